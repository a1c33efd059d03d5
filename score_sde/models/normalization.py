"""Normalization layers of NCSN / NCSNv2 (parameter names as in the original score_sde).

For ``x [B, H, W, C]`` let ``mu_c, s_c^2`` be the per-image, per-channel spatial mean / variance.

* InstanceNorm:  ``scale * (x - mu_c) / sqrt(s_c^2 + 1e-5) + bias``.
* VarianceNorm:  ``scale * x / sqrt(s_c^2 + 1e-5) (+ bias)``.
* InstanceNorm++ (Song & Ermon 2019): with ``m, v`` the mean / variance of ``mu_c`` over channels,
  ``gamma * ((x - mu_c) / sqrt(s_c^2 + 1e-5) + alpha * (mu_c - m) / sqrt(v + 1e-5)) + beta``.
* Conditional InstanceNorm++: ``gamma, alpha, beta`` looked up per noise level ``y`` from an
  ``Embed [num_classes, 3 C]`` table.

Statistics are computed in float32; the output is cast to ``dtype``.
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from score_sde.models.group_norm import GroupNorm

Array = jax.Array

_EPS = 1e-5


def _near_one(key, shape, dtype=jnp.float32):
  """N(1, 0.02^2) initialization of the scale parameters."""
  return nn.initializers.normal(0.02)(key, shape, dtype) + 1.0


def _instance_stats(x: Array):
  x = x.astype(jnp.float32)
  return x, jnp.mean(x, axis=(1, 2)), jnp.var(x, axis=(1, 2), keepdims=True)


def get_normalization(config, conditional: bool = False):
  """The normalization module class named by ``config.model.normalization``."""
  norm = config.model.normalization
  if conditional:
    if norm != "InstanceNorm++":
      raise ValueError(f"config.model.normalization={norm!r}: the noise-conditional NCSN only "
                       "supports 'InstanceNorm++'.")
    num_classes = config.model.get("num_classes", None) or config.model.num_scales
    return functools.partial(ConditionalInstanceNorm2dPlus, num_classes=int(num_classes))
  norms = {"InstanceNorm": InstanceNorm2d, "InstanceNorm++": InstanceNorm2dPlus,
           "VarianceNorm": VarianceNorm2d, "GroupNorm": GroupNorm}
  if norm not in norms:
    raise ValueError(f"config.model.normalization={norm!r} is unknown; choose one of "
                     f"{sorted(norms)}.")
  return norms[norm]


class VarianceNorm2d(nn.Module):
  """``scale * x / sqrt(var_hw(x) + 1e-5) (+ bias)``; params ``scale [1,1,1,C]``, ``bias``."""
  bias: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x, _, var = _instance_stats(x)
    h = x / jnp.sqrt(var + _EPS)
    h = h * self.param("scale", _near_one, (1, 1, 1, x.shape[-1]))
    if self.bias:
      h = h + self.param("bias", nn.initializers.zeros, (1, 1, 1, x.shape[-1]))
    return h.astype(self.dtype)


class InstanceNorm2d(nn.Module):
  """Instance normalization; params ``scale``, ``bias`` of shape ``[1, 1, 1, C]``."""
  bias: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x, mean, var = _instance_stats(x)
    h = (x - mean[:, None, None, :]) / jnp.sqrt(var + _EPS)
    h = h * self.param("scale", nn.initializers.ones, (1, 1, 1, x.shape[-1]))
    if self.bias:
      h = h + self.param("bias", nn.initializers.zeros, (1, 1, 1, x.shape[-1]))
    return h.astype(self.dtype)


class InstanceNorm2dPlus(nn.Module):
  """InstanceNorm++; params ``alpha``, ``gamma``, ``beta`` of shape ``[1, 1, 1, C]``."""
  bias: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x, means, var = _instance_stats(x)
    m = jnp.mean(means, axis=-1, keepdims=True)
    v = jnp.var(means, axis=-1, keepdims=True)
    means_plus = (means - m) / jnp.sqrt(v + _EPS)
    h = (x - means[:, None, None, :]) / jnp.sqrt(var + _EPS)
    c = x.shape[-1]
    h = h + means_plus[:, None, None, :] * self.param("alpha", _near_one, (1, 1, 1, c))
    h = h * self.param("gamma", _near_one, (1, 1, 1, c))
    if self.bias:
      h = h + self.param("beta", nn.initializers.zeros, (1, 1, 1, c))
    return h.astype(self.dtype)


class ConditionalInstanceNorm2dPlus(nn.Module):
  """Conditional InstanceNorm++: ``[gamma | alpha | beta] = Embed(y)`` (``Embed_0/embedding``)."""
  num_classes: int = 10
  bias: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, y: Array) -> Array:
    x, means, var = _instance_stats(x)
    m = jnp.mean(means, axis=-1, keepdims=True)
    v = jnp.var(means, axis=-1, keepdims=True)
    means_plus = (means - m) / jnp.sqrt(v + _EPS)
    h = (x - means[:, None, None, :]) / jnp.sqrt(var + _EPS)
    c = x.shape[-1]
    n_out = 3 if self.bias else 2

    def init_embed(key, shape, dtype=jnp.float32):
      scales = _near_one(key, (shape[0], 2 * c), dtype)
      return jnp.concatenate([scales, jnp.zeros((shape[0], c), dtype)], -1) if self.bias else scales

    emb = nn.Embed(self.num_classes, c * n_out, embedding_init=init_embed)(y.astype(jnp.int32))
    parts = jnp.split(emb, n_out, axis=-1)
    gamma, alpha = parts[0], parts[1]
    h = h + means_plus[:, None, None, :] * alpha[:, None, None, :]
    out = gamma[:, None, None, :] * h
    if self.bias:
      out = out + parts[2][:, None, None, :]
    return out.astype(self.dtype)
