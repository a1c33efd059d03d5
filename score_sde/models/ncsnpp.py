"""NCSN++ / DDPM++ score network (Song et al., ICLR 2021, appendix H).

One configurable U-Net covers both families:

* DDPM++: ``resblock_type='biggan'``, ``fir=False``, ``progressive*='none'``, positional embedding.
* NCSN++: ``fir=True`` (StyleGAN2 FIR resampling with ``fir_kernel``), ``progressive_input=
  'residual'`` (CIFAR-10) or ``progressive='output_skip'``, ``progressive_input='input_skip'``
  (256px / 1024px), Gaussian Fourier features of ``log sigma`` for continuous VE training.

Call: ``model.apply(variables, x [B, H, W, C], labels [B], train=False)`` -> ``[B, H, W, C]``.
Labels are ``sigma`` (``embedding_type='fourier'``) or a time / step index ('positional'). With
``scale_by_sigma`` the output is divided by ``sigma`` (the VE score convention).

Parameter tree = the original score_sde ``NCSNpp`` tree (names, order, shapes).
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from score_sde.models import layers, layerspp, remat, scan
from score_sde.models.utils import register_model

Array = jax.Array

RESBLOCK_TYPES = ("ddpm", "biggan")
PROGRESSIVE = ("none", "output_skip", "residual")
PROGRESSIVE_INPUT = ("none", "input_skip", "residual")
PROGRESSIVE_COMBINE = ("sum", "cat")
EMBEDDING_TYPES = ("fourier", "positional")


def check_ncsnpp_config(config) -> None:
  """Raises ``ValueError`` naming the field for any NCSN++ option that cannot be built."""
  layers.check_unet_config(config, "NCSN++")
  layers.check_choice(config, "resblock_type", RESBLOCK_TYPES)
  layers.check_choice(config, "progressive", PROGRESSIVE)
  layers.check_choice(config, "progressive_input", PROGRESSIVE_INPUT)
  layers.check_choice(config, "progressive_combine", PROGRESSIVE_COMBINE)
  emb = layers.check_choice(config, "embedding_type", EMBEDDING_TYPES)
  if emb == "fourier" and not config.training.get("continuous", True):
    raise ValueError("config.model.embedding_type='fourier' conditions on continuous noise levels; "
                     "set config.training.continuous=True or embedding_type='positional'.")
  m = config.model
  if m.get("fir", False):
    k = list(m.get("fir_kernel", []))
    if len(k) < 1 or sum(k) == 0:
      raise ValueError(f"config.model.fir_kernel={m.get('fir_kernel')!r} must be a non-empty 1-D "
                       "list with a non-zero sum, e.g. [1, 3, 3, 1].")
  channels = [int(m.nf) * int(c) for c in m.ch_mult]
  if min(channels) < 4:
    raise ValueError(f"config.model.nf * ch_mult must be >= 4 for GroupNorm (got {channels}).")


@register_model(name="ncsnpp")
class NCSNpp(nn.Module):
  """NCSN++ / DDPM++ U-Net (see module docstring)."""
  config: ml_collections.ConfigDict
  # Run identically shaped consecutive blocks as one lax.scan (same values and parameter tree,
  # a much smaller program to compile); False unrolls every block.
  scan_blocks: bool = True

  def __post_init__(self):
    check_ncsnpp_config(self.config)
    super().__post_init__()

  @nn.compact
  def __call__(self, x: Array, labels: Array, train: bool = False) -> Array:
    config = self.config
    m = config.model
    act = layers.get_act(config)
    dtype = layers.get_dtype(config)
    nf = m.nf
    ch_mult = tuple(m.ch_mult)
    num_res_blocks = m.num_res_blocks
    attn_resolutions = tuple(m.attn_resolutions)
    num_resolutions = len(ch_mult)
    fir = m.fir
    fir_kernel = tuple(m.fir_kernel)
    skip_rescale = m.skip_rescale
    init_scale = m.init_scale
    resblock_type = m.resblock_type.lower()
    progressive = m.progressive.lower()
    progressive_input = m.progressive_input.lower()
    embedding_type = m.embedding_type.lower()
    combiner = functools.partial(layerspp.Combine, method=m.progressive_combine.lower(),
                                 dtype=dtype)
    conv3x3 = functools.partial(layerspp.conv3x3, dtype=dtype)
    group_norm = functools.partial(layerspp.group_norm, dtype=dtype)

    # Noise-level / time embedding.
    if embedding_type == "fourier":
      from score_sde.models.embeddings import GaussianFourierProjection
      used_sigmas = labels
      temb = GaussianFourierProjection(embedding_size=nf, scale=m.fourier_scale)(
          jnp.log(labels.astype(jnp.float32)))
    else:
      used_sigmas = layers.get_sigmas(config)[labels.astype(jnp.int32)]
      temb = layers.get_timestep_embedding(labels.astype(jnp.float32), nf)

    if m.conditional:
      temb = nn.Dense(nf * 4, kernel_init=layers.default_init(), dtype=dtype)(temb)
      temb = nn.Dense(nf * 4, kernel_init=layers.default_init(), dtype=dtype)(act(temb))
    else:
      temb = None

    AttnBlock = functools.partial(layerspp.AttnBlockpp, init_scale=init_scale,
                                  skip_rescale=skip_rescale, dtype=dtype)
    Upsample = functools.partial(layerspp.Upsample, with_conv=m.resamp_with_conv, fir=fir,
                                 fir_kernel=fir_kernel, dtype=dtype)
    Downsample = functools.partial(layerspp.Downsample, with_conv=m.resamp_with_conv, fir=fir,
                                   fir_kernel=fir_kernel, dtype=dtype)
    pyramid_upsample = functools.partial(layerspp.Upsample, fir=fir, fir_kernel=fir_kernel,
                                         with_conv=progressive == "residual", dtype=dtype)
    pyramid_downsample = functools.partial(layerspp.Downsample, fir=fir, fir_kernel=fir_kernel,
                                           with_conv=progressive_input == "residual", dtype=dtype)
    if resblock_type == "ddpm":
      ResnetBlock = functools.partial(layerspp.ResnetBlockDDPMpp, act=act, dropout=m.dropout,
                                      init_scale=init_scale, skip_rescale=skip_rescale,
                                      dtype=dtype)
    else:
      ResnetBlock = functools.partial(layerspp.ResnetBlockBigGANpp, act=act, dropout=m.dropout,
                                      fir=fir, fir_kernel=fir_kernel, init_scale=init_scale,
                                      skip_rescale=skip_rescale, dtype=dtype)

    if not config.data.centered:
      x = 2 * x - 1.0  # data in [0, 1] -> [-1, 1]
    x = x.astype(dtype)
    # model.remat='blocks' / 'elementwise': checkpoint every block
    remat_blocks = remat.blocks_of(config)
    block = functools.partial(remat.call, enabled=remat_blocks)

    def down_step(mods, h, _):  # a residual block, then attention at attn_resolutions
      h = mods[0](h, temb, train)
      return mods[1](h) if len(mods) > 1 else h

    def up_step(mods, h, skip):  # a residual block on [h, skip connection]
      return mods[0](jnp.concatenate([h, skip], axis=-1), temb, train)

    # Downsampling path. Runs of identical blocks execute as one lax.scan (score_sde.models.scan).
    input_pyramid = x if progressive_input != "none" else None
    hs = [conv3x3(x, nf)]
    for i_level in range(num_resolutions):
      with_attn = hs[-1].shape[1] in attn_resolutions  # res blocks keep the resolution
      units = [(ResnetBlock(out_ch=nf * ch_mult[i_level]),) + ((AttnBlock(),) if with_attn else ())
               for _ in range(num_res_blocks)]
      hs.extend(scan.apply_units(self, units, down_step, hs[-1], scan=self.scan_blocks,
                                 remat=remat_blocks))
      if i_level != num_resolutions - 1:
        if resblock_type == "ddpm":
          h = Downsample()(hs[-1])
        else:
          h = block(ResnetBlock(down=True), hs[-1], temb, train)
        if progressive_input == "input_skip":
          input_pyramid = pyramid_downsample()(input_pyramid)
          h = combiner()(input_pyramid, h)
        elif progressive_input == "residual":
          input_pyramid = pyramid_downsample(out_ch=h.shape[-1])(input_pyramid)
          input_pyramid = layerspp._skip(input_pyramid, h, skip_rescale)  # pylint: disable=protected-access
          h = input_pyramid
        hs.append(h)

    h = hs[-1]
    h = block(ResnetBlock(), h, temb, train)
    h = block(AttnBlock(), h)
    h = block(ResnetBlock(), h, temb, train)

    # Upsampling path.
    pyramid = None
    for i_level in reversed(range(num_resolutions)):
      units = [(ResnetBlock(out_ch=nf * ch_mult[i_level]),) for _ in range(num_res_blocks + 1)]
      skips = [hs.pop() for _ in units]
      h = scan.apply_units(self, units, up_step, h, skips, scan=self.scan_blocks,
                           remat=remat_blocks)[-1]
      if h.shape[1] in attn_resolutions:
        h = block(AttnBlock(), h)
      if progressive != "none":
        if i_level == num_resolutions - 1:
          if progressive == "output_skip":
            pyramid = conv3x3(act(group_norm(h)), x.shape[-1], bias=True, init_scale=init_scale)
          else:
            pyramid = conv3x3(act(group_norm(h)), h.shape[-1], bias=True)
        else:
          if progressive == "output_skip":
            pyramid = pyramid_upsample()(pyramid)
            pyramid = pyramid + conv3x3(act(group_norm(h)), x.shape[-1], bias=True,
                                        init_scale=init_scale)
          else:
            pyramid = pyramid_upsample(out_ch=h.shape[-1])(pyramid)
            pyramid = layerspp._skip(pyramid, h, skip_rescale)  # pylint: disable=protected-access
            h = pyramid
      if i_level != 0:
        if resblock_type == "ddpm":
          h = Upsample()(h)
        else:
          h = block(ResnetBlock(up=True), h, temb, train)
    assert not hs

    if progressive == "output_skip":
      h = pyramid
    else:
      h = conv3x3(act(group_norm(h)), x.shape[-1], init_scale=init_scale)
    h = h.astype(jnp.float32)
    if m.scale_by_sigma:
      h = h / used_sigmas.reshape((x.shape[0],) + (1,) * (x.ndim - 1))
    return h
