"""Toy 2-D data (default: Gaussian mixture), vpsde SDE, continuous DSM training."""
from configs.default_toy_configs import get_default_configs


def get_config():
  config = get_default_configs()
  config.training.sde = "vpsde"
  return config
