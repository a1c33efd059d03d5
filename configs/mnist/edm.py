"""MNIST, small U-Net, EDM: x_t = x_0 + t n on [0.002, 80], EDM preconditioning (sigma_data 0.5,
data in [-1, 1]), EDM loss, Heun sampling at 35 NFE."""
from configs.default_mnist_configs import get_default_configs


def get_config():
  config = get_default_configs()
  config.training.sde = "edmsde"
  config.training.loss = "edm"
  config.model.parametrization = "edm"
  config.model.sigma_data = 0.5
  config.model.scale_by_sigma = False
  config.model.fourier_scale = 4.0   # of ln sigma: EDM's 16 of c_noise = ln(sigma) / 4
  config.model.sigma_min = 0.002
  config.model.sigma_max = 80.0
  config.sampling.method = "heun"
  config.sampling.nfe = 35
  return config
