"""A drop-in ``conv_general_dilated`` whose gradients XLA:CPU runs fast inside loops.

JAX differentiates a channel-last convolution (NHWC input, HWIO kernel) into two convolutions
with permuted dimension labels: the input gradient ``b01f_01oi->b01f`` on a reversed kernel and
the kernel gradient ``f01b_i01o->01bf``. Outside loops XLA:CPU's layout assignment turns them into
its fast (Eigen) canonical form; inside a ``while`` body (``lax.scan``, ``fori_loop``, diffrax's
adaptive solves) it does not, and they run 10-40x slower (JAX issue #12868). On a 4-conv net,
4 SGD steps in a loop on 2 CPU cores: 1.64 s with ``lax.conv_general_dilated`` (0.052 s
unrolled), 0.050 s with this (experiments/benchmark_conv_loop.py).

:func:`conv_general_dilated` computes the same forward pass and writes the input gradient as a
canonical ``NHWC x HWIO -> NHWC`` convolution with explicit transposes, which XLA:CPU keeps
canonical everywhere, and the kernel gradient of a stride-1 convolution as one matrix product per
kernel tap (a row-major GEMM ``x^T dy_k``, which XLA:CPU hands to its YNNPACK kernels: faster than
any convolution form of it and than PyTorch's oneDNN at the DDPM++ shapes,
experiments/benchmark_conv_grad.py; strided ones as a canonical convolution). It is
used on the CPU backend only; other backends and the cases it does not
cover (input dilation, grouped convolutions, other layouts) call ``lax.conv_general_dilated``.
"""
from __future__ import annotations

import functools
import itertools
from typing import Any, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.ad_checkpoint import checkpoint_name

import flax.linen as nn

__all__ = ["conv_general_dilated", "canonical_spec", "explicit_pads", "Conv", "CHECKPOINT_NAME"]

# Every convolution output is tagged with this name for jax.checkpoint policies
# (model.remat='elementwise' stores it: score_sde.models.remat).
CHECKPOINT_NAME = "conv"

Pads = Tuple[Tuple[int, int], ...]


def canonical_spec(nd: int):
  """lax dimension numbers of channel-last input/output and HWIO kernel in ``nd`` spatial dims."""
  lhs = (0, nd + 1) + tuple(range(1, nd + 1))
  rhs = (nd + 1, nd) + tuple(range(nd))
  return lax.ConvDimensionNumbers(lhs, rhs, lhs)


def explicit_pads(spatial: Sequence[int], kernel: Sequence[int], strides: Sequence[int],
                  dilation: Sequence[int], padding: Union[str, Sequence[Tuple[int, int]]]) -> Pads:
  """``((lo, hi), ...)`` per spatial axis: a padding name ('SAME', 'VALID', ...) resolved for an
  input of size ``spatial`` and a ``kernel`` dilated by ``dilation``, or explicit pads as ints."""
  if isinstance(padding, str):
    window = [(k - 1) * d + 1 for k, d in zip(kernel, dilation)]
    padding = lax.padtype_to_pads(spatial, window, strides, padding)
  return tuple((int(lo), int(hi)) for lo, hi in padding)


def _channel_last(nd: int) -> Tuple[str, str, str]:
  sp = "HWDXYZ"[:nd]
  return "N" + sp + "C", sp + "IO", "N" + sp + "C"


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _conv(x, w, strides: Tuple[int, ...], pads: Pads, dilation: Tuple[int, ...], precision):
  """out[n, o, c'] = sum_{k, c} x[n, o * s + k * d - lo, c] w[k, c, c'] (spatial index per axis)."""
  return lax.conv_general_dilated(x, w, strides, pads, rhs_dilation=dilation,
                                  dimension_numbers=_channel_last(x.ndim - 2), precision=precision)


def _conv_fwd(x, w, strides, pads, dilation, precision):
  return _conv(x, w, strides, pads, dilation, precision), (x, w)


def _conv_bwd(strides, pads, dilation, precision, res, dy):
  x, w = res
  nd = x.ndim - 2
  spatial_in, kernel, spatial_out = x.shape[1:-1], w.shape[:nd], dy.shape[1:-1]
  dn = _channel_last(nd)
  # Input gradient: dy dilated by the stride, correlated with the flipped kernel (in <-> out).
  w_t = jnp.swapaxes(jnp.flip(w, tuple(range(nd))), nd, nd + 1)
  pads_x = tuple(((k - 1) * d - lo, h + lo - (o - 1) * s - 1)
                 for h, k, o, s, d, (lo, _) in zip(spatial_in, kernel, spatial_out, strides,
                                                   dilation, pads))
  dx = lax.conv_general_dilated(dy, w_t, (1,) * nd, pads_x, lhs_dilation=strides,
                                rhs_dilation=dilation, dimension_numbers=dn, precision=precision)
  dw = _kernel_grad(x, dy, kernel, strides, pads, dilation, precision)
  return dx.astype(x.dtype), dw.astype(w.dtype)


def _kernel_grad(x, dy, kernel, strides, pads, dilation, precision):
  """dw[k] = sum_{n, p} x[n, p]^T dy_k[n, p]: one matrix product per kernel tap (stride 1).

  ``dy_k`` is dy placed in x's frame for tap k, dy_k[n, p] = dy[n, p + lo - k * d] (zero outside):
  a window of dy padded once (low ``(K - 1) * d - lo``, high ``h + lo - o``; negative crops) at
  offset ``(K - 1 - k) * d``. Each tap contracts x and dy_k, flattened to [M, C_in] and [M, C_out],
  over M = N * prod(spatial_in). The taps run in a loop, so one window is alive at a time and the
  GEMMs run one after another on all cores: on XLA:CPU 1.25-3.5x faster than the kernel gradient
  written as one convolution at the DDPM++ shapes (experiments/benchmark_conv_grad.py), and
  faster than the taps unrolled (which XLA runs side by side, all windows alive at once).
  x is the saved residual itself: nothing x-sized is made before the backward pass reaches this
  layer. Strided convolutions use that convolution (:func:`_kernel_grad_conv`).
  """
  if any(s != 1 for s in strides):
    return _kernel_grad_conv(x, dy, kernel, strides, pads, dilation, precision)
  spatial_in, spatial_out = x.shape[1:-1], dy.shape[1:-1]
  c_in, c_out = x.shape[-1], dy.shape[-1]
  frame = tuple(((k - 1) * d - lo, h + lo - o, 0)
                for k, d, (lo, _), h, o in zip(kernel, dilation, pads, spatial_in, spatial_out))
  dy_pad = lax.pad(dy, jnp.zeros((), dy.dtype), ((0, 0, 0),) + frame + ((0, 0, 0),))
  starts = np.array([[(k - 1 - t) * d for k, t, d in zip(kernel, tap, dilation)]
                     for tap in itertools.product(*(range(k) for k in kernel))], np.int32)
  # x^T as a [C_in, M] array: XLA:CPU hands a row-major [C_in, M] x [M, C_out] product to its
  # YNNPACK kernels, a product contracting both operands' leading axes to Eigen (1.2-2.5x slower).
  x_t = x.reshape(-1, c_in).T
  acc = jnp.promote_types(x.dtype, jnp.float32)

  def tap_grad(_, start):
    zero = jnp.zeros((), jnp.int32)
    dy_k = lax.dynamic_slice(dy_pad, (zero, *start, zero), dy.shape[:1] + spatial_in + (c_out,))
    return None, lax.dot_general(x_t, dy_k.reshape(-1, c_out), (((1,), (0,)), ((), ())),
                                 precision=precision, preferred_element_type=acc)

  _, dw = lax.scan(tap_grad, None, jnp.asarray(starts))
  return dw.reshape(tuple(kernel) + (c_in, c_out))


def _kernel_grad_conv(x, dy, kernel, strides, pads, dilation, precision):
  """The kernel gradient as one canonical convolution (strided convolutions).

  Channels of x act as the batch, the batch as the contracted features, and dy is the kernel
  (dilated by the stride); the window steps by the kernel dilation.
  """
  nd = x.ndim - 2
  spatial_in, spatial_out = x.shape[1:-1], dy.shape[1:-1]
  perm = (nd + 1,) + tuple(range(1, nd + 1)) + (0,)
  x_t = jnp.transpose(x, perm)                                   # [C_in, *spatial_in, N]
  dy_t = jnp.transpose(dy, tuple(range(1, nd + 1)) + (0, nd + 1))  # [*spatial_out, N, C_out]
  pads_w = tuple((lo, (k - 1) * d + (o - 1) * s + 1 - h - lo)
                 for h, k, o, s, d, (lo, _) in zip(spatial_in, kernel, spatial_out, strides,
                                                   dilation, pads))
  dw = lax.conv_general_dilated(x_t, dy_t, dilation, pads_w, rhs_dilation=strides,
                                dimension_numbers=_channel_last(nd),
                                precision=precision)  # [C_in, *kernel, C_out]
  return jnp.transpose(dw, tuple(range(1, nd + 1)) + (0, nd + 1))


_conv.defvjp(_conv_fwd, _conv_bwd)


def conv_general_dilated(lhs, rhs, window_strides: Sequence[int],
                         padding: Union[str, Sequence[Tuple[int, int]]],
                         lhs_dilation: Optional[Sequence[int]] = None,
                         rhs_dilation: Optional[Sequence[int]] = None,
                         dimension_numbers: Any = None, feature_group_count: int = 1,
                         batch_group_count: int = 1, precision: Any = None,
                         preferred_element_type: Any = None):
  """``lax.conv_general_dilated`` with CPU-canonical gradients (see the module docstring).

  Same signature and result as ``lax.conv_general_dilated``. The custom gradient applies on the
  CPU backend to channel-last convolutions without input dilation or groups; everything else is
  passed through unchanged. The output is named :data:`CHECKPOINT_NAME`
  (``jax.ad_checkpoint.checkpoint_name``) for checkpoint policies (``model.remat='elementwise'``,
  :mod:`score_sde.models.remat`).
  """
  nd = lhs.ndim - 2
  dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
  covered = (jax.default_backend() == "cpu" and dn == canonical_spec(nd)
             and feature_group_count == 1 and batch_group_count == 1
             and all(int(v) == 1 for v in (lhs_dilation or (1,) * nd))
             and preferred_element_type is None and lhs.dtype == rhs.dtype)
  if not covered:
    return checkpoint_name(lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
        feature_group_count, batch_group_count, precision, preferred_element_type),
        CHECKPOINT_NAME)
  strides = tuple(int(s) for s in window_strides)
  dilation = tuple(int(d) for d in (rhs_dilation or (1,) * nd))
  pads = explicit_pads(lhs.shape[1:-1], rhs.shape[:nd], strides, dilation, padding)
  return checkpoint_name(_conv(lhs, rhs, strides, pads, dilation, precision), CHECKPOINT_NAME)


# ``nn.Conv`` with the CPU-friendly convolution: same class, so parameter names are unchanged.
Conv = functools.partial(nn.Conv, conv_general_dilated=conv_general_dilated)
