"""Group normalization with a hand-written backward pass (drop-in for ``flax.linen.GroupNorm``).

For x of shape ``[B, ..., C]`` with C channels in G groups of C / G, n = (spatial size) * C / G:

  mu[b, g] = mean_{i in (b, g)} x_i,   var[b, g] = mean x_i^2 - mu^2 (clipped at 0),
  r[b, g] = 1 / sqrt(var + eps),       xhat = (x - mu) r,     y = xhat * scale[c] + bias[c].

Backward, with dy the cotangent of y and u = dy * scale (all per (b, g) group sums):

  dbias[c] = sum_{b, spatial} dy,      dscale[c] = sum_{b, spatial} dy * xhat,
  dx = r * (u - sum(u) / n - xhat * sum(u * xhat) / n).

Both passes read their inputs once for the statistics (per-channel sums, then grouped: a plain
reduction over the spatial axes, which XLA:CPU runs at memory speed) and once elementwise. Autodiff
of flax's GroupNorm instead reduces the grouped view ``[B, ..., G, C / G]`` several times, forward
and backward: 0.40 s of the DDPM++ cont. train step at batch 8 on two CPU cores against PyTorch's
fused kernel's ~0.06 s (docs/networks.md, Throughput). The statistics (mu, r: [B, G]) are named
:data:`STATS_NAME` so ``model.remat='elementwise'`` keeps them and its recomputation of the
normalized values in the backward pass is elementwise only.

The hand-written backward (a ``jax.custom_vjp``, reverse mode only) is used on the CPU backend,
where it was measured, as the CPU convolution of :mod:`score_sde.models.conv`; on other backends
the same forward pass is differentiated by JAX (so ``jax.jvp`` works there).

Statistics and both passes run in float32 whatever the input dtype (as flax's
``force_float32_reductions``); the output has ``dtype`` (None: the promoted input / parameter
dtype), ``dx`` the input's dtype. Parameters are flax's: ``scale`` (ones) and ``bias`` (zeros) of
shape [C], so checkpoints load name for name.
"""
from __future__ import annotations

import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

Array = jax.Array
Dtype = Any

__all__ = ["GroupNorm", "group_norm", "normalize", "STATS_NAME"]

# The per-group mean and inverse standard deviation, for jax.checkpoint policies
# (model.remat='elementwise' stores them: score_sde.models.remat).
STATS_NAME = "group_norm_stats"


def _group_sum(v: Array, num_groups: int) -> Array:
  """[B, C] -> [B, G]: the sum over each group's channels."""
  return v.reshape(v.shape[0], num_groups, -1).sum(-1)


def _stats(x: Array, num_groups: int, epsilon: float) -> tuple[Array, Array]:
  """(mu, r) of shape [B, G] in float32 (module docstring)."""
  b = x.shape[0]
  axes = tuple(range(1, x.ndim - 1))
  n = x.size // (b * num_groups)
  s1 = _group_sum(jnp.sum(x, axis=axes), num_groups)
  s2 = _group_sum(jnp.sum(jnp.square(x), axis=axes), num_groups)
  mu = s1 / n
  var = jnp.maximum(s2 / n - jnp.square(mu), 0.0)
  return mu, jax.lax.rsqrt(var + epsilon)


def _per_channel(v: Array, x: Array) -> Array:
  """[B, G] -> [B, 1, ..., 1, C] (each group's value repeated over its channels)."""
  b, g = v.shape
  c = x.shape[-1]
  v = jnp.repeat(v, c // g, axis=1)
  return v.reshape((b,) + (1,) * (x.ndim - 2) + (c,))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def group_norm(x: Array, scale: Array, bias: Array, num_groups: int, epsilon: float) -> Array:
  """``xhat * scale + bias`` in float32 (module docstring); x [B, ..., C], scale / bias [C]."""
  return _group_norm_fwd(x, scale, bias, num_groups, epsilon)[0]


def _group_norm_fwd(x, scale, bias, num_groups, epsilon):
  xf = x.astype(jnp.float32)
  mu, r = _stats(xf, num_groups, epsilon)
  mu, r = checkpoint_name(mu, STATS_NAME), checkpoint_name(r, STATS_NAME)
  xhat = (xf - _per_channel(mu, xf)) * _per_channel(r, xf)
  y = xhat * scale.astype(jnp.float32) + bias.astype(jnp.float32)
  return y, (x, mu, r, scale, bias)


def _group_norm_bwd(num_groups, epsilon, res, dy):
  del epsilon
  x, mu, r, scale, bias = res
  xf = x.astype(jnp.float32)
  dy = dy.astype(jnp.float32)
  b = x.shape[0]
  axes = tuple(range(1, x.ndim - 1))
  n = x.size // (b * num_groups)
  r_c = _per_channel(r, xf)
  xhat = (xf - _per_channel(mu, xf)) * r_c
  p1 = jnp.sum(dy, axis=axes)  # [B, C]
  p2 = jnp.sum(dy * xhat, axis=axes)  # [B, C]
  s = scale.astype(jnp.float32)
  su = _group_sum(p1 * s, num_groups) / n  # [B, G]
  sux = _group_sum(p2 * s, num_groups) / n
  dx = r_c * (dy * s - _per_channel(su, xf) - xhat * _per_channel(sux, xf))
  dscale = jnp.sum(p2, axis=0).astype(scale.dtype)
  dbias = jnp.sum(p1, axis=0).astype(bias.dtype)
  return dx.astype(x.dtype), dscale, dbias


group_norm.defvjp(_group_norm_fwd, _group_norm_bwd)


def normalize(x: Array, scale: Array, bias: Array, num_groups: int, epsilon: float,
              custom_backward: Optional[bool] = None) -> Array:
  """``xhat * scale + bias`` (module docstring). ``custom_backward`` (None: on the CPU backend, as
  :mod:`score_sde.models.conv`): :func:`group_norm`, whose hand-written backward is reverse mode
  only; otherwise the same forward pass differentiated by JAX (forward mode too)."""
  if custom_backward is None:
    custom_backward = jax.default_backend() == "cpu"
  if custom_backward:
    return group_norm(x, scale, bias, num_groups, epsilon)
  return _group_norm_fwd(x, scale, bias, num_groups, epsilon)[0]


class GroupNorm(nn.Module):
  """``flax.linen.GroupNorm`` (``num_groups`` groups over the last axis, statistics over all axes
  but the batch) computed by :func:`group_norm`: same parameters, values to float round-off.

  ``dtype``: output dtype (None: promoted from the input and the parameters).
  """
  num_groups: int = 32
  epsilon: float = 1e-6
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c = x.shape[-1]
    if self.num_groups <= 0 or c % self.num_groups:
      raise ValueError(f"GroupNorm: num_groups={self.num_groups} does not divide the {c} channels "
                       "of its input.")
    if x.ndim < 2:
      raise ValueError(f"GroupNorm needs an input [batch, ..., channels]; got shape {x.shape}.")
    scale = self.param("scale", nn.initializers.ones, (c,), self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
    dtype = self.dtype or jnp.result_type(x.dtype, self.param_dtype)
    return normalize(x, scale, bias, self.num_groups, self.epsilon).astype(dtype)
