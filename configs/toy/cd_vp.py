"""Toy 2-D mixture, VP SDE: a consistency model distilled (CD, Song et al. 2023) from the exact
score of the mixture (``consistency.teacher='exact'``), Heun teacher steps on N = 18 EDM-rho
times, target EMA mu = 0.95, l2 metric; one-step consistency sampling.

sigma_data = 2.87: the per-coordinate std of the default mixture (as configs/toy/edm.py).
"""
from configs.default_consistency import add_consistency_fields
from configs.default_toy_configs import get_default_configs


def get_config():
  config = get_default_configs()
  config.training.sde = "vpsde"
  config.model.sigma_data = 2.87
  add_consistency_fields(config, "consistency_distillation", teacher="exact", solver="heun",
                         num_scales=18, target_ema=0.95, metric="l2")
  return config
