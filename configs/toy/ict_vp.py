"""Toy 2-D mixture, VP SDE: improved consistency training (iCT, Song & Dhariwal 2024) without a
teacher: N from 10 to 1280 over training, lognormal times, pseudo-Huber loss, no target EMA."""
from configs.default_consistency import add_consistency_fields
from configs.default_toy_configs import get_default_configs


def get_config():
  config = get_default_configs()
  config.training.sde = "vpsde"
  config.model.sigma_data = 2.87
  add_consistency_fields(config, "consistency_training")
  return config
