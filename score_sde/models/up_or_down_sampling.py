"""FIR up/down-sampling of NHWC images (StyleGAN2's ``upfirdn_2d``), as used by NCSN++.

All functions take ``x [N, H, W, C]``. The FIR kernel ``k`` is 1-D (separable, outer product
``k k^T``) or 2-D, and is normalized to sum to ``gain`` (down) or ``gain * factor^2`` (up) so a
constant image keeps its value.

``upfirdn_2d`` computes, per image and channel: insert ``up - 1`` zeros after every pixel, pad
by ``pad0`` / ``pad1`` (negative pads crop), convolve (true convolution, the kernel flipped) with
``k``, keep every ``down``-th pixel:

    out = downsample_down( conv( pad( zero_insert_up(x) ), k ) ).

Output size per axis: ``ceil((H * up + pad0 + pad1 - kh + 1) / down)``.

Parameter names match the reference's ``Conv2d`` (``weight`` [kh, kw, C_in, C_out], ``bias``).
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from score_sde.models import conv as conv_lib

Array = jax.Array


def setup_kernel(k: Sequence[float] | np.ndarray) -> np.ndarray:
  """Returns the normalized 2-D FIR kernel: ``outer(k, k) / sum`` for 1-D ``k``."""
  k = np.asarray(k, dtype=np.float32)
  if k.ndim == 1:
    k = np.outer(k, k)
  if k.ndim != 2 or k.shape[0] != k.shape[1]:
    raise ValueError(f"FIR kernel must be 1-D or square 2-D, got shape {k.shape}.")
  return k / np.sum(k)


def upfirdn_2d(x: Array, k: np.ndarray, up: int = 1, down: int = 1, pad0: int = 0,
               pad1: int = 0) -> Array:
  """Pad, upsample (zero insertion), FIR-filter and downsample ``x [N, H, W, C]``.

  Implemented as one depthwise ``conv_general_dilated``: ``lhs_dilation = up`` inserts the zeros
  (plus ``up - 1`` trailing zeros through the end padding), padding may be negative (crop) and
  ``window_strides = down`` drops pixels.
  """
  k = np.asarray(k, dtype=np.float32)
  kh, kw = k.shape
  c = x.shape[-1]
  # Flip: upfirdn is a true convolution, XLA convolutions are correlations.
  w = jnp.asarray(k[::-1, ::-1, None, None], dtype=x.dtype)
  w = jnp.tile(w, (1, 1, 1, c))
  return jax.lax.conv_general_dilated(
      x, w, window_strides=(down, down),
      padding=((pad0, pad1 + up - 1), (pad0, pad1 + up - 1)),
      lhs_dilation=(up, up), dimension_numbers=("NHWC", "HWIO", "NHWC"),
      feature_group_count=c)


def upsample_2d(x: Array, k: Optional[Sequence[float]] = None, factor: int = 2,
                gain: float = 1.0) -> Array:
  """FIR upsampling ``[N, H, W, C] -> [N, factor H, factor W, C]`` (``k=None``: nearest)."""
  k = setup_kernel([1] * factor if k is None else k) * (gain * factor ** 2)
  p = k.shape[0] - factor
  return upfirdn_2d(x, k, up=factor, pad0=(p + 1) // 2 + factor - 1, pad1=p // 2)


def downsample_2d(x: Array, k: Optional[Sequence[float]] = None, factor: int = 2,
                  gain: float = 1.0) -> Array:
  """FIR downsampling ``[N, H, W, C] -> [N, H / factor, W / factor, C]`` (``k=None``: mean pool)."""
  k = setup_kernel([1] * factor if k is None else k) * gain
  p = k.shape[0] - factor
  return upfirdn_2d(x, k, down=factor, pad0=(p + 1) // 2, pad1=p // 2)


def upsample_conv_2d(x: Array, w: Array, k: Optional[Sequence[float]] = None, factor: int = 2,
                     gain: float = 1.0) -> Array:
  """Fused ``upsample_2d`` then ``conv2d(w)`` (``w [kh, kw, C_in, C_out]``, odd square).

  A stride-``factor`` transposed convolution (zero insertion, then correlation with ``w``,
  padding ``kh - 1`` both sides) followed by the FIR filter with pads ``(p+1)//2 + factor - 1``
  and ``p//2 + 1``, ``p = len(k) - factor - (kh - 1)``.
  """
  kh = w.shape[0]
  if w.shape[0] != w.shape[1]:
    raise ValueError(f"Conv kernel must be square, got {w.shape}.")
  kk = setup_kernel([1] * factor if k is None else k) * (gain * factor ** 2)
  p = (kk.shape[0] - factor) - (kh - 1)
  # Transposed conv (jax.lax.conv_transpose 'VALID' padding rule): zero-insert, pad, correlate.
  pad_a = kh - 1
  pad_b = kh + factor - 2 + max(kh - factor, 0) - pad_a
  x = jax.lax.conv_general_dilated(
      x, w.astype(x.dtype), window_strides=(1, 1), padding=((pad_a, pad_b), (pad_a, pad_b)),
      lhs_dilation=(factor, factor), dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return upfirdn_2d(x, kk, pad0=(p + 1) // 2 + factor - 1, pad1=p // 2 + 1)


def conv_downsample_2d(x: Array, w: Array, k: Optional[Sequence[float]] = None,
                       factor: int = 2, gain: float = 1.0) -> Array:
  """Fused ``conv2d(w)`` then ``downsample_2d``: FIR filter, then a stride-``factor`` VALID conv."""
  kh = w.shape[0]
  if w.shape[0] != w.shape[1]:
    raise ValueError(f"Conv kernel must be square, got {w.shape}.")
  kk = setup_kernel([1] * factor if k is None else k) * gain
  p = (kk.shape[0] - factor) + (kh - 1)
  x = upfirdn_2d(x, kk, pad0=(p + 1) // 2, pad1=p // 2)
  return conv_lib.conv_general_dilated(
      x, w.astype(x.dtype), window_strides=(factor, factor), padding="VALID",
      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def naive_upsample_2d(x: Array, factor: int = 2) -> Array:
  """Nearest-neighbour upsampling by pixel repetition."""
  return jnp.repeat(jnp.repeat(x, factor, axis=1), factor, axis=2)


def _phase_folds(k: int, lo: int) -> list[tuple[list[np.ndarray], tuple[int, int]]]:
  """Per output phase p of a ``k``-tap correlation (low padding ``lo``) on a x2 nearest-upsampled
  axis: ``(taps_p, pads_p)``, the kernel taps that land on each input pixel and the padding.

  Upsampled pixel ``2i + p + a - lo`` is input pixel ``i + d``, ``d = floor((p + a - lo) / 2)``,
  so output ``2i + p`` is a correlation of the input with the folded kernel
  ``w_p[d - d_min] = sum_{a in taps_p[d - d_min]} w[a]``, padded by ``(-d_min, d_max)``.
  """
  folds = []
  for p in range(2):
    d = (p + np.arange(k) - lo) // 2
    taps = [np.flatnonzero(d == offset) for offset in range(d.min(), d.max() + 1)]
    folds.append((taps, (int(-d.min()), int(d.max()))))
  return folds


def naive_upsample_conv(lhs: Array, rhs: Array, window_strides: Sequence[int],
                        padding: str | Sequence[tuple[int, int]],
                        lhs_dilation: Optional[Sequence[int]] = None,
                        rhs_dilation: Optional[Sequence[int]] = None,
                        dimension_numbers: Any = None, feature_group_count: int = 1,
                        batch_group_count: int = 1, precision: Any = None,
                        preferred_element_type: Any = None) -> Array:
  """``conv(naive_upsample_2d(lhs, 2), rhs)``, computed at the input's resolution.

  A ``conv_general_dilated`` for ``nn.Conv(conv_general_dilated=...)``: ``lhs [N, H, W, C]`` is
  the image *before* the x2 nearest-neighbour upsampling, the result ``[N, 2H, 2W, C_out]``
  equals the convolution of the upsampled image (stride 1, padding that keeps the size 2H x 2W,
  e.g. 'SAME'). Each of the four output phases ``(p, q)`` (``y[:, 2i + p, 2j + q]``) is a
  convolution of ``lhs`` with the kernel folded onto the input pixels (:func:`_phase_folds`; a 3x3
  kernel becomes four 2x2 ones: 16 / 36 of the multiply-adds), and a 1x1 kernel is applied before
  the upsampling (1 / 4). Same values as upsampling first, to float round-off (the folded taps
  are summed before they multiply). Other strides, dilations, groups or paddings upsample and call
  the convolution; other layouts are an error.
  """
  nd = lhs.ndim - 2
  dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
  if nd != 2 or dn != conv_lib.canonical_spec(nd):
    raise ValueError("naive_upsample_conv takes NHWC images and HWIO kernels "
                     f"(dimension_numbers=('NHWC', 'HWIO', 'NHWC')), got {dimension_numbers!r} "
                     f"for an input of shape {lhs.shape}.")
  conv = conv_lib.conv_general_dilated
  kernel = rhs.shape[:nd]
  ones = (1,) * nd
  pads = conv_lib.explicit_pads([2 * s for s in lhs.shape[1:-1]], kernel, window_strides,
                                rhs_dilation or ones, padding)  # of the upsampled image
  simple = (feature_group_count == 1 and batch_group_count == 1
            and all(int(v) == 1 for v in (*window_strides, *(lhs_dilation or ones),
                                          *(rhs_dilation or ones)))
            and all(lo + hi == k - 1 for (lo, hi), k in zip(pads, kernel)))
  kw = dict(dimension_numbers=dimension_numbers, precision=precision,
            preferred_element_type=preferred_element_type)
  if not simple:
    return conv(naive_upsample_2d(lhs, 2), rhs, window_strides, pads, lhs_dilation, rhs_dilation,
                feature_group_count=feature_group_count, batch_group_count=batch_group_count, **kw)
  if kernel == (1, 1):
    return naive_upsample_2d(conv(lhs, rhs, (1, 1), ((0, 0), (0, 0)), **kw), 2)

  def fold(k: Array, taps: list[np.ndarray], axis: int) -> Array:
    # Sums of tap slices (a product with a 0 / 1 fold matrix runs on XLA:CPU as a skinny GEMM
    # over a transposed copy of the kernel: slower than the convolutions it saves).
    return jnp.stack([sum(lax.index_in_dim(k, a, axis, keepdims=False) for a in group)
                      for group in taps], axis)

  n, h, w = lhs.shape[:3]
  rows = []
  for fold_p, pad_p in _phase_folds(kernel[0], pads[0][0]):
    w_p = fold(rhs.astype(jnp.float32), fold_p, 0)
    cols = []
    for fold_q, pad_q in _phase_folds(kernel[1], pads[1][0]):
      w_pq = fold(w_p, fold_q, 1).astype(rhs.dtype)
      cols.append(conv(lhs, w_pq, (1, 1), (pad_p, pad_q), **kw))
    rows.append(jnp.stack(cols, axis=3))       # [N, H, W, 2 (q), C_out]
  y = jnp.stack(rows, axis=2)                  # [N, H, 2 (p), W, 2 (q), C_out]
  return y.reshape(n, 2 * h, 2 * w, y.shape[-1])


def naive_downsample_2d(x: Array, factor: int = 2) -> Array:
  """Mean pooling over ``factor x factor`` blocks."""
  n, h, w, c = x.shape
  x = x.reshape(n, h // factor, factor, w // factor, factor, c)
  return jnp.mean(x, axis=(2, 4))


class Conv2d(nn.Module):
  """Conv layer with optional fused FIR up/down-sampling (StyleGAN2); params ``weight``, ``bias``."""
  fmaps: int
  kernel: int
  up: bool = False
  down: bool = False
  resample_kernel: Sequence[int] = (1, 3, 3, 1)
  use_bias: bool = True
  weight_var: str = "weight"
  kernel_init: Optional[Callable[..., Any]] = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    if self.up and self.down:
      raise ValueError("Conv2d: up and down are exclusive.")
    if self.kernel < 1 or self.kernel % 2 != 1:
      raise ValueError(f"Conv2d: kernel must be odd and >= 1, got {self.kernel}.")
    init = self.kernel_init or nn.initializers.lecun_normal()
    w = self.param(self.weight_var, init, (self.kernel, self.kernel, x.shape[-1], self.fmaps))
    x = x.astype(self.dtype)
    w = w.astype(self.dtype)
    if self.up:
      x = upsample_conv_2d(x, w, k=self.resample_kernel)
    elif self.down:
      x = conv_downsample_2d(x, w, k=self.resample_kernel)
    else:
      x = conv_lib.conv_general_dilated(x, w, window_strides=(1, 1), padding="SAME",
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"))
    if self.use_bias:
      b = self.param("bias", nn.initializers.zeros, (x.shape[-1],))
      x = x + b.astype(self.dtype).reshape((1, 1, 1, -1))
    return x
