"""Defaults for MNIST with the small U-Net (trains on a laptop CPU; scales to GPU/TPU).

Data come from tfds (`data.data_dir=None`) or from a directory holding the four standard idx files
(`--config.data.data_dir=/path/to/mnist`, .gz or not).
"""
from ml_collections.config_dict import placeholder

from configs.default_toy_configs import get_default_configs as _toy_defaults


def get_default_configs():
  config = _toy_defaults()
  training = config.training
  training.batch_size = 128
  training.n_iters = 20000
  training.n_jitted_steps = 5
  training.log_freq = 50
  training.eval_freq = 1000
  training.snapshot_freq = 5000
  training.snapshot_freq_for_preemption = 1000

  sampling = config.sampling
  sampling.num_samples = 64
  sampling.batch_size = 64

  evaluate = config.eval
  evaluate.batch_size = 256
  evaluate.num_bpd_samples = 1024
  evaluate.hutchinson_type = "rademacher"
  evaluate.num_samples = 256
  evaluate.enable_sampling = False   # FID needs Inception weights and fid_stats (docs/evaluation.md)

  data = config.data
  data.dataset = "mnist"
  data.dim = placeholder(int)        # None: image data (shape from image_size, num_channels)
  data.image_size = 28
  data.num_channels = 1
  data.centered = True
  data.random_flip = False
  data.uniform_dequantization = True

  model = config.model
  model.name = "small_unet"
  model.nf = 32
  model.ch_mult = (1, 2, 2)
  model.num_res_blocks = 1
  model.dropout = 0.1
  model.fourier_scale = 16.0
  model.ema_rate = 0.999
  model.sigma_min = 0.01
  model.sigma_max = 50.0

  optim = config.optim
  optim.lr = 2e-4
  optim.warmup = 1000
  optim.lr_decay = "constant"        # the reference's schedule (the toy defaults decay)
  return config
