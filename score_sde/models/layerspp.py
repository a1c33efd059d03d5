"""Layers of NCSN++ / DDPM++ (Song et al. 2021, appendix H): BigGAN / DDPM++ residual blocks,
FIR resampling, progressive-growing combiners and rescaled skip connections.

NHWC tensors throughout. Names and creation order match the original score_sde ``layerspp.py``
(so ``ResnetBlockBigGANpp_3/Conv_1/kernel`` etc. line up with released checkpoints).
GroupNorm uses ``min(C // 4, 32)`` groups.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from score_sde.models import group_norm as gn
from score_sde.models import layers
from score_sde.models import up_or_down_sampling as updown

Array = jax.Array
Dtype = Any

conv1x1 = layers.ddpm_conv1x1
conv3x3 = layers.ddpm_conv3x3
NIN = layers.NIN
default_init = layers.default_init


def group_norm(x: Array, dtype: Dtype = jnp.float32) -> Array:
  """GroupNorm with ``min(C // 4, 32)`` groups, created in the caller's scope."""
  return gn.GroupNorm(num_groups=min(x.shape[-1] // 4, 32), dtype=dtype)(x)


def _skip(x: Array, h: Array, skip_rescale: bool) -> Array:
  """Residual sum ``x + h``, divided by sqrt(2) when ``skip_rescale``."""
  return (x + h) / np.sqrt(2.0) if skip_rescale else x + h


class Combine(nn.Module):
  """Combines a pyramid branch ``x`` into ``y``: ``conv1x1(x) + y`` ('sum') or concat ('cat')."""
  method: str = "cat"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, y: Array) -> Array:
    h = conv1x1(x, y.shape[-1], dtype=self.dtype)
    if self.method == "cat":
      return jnp.concatenate([h, y], axis=-1)
    if self.method == "sum":
      return h + y
    raise ValueError(f"config.model.progressive_combine={self.method!r} must be 'sum' or 'cat'.")


class AttnBlockpp(nn.Module):
  """Self-attention block: ``(x + NIN(attn(q, k, v))) [/ sqrt 2]`` with q, k, v = NIN(GN(x))."""
  skip_rescale: bool = False
  init_scale: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c = x.shape[-1]
    h = group_norm(x, self.dtype)
    q = NIN(c, dtype=self.dtype)(h)
    k = NIN(c, dtype=self.dtype)(h)
    v = NIN(c, dtype=self.dtype)(h)
    h = NIN(c, init_scale=self.init_scale, dtype=self.dtype)(layers.attention(q, k, v))
    return _skip(x, h, self.skip_rescale)


class Upsample(nn.Module):
  """x2 upsampling: nearest (+ 3x3 conv), or FIR (``upsample_2d`` / fused ``Conv2d(up=True)``)."""
  out_ch: Optional[int] = None
  with_conv: bool = False
  fir: bool = False
  fir_kernel: Sequence[int] = (1, 3, 3, 1)
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    out_ch = self.out_ch or x.shape[-1]
    if not self.fir:
      if self.with_conv:
        h = conv3x3(x, out_ch, dtype=self.dtype, upsample=True)
      else:
        h = updown.naive_upsample_2d(x, 2)
    elif not self.with_conv:
      h = updown.upsample_2d(x, self.fir_kernel, factor=2)
    else:
      h = updown.Conv2d(out_ch, kernel=3, up=True, resample_kernel=tuple(self.fir_kernel),
                        use_bias=True, kernel_init=default_init(), dtype=self.dtype)(x)
    return h


class Downsample(nn.Module):
  """x2 downsampling: stride-2 conv / mean pool, or FIR (``downsample_2d`` / ``Conv2d(down)``)."""
  out_ch: Optional[int] = None
  with_conv: bool = False
  fir: bool = False
  fir_kernel: Sequence[int] = (1, 3, 3, 1)
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    out_ch = self.out_ch or x.shape[-1]
    if not self.fir:
      if self.with_conv:
        return conv3x3(x, out_ch, stride=2, dtype=self.dtype)
      return updown.naive_downsample_2d(x, 2)
    if not self.with_conv:
      return updown.downsample_2d(x, self.fir_kernel, factor=2)
    return updown.Conv2d(out_ch, kernel=3, down=True, resample_kernel=tuple(self.fir_kernel),
                         use_bias=True, kernel_init=default_init(), dtype=self.dtype)(x)


class ResnetBlockDDPMpp(nn.Module):
  """DDPM++ residual block (DDPM block with GroupNorm(min(C/4, 32)) and rescaled skips)."""
  act: Any
  out_ch: Optional[int] = None
  conv_shortcut: bool = False
  dropout: float = 0.1
  skip_rescale: bool = False
  init_scale: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, temb: Optional[Array] = None, train: bool = True) -> Array:
    c = x.shape[-1]
    out_ch = self.out_ch or c
    h = self.act(group_norm(x, self.dtype))
    h = conv3x3(h, out_ch, dtype=self.dtype)
    if temb is not None:
      h = h + nn.Dense(out_ch, kernel_init=default_init(), dtype=self.dtype)(
          self.act(temb))[:, None, None, :]
    h = self.act(group_norm(h, self.dtype))
    h = nn.Dropout(self.dropout)(h, deterministic=not train)
    h = conv3x3(h, out_ch, init_scale=self.init_scale, dtype=self.dtype)
    if c != out_ch:
      x = conv3x3(x, out_ch, dtype=self.dtype) if self.conv_shortcut else NIN(
          out_ch, dtype=self.dtype)(x)
    return _skip(x, h, self.skip_rescale)


class ResnetBlockBigGANpp(nn.Module):
  """BigGAN-style residual block; resamples (FIR or naive) inside the block when ``up``/``down``.

  ``h = conv(drop(act(GN(conv(resample(act(GN(x)))) + Dense(act(temb))))))``,
  ``out = (conv1x1(resample(x)) + h) / sqrt(2)`` (1x1 shortcut when channels change or resampling).
  """
  act: Any
  up: bool = False
  down: bool = False
  out_ch: Optional[int] = None
  dropout: float = 0.1
  fir: bool = False
  fir_kernel: Sequence[int] = (1, 3, 3, 1)
  skip_rescale: bool = True
  init_scale: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, temb: Optional[Array] = None, train: bool = True) -> Array:
    c = x.shape[-1]
    out_ch = self.out_ch or c
    h = self.act(group_norm(x, self.dtype))
    # Nearest-neighbour upsampling is folded into the two convolutions that follow it.
    naive_up = self.up and not self.fir
    if self.up and self.fir:
      h = updown.upsample_2d(h, self.fir_kernel, factor=2)
      x = updown.upsample_2d(x, self.fir_kernel, factor=2)
    elif self.down:
      if self.fir:
        h = updown.downsample_2d(h, self.fir_kernel, factor=2)
        x = updown.downsample_2d(x, self.fir_kernel, factor=2)
      else:
        h = updown.naive_downsample_2d(h, factor=2)
        x = updown.naive_downsample_2d(x, factor=2)
    h = conv3x3(h, out_ch, dtype=self.dtype, upsample=naive_up)
    if temb is not None:
      h = h + nn.Dense(out_ch, kernel_init=default_init(), dtype=self.dtype)(
          self.act(temb))[:, None, None, :]
    h = self.act(group_norm(h, self.dtype))
    h = nn.Dropout(self.dropout)(h, deterministic=not train)
    h = conv3x3(h, out_ch, init_scale=self.init_scale, dtype=self.dtype)
    if c != out_ch or self.up or self.down:
      x = conv1x1(x, out_ch, dtype=self.dtype, upsample=naive_up)
    return _skip(x, h, self.skip_rescale)
