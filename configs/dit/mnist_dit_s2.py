"""MNIST in pixel space, DiT-S/2 (14x14 = 196 tokens of 2x2 patches, 33M parameters), VP SDE,
continuous DSM training: the MNIST U-Net's setting (configs/mnist/vp_continuous.py) with the
transformer instead, at DiT's learning rate.

Other processes / losses by override, e.g. EDM: --config.training.sde=edmsde
--config.training.loss=edm --config.model.parametrization=edm --config.model.embedding_type=fourier
--config.model.fourier_scale=4 --config.model.sigma_min=0.002 --config.model.sigma_max=80
(configs/mnist/edm.py lists the rest); docs/networks.md#dit.
"""
from configs.default_mnist_configs import get_default_configs
from configs.dit.default_dit_configs import set_dit_model


def get_config():
  config = get_default_configs()
  config.training.sde = "vpsde"
  config.model.embedding_type = "positional"   # labels 999 t, DiT's timestep scale
  set_dit_model(config, "S", 2)
  config.optim.lr = 1e-4
  return config
