"""NCSN (Song & Ermon 2019) and NCSNv2 (Song & Ermon 2020) RefineNet score networks.

``model.apply(variables, x [B, H, W, C], labels [B] int, train=False) -> [B, H, W, C]``, labels
being SMLD noise-level indices. NCSN conditions every normalization on the label
(conditional InstanceNorm++); NCSNv2 is unconditional and, with ``scale_by_sigma``, divides its
output by ``sigma_{labels}``.

A ResNet encoder (levels of [ResidualBlock 'down', ResidualBlock]; levels past the first two use
dilated convolutions at constant resolution) feeds a cascade of RefineBlocks from the deepest
level to the shallowest. Registered names: 'ncsn', 'ncsnv2_64' (alias 'ncsnv2'), 'ncsnv2_128',
'ncsnv2_256'. Parameter trees match the original score_sde.
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from score_sde.models import layers, normalization
from score_sde.models.utils import register_model

Array = jax.Array

# (channel multiplier, dilation) per encoder level; refine-block channel multipliers from the
# deepest level up.
_ARCHS = {
    "64": ([(1, 1), (2, 1), (2, 2), (2, 4)], [2, 2, 2, 1]),
    "128": ([(1, 1), (2, 1), (2, 1), (4, 2), (4, 4)], [4, 2, 2, 1, 1]),
    "256": ([(1, 1), (2, 1), (2, 1), (2, 1), (4, 2), (4, 4)], [4, 2, 2, 2, 1, 1]),
}


def check_ncsnv2_config(config, arch: str, conditional: bool) -> None:
  """Raises ``ValueError`` naming the field for options the RefineNet cannot be built with."""
  levels, _ = _ARCHS[arch]
  factor = 2 ** sum(1 for i, (_, d) in enumerate(levels) if i > 0 and d == 1)
  size = int(config.data.image_size)
  if size % factor:
    raise ValueError(f"config.data.image_size={size} is not divisible by the downsampling factor "
                     f"{factor} of this NCSN network ({config.model.name!r}).")
  layers.get_act(config)
  layers.get_dtype(config)
  normalization.get_normalization(config, conditional=conditional)
  layers.check_choice(config, "interpolation", ("bilinear", "nearest_neighbor"), "bilinear")


class _RefineNet(nn.Module):
  """Shared NCSN / NCSNv2 body; subclasses fix the architecture and conditioning."""
  config: ml_collections.ConfigDict
  arch = "64"
  conditional = False

  def __post_init__(self):
    check_ncsnv2_config(self.config, self.arch, self.conditional)
    super().__post_init__()

  @nn.compact
  def __call__(self, x: Array, labels: Array, train: bool = False) -> Array:
    config = self.config
    m = config.model
    nf = m.nf
    act = layers.get_act(config)
    dtype = layers.get_dtype(config)
    normalizer = functools.partial(normalization.get_normalization(config, self.conditional))
    interpolation = m.get("interpolation", "bilinear")
    levels, refine_mult = _ARCHS[self.arch]
    y = labels.astype(jnp.int32) if self.conditional else None

    if self.conditional:
      Block = functools.partial(layers.ConditionalResidualBlock, act=act,
                                normalization=normalizer, dtype=dtype)
      block = lambda mod, h: mod(h, y)
      Refine = functools.partial(layers.CondRefineBlock, normalizer=normalizer)
      refine = lambda mod, hs: mod(hs, y)
      final_norm = lambda h: normalizer(dtype=dtype)(h, y)
    else:
      Block = functools.partial(layers.ResidualBlock, act=act, normalization=normalizer,
                                dtype=dtype)
      block = lambda mod, h: mod(h)
      Refine = layers.RefineBlock
      refine = lambda mod, hs: mod(hs)
      final_norm = lambda h: normalizer(dtype=dtype)(h)

    h = x if config.data.centered else 2 * x - 1.0
    h = layers.ncsn_conv3x3(h.astype(dtype), nf, stride=1, bias=True, dtype=dtype)
    skips: list[Array] = []
    for i, (mult, dilation) in enumerate(levels):
      resample = None if i == 0 else "down"
      h = block(Block(mult * nf, resample=resample, dilation=dilation), h)
      h = block(Block(mult * nf, resample=None, dilation=dilation), h)
      skips.append(h)

    ref = None
    n = len(skips)
    for j, mult in enumerate(refine_mult):
      layer = skips[n - 1 - j]
      inputs = [layer] if ref is None else [layer, ref]
      ref = refine(Refine(layer.shape[1:3], mult * nf, act=act, interpolation=interpolation,
                          start=j == 0, end=j == n - 1, dtype=dtype), inputs)

    h = act(final_norm(ref))
    h = layers.ncsn_conv3x3(h, x.shape[-1], dtype=dtype).astype(jnp.float32)
    if m.scale_by_sigma:
      sigmas = layers.get_sigmas(config)[labels.astype(jnp.int32)]
      h = h / sigmas.reshape((x.shape[0],) + (1,) * (x.ndim - 1))
    return h


@register_model(name="ncsnv2_64")
class NCSNv2(_RefineNet):
  """NCSNv2 for images below 96px."""
  arch = "64"


register_model(NCSNv2, name="ncsnv2")


@register_model(name="ncsnv2_128")
class NCSNv2_128(_RefineNet):  # pylint: disable=invalid-name
  """NCSNv2 for 96-128px images."""
  arch = "128"


@register_model(name="ncsnv2_256")
class NCSNv2_256(_RefineNet):  # pylint: disable=invalid-name
  """NCSNv2 for 128-256px images."""
  arch = "256"


@register_model(name="ncsn")
class NCSN(_RefineNet):
  """NCSNv1: the 64px RefineNet with noise-conditional InstanceNorm++ everywhere."""
  arch = "64"
  conditional = True
