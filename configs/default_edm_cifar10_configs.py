"""EDM (Karras et al. 2022) CIFAR-10 training settings, Table 7 (config F), shared by the DDPM++ and
NCSN++ configs of configs/edm/

As in EDM: x_t = x_0 + t n on [0.002, 80] (EDMSDE), EDM preconditioning with sigma_data 0.5, the
EDM loss (ln sigma ~ N(-1.2, 1.2^2)), batch 512, Adam lr 1e-3 (betas 0.9 / 0.999, eps 1e-8), no
gradient clipping, lr ramp-up over 10 Mimg (19,531 steps), 200 Mimg (390,625 steps), dropout 0.13,
EMA half-life 0.5 Mimg (a per-step rate 0.5^(512 / 500000) = 0.99929), channel_mult (2, 2, 2) at 128
channels, 4 blocks per resolution, attention at 16x16; Heun sampling with 18 steps (35 NFE).

What differs from EDM's code, and why:
  * no augmentation (EDM: non-leaky augmentation with probability 0.12 and the augmentation
    labels as network conditioning; there is no augmentation pipeline here), so expect an FID
    somewhat above EDM's 1.97;
  * the networks are score_sde's NCSN++ / DDPM++ (parameter-compatible with the released score_sde
    checkpoints), not EDM's re-implementation (SongUNet); the DDPM++ one embeds Fourier features of
    ln sigma (fourier_scale 4 = EDM's 16 on c_noise = ln(sigma) / 4) where EDM's DDPM++ uses a
    positional embedding of c_noise: this framework's EDM preconditioning labels networks with
    sigma (score_sde.parametrizations);
  * the EMA is a constant per-step rate (EDM ramps its EMA up at the start of training).
"""
import math

from configs.default_cifar10_configs import get_default_configs


def get_edm_config(arch: str):
  config = get_default_configs()
  training = config.training
  training.sde = "edmsde"
  training.continuous = True
  training.reduce_mean = True
  training.loss = "edm"
  training.batch_size = 512
  training.n_iters = 390625          # 200 Mimg / 512
  training.snapshot_freq = 25000
  training.snapshot_freq_for_preemption = 5000
  config.sampling.method = "heun"
  config.sampling.nfe = 35
  config.data.centered = True
  model = config.model
  model.name = "ncsnpp"
  model.parametrization = "edm"
  model.sigma_data = 0.5
  model.sigma_min = 0.002
  model.sigma_max = 80        # an int in the reference schema (its 50)
  model.scale_by_sigma = False
  model.ema_rate = round(0.5 ** (512 / 500000), 6)
  model.dropout = 0.13
  model.normalization = "GroupNorm"
  model.nonlinearity = "swish"
  model.nf = 128
  model.ch_mult = (2, 2, 2)
  model.num_res_blocks = 4
  model.attn_resolutions = (16,)
  model.resamp_with_conv = True
  model.conditional = True
  model.skip_rescale = True
  model.resblock_type = "biggan"
  model.progressive = "none"
  model.progressive_combine = "sum"
  model.attention_type = "ddpm"
  model.init_scale = 0.0
  model.embedding_type = "fourier"
  model.fourier_scale = 4
  model.conv_size = 3
  if arch == "ddpmpp":      # EDM's "VP" architecture
    model.fir = False
    model.fir_kernel = [1, 3, 3, 1]
    model.progressive_input = "none"
  elif arch == "ncsnpp":    # EDM's "VE" architecture
    model.fir = True
    model.fir_kernel = [1, 3, 3, 1]
    model.progressive_input = "residual"
  else:
    raise ValueError(f"Unknown EDM architecture {arch!r}; 'ddpmpp' or 'ncsnpp'.")
  optim = config.optim
  optim.lr = 1e-3
  optim.beta1 = 0.9
  optim.eps = 1e-8
  optim.grad_clip = -1.0            # none
  optim.warmup = math.ceil(10e6 / 512)   # 19,531 steps
  return config
