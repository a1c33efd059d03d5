"""Toy 2-D data (default: Gaussian mixture), subvpsde SDE, continuous DSM training."""
from configs.default_toy_configs import get_default_configs


def get_config():
  config = get_default_configs()
  config.training.sde = "subvpsde"
  return config
