"""Common layers of the score networks: DDPM blocks and the NCSN / NCSNv2 RefineNet blocks.

All modules work on NHWC images ``[batch, H, W, C]``. Module class names, the order in which
sub-modules are created, and parameter names follow the original score_sde Flax code, so that
automatically assigned names (``Conv_0``, ``NIN_2``, ``GroupNorm_1`` ...) and shapes of a parameter
tree match the released checkpoints.

Mixed precision: every module takes ``dtype`` (the compute dtype). Parameters are always created
in float32; they are cast to ``dtype`` where used.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from score_sde.models import up_or_down_sampling as updown
from score_sde.models.conv import Conv

# ``nn.Conv`` applied to the x2 nearest-upsampled input, computed at the input's resolution
# (:func:`up_or_down_sampling.naive_upsample_conv`); same class, so parameter names are unchanged.
UpsampleConv = functools.partial(nn.Conv, conv_general_dilated=updown.naive_upsample_conv)

Array = jax.Array
Dtype = Any

_ACTIVATIONS = {
    "elu": nn.elu,
    "relu": nn.relu,
    "lrelu": functools.partial(nn.leaky_relu, negative_slope=0.2),
    "swish": nn.swish,
}


def get_act(config) -> Callable[[Array], Array]:
  """The activation named by ``config.model.nonlinearity`` (elu | relu | lrelu | swish)."""
  name = str(config.model.nonlinearity).lower()
  if name not in _ACTIVATIONS:
    raise ValueError(f"config.model.nonlinearity={config.model.nonlinearity!r} is unknown; choose "
                     f"one of {sorted(_ACTIVATIONS)}.")
  return _ACTIVATIONS[name]


def get_dtype(config) -> Dtype:
  """Compute dtype from ``config.model.dtype`` ('float32' default, or 'bfloat16')."""
  name = str(config.model.get("dtype", "float32")).lower()
  if name not in ("float32", "bfloat16"):
    raise ValueError(f"config.model.dtype={name!r} is unknown; choose 'float32' or 'bfloat16'.")
  return jnp.float32 if name == "float32" else jnp.bfloat16


def default_init(scale: float = 1.0):
  """DDPM initialization: variance scaling, fan_avg, uniform (scale 0 -> 1e-10)."""
  scale = 1e-10 if scale == 0 else scale
  return nn.initializers.variance_scaling(scale, "fan_avg", "uniform")


def _ncsn_init(init_scale: float, kernel_shape):
  """PyTorch's default conv init (NCSN / NCSNv2): U(+-sqrt(init_scale / fan_in))."""
  init_scale = 1e-10 if init_scale == 0 else init_scale
  kernel_init = nn.initializers.variance_scaling(init_scale / 3, "fan_in", "uniform")
  bias_init = lambda key, shape, dtype=jnp.float32: kernel_init(key, kernel_shape, dtype)[0, 0, 0, :]
  return kernel_init, bias_init


def ncsn_conv1x1(x: Array, out_planes: int, stride: int = 1, bias: bool = True, dilation: int = 1,
                 init_scale: float = 1.0, dtype: Dtype = jnp.float32) -> Array:
  """1x1 conv with PyTorch initialization (NCSN / NCSNv2); created in the caller's scope."""
  kernel_init, bias_init = _ncsn_init(init_scale, (1, 1, x.shape[-1], out_planes))
  return Conv(out_planes, kernel_size=(1, 1), strides=(stride, stride), padding="SAME",
                 use_bias=bias, kernel_dilation=(dilation, dilation), kernel_init=kernel_init,
                 bias_init=bias_init, dtype=dtype)(x)


def ncsn_conv3x3(x: Array, out_planes: int, stride: int = 1, bias: bool = True, dilation: int = 1,
                 init_scale: float = 1.0, dtype: Dtype = jnp.float32) -> Array:
  """3x3 conv with PyTorch initialization (NCSN / NCSNv2); created in the caller's scope."""
  kernel_init, bias_init = _ncsn_init(init_scale, (3, 3, x.shape[-1], out_planes))
  return Conv(out_planes, kernel_size=(3, 3), strides=(stride, stride), padding="SAME",
                 use_bias=bias, kernel_dilation=(dilation, dilation), kernel_init=kernel_init,
                 bias_init=bias_init, dtype=dtype)(x)


def ddpm_conv1x1(x: Array, out_planes: int, stride: int = 1, bias: bool = True, dilation: int = 1,
                 init_scale: float = 1.0, dtype: Dtype = jnp.float32,
                 upsample: bool = False) -> Array:
  """1x1 conv with DDPM initialization; created in the caller's scope (``Conv_i``).

  ``upsample``: the conv of ``naive_upsample_2d(x, 2)`` (:data:`UpsampleConv`)."""
  conv = UpsampleConv if upsample else Conv
  return conv(out_planes, kernel_size=(1, 1), strides=(stride, stride), padding="SAME",
              use_bias=bias, kernel_dilation=(dilation, dilation),
              kernel_init=default_init(init_scale), bias_init=nn.initializers.zeros,
              dtype=dtype)(x)


def ddpm_conv3x3(x: Array, out_planes: int, stride: int = 1, bias: bool = True, dilation: int = 1,
                 init_scale: float = 1.0, dtype: Dtype = jnp.float32,
                 upsample: bool = False) -> Array:
  """3x3 conv with DDPM initialization; created in the caller's scope (``Conv_i``).

  ``upsample``: the conv of ``naive_upsample_2d(x, 2)``, computed as four 2x2 convs at x's
  resolution (:data:`UpsampleConv`: 16 / 36 of the multiply-adds, same values to round-off)."""
  conv = UpsampleConv if upsample else Conv
  return conv(out_planes, kernel_size=(3, 3), strides=(stride, stride), padding="SAME",
              use_bias=bias, kernel_dilation=(dilation, dilation),
              kernel_init=default_init(init_scale), bias_init=nn.initializers.zeros,
              dtype=dtype)(x)


def get_timestep_embedding(timesteps: Array, embedding_dim: int, max_positions: int = 10000):
  """Sinusoidal embedding ``[batch] -> [batch, embedding_dim]`` (see ``models.embeddings``)."""
  from score_sde.models.embeddings import get_timestep_embedding as _emb
  return _emb(timesteps, embedding_dim, max_positions=max_positions)


# ----------------------------------------------------------------------------------------------
# DDPM (Ho et al. 2020) blocks.
# ----------------------------------------------------------------------------------------------


class NIN(nn.Module):
  """Per-pixel dense layer ``y = x W + b`` with ``W [C_in, num_units]`` (params ``W``, ``b``)."""
  num_units: int
  init_scale: float = 0.1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    w = self.param("W", default_init(scale=self.init_scale), (x.shape[-1], self.num_units))
    b = self.param("b", nn.initializers.zeros, (self.num_units,))
    return (jnp.tensordot(x.astype(self.dtype), w.astype(self.dtype), axes=1)
            + b.astype(self.dtype))


def attention(q: Array, k: Array, v: Array) -> Array:
  """Single-head spatial self-attention over all ``H W`` positions of NHWC ``q, k, v``.

  ``w[b, hw, h'w'] = softmax_{h'w'}(q . k / sqrt(C))``; ``out = sum_{h'w'} w v``. Softmax in f32.
  """
  b, h, w, c = q.shape
  logits = jnp.einsum("bhwc,bHWc->bhwHW", q, k).astype(jnp.float32) * (c ** -0.5)
  weights = jax.nn.softmax(logits.reshape(b, h, w, h * w), axis=-1).reshape(b, h, w, h, w)
  return jnp.einsum("bhwHW,bHWc->bhwc", weights.astype(v.dtype), v)


class AttnBlock(nn.Module):
  """DDPM self-attention block: ``x + NIN(attention(NIN(n), NIN(n), NIN(n)))``, ``n = norm(x)``."""
  normalize: Any
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c = x.shape[-1]
    h = self.normalize(dtype=self.dtype)(x)
    q = NIN(c, dtype=self.dtype)(h)
    k = NIN(c, dtype=self.dtype)(h)
    v = NIN(c, dtype=self.dtype)(h)
    h = NIN(c, init_scale=0.0, dtype=self.dtype)(attention(q, k, v))
    return x + h


class Upsample(nn.Module):
  """Nearest-neighbour x2 upsampling, then an optional 3x3 conv."""
  with_conv: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    if self.with_conv:
      return ddpm_conv3x3(x, x.shape[-1], dtype=self.dtype, upsample=True)
    return updown.naive_upsample_2d(x, 2)


class Downsample(nn.Module):
  """x2 downsampling: stride-2 3x3 conv, or 2x2 mean pooling."""
  with_conv: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    if self.with_conv:
      return ddpm_conv3x3(x, x.shape[-1], stride=2, dtype=self.dtype)
    return nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2), padding="SAME")


class ResnetBlockDDPM(nn.Module):
  """DDPM ResNet block: ``x' + conv(drop(act(norm(conv(act(norm(x))) + Dense(act(temb))))))``."""
  act: Any
  normalize: Any
  out_ch: Optional[int] = None
  conv_shortcut: bool = False
  dropout: float = 0.5
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, temb: Optional[Array] = None, train: bool = True) -> Array:
    c = x.shape[-1]
    out_ch = self.out_ch or c
    h = self.act(self.normalize(dtype=self.dtype)(x))
    h = ddpm_conv3x3(h, out_ch, dtype=self.dtype)
    if temb is not None:
      h = h + nn.Dense(out_ch, kernel_init=default_init(), dtype=self.dtype)(
          self.act(temb))[:, None, None, :]
    h = self.act(self.normalize(dtype=self.dtype)(h))
    h = nn.Dropout(self.dropout)(h, deterministic=not train)
    h = ddpm_conv3x3(h, out_ch, init_scale=0.0, dtype=self.dtype)
    if c != out_ch:
      if self.conv_shortcut:
        x = ddpm_conv3x3(x, out_ch, dtype=self.dtype)
      else:
        x = NIN(out_ch, dtype=self.dtype)(x)
    return x + h


# ----------------------------------------------------------------------------------------------
# NCSN / NCSNv2 RefineNet blocks (ported from ermongroup/ncsn and ermongroup/ncsnv2).
# ----------------------------------------------------------------------------------------------


def _resize(h: Array, shape: Sequence[int], interpolation: str) -> Array:
  methods = {"bilinear": "bilinear", "nearest_neighbor": "nearest"}
  if interpolation not in methods:
    raise ValueError(f"config.model.interpolation={interpolation!r} is unknown; choose one of "
                     f"{sorted(methods)}.")
  return jax.image.resize(h, (h.shape[0], *shape, h.shape[-1]), methods[interpolation])


class CRPBlock(nn.Module):
  """Chained residual pooling (NCSNv2): ``x += conv(maxpool5(path))`` ``n_stages`` times."""
  features: int
  n_stages: int
  act: Any = nn.relu
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = self.act(x)
    path = x
    for _ in range(self.n_stages):
      path = nn.max_pool(path, window_shape=(5, 5), strides=(1, 1), padding="SAME")
      path = ncsn_conv3x3(path, self.features, stride=1, bias=False, dtype=self.dtype)
      x = path + x
    return x


class CondCRPBlock(nn.Module):
  """Noise-conditional chained residual pooling (NCSN): norm, 5x5 mean pool, conv."""
  features: int
  n_stages: int
  normalizer: Any
  act: Any = nn.relu
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, y: Array) -> Array:
    x = self.act(x)
    path = x
    for _ in range(self.n_stages):
      path = self.normalizer(dtype=self.dtype)(path, y)
      path = nn.avg_pool(path, window_shape=(5, 5), strides=(1, 1), padding="SAME")
      path = ncsn_conv3x3(path, self.features, stride=1, bias=False, dtype=self.dtype)
      x = path + x
    return x


class RCUBlock(nn.Module):
  """Residual conv unit (NCSNv2): ``n_blocks`` x (``x += (act, conv) ^ n_stages (x)``)."""
  features: int
  n_blocks: int
  n_stages: int
  act: Any = nn.relu
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    for _ in range(self.n_blocks):
      residual = x
      for _ in range(self.n_stages):
        x = ncsn_conv3x3(self.act(x), self.features, stride=1, bias=False, dtype=self.dtype)
      x = x + residual
    return x


class CondRCUBlock(nn.Module):
  """Noise-conditional residual conv unit (NCSN): (norm, act, conv) stages."""
  features: int
  n_blocks: int
  n_stages: int
  normalizer: Any
  act: Any = nn.relu
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, y: Array) -> Array:
    for _ in range(self.n_blocks):
      residual = x
      for _ in range(self.n_stages):
        x = self.act(self.normalizer(dtype=self.dtype)(x, y))
        x = ncsn_conv3x3(x, self.features, stride=1, bias=False, dtype=self.dtype)
      x = x + residual
    return x


class MSFBlock(nn.Module):
  """Multi-resolution fusion (NCSNv2): ``sum_i resize(conv(x_i), shape)``."""
  shape: Sequence[int]
  features: int
  interpolation: str = "bilinear"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, xs: Sequence[Array]) -> Array:
    sums = 0.0
    for x in xs:
      h = ncsn_conv3x3(x, self.features, stride=1, bias=True, dtype=self.dtype)
      sums = sums + _resize(h, self.shape, self.interpolation)
    return sums


class CondMSFBlock(nn.Module):
  """Noise-conditional multi-resolution fusion (NCSN): ``sum_i resize(conv(norm(x_i)))``."""
  shape: Sequence[int]
  features: int
  normalizer: Any
  interpolation: str = "bilinear"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, xs: Sequence[Array], y: Array) -> Array:
    sums = 0.0
    for x in xs:
      h = self.normalizer(dtype=self.dtype)(x, y)
      h = ncsn_conv3x3(h, self.features, stride=1, bias=True, dtype=self.dtype)
      sums = sums + _resize(h, self.shape, self.interpolation)
    return sums


class RefineBlock(nn.Module):
  """RefineNet block (NCSNv2): RCU per input, fusion (unless ``start``), CRP, output RCU."""
  output_shape: Sequence[int]
  features: int
  act: Any = nn.relu
  interpolation: str = "bilinear"
  start: bool = False
  end: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, xs: Sequence[Array]) -> Array:
    hs = [RCUBlock(x.shape[-1], n_blocks=2, n_stages=2, act=self.act, dtype=self.dtype)(x)
          for x in xs]
    if not self.start:
      h = MSFBlock(self.output_shape, self.features, interpolation=self.interpolation,
                   dtype=self.dtype)(hs)
    else:
      h = hs[0]
    h = CRPBlock(self.features, n_stages=2, act=self.act, dtype=self.dtype)(h)
    return RCUBlock(self.features, n_blocks=3 if self.end else 1, n_stages=2, act=self.act,
                    dtype=self.dtype)(h)


class CondRefineBlock(nn.Module):
  """Noise-conditional RefineNet block (NCSN)."""
  output_shape: Sequence[int]
  features: int
  normalizer: Any
  act: Any = nn.relu
  interpolation: str = "bilinear"
  start: bool = False
  end: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, xs: Sequence[Array], y: Array) -> Array:
    hs = [CondRCUBlock(x.shape[-1], n_blocks=2, n_stages=2, normalizer=self.normalizer,
                       act=self.act, dtype=self.dtype)(x, y) for x in xs]
    if not self.start:
      h = CondMSFBlock(self.output_shape, self.features, normalizer=self.normalizer,
                       interpolation=self.interpolation, dtype=self.dtype)(hs, y)
    else:
      h = hs[0]
    h = CondCRPBlock(self.features, n_stages=2, normalizer=self.normalizer, act=self.act,
                     dtype=self.dtype)(h, y)
    return CondRCUBlock(self.features, n_blocks=3 if self.end else 1, n_stages=2,
                        normalizer=self.normalizer, act=self.act, dtype=self.dtype)(h, y)


def _mean_pool2(x: Array) -> Array:
  return (x[:, ::2, ::2, :] + x[:, 1::2, ::2, :] + x[:, ::2, 1::2, :] + x[:, 1::2, 1::2, :]) / 4.0


class ConvMeanPool(nn.Module):
  """Conv then 2x2 mean pooling."""
  output_dim: int
  kernel_size: int = 3
  biases: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = Conv(self.output_dim, (self.kernel_size, self.kernel_size), padding="SAME",
                use_bias=self.biases, dtype=self.dtype)(x)
    return _mean_pool2(x)


class ResidualBlock(nn.Module):
  """NCSNv2 ResNet block; ``resample`` is None or 'down' (dilated convs when ``dilation > 1``)."""
  output_dim: int
  normalization: Any
  resample: Optional[str] = None
  act: Any = nn.elu
  dilation: int = 1
  dtype: Dtype = jnp.float32

  def _norm(self, h, y):
    return self.normalization(dtype=self.dtype)(h)

  @nn.compact
  def __call__(self, x: Array, y: Optional[Array] = None) -> Array:
    conv3 = functools.partial(ncsn_conv3x3, dtype=self.dtype)
    d = self.dilation
    h = self.act(self._norm(x, y))
    if self.resample == "down":
      h = conv3(h, h.shape[-1], dilation=d)
      h = self.act(self._norm(h, y))
      if d > 1:
        h = conv3(h, self.output_dim, dilation=d)
        shortcut = conv3(x, self.output_dim, dilation=d)
      else:
        h = ConvMeanPool(self.output_dim, dtype=self.dtype)(h)
        shortcut = ConvMeanPool(self.output_dim, kernel_size=1, dtype=self.dtype)(x)
    elif self.resample is None:
      if d > 1:
        shortcut = x if self.output_dim == x.shape[-1] else conv3(x, self.output_dim, dilation=d)
        h = conv3(h, self.output_dim, dilation=d)
        h = self.act(self._norm(h, y))
        h = conv3(h, self.output_dim, dilation=d)
      else:
        shortcut = (x if self.output_dim == x.shape[-1]
                    else ncsn_conv1x1(x, self.output_dim, dtype=self.dtype))
        h = conv3(h, self.output_dim)
        h = self.act(self._norm(h, y))
        h = conv3(h, self.output_dim)
    else:
      raise ValueError(f"ResidualBlock: resample={self.resample!r} must be None or 'down'.")
    return h + shortcut


class ConditionalResidualBlock(ResidualBlock):
  """NCSNv1 ResNet block with noise-conditional normalization ``normalization()(h, y)``."""

  def _norm(self, h, y):
    return self.normalization(dtype=self.dtype)(h, y)


# ----------------------------------------------------------------------------------------------
# Config helpers shared by the networks.
# ----------------------------------------------------------------------------------------------


def get_sigmas(config):
  """SMLD noise levels ``sigma_i = exp(linspace(log sigma_max, log sigma_min, num_scales))``."""
  import numpy as np
  m = config.model
  return jnp.asarray(np.exp(np.linspace(np.log(m.sigma_max), np.log(m.sigma_min), m.num_scales)),
                     jnp.float32)


def check_choice(config, field: str, choices: Sequence[str], default: Optional[str] = None) -> str:
  """Returns ``config.model.<field>`` lower-cased, or raises naming the field and the choices."""
  value = config.model.get(field, default)
  if value is None or str(value).lower() not in choices:
    raise ValueError(f"config.model.{field}={value!r} is unknown; choose one of {list(choices)}.")
  return str(value).lower()


def check_unet_config(config, name: str) -> None:
  """Checks the U-Net shape fields shared by DDPM and NCSN++ before anything is built.

  ``image_size`` must be divisible by ``2 ** (len(ch_mult) - 1)`` and every entry of
  ``attn_resolutions`` must be one of the resolutions ``image_size / 2 ** i`` the U-Net visits.
  """
  m, d = config.model, config.data
  for field in ("nf", "ch_mult", "num_res_blocks", "attn_resolutions"):
    if m.get(field, None) is None:
      raise ValueError(f"config.model.{field} is required by the {name} network.")
  if int(m.nf) < 1 or int(m.num_res_blocks) < 1 or len(m.ch_mult) < 1:
    raise ValueError(f"{name}: config.model.nf, num_res_blocks and ch_mult must be positive / "
                     f"non-empty (got nf={m.nf}, num_res_blocks={m.num_res_blocks}, "
                     f"ch_mult={m.ch_mult}).")
  factor = 2 ** (len(m.ch_mult) - 1)
  size = int(d.image_size)
  if size % factor:
    raise ValueError(f"config.data.image_size={size} is not divisible by the {name} downsampling "
                     f"factor 2**(len(config.model.ch_mult)-1)={factor}; change image_size or "
                     f"config.model.ch_mult={tuple(m.ch_mult)}.")
  resolutions = [size // 2 ** i for i in range(len(m.ch_mult))]
  bad = [r for r in m.attn_resolutions if r not in resolutions]
  if bad:
    raise ValueError(f"config.model.attn_resolutions={tuple(m.attn_resolutions)} contains {bad}, "
                     f"which the {name} never visits; the resolutions are {resolutions}.")
  norm = m.get("normalization", "GroupNorm")
  if str(norm).lower() != "groupnorm":
    raise ValueError(f"config.model.normalization={norm!r} is not supported by the {name} "
                     "network, which always uses GroupNorm; set it to 'GroupNorm'.")
  get_act(config)
  get_dtype(config)
