"""Noise-level embeddings, parameter-compatible with the original score_sde JAX code.

* :func:`get_timestep_embedding` is the DDPM sinusoidal embedding (``layers.py`` in score_sde).
* :class:`GaussianFourierProjection` is the random Fourier feature layer of NCSN++
  (``layerspp.py``); its single param is named ``'W'`` so released checkpoints load name for name.

The helpers :func:`noise_embedding` and :func:`label_sigma` turn the noise labels of the model call
convention (see :mod:`score_sde.models.utils`) into an embedding and, for VE models, the noise
scale sigma that ``scale_by_sigma`` divides by. They are shared by the small networks of this
package (``toy_mlp``, ``small_unet``, ``dit``).
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from score_sde.parametrizations import PARAMETRIZATIONS

Array = jax.Array

EMBEDDING_TYPES = ("fourier", "positional")


def get_timestep_embedding(timesteps: Array, embedding_dim: int,
                           max_positions: int = 10000) -> Array:
  """Sinusoidal embedding of ``timesteps [batch]`` -> ``[batch, embedding_dim]``.

  With h = embedding_dim // 2 and w_k = exp(-k log(max_positions) / (h - 1)), k = 0..h-1:
  emb = [sin(t w_0), ..., sin(t w_{h-1}), cos(t w_0), ..., cos(t w_{h-1})], zero-padded by one
  column when embedding_dim is odd.
  """
  if timesteps.ndim != 1:
    raise ValueError(f"timesteps must be [batch], got shape {timesteps.shape}.")
  half_dim = embedding_dim // 2
  if half_dim < 2:
    raise ValueError(f"embedding_dim must be >= 4, got {embedding_dim}.")
  emb = math.log(max_positions) / (half_dim - 1)
  emb = jnp.exp(jnp.arange(half_dim, dtype=jnp.float32) * -emb)
  emb = timesteps.astype(jnp.float32)[:, None] * emb[None, :]
  emb = jnp.concatenate([jnp.sin(emb), jnp.cos(emb)], axis=1)
  if embedding_dim % 2 == 1:
    emb = jnp.pad(emb, [[0, 0], [0, 1]])
  return emb


class GaussianFourierProjection(nn.Module):
  """Random Fourier features: x [batch] -> [sin(2 pi x W), cos(2 pi x W)]  [batch, 2 embedding_size].

  W [embedding_size] ~ N(0, scale^2) is drawn at init and frozen (gradients are stopped).
  """
  embedding_size: int = 256
  scale: float = 1.0

  @nn.compact
  def __call__(self, x: Array) -> Array:
    W = self.param("W", jax.nn.initializers.normal(stddev=self.scale), (self.embedding_size,))
    W = jax.lax.stop_gradient(W)
    x_proj = x[:, None] * W[None, :] * 2 * jnp.pi
    return jnp.concatenate([jnp.sin(x_proj), jnp.cos(x_proj)], axis=-1)


def check_label_config(config) -> None:
  """Fails early on label/embedding combinations the small networks cannot embed."""
  etype = str(config.model.embedding_type).lower()
  if etype not in EMBEDDING_TYPES:
    raise ValueError(f"Unknown config.model.embedding_type {config.model.embedding_type!r}; "
                     f"choose one of {EMBEDDING_TYPES}.")
  if etype == "fourier" and not config.training.continuous:
    raise ValueError("embedding_type='fourier' embeds log(label) and needs positive continuous "
                     "labels; discrete (SMLD/DDPM) labels are integer steps starting at 0. Set "
                     "config.model.embedding_type='positional' or config.training.continuous=True.")


def noise_embedding(config, labels: Array, dim: int) -> Array:
  """Embeds noise labels ``[batch]`` -> ``[batch, dim]`` (call inside a compact module).

  'fourier': Gaussian Fourier features of log(label) (NCSN++), W ~ N(0, fourier_scale^2), dim/2
  frequencies; 'positional': sinusoidal embedding of the label itself (DDPM).
  """
  check_label_config(config)
  if str(config.model.embedding_type).lower() == "fourier":
    if dim % 2:
      raise ValueError(f"Fourier embedding needs an even size, got {dim}.")
    return GaussianFourierProjection(embedding_size=dim // 2,
                                     scale=config.model.fourier_scale)(jnp.log(labels))
  return get_timestep_embedding(labels, dim)


def is_ve(config) -> bool:
  """Whether the network itself normalizes VE inputs (x / sqrt(1 + sigma^2)) and, with
  ``scale_by_sigma``, divides its output by sigma: VE training with the SDE's own parametrization.
  A preconditioning parametrization (EDM's) does both outside the network."""
  if str(config.training.sde).lower() != "vesde":
    return False
  name = config.model.get("parametrization", None) or None
  return not (name in PARAMETRIZATIONS and PARAMETRIZATIONS[name].preconditions)


def label_sigma(config, labels: Array) -> Array:
  """sigma [batch] of VE labels: the label itself (continuous) or sigma_max..sigma_min[label].

  Discrete SMLD labels index the noise levels in descending order, as in the reference
  (sigmas = exp(linspace(log sigma_max, log sigma_min, N))).
  """
  if config.training.continuous:
    return labels.astype(jnp.float32)
  m = config.model
  sigmas = np.exp(np.linspace(np.log(m.sigma_max), np.log(m.sigma_min), m.num_scales))
  return jnp.asarray(sigmas, jnp.float32)[labels.astype(jnp.int32)]


def class_embedding(config, class_labels, batch: int, dim: int, stddev: float = 1.0):
  """Class-label embedding ``[batch, dim]`` for class-conditional networks (call inside a compact
  module), or 0 when ``config.model.num_classes`` is unset.

  Labels lie in 0..K with K = num_classes the null label (unconditional; also used when
  ``class_labels`` is None). The table has K + 1 rows, initialized N(0, stddev^2) (default 1, like
  the noise features it is added to; DiT's table uses 0.02). Out-of-range labels raise when concrete; under jit they are clipped
  by the gather, so check them first (score_sde.controllable.check_labels).
  """
  k = config.model.get("num_classes", None)
  if k in (None, 0):
    if class_labels is not None:
      raise ValueError("class_labels given to an unconditional network: set "
                       "config.model.num_classes to train a class-conditional model.")
    return 0.0
  if class_labels is None:
    class_labels = jnp.full((batch,), int(k), jnp.int32)
  if class_labels.shape != (batch,):
    raise ValueError(f"class_labels must be [batch]={batch}, got {class_labels.shape}.")
  if not isinstance(class_labels, jax.core.Tracer):
    arr = np.asarray(class_labels)
    if arr.size and (arr.min() < 0 or arr.max() > int(k)):
      raise ValueError(f"class_labels must lie in 0..{int(k)} ({int(k)} = the null label), got "
                       f"values in [{arr.min()}, {arr.max()}].")
  return nn.Embed(int(k) + 1, dim, embedding_init=nn.initializers.normal(stddev),
                  name="class_embed")(class_labels.astype(jnp.int32))
