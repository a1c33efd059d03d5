"""MNIST, small U-Net, subvpsde SDE, continuous DSM training."""
from configs.default_mnist_configs import get_default_configs


def get_config():
  config = get_default_configs()
  config.training.sde = "subvpsde"
  return config
