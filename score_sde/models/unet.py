"""A small DDPM-style U-Net for small images (MNIST 28x28x1), registered as ``'small_unet'``.

Config fields read: model.nf (base channels), model.ch_mult (channel multiplier per resolution;
len(ch_mult) - 1 downsamplings, so image_size must be divisible by 2^(len(ch_mult) - 1)),
model.num_res_blocks, model.attn_resolutions (resolutions with a self-attention block; default:
the lowest one; () for none), model.dropout, model.embedding_type, model.fourier_scale,
model.scale_by_sigma, training.sde / training.continuous (label convention).

Layout (nf=32, ch_mult=(1, 2, 2), num_res_blocks=1 on 28x28): conv_in -> [ResBlock x n, Down]
at 28 -> 14 -> 7 -> middle ResBlock, Attention, ResBlock -> [ResBlock x (n + 1) on the skip
concatenation, Up] back to 28 -> GroupNorm, SiLU, conv_out. Res blocks add a projected time
embedding temb = Dense(4 nf) SiLU (Dense(4 nf)(embed(labels)) + Embed(class_labels)), the class
embedding only with config.model.num_classes = K (class_labels in 0..K; K, the null label, is
the unconditional score and the default when class_labels is None). GroupNorm uses min(32, C / 4)
groups; convs that end a residual branch and the output conv start at zero (as in DDPM), so the
untrained network outputs 0.

Output convention as in :mod:`score_sde.models.toy`: VE inputs are scaled by 1 / sqrt(1 + sigma^2)
and, with scale_by_sigma, the output is divided by sigma; VP / sub-VP outputs are unit scale.
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from score_sde.models import embeddings, remat
from score_sde.models.conv import Conv
from score_sde.models.group_norm import GroupNorm
from score_sde.models.utils import register_model

Array = jax.Array


def _group_norm(channels: int) -> GroupNorm:
  return GroupNorm(num_groups=max(1, min(32, channels // 4)))


class ResBlock(nn.Module):
  """h = Conv(SiLU(GN(x))) + Dense(SiLU(temb)); out = skip(x) + Conv(Dropout(SiLU(GN(h))))."""
  out_ch: int
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x: Array, temb: Array, train: bool = False) -> Array:
    h = Conv(self.out_ch, (3, 3))(nn.silu(_group_norm(x.shape[-1])(x)))
    h = h + nn.Dense(self.out_ch)(nn.silu(temb))[:, None, None, :]
    h = nn.silu(_group_norm(self.out_ch)(h))
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    h = Conv(self.out_ch, (3, 3), kernel_init=nn.initializers.zeros)(h)
    if x.shape[-1] != self.out_ch:
      x = nn.Dense(self.out_ch)(x)  # 1x1 conv ("NIN") on the skip path
    return x + h


class AttnBlock(nn.Module):
  """Single-head self-attention over the H W positions, residual: x + proj(softmax(q k^T / sqrt C) v)."""

  @nn.compact
  def __call__(self, x: Array) -> Array:
    B, H, W, C = x.shape
    h = _group_norm(C)(x).reshape(B, H * W, C)
    q, k, v = nn.Dense(C)(h), nn.Dense(C)(h), nn.Dense(C)(h)
    w = jax.nn.softmax(jnp.einsum("bic,bjc->bij", q, k) / jnp.sqrt(C).astype(x.dtype), axis=-1)
    h = jnp.einsum("bij,bjc->bic", w, v)
    h = nn.Dense(C, kernel_init=nn.initializers.zeros)(h)
    return x + h.reshape(B, H, W, C)


@register_model(name="small_unet")
class SmallUNet(nn.Module):
  """Noise-conditional U-Net: ``(x [batch, H, W, C], labels [batch]) -> [batch, H, W, C]``."""
  config: object

  @nn.compact
  def __call__(self, x: Array, labels: Array, train: bool = False,
               class_labels: Optional[Array] = None) -> Array:
    cfg = self.config
    m = cfg.model
    if x.ndim != 4:
      raise ValueError(f"small_unet expects images [batch, H, W, C], got shape {x.shape}.")
    if labels.shape != x.shape[:1]:
      raise ValueError(f"labels must be [batch]={x.shape[:1]}, got {labels.shape}.")
    nf = int(m.nf)
    ch_mult: Sequence[int] = tuple(m.get("ch_mult", (1, 2, 2)))
    num_res_blocks = int(m.get("num_res_blocks", 1))
    dropout = float(m.dropout)
    factor = 2 ** (len(ch_mult) - 1)
    H, W = x.shape[1:3]
    if H % factor or W % factor:
      raise ValueError(f"small_unet with ch_mult={ch_mult} downsamples by {factor}: image size "
                       f"{H}x{W} must be divisible by it; change config.model.ch_mult.")
    attn_res: Optional[Sequence[int]] = m.get("attn_resolutions", None)
    attn_res = (H // factor,) if attn_res is None else tuple(attn_res)

    temb = embeddings.noise_embedding(cfg, labels, nf)
    temb = nn.Dense(4 * nf)(temb)
    temb = temb + embeddings.class_embedding(cfg, class_labels, x.shape[0], 4 * nf)
    temb = nn.Dense(4 * nf)(nn.silu(temb))

    ve = embeddings.is_ve(cfg)
    if ve:
      sigma = embeddings.label_sigma(cfg, labels)
      x = x / jnp.sqrt(1.0 + sigma**2)[:, None, None, None]

    # model.remat='blocks' / 'elementwise': checkpoint every block
    block = functools.partial(remat.call, enabled=remat.blocks_of(cfg))
    # Downsampling path.
    h = Conv(nf, (3, 3))(x)
    hs = [h]
    for level, mult in enumerate(ch_mult):
      for _ in range(num_res_blocks):
        h = block(ResBlock(nf * mult, dropout), h, temb, train)
        if h.shape[1] in attn_res:
          h = block(AttnBlock(), h)
        hs.append(h)
      if level != len(ch_mult) - 1:
        h = Conv(h.shape[-1], (3, 3), strides=(2, 2))(h)
        hs.append(h)

    # Middle.
    h = block(ResBlock(h.shape[-1], dropout), h, temb, train)
    if h.shape[1] in attn_res:
      h = block(AttnBlock(), h)
    h = block(ResBlock(h.shape[-1], dropout), h, temb, train)

    # Upsampling path.
    for level, mult in reversed(list(enumerate(ch_mult))):
      for _ in range(num_res_blocks + 1):
        h = block(ResBlock(nf * mult, dropout), jnp.concatenate([h, hs.pop()], axis=-1), temb,
                  train)
        if h.shape[1] in attn_res:
          h = block(AttnBlock(), h)
      if level != 0:
        B, hh, ww, C = h.shape
        # Nearest-neighbour 2x upsampling as a broadcast (its gradient is a sum, not a scatter).
        h = jnp.broadcast_to(h[:, :, None, :, None, :], (B, hh, 2, ww, 2, C))
        h = h.reshape(B, 2 * hh, 2 * ww, C)
        h = Conv(nf * ch_mult[level - 1], (3, 3))(h)  # to the next level's width (cheaper)
    assert not hs

    h = nn.silu(_group_norm(h.shape[-1])(h))
    out = Conv(x.shape[-1], (3, 3), kernel_init=nn.initializers.zeros)(h)
    if ve and m.scale_by_sigma:
      out = out / sigma[:, None, None, None]
    return out
