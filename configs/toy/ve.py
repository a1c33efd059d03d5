"""Toy 2-D data (default: Gaussian mixture), vesde SDE, continuous DSM training."""
from configs.default_toy_configs import get_default_configs


def get_config():
  config = get_default_configs()
  config.training.sde = "vesde"
  config.sampling.predictor = "reverse_diffusion"
  config.sampling.corrector = "langevin"
  return config
