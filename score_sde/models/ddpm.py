"""The DDPM U-Net (Ho et al. 2020; the Flax port in the original score_sde).

``model.apply(variables, x [B, H, W, C], labels [B], train=False) -> [B, H, W, C]``; ``labels``
are (float) time steps fed to a sinusoidal embedding. Normalization is
``config.model.normalization`` (GroupNorm with 32 groups in every released config). With
``scale_by_sigma`` (SMLD training) the output is divided by ``sigma_{labels}``.
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from score_sde.models import layers, normalization, remat
from score_sde.models.utils import register_model

Array = jax.Array


def check_ddpm_config(config) -> None:
  """Raises ``ValueError`` naming the field for any DDPM option that cannot be built."""
  layers.check_unet_config(config, "DDPM")
  normalization.get_normalization(config)
  if config.model.normalization == "GroupNorm" and int(config.model.nf) % 32:
    raise ValueError(f"config.model.nf={config.model.nf} must be a multiple of 32 for the DDPM "
                     "GroupNorm(32 groups).")


@register_model(name="ddpm")
class DDPM(nn.Module):
  """DDPM U-Net: ``num_res_blocks`` ResNet blocks per level, attention at ``attn_resolutions``."""
  config: ml_collections.ConfigDict

  def __post_init__(self):
    check_ddpm_config(self.config)
    super().__post_init__()

  @nn.compact
  def __call__(self, x: Array, labels: Array, train: bool = False) -> Array:
    config = self.config
    m = config.model
    act = layers.get_act(config)
    dtype = layers.get_dtype(config)
    normalize = normalization.get_normalization(config)
    nf = m.nf
    ch_mult = tuple(m.ch_mult)
    num_resolutions = len(ch_mult)
    attn_resolutions = tuple(m.attn_resolutions)
    conv3x3 = functools.partial(layers.ddpm_conv3x3, dtype=dtype)
    AttnBlock = functools.partial(layers.AttnBlock, normalize=normalize, dtype=dtype)
    ResnetBlock = functools.partial(layers.ResnetBlockDDPM, act=act, normalize=normalize,
                                    dropout=m.dropout, dtype=dtype)

    if m.conditional:
      temb = layers.get_timestep_embedding(labels.astype(jnp.float32), nf)
      temb = nn.Dense(nf * 4, kernel_init=layers.default_init(), dtype=dtype)(temb)
      temb = nn.Dense(nf * 4, kernel_init=layers.default_init(), dtype=dtype)(act(temb))
    else:
      temb = None

    h = x if config.data.centered else 2 * x - 1.0
    h = h.astype(dtype)
    block = functools.partial(remat.call, enabled=remat.blocks_of(config))

    hs = [conv3x3(h, nf)]
    for i_level in range(num_resolutions):
      for _ in range(m.num_res_blocks):
        h = block(ResnetBlock(out_ch=nf * ch_mult[i_level]), hs[-1], temb, train)
        if h.shape[1] in attn_resolutions:
          h = block(AttnBlock(), h)
        hs.append(h)
      if i_level != num_resolutions - 1:
        hs.append(layers.Downsample(with_conv=m.resamp_with_conv, dtype=dtype)(hs[-1]))

    h = hs[-1]
    h = block(ResnetBlock(), h, temb, train)
    h = block(AttnBlock(), h)
    h = block(ResnetBlock(), h, temb, train)

    for i_level in reversed(range(num_resolutions)):
      for _ in range(m.num_res_blocks + 1):
        h = block(ResnetBlock(out_ch=nf * ch_mult[i_level]),
                  jnp.concatenate([h, hs.pop()], axis=-1), temb, train)
      if h.shape[1] in attn_resolutions:
        h = block(AttnBlock(), h)
      if i_level != 0:
        h = layers.Upsample(with_conv=m.resamp_with_conv, dtype=dtype)(h)
    assert not hs

    h = act(normalize(dtype=dtype)(h))
    h = conv3x3(h, x.shape[-1], init_scale=0.0).astype(jnp.float32)
    if m.scale_by_sigma:
      sigmas = layers.get_sigmas(config)[labels.astype(jnp.int32)]
      h = h / sigmas.reshape((x.shape[0],) + (1,) * (x.ndim - 1))
    return h
