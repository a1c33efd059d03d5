"""DiT (Peebles & Xie 2023) model fields and DiT's reference setting.

``set_dit_model(config, size, patch)`` turns any config into a DiT-<size>/<patch> one
(``model.name = 'dit'``; the U-Net-only fields are removed). Sizes (depth, hidden size, heads):
S (12, 384, 6), B (12, 768, 12), L (24, 1024, 16), XL (28, 1152, 16); patch sizes 2, 4, 8.

``reference_config('XL/2')`` is DiT's ImageNet-256 setting: 32x32x4 Stable-Diffusion VAE latents,
1000 classes (+ the null class), the learned-sigma head (8 output channels, unused by our
samplers), discrete VP labels 0..999 (betas linspace(1e-4, 0.02, 1000) = beta_min 0.1, beta_max
20), AdamW lr 1e-4 without weight decay or warm-up, batch 256, EMA 0.9999. It exists for the
architecture (parameter counts: tests/test_dit.py, README) and is not a run config: this framework
has no latent ImageNet pipeline (data.dataset names DiT's data, not one of ours). The trainable
pixel-space configs are mnist_dit_s2.py and cifar10_dit_s2.py next to this file.
"""
import ml_collections

from configs.default_cifar10_configs import get_default_configs as _cifar10_defaults

# name -> (depth, hidden_size, num_heads); the same table as score_sde.models.dit.DIT_SIZES
# (tests/test_dit.py checks they agree; configs do not import the library).
DIT_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
PATCH_SIZES = (2, 4, 8)
REFERENCE_NAMES = tuple(f"{s}/{p}" for s in DIT_SIZES for p in PATCH_SIZES)
_UNET_FIELDS = ("nf", "ch_mult", "num_res_blocks", "attn_resolutions", "num_layers")


def set_dit_model(config: ml_collections.ConfigDict, size: str, patch: int,
                  learn_sigma: bool = False) -> ml_collections.ConfigDict:
  """DiT-<size>/<patch> in ``config.model`` (in place; returned)."""
  if size not in DIT_SIZES:
    raise ValueError(f"Unknown DiT size {size!r}; choose one of {sorted(DIT_SIZES)}.")
  depth, hidden, heads = DIT_SIZES[size]
  model = config.model
  for field in _UNET_FIELDS:
    if field in model:
      del model[field]
  model.name = "dit"
  model.hidden_size = hidden
  model.depth = depth
  model.num_heads = heads
  model.patch_size = patch
  model.mlp_ratio = 4.0
  model.learn_sigma = learn_sigma
  model.dropout = 0.0           # DiT has no dropout
  return config


def reference_config(name: str = "XL/2") -> ml_collections.ConfigDict:
  """DiT's ImageNet-256 latent setting for ``name`` in :data:`REFERENCE_NAMES` (module
  docstring)."""
  size, _, patch = name.partition("/")
  if name not in REFERENCE_NAMES:
    raise ValueError(f"Unknown DiT reference {name!r}; choose one of {REFERENCE_NAMES}.")
  config = _cifar10_defaults()
  training = config.training
  training.sde = "vpsde"
  training.continuous = False          # integer timesteps 0..999, DiT's labels
  training.reduce_mean = True
  training.batch_size = 256
  training.n_iters = 400000
  data = config.data
  data.dataset = "imagenet_256_sd_vae_latents"   # DiT's data; not a dataset of this framework
  data.image_size = 32
  data.num_channels = 4
  data.centered = True
  data.random_flip = True
  model = config.model
  model.num_classes = 1000
  model.embedding_type = "positional"
  model.scale_by_sigma = False
  model.ema_rate = 0.9999
  model.fourier_scale = 16.0
  set_dit_model(config, size, int(patch), learn_sigma=True)
  config.training.label_dropout = 0.1
  optim = config.optim
  optim.lr = 1e-4
  optim.warmup = 0
  optim.weight_decay = 0
  optim.grad_clip = -1.0
  config.sampling.method = "pc"
  config.sampling.predictor = "ancestral_sampling"
  config.sampling.corrector = "none"
  return config


def get_default_configs() -> ml_collections.ConfigDict:
  return reference_config("XL/2")
