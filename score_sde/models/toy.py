"""Residual MLP score network for vector (toy) data, registered as ``'toy_mlp'``.

Config fields read: model.nf (width), model.num_layers (residual blocks), model.dropout,
model.embedding_type ('fourier' | 'positional'), model.fourier_scale, model.scale_by_sigma,
training.sde / training.continuous (label convention), and for discrete VE model.sigma_min,
model.sigma_max, model.num_scales.

Architecture, for x [batch, D] and labels [batch]:
  temb = Dense(nf) SiLU (Dense(nf)(embed(labels)) + Embed(class_labels))
  (the class embedding only when config.model.num_classes = K is set: class_labels [batch] in
  0..K, K the null label, which is also used when class_labels is None)
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

from score_sde.models import embeddings, remat
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
  def __call__(self, x: Array, labels: Array, train: bool = False,
               class_labels: Array | None = None) -> Array:
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
    temb = temb + embeddings.class_embedding(cfg, class_labels, x.shape[0], nf)
    temb = nn.Dense(nf)(nn.silu(temb))

    ve = embeddings.is_ve(cfg)
    if ve:
      sigma = embeddings.label_sigma(cfg, labels)
      x = x / jnp.sqrt(1.0 + sigma[:, None] ** 2)
    h = nn.Dense(nf)(x)
    # model.remat='blocks' / 'elementwise': checkpoint every block
    remat_blocks = remat.blocks_of(cfg)
    for _ in range(num_layers):
      h = remat.call(ResidualMLPBlock(nf, float(m.dropout)), h, temb, train, enabled=remat_blocks)
    out = nn.Dense(x.shape[-1])(nn.silu(nn.LayerNorm()(h)))
    if ve and m.scale_by_sigma:
      out = out / sigma[:, None]
    return out


class ToyClassifier(nn.Module):
  """Noise-conditional MLP classifier for vector data: ``(x_t [batch, D], sigma [batch]) -> logits``.

  temb = Dense(nf) SiLU Dense(nf) (Fourier(log sigma), scale 1); h = Dense(nf)(x / sqrt(1 + sigma^2));
  num_layers residual blocks as in :class:`ToyMLP`; logits = Dense(K)(SiLU(LN(h))). Same call
  convention as :class:`score_sde.models.wideresnet.WideResnet` (x_t and its noise std sigma(t)).
  """
  num_classes: int
  nf: int = 128
  num_layers: int = 3

  @nn.compact
  def __call__(self, x: Array, sigmas: Array, train: bool = False) -> Array:
    if x.ndim != 2 or sigmas.shape != x.shape[:1]:
      raise ValueError(f"ToyClassifier expects x [batch, dim] and sigmas [batch], got {x.shape} "
                       f"and {sigmas.shape}.")
    temb = embeddings.GaussianFourierProjection(self.nf // 2, scale=1.0)(jnp.log(sigmas))
    temb = nn.Dense(self.nf)(nn.silu(nn.Dense(self.nf)(temb)))
    h = nn.Dense(self.nf)(x / jnp.sqrt(1.0 + sigmas[:, None] ** 2))
    for _ in range(self.num_layers):
      h = ResidualMLPBlock(self.nf)(h, temb, train)
    return nn.Dense(self.num_classes)(nn.silu(nn.LayerNorm()(h)))
