"""Toy 2-D data, EDM (Karras et al. 2022): x_t = x_0 + t n on [0.002, 80], EDM preconditioning, the
EDM loss (ln sigma ~ N(-1.2, 1.2^2)), Heun sampling at 35 NFE with EDM's rho = 7 steps.

sigma_data = 2.87: the per-coordinate std of the default mixture (8 components on a circle of
radius 4, std 0.5: sqrt(4^2 / 2 + 0.5^2)); EDM's 0.5 is for images in [-1, 1].
"""
from configs.default_toy_configs import get_default_configs


def get_config():
  config = get_default_configs()
  config.training.sde = "edmsde"
  config.training.loss = "edm"
  config.model.parametrization = "edm"
  config.model.sigma_data = 2.87
  config.model.scale_by_sigma = False   # the preconditioning scales input and output
  config.model.sigma_min = 0.002
  config.model.sigma_max = 80.0
  config.sampling.method = "heun"
  config.sampling.nfe = 35
  return config
