"""Defaults for the embedded 2-D toy sets (no download; the README's quick-start job).

Every field users touch is documented in docs/configs.md. Variants in configs/toy/ set the SDE.
"""
import ml_collections
from ml_collections.config_dict import placeholder

from configs.default_image_eval import add_image_eval_fields


def get_default_configs() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 42

  config.training = training = ml_collections.ConfigDict()
  training.batch_size = 512          # global batch, split over all devices of all hosts
  training.n_iters = 8000
  training.n_jitted_steps = 50       # optimizer steps per compiled call (lax.scan)
  training.log_freq = 100
  training.eval_freq = 500
  training.snapshot_freq = 8000      # kept checkpoints (each one is evaluated by --mode eval)
  training.snapshot_freq_for_preemption = 1000  # rolling checkpoint, overwritten
  training.posthoc_ema_every = 0     # post-hoc EMA snapshots every this many steps; 0: off
  training.posthoc_ema_sigma_rels = (0.05, 0.10)  # tracked power-EMA widths (docs/posthoc_ema.md)
  training.snapshot_sampling = True
  training.max_to_keep = 5
  training.likelihood_weighting = False
  training.continuous = True
  training.reduce_mean = True
  training.sde = "vpsde"
  training.nan_policy = "stop"       # 'stop' | 'skip' non-finite updates
  training.loss = "dsm"              # 'dsm' | 'eps' | 'x0' | 'v' | 'flow_matching' | 'edm'
  training.micro_batches = 1         # gradient accumulation inside the step
  training.param_sharding = "replicated"  # or 'fsdp' (docs/distributed.md)
  training.t_sampling = placeholder(str)   # None: the loss's ('uniform'; 'lognormal' for 'edm')
  training.t_mean = placeholder(float)     # logit_normal / lognormal location (None: 0 / -1.2)
  training.t_std = placeholder(float)      # logit_normal / lognormal scale (None: 1 / 1.2)

  config.sampling = sampling = ml_collections.ConfigDict()
  sampling.method = "pc"             # any name in score_sde.sampling.available_samplers()
  sampling.predictor = "euler_maruyama"
  sampling.corrector = "none"
  sampling.n_steps_each = 1
  sampling.noise_removal = True
  sampling.probability_flow = False
  sampling.snr = 0.16
  sampling.num_samples = 1000        # for --mode sample and snapshot sampling
  sampling.batch_size = 1000
  sampling.rtol = 1e-5               # ODE sampler tolerances
  sampling.atol = 1e-5
  sampling.ode_method = "dopri5"
  sampling.nfe = 20                  # fast samplers
  sampling.options = ml_collections.ConfigDict()  # extra keyword options for the sampler

  config.eval = evaluate = ml_collections.ConfigDict()
  evaluate.begin_ckpt = 1
  evaluate.end_ckpt = -1             # -1: every checkpoint present
  evaluate.batch_size = 1000
  evaluate.enable_loss = True
  evaluate.enable_bpd = True
  evaluate.num_bpd_samples = 2000
  evaluate.bpd_repeats = 1
  evaluate.enable_sampling = True
  evaluate.num_samples = 2000        # energy distance to held-out data (and its floor)
  evaluate.hutchinson_type = "exact"  # exact trace is cheap in 2-D
  evaluate.rtol = 1e-5
  evaluate.atol = 1e-5
  evaluate.sigma_rel = placeholder(float)  # a post-hoc EMA width: eval / sample its reconstruction
  add_image_eval_fields(evaluate)         # FID / IS / KID of image samples

  config.data = data = ml_collections.ConfigDict()
  data.dataset = "gmm"               # gmm | checkerboard | swiss_roll | rings
  data.dim = 2
  data.centered = True
  data.data_dir = placeholder(str)   # image sets: local data (MNIST idx / tfds dir); None: tfds
  data.num_components = 8            # gmm: components on a circle of gmm_radius
  data.gmm_radius = 4.0
  data.gmm_std = 0.5
  data.random_flip = False
  data.uniform_dequantization = False

  config.model = model = ml_collections.ConfigDict()
  model.name = "toy_mlp"
  model.nf = 128
  model.num_layers = 4
  model.embedding_type = "fourier"
  model.fourier_scale = 1.0          # of log(label): a smooth time embedding
  model.scale_by_sigma = True
  model.ema_rate = 0.999
  model.parametrization = placeholder(str)  # None: the SDE's ('eps' VP, 'score' VE, 'edm' EDM)
  model.sigma_data = 0.5             # EDM preconditioning / loss
  model.remat = "none"               # 'none' | 'blocks' | 'full' (docs/configs.md)
  model.dropout = 0.0
  model.sigma_min = 0.01
  model.sigma_max = 12.0
  model.num_scales = 1000
  model.beta_min = 0.1
  model.beta_max = 20.0
  model.dtype = "float32"

  config.optim = optim = ml_collections.ConfigDict()
  optim.optimizer = "Adam"
  optim.lr = 2e-3
  optim.beta1 = 0.9
  optim.eps = 1e-8
  optim.weight_decay = 0.0
  optim.warmup = 200
  optim.lr_decay = "cosine"          # to 0 at n_iters
  optim.grad_clip = 1.0
  return config
