"""Residual MLP score network for vector (toy) data, registered as ``'toy_mlp'``.

Config fields read: model.nf (width), model.num_layers (residual blocks), model.dropout,
model.embedding_type ('fourier' | 'positional'), model.fourier_scale, model.scale_by_sigma,
training.sde / training.continuous (label convention), and for discrete VE model.sigma_min,
model.sigma_max, model.num_scales.

Architecture, for x [batch, D] and labels [batch]:
  temb = Dense(nf) SiLU Dense(nf) (embed(labels))
  h = Dense(nf)(c_in x)
  h <- h + Dense(nf)(Dropout(SiLU(Dense(2 nf)(SiLU(LayerNorm(h))) + Dense(2 nf)(temb))))  x num_layers
  out = Dense(D)(SiLU(LayerNorm(h)))
For VE the input is scaled by c_in = 1 / sqrt(1 + sigma^2) (x_t has std ~ sigma) and, with
scale_by_sigma, the output is divided by sigma so it estimates the score (models/utils.py
conventions). For VP / sub-VP the output already has unit scale (it estimates -sigma(t) score =
E[z | x_t]), so neither rescaling applies.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from score_sde.models import embeddings
from score_sde.models.utils import register_model

Array = jax.Array


class ResidualMLPBlock(nn.Module):
  """h + W_2 Dropout(SiLU(W_1 SiLU(LN(h)) + W_t temb))."""
  width: int
  dropout: float = 0.0

  @nn.compact
  def __call__(self, h: Array, temb: Array, train: bool = False) -> Array:
    y = nn.Dense(2 * self.width)(nn.silu(nn.LayerNorm()(h)))
    y = y + nn.Dense(2 * self.width)(temb)
    y = nn.Dropout(self.dropout, deterministic=not train)(nn.silu(y))
    return h + nn.Dense(self.width)(y)


@register_model(name="toy_mlp")
class ToyMLP(nn.Module):
  """Noise-conditional residual MLP: ``(x [batch, D], labels [batch]) -> [batch, D]``."""
  config: object

  @nn.compact
  def __call__(self, x: Array, labels: Array, train: bool = False) -> Array:
    cfg = self.config
    m = cfg.model
    if x.ndim != 2:
      raise ValueError(f"toy_mlp expects vector data [batch, dim], got shape {x.shape}; use an "
                       "image network (e.g. 'small_unet') for images.")
    if labels.shape != x.shape[:1]:
      raise ValueError(f"labels must be [batch]={x.shape[:1]}, got {labels.shape}.")
    nf = int(m.nf)
    num_layers = int(m.get("num_layers", 3))
    temb = embeddings.noise_embedding(cfg, labels, nf)
    temb = nn.Dense(nf)(temb)
    temb = nn.Dense(nf)(nn.silu(temb))

    ve = embeddings.is_ve(cfg)
    if ve:
      sigma = embeddings.label_sigma(cfg, labels)
      x = x / jnp.sqrt(1.0 + sigma[:, None] ** 2)
    h = nn.Dense(nf)(x)
    for _ in range(num_layers):
      h = ResidualMLPBlock(nf, float(m.dropout))(h, temb, train)
    out = nn.Dense(x.shape[-1])(nn.silu(nn.LayerNorm()(h)))
    if ve and m.scale_by_sigma:
      out = out / sigma[:, None]
    return out
