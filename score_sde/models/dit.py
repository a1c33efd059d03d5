"""DiT: the Diffusion Transformer of Peebles & Xie, "Scalable Diffusion Models with Transformers"
(ICCV 2023), registered as ``'dit'``.

``(x [B, H, W, C], labels [B]) -> [B, H, W, C]`` (the output in the network's parametrization,
like every network here; see :mod:`score_sde.models.utils`).

Layout (D = hidden_size, p = patch_size, T = (H / p)(W / p) tokens):

* patchify: the image is cut into T non-overlapping p x p patches (row-major over the patch grid),
  each flattened to p*p*C values and embedded by one dense layer ``x_embedder`` (DiT's
  Conv2d(kernel = stride = p), same parameter count), plus the fixed 2-D sin-cos position table
  :func:`sincos_2d_position_embedding` (not trained; see below);
* conditioning c = MLP(sinusoidal features of the noise label, 256 of them) + class embedding
  (a (K + 1)-row table, row K the null class of classifier-free guidance; only with
  ``model.num_classes = K``), the MLP being Dense(D) SiLU Dense(D) (``t_embedder_0`` / ``_1``);
* ``depth`` adaLN-Zero blocks (:class:`DiTBlock`): (shift, scale, gate) for the attention and the
  MLP branch from Dense(6D)(SiLU(c)),
      h = h + gate_a * Attn(LN(h) (1 + scale_a) + shift_a)
      h = h + gate_m * MLP(LN(h) (1 + scale_m) + shift_m),
  LN without affine parameters (eps 1e-6), multi-head self-attention through
  ``jax.nn.dot_product_attention`` (the fused cuDNN kernel on GPU when the dtype allows), MLP
  Dense(mlp_ratio D) GELU(tanh) Dense(D);
* final adaLN layer: (shift, scale) = Dense(2D)(SiLU(c)), out = Dense(p*p*C_out)(LN(h) (1 + scale)
  + shift), unpatchified back to [B, H, W, C_out].

Initialization as DiT: dense layers Xavier-uniform with zero bias, the timestep MLP N(0, 0.02^2),
the class table N(0, 0.02^2), and every modulation layer and the output layer zero ("adaLN-Zero"):
each block starts as the identity and the untrained network outputs exactly 0.

``model.learn_sigma = True`` doubles the output channels as DiT's learned-variance head (so the
parameter counts of DiT's reference setting match the published ones); our samplers use the
SDE's own variances, so only the first C channels are returned and the second half is unused
(it gets no gradient). The fixed position table is a constant, not a parameter: DiT stores it as
a frozen ``nn.Parameter`` that its published counts include, so those counts are
``count_params(config) + T * D`` (:func:`fixed_position_params`); keeping it out of ``params``
keeps it out of the optimizer, weight decay, EMA and checkpoints.

Noise labels are embedded with the house embedding (:func:`embeddings.noise_embedding`):
'positional' (DDPM's sinusoids of the label; VP labels are 999 t, DiT's timestep scale) or
'fourier' (Fourier features of log label: VE sigma, EDM preconditioning). DiT's own sinusoid puts
cos before sin and divides the log-frequency by half instead of half - 1, which only matters when
loading DiT's PyTorch weights (not supported). VE inputs are scaled by 1 / sqrt(1 + sigma^2) and,
with ``scale_by_sigma``, the output divided by sigma, as in ``small_unet``.

Efficiency: the identical blocks run under one ``lax.scan`` (:mod:`score_sde.models.scan`; the
parameter tree keeps ``blocks_0 .. blocks_{depth-1}``, compile time does not grow with depth;
``model.remat`` 'blocks' / 'elementwise' checkpoints each block, :mod:`score_sde.models.remat`);
``model.dtype = 'bfloat16'`` computes dense layers and attention in bfloat16 with float32
parameters, LayerNorm statistics and output.

Config fields read: model.hidden_size, model.depth, model.num_heads, model.patch_size,
model.mlp_ratio (default 4), model.learn_sigma (default False), model.num_classes,
model.embedding_type, model.fourier_scale, model.scale_by_sigma, model.dtype, data.image_size.
"""
from __future__ import annotations

import functools
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from score_sde.models import embeddings, layers, remat, scan
from score_sde.models.utils import register_model

Array = jax.Array

# DiT's model sizes (Table 1 of the paper): depth, hidden size D, heads.
DIT_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
PATCH_SIZES = (2, 4, 8)
FREQUENCY_EMBEDDING_SIZE = 256   # sinusoidal features of the noise label fed to the timestep MLP

_xavier = nn.initializers.xavier_uniform()
_zeros = nn.initializers.zeros


def patchify(x: Array, p: int) -> Array:
  """``x [B, H, W, C] -> [B, (H/p)(W/p), p*p*C]``: token i*(W/p) + j holds the patch
  ``x[:, i p:(i+1) p, j p:(j+1) p, :]`` flattened in (row, column, channel) order."""
  B, H, W, C = x.shape
  if H % p or W % p:
    raise ValueError(f"patchify: image size {H}x{W} is not divisible by the patch size {p}.")
  x = x.reshape(B, H // p, p, W // p, p, C).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(B, (H // p) * (W // p), p * p * C)


def unpatchify(tokens: Array, p: int, height: int, width: int) -> Array:
  """Inverse of :func:`patchify`: ``[B, (H/p)(W/p), p*p*C] -> [B, H, W, C]``."""
  B, T, F = tokens.shape
  gh, gw = height // p, width // p
  if gh * gw != T or F % (p * p):
    raise ValueError(f"unpatchify: {T} tokens of {F} values do not tile a {height}x{width} image "
                     f"with {p}x{p} patches.")
  C = F // (p * p)
  x = tokens.reshape(B, gh, gw, p, p, C).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(B, height, width, C)


@functools.lru_cache(maxsize=32)
def sincos_2d_position_embedding(dim: int, grid_h: int, grid_w: int) -> np.ndarray:
  """Fixed 2-D sin-cos position table ``[grid_h * grid_w, dim]`` (float32; MAE / DiT).

  Token k = i grid_w + j (row i, column j). With q = dim / 4 and w_m = 10000^(-m / q),
  m = 0..q-1: emb[k] = [sin(j w), cos(j w), sin(i w), cos(i w)] (the column first, as DiT's
  ``np.meshgrid(grid_w, grid_h)``). ``dim`` must be divisible by 4.
  """
  if dim % 4:
    raise ValueError(f"The 2-D sin-cos position embedding needs a width divisible by 4, got {dim}.")
  q = dim // 4
  omega = 1.0 / 10000.0 ** (np.arange(q, dtype=np.float64) / q)
  rows, cols = np.meshgrid(np.arange(grid_h, dtype=np.float64),
                           np.arange(grid_w, dtype=np.float64), indexing="ij")

  def one_d(pos):
    out = pos.reshape(-1)[:, None] * omega[None, :]
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)
  table = np.concatenate([one_d(cols), one_d(rows)], axis=1).astype(np.float32)
  table.setflags(write=False)
  return table


def modulate(x: Array, shift: Array, scale: Array) -> Array:
  """adaLN: ``x [B, T, D] * (1 + scale [B, D]) + shift [B, D]`` (per example, per channel)."""
  return x * (1 + scale[:, None, :]) + shift[:, None, :]


def _layer_norm(dtype) -> nn.LayerNorm:
  """LayerNorm without affine parameters (eps 1e-6; statistics in float32)."""
  return nn.LayerNorm(epsilon=1e-6, use_bias=False, use_scale=False, dtype=dtype)


class Attention(nn.Module):
  """Multi-head self-attention ``[B, T, D] -> [B, T, D]``: qkv = Dense(3D)(h) split into
  ``num_heads`` heads of D / num_heads, softmax(q k^T / sqrt(D / heads)) v per head, then
  Dense(D). The attention itself is ``jax.nn.dot_product_attention``."""
  num_heads: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, h: Array) -> Array:
    B, T, D = h.shape
    qkv = nn.Dense(3 * D, kernel_init=_xavier, dtype=self.dtype, name="qkv")(h)
    q, k, v = jnp.split(qkv.reshape(B, T, 3, self.num_heads, D // self.num_heads), 3, axis=2)
    out = jax.nn.dot_product_attention(q[:, :, 0], k[:, :, 0], v[:, :, 0])
    return nn.Dense(D, kernel_init=_xavier, dtype=self.dtype, name="proj")(out.reshape(B, T, D))


class DiTBlock(nn.Module):
  """adaLN-Zero transformer block ``(h [B, T, D], c [B, D]) -> [B, T, D]`` (module docstring)."""
  num_heads: int
  mlp_ratio: float = 4.0
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, h: Array, c: Array) -> Array:
    D = h.shape[-1]
    mod = nn.Dense(6 * D, kernel_init=_zeros, dtype=self.dtype, name="adaLN_modulation")(
        nn.silu(c))
    shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = jnp.split(mod, 6, axis=-1)
    a = Attention(self.num_heads, self.dtype, name="attn")(
        modulate(_layer_norm(self.dtype)(h), shift_a, scale_a))
    h = h + gate_a[:, None, :] * a
    m = modulate(_layer_norm(self.dtype)(h), shift_m, scale_m)
    m = nn.Dense(int(D * self.mlp_ratio), kernel_init=_xavier, dtype=self.dtype, name="fc1")(m)
    m = nn.Dense(D, kernel_init=_xavier, dtype=self.dtype, name="fc2")(
        nn.gelu(m, approximate=True))
    return (h + gate_m[:, None, :] * m).astype(h.dtype)


class FinalLayer(nn.Module):
  """``(h [B, T, D], c [B, D]) -> [B, T, out_features]``: Dense(LN(h) (1 + scale) + shift) with
  (shift, scale) = Dense(2D)(SiLU(c)); both dense layers start at zero."""
  out_features: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, h: Array, c: Array) -> Array:
    D = h.shape[-1]
    mod = nn.Dense(2 * D, kernel_init=_zeros, dtype=self.dtype, name="adaLN_modulation")(
        nn.silu(c))
    shift, scale = jnp.split(mod, 2, axis=-1)
    h = modulate(_layer_norm(self.dtype)(h), shift, scale)
    return nn.Dense(self.out_features, kernel_init=_zeros, dtype=self.dtype, name="linear")(h)


def dit_hparams(config) -> dict:
  """The DiT fields of ``config.model`` checked (``ValueError`` naming the field): hidden_size,
  depth, num_heads, patch_size, mlp_ratio, learn_sigma; and data.image_size against the patch."""
  m = config.model
  out = {}
  for field in ("hidden_size", "depth", "num_heads", "patch_size"):
    value = m.get(field, None)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
      raise ValueError(f"config.model.{field}={value!r}: the 'dit' network needs a positive "
                       "integer (e.g. DiT-S/2: hidden_size=384, depth=12, num_heads=6, "
                       "patch_size=2).")
    out[field] = value
  out["mlp_ratio"] = float(m.get("mlp_ratio", 4.0))
  if out["mlp_ratio"] <= 0:
    raise ValueError(f"config.model.mlp_ratio={out['mlp_ratio']!r} must be > 0 (DiT: 4).")
  out["learn_sigma"] = bool(m.get("learn_sigma", False))
  D, heads, p = out["hidden_size"], out["num_heads"], out["patch_size"]
  if D % heads:
    raise ValueError(f"config.model.hidden_size={D} is not divisible by config.model.num_heads="
                     f"{heads}; choose a head count that divides it.")
  if D % 4:
    raise ValueError(f"config.model.hidden_size={D} must be divisible by 4 (the 2-D sin-cos "
                     "position embedding splits it into four sinusoid blocks).")
  size = config.data.get("image_size", None)
  if isinstance(size, int) and size % p:
    raise ValueError(f"config.data.image_size={size} is not divisible by config.model.patch_size="
                     f"{p}: choose a patch size that divides the image size (e.g. "
                     f"{[q for q in PATCH_SIZES if size % q == 0] or [1]}).")
  return out


def fixed_position_params(config) -> int:
  """Size of the fixed position table, T * D: what DiT's published parameter counts add to
  ``count_params(config)`` (DiT keeps the table as a frozen parameter, we as a constant)."""
  hp = dit_hparams(config)
  size = int(config.data.image_size)
  return (size // hp["patch_size"]) ** 2 * hp["hidden_size"]


@register_model(name="dit")
class DiT(nn.Module):
  """Diffusion Transformer (module docstring): ``(x [B, H, W, C], labels [B]) -> [B, H, W, C]``."""
  config: object
  # Run the identical blocks as one lax.scan (same values and parameter tree, one compiled block);
  # False unrolls them.
  scan_blocks: bool = True

  def __post_init__(self):
    dit_hparams(self.config)
    embeddings.check_label_config(self.config)
    layers.get_dtype(self.config)
    super().__post_init__()

  @nn.compact
  def __call__(self, x: Array, labels: Array, train: bool = False,
               class_labels: Optional[Array] = None) -> Array:
    cfg = self.config
    hp = dit_hparams(cfg)
    dtype = layers.get_dtype(cfg)
    D, p = hp["hidden_size"], hp["patch_size"]
    if x.ndim != 4:
      raise ValueError(f"dit expects images [batch, H, W, C], got shape {x.shape}.")
    B, H, W, C = x.shape
    if labels.shape != (B,):
      raise ValueError(f"labels must be [batch]={(B,)}, got {labels.shape}.")
    if H % p or W % p:
      raise ValueError(f"dit: image size {H}x{W} is not divisible by config.model.patch_size={p}.")

    ve = embeddings.is_ve(cfg)
    if ve:
      sigma = embeddings.label_sigma(cfg, labels)
      x = x / jnp.sqrt(1.0 + sigma**2)[:, None, None, None]

    # Tokens: patch embedding plus the fixed position table; the residual stream stays float32.
    h = nn.Dense(D, kernel_init=_xavier, dtype=dtype, name="x_embedder")(patchify(x, p))
    h = h.astype(jnp.float32) + jnp.asarray(sincos_2d_position_embedding(D, H // p, W // p))

    # Conditioning: timestep MLP on sinusoidal features, plus the class embedding (null row K).
    t_init = nn.initializers.normal(0.02)
    c = embeddings.noise_embedding(cfg, labels, FREQUENCY_EMBEDDING_SIZE)
    c = nn.Dense(D, kernel_init=t_init, name="t_embedder_0")(c)
    c = nn.Dense(D, kernel_init=t_init, name="t_embedder_1")(nn.silu(c))
    c = c + embeddings.class_embedding(cfg, class_labels, B, D, stddev=0.02)

    units = [(DiTBlock(hp["num_heads"], hp["mlp_ratio"], dtype, name=f"blocks_{i}"),)
             for i in range(hp["depth"])]
    step = lambda mods, h_, _: mods[0](h_, c)
    # model.remat='blocks' / 'elementwise': checkpoint every block (scanned loop body)
    h = scan.apply_units(self, units, step, h, scan=self.scan_blocks,
                         remat=remat.blocks_of(cfg))[-1]

    out_channels = 2 * C if hp["learn_sigma"] else C
    out = FinalLayer(p * p * out_channels, dtype, name="final_layer")(h, c)
    out = unpatchify(out.astype(jnp.float32), p, H, W)[..., :C]
    if ve and cfg.model.get("scale_by_sigma", False):
      out = out / sigma[:, None, None, None]
    return out
