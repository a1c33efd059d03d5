"""MNIST, small U-Net, vesde SDE, continuous DSM training."""
from configs.default_mnist_configs import get_default_configs


def get_config():
  config = get_default_configs()
  config.training.sde = "vesde"
  config.data.centered = False
  config.sampling.predictor = "reverse_diffusion"
  config.sampling.corrector = "langevin"
  return config
