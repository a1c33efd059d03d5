"""CIFAR-10 in pixel space, DiT-S/2 (16x16 = 256 tokens of 2x2 patches), VP SDE, continuous DSM:
the DDPM++ cont. (VP) training setup (configs/vp/cifar10_ddpmpp_continuous.py) with the
transformer, at DiT's learning rate and EMA. Larger models: --config.model.hidden_size /
depth / num_heads (configs/dit/default_dit_configs.py lists DiT's sizes)."""
from configs.default_cifar10_configs import get_default_configs
from configs.dit.default_dit_configs import set_dit_model


def get_config():
  config = get_default_configs()
  training = config.training
  training.sde = "vpsde"
  training.continuous = True
  training.reduce_mean = True
  sampling = config.sampling
  sampling.method = "pc"
  sampling.predictor = "euler_maruyama"
  sampling.corrector = "none"
  config.data.centered = True
  model = config.model
  model.scale_by_sigma = False
  model.ema_rate = 0.9999
  model.embedding_type = "positional"
  model.fourier_scale = 16.0
  set_dit_model(config, "S", 2)
  config.optim.lr = 1e-4
  return config
