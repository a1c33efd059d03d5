"""NCSN++ cont. on CelebAHQ 1024x1024, VE SDE (paper Fig. 1 / appendix)."""
from ml_collections.config_dict import placeholder

from configs.default_lsun_configs import get_default_configs


def get_config():
  config = get_default_configs()
  # training
  training = config.training
  training.batch_size = 8
  training.n_iters = 2400000  # reference: 2400001, its range() end
  training.sde = 'vesde'
  training.continuous = True
  training.reduce_mean = False
  # sampling
  sampling = config.sampling
  sampling.method = 'pc'
  sampling.predictor = 'reverse_diffusion'
  sampling.corrector = 'langevin'
  sampling.snr = 0.15
  # evaluation
  evaluate = config.eval
  evaluate.batch_size = 1024
  evaluate.begin_ckpt = 1
  evaluate.end_ckpt = 96
  # data
  data = config.data
  data.dataset = 'CelebAHQ'
  data.image_size = 1024
  data.tfrecords_path = placeholder(str)  # None; set it to your celebahq r10 tfrecords
  # model
  model = config.model
  model.sigma_max = 1348
  model.sigma_min = 0.01
  model.num_scales = 2000
  model.dropout = 0.
  model.name = 'ncsnpp'
  model.scale_by_sigma = True
  model.ema_rate = 0.9999
  model.normalization = 'GroupNorm'
  model.nonlinearity = 'swish'
  model.nf = 16
  model.ch_mult = (1, 2, 4, 8, 16, 32, 32, 32)
  model.num_res_blocks = 1
  model.attn_resolutions = (16,)
  model.resamp_with_conv = True
  model.conditional = True
  model.fir = True
  model.fir_kernel = [1, 3, 3, 1]
  model.skip_rescale = True
  model.resblock_type = 'biggan'
  model.progressive = 'output_skip'
  model.progressive_input = 'input_skip'
  model.progressive_combine = 'sum'
  model.attention_type = 'ddpm'
  model.init_scale = 0.
  model.fourier_scale = 16
  model.conv_size = 3
  model.embedding_type = 'fourier'
  return config
