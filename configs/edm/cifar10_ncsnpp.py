"""EDM on CIFAR-10 with NCSN++ (EDM's "VE" setup, Table 7 config F); see configs/default_edm_cifar10_configs.py."""
from configs.default_edm_cifar10_configs import get_edm_config


def get_config():
  return get_edm_config("ncsnpp")
