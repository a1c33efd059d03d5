"""Defaults for CIFAR-10 (32x32x3), the original score_sde's `default_cifar10_configs.py`.

Field names and values are the reference's; the per-model files in vp/, subvp/ and ve/ override the
model and SDE. `add_runtime_fields` adds this framework's extra knobs (checkpoint retention, NaN
policy, snapshot sample count, ODE tolerances, mixed precision) with neutral defaults.
"""
import ml_collections
from ml_collections.config_dict import placeholder

from configs.default_image_eval import add_image_eval_fields


def add_runtime_fields(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Fields this framework reads beyond the reference schema (same names as the toy defaults)."""
  config.training.max_to_keep = 5
  config.training.nan_policy = "stop"           # 'stop' | 'skip' non-finite updates
  config.training.loss = "dsm"                  # see configs/default_toy_configs.py
  config.training.t_sampling = placeholder(str)
  config.training.t_mean = placeholder(float)
  config.training.t_std = placeholder(float)
  config.model.parametrization = placeholder(str)  # None: the SDE's
  config.model.sigma_data = 0.5
  config.training.micro_batches = 1            # gradient accumulation inside the step
  config.training.param_sharding = "replicated"  # or 'fsdp'
  # 'none' | 'elementwise' | 'blocks' | 'full' (score_sde/models/remat.py): 'elementwise' keeps
  # every block's conv / matmul outputs and recomputes the rest (NCSN++ / DDPM++ / DDPM: about half
  # the activation memory, no extra convolution; docs/networks.md). NCSN / NCSNv2 set 'none'.
  config.model.remat = "elementwise"
  sampling = config.sampling
  sampling.method = "pc"
  sampling.predictor = "euler_maruyama"
  sampling.corrector = "none"
  sampling.num_samples = 64                     # snapshot / --mode sample
  sampling.batch_size = 64
  sampling.rtol = 1e-5
  sampling.atol = 1e-5
  sampling.ode_method = "dopri5"
  sampling.nfe = 20
  sampling.options = ml_collections.ConfigDict()
  evaluate = config.eval
  evaluate.num_bpd_samples = 10000
  evaluate.bpd_repeats = 1
  evaluate.hutchinson_type = "rademacher"
  evaluate.rtol = 1e-5
  evaluate.atol = 1e-5
  add_image_eval_fields(evaluate)         # FID / IS / KID of image samples
  evaluate.sigma_rel = placeholder(float)  # a post-hoc EMA width: eval / sample its reconstruction
  config.training.posthoc_ema_every = 0          # post-hoc EMA snapshots every this many steps
  config.training.posthoc_ema_sigma_rels = (0.05, 0.10)  # (docs/posthoc_ema.md); 0: off
  config.data.data_dir = placeholder(str)  # None: tfds' default data directory
  config.model.dtype = "float32"                # 'bfloat16': bf16 compute, f32 params / output
  return config


def get_default_configs() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  # training
  config.training = training = ml_collections.ConfigDict()
  training.batch_size = 128
  training.n_iters = 1300000  # reference: 1300001, its range() end
  training.snapshot_freq = 50000
  training.log_freq = 50
  training.eval_freq = 100
  training.snapshot_freq_for_preemption = 10000  # extra checkpoints for preemption
  training.snapshot_sampling = True              # produce samples at each snapshot
  training.likelihood_weighting = False
  training.continuous = True
  training.n_jitted_steps = 5
  training.reduce_mean = False
  training.sde = "vesde"

  # sampling
  config.sampling = sampling = ml_collections.ConfigDict()
  sampling.n_steps_each = 1
  sampling.noise_removal = True
  sampling.probability_flow = False
  sampling.snr = 0.16

  # evaluation
  config.eval = evaluate = ml_collections.ConfigDict()
  evaluate.begin_ckpt = 9
  evaluate.end_ckpt = 26
  evaluate.batch_size = 1024
  evaluate.enable_sampling = False
  evaluate.num_samples = 50000
  evaluate.enable_loss = True
  evaluate.enable_bpd = False
  evaluate.bpd_dataset = "test"

  # data
  config.data = data = ml_collections.ConfigDict()
  data.dataset = "CIFAR10"
  data.image_size = 32
  data.random_flip = True
  data.centered = False
  data.uniform_dequantization = False
  data.num_channels = 3

  # model
  config.model = model = ml_collections.ConfigDict()
  model.sigma_min = 0.01
  model.sigma_max = 50
  model.num_scales = 1000
  model.beta_min = 0.1
  model.beta_max = 20.
  model.dropout = 0.1
  model.embedding_type = "fourier"

  # optimization
  config.optim = optim = ml_collections.ConfigDict()
  optim.weight_decay = 0
  optim.optimizer = "Adam"
  optim.lr = 2e-4
  optim.beta1 = 0.9
  optim.eps = 1e-8
  optim.warmup = 5000
  optim.grad_clip = 1.

  config.seed = 42
  return add_runtime_fields(config)
