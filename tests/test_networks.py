"""Score networks: FIR resampling, parameter trees / counts of every config, behaviour of shrunken
networks (one compile each), bf16, and build-time config errors."""
import glob
import importlib
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from score_sde.models import scan as scan_lib
from score_sde.models import up_or_down_sampling as updown
from score_sde.models import utils as mutils

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(name):
  return importlib.import_module(f"configs.{name}").get_config()


def shrink(cfg, **model):
  """Tiny copy of a config: 8x8 images, nf=8, two levels (attention at 4x4)."""
  cfg = cfg.copy_and_resolve_references()
  cfg.data.image_size = model.pop("image_size", 8)
  defaults = dict(nf=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,))
  for k, v in {**defaults, **model}.items():
    cfg.model[k] = v
  return cfg


def param_shapes(cfg):
  model = mutils.get_model(cfg.model.name)(config=cfg)
  s = cfg.data.image_size
  v = jax.eval_shape(lambda: model.init({"params": jax.random.PRNGKey(0)},
                                        jnp.zeros((1, s, s, 3)), jnp.ones((1,)), train=False))
  return model, {"/".join(k): x.shape for k, x in flatten_dict(v["params"]).items()}


def random_params(cfg, seed=0, scale=0.2):
  """Parameters from the eval_shape template (no init compile)."""
  model = mutils.get_model(cfg.model.name)(config=cfg)
  s = cfg.data.image_size
  shapes = jax.eval_shape(lambda: model.init({"params": jax.random.PRNGKey(0)},
                                             jnp.zeros((1, s, s, 3)), jnp.ones((1,))))["params"]
  rng = np.random.default_rng(seed)
  return model, jax.tree_util.tree_map(
      lambda a: jnp.asarray(rng.normal(size=a.shape) * scale, jnp.float32), shapes)


# ------------------------------------------------------------------------------------------------
# FIR up/down-sampling against independent implementations.
# ------------------------------------------------------------------------------------------------


def _np_upfirdn_1d(a, k, up, down, pad0, pad1, axis):
  """Zero-insert, pad, full 1-D convolution (np.convolve), decimate: scipy.signal.upfirdn + crop."""
  a = np.moveaxis(a, axis, -1)
  z = np.zeros(a.shape[:-1] + (a.shape[-1] * up,))
  z[..., ::up] = a
  z = np.concatenate([np.zeros(a.shape[:-1] + (pad0,)), z, np.zeros(a.shape[:-1] + (pad1,))], -1)
  out = np.apply_along_axis(lambda v: np.convolve(v, k, mode="valid"), -1, z)[..., ::down]
  return np.moveaxis(out, -1, axis)


def test_fir_resampling_matches_separable_numpy_convolution():
  x = np.random.default_rng(0).normal(size=(2, 8, 8, 3)).astype(np.float32)
  k = np.array([1, 3, 3, 1], np.float64)
  up = _np_upfirdn_1d(_np_upfirdn_1d(x, 2 * k / k.sum(), 2, 1, 2, 1, 1), 2 * k / k.sum(), 2, 1, 2,
                      1, 2)
  np.testing.assert_allclose(updown.upsample_2d(jnp.asarray(x), k), up, atol=1e-5)
  down = _np_upfirdn_1d(_np_upfirdn_1d(x, k / k.sum(), 1, 2, 1, 1, 1), k / k.sum(), 1, 2, 1, 1, 2)
  np.testing.assert_allclose(updown.downsample_2d(jnp.asarray(x), k), down, atol=1e-5)
  # k = [1, 1]: nearest-neighbour upsampling and 2x2 mean pooling exactly.
  np.testing.assert_allclose(updown.upsample_2d(jnp.asarray(x), [1, 1]),
                             x.repeat(2, 1).repeat(2, 2), atol=1e-6)
  np.testing.assert_allclose(updown.downsample_2d(jnp.asarray(x), [1, 1]),
                             x.reshape(2, 4, 2, 4, 2, 3).mean((2, 4)), atol=1e-6)


@pytest.mark.parametrize("kernel,padding", [
    (3, "SAME"), (3, ((1, 1), (1, 1))), (3, ((0, 2), (2, 0))), (5, "SAME"), (1, "SAME"),
    (4, "SAME"), (3, "VALID")])
def test_naive_upsample_conv_equals_the_convolution_of_the_upsampled_image(kernel, padding):
  """Values and both gradients, against upsampling first; VALID (output not 2H) falls back."""
  rng = np.random.default_rng(kernel)
  x = jnp.asarray(rng.normal(size=(2, 5, 6, 3)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(kernel, kernel, 3, 4)), jnp.float32)
  dn = ("NHWC", "HWIO", "NHWC")
  ref = lambda x, w: jax.lax.conv_general_dilated(updown.naive_upsample_2d(x, 2), w, (1, 1),
                                                  padding, dimension_numbers=dn)
  ours = lambda x, w: updown.naive_upsample_conv(x, w, (1, 1), padding, dimension_numbers=dn)
  y, y_ref = ours(x, w), ref(x, w)
  assert y.shape == y_ref.shape
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  dy = jnp.asarray(rng.normal(size=y.shape), jnp.float32)
  for g, g_ref in zip(jax.vjp(ours, x, w)[1](dy), jax.vjp(ref, x, w)[1](dy)):
    np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-4)
  # Fewer multiply-adds: a 3x3 kernel becomes four 2x2 convolutions of the input itself.
  if kernel == 3 and padding == "SAME":
    text = str(jax.make_jaxpr(ours)(x, w))
    assert "conv_general_dilated" in text and "f32[2,10,12,3]" not in text, text
  with pytest.raises(ValueError, match="NHWC"):
    updown.naive_upsample_conv(x, w, (1, 1), padding)  # lax's default layout: NCHW / OIHW


def test_upsampling_blocks_keep_their_parameters_and_outputs():
  """The layers that fold the upsampling into their convolution (``upsample=True``) have the
  parameter tree of the conv-after-upsampling they replace and compute the same output."""
  from score_sde.models import layers
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 4, 6))

  class Reference(nn.Module):
    @nn.compact
    def __call__(self, x):
      up = updown.naive_upsample_2d(x, 2)
      return layers.ddpm_conv3x3(up, 5) + layers.ddpm_conv1x1(up, 5)

  class Folded(nn.Module):
    @nn.compact
    def __call__(self, x):
      return (layers.ddpm_conv3x3(x, 5, upsample=True)
              + layers.ddpm_conv1x1(x, 5, upsample=True))

  v = Reference().init(jax.random.PRNGKey(1), x)
  v = jax.tree.map(lambda p: p + 0.1, v)  # non-zero biases too
  assert jax.tree.structure(Folded().init(jax.random.PRNGKey(1), x)) == jax.tree.structure(v)
  np.testing.assert_allclose(Folded().apply(v, x), Reference().apply(v, x), rtol=1e-5, atol=1e-5)


def test_fused_conv_resampling_matches_stylegan2_formulation():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(2, 8, 8, 3)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(3, 3, 3, 5)), jnp.float32)
  # StyleGAN2 / reference: conv2d_transpose (stride 2, VALID) with the flipped kernel, then FIR.
  wt = jnp.transpose(w[::-1, ::-1], (0, 1, 3, 2))
  y = jax.lax.conv_transpose(x, wt, strides=(2, 2), padding="VALID", transpose_kernel=True,
                             dimension_numbers=("NHWC", "HWIO", "NHWC"))
  ref = updown.upfirdn_2d(y, updown.setup_kernel([1, 3, 3, 1]) * 4, pad0=1, pad1=1)
  np.testing.assert_allclose(updown.upsample_conv_2d(x, w, [1, 3, 3, 1]), ref, atol=1e-4)
  assert ref.shape == (2, 16, 16, 5)
  # k = [1, 1] with a 1x1 kernel: conv-then-downsample == mean pool then 1x1 conv.
  w1 = w[1:2, 1:2]
  pooled = np.asarray(x).reshape(2, 4, 2, 4, 2, 3).mean((2, 4))
  np.testing.assert_allclose(updown.conv_downsample_2d(x, w1, [1, 1]),
                             np.einsum("bhwc,cd->bhwd", pooled, np.asarray(w1[0, 0])), atol=1e-5)


# ------------------------------------------------------------------------------------------------
# Parameter trees and counts.
# ------------------------------------------------------------------------------------------------


def _expected_unet_params(cfg):
  """Parameter count of NCSN++ / DDPM++ / DDPM recomputed from the architecture description."""
  m, c_in = cfg.model, 3
  nf, mult, nrb = m.nf, list(m.ch_mult), m.num_res_blocks
  ddpm_net = m.name == "ddpm"
  resblock = "ddpm" if ddpm_net else m.resblock_type
  prog = "none" if ddpm_net else m.progressive
  prog_in = "none" if ddpm_net else m.progressive_input
  fourier = (not ddpm_net) and m.embedding_type == "fourier"
  conv = lambda k, i, o: k * k * i * o + o
  gn = lambda c: 2 * c
  nin = lambda i, o: i * o + o
  tdim = 4 * nf if m.conditional else 0

  def block(i, o, resample=False):
    n = gn(i) + conv(3, i, o) + (tdim * o + o if tdim else 0) + gn(o) + conv(3, o, o)
    if resblock == "biggan":
      return n + (conv(1, i, o) if (i != o or resample) else 0)
    return n + (nin(i, o) if i != o else 0)

  attn = lambda c: gn(c) + 4 * nin(c, c)
  total = (nf if fourier else 0)
  if m.conditional:
    total += (2 * nf if fourier else nf) * 4 * nf + 4 * nf + 4 * nf * 4 * nf + 4 * nf
  total += conv(3, c_in, nf)
  hs, cur, res, pyr = [nf], nf, cfg.data.image_size, c_in
  for i, mu in enumerate(mult):
    for _ in range(nrb):
      total += block(cur, nf * mu)
      cur = nf * mu
      total += attn(cur) if res in m.attn_resolutions else 0
      hs.append(cur)
    if i != len(mult) - 1:
      total += block(cur, cur, True) if resblock == "biggan" else conv(3, cur, cur)
      res //= 2
      if prog_in == "input_skip":
        total += conv(1, c_in, cur)
      elif prog_in == "residual":
        total += conv(3, pyr, cur)
        pyr = cur
      hs.append(cur)
  total += 2 * block(cur, cur) + attn(cur)
  pyr = None
  for i in reversed(range(len(mult))):
    for _ in range(nrb + 1):
      total += block(cur + hs.pop(), nf * mult[i])
      cur = nf * mult[i]
    total += attn(cur) if res in m.attn_resolutions else 0
    if prog == "output_skip":
      total += gn(cur) + conv(3, cur, c_in)
    elif prog == "residual":
      total += gn(cur) + conv(3, cur, cur) if pyr is None else conv(3, pyr, cur)
      pyr = cur
    if i != 0:
      total += block(cur, cur, True) if resblock == "biggan" else conv(3, cur, cur)
      res *= 2
  assert not hs
  if prog != "output_skip":
    total += gn(cur) + conv(3, cur, c_in)
  return total


UNET_CONFIGS = ["vp.cifar10_ddpm", "vp.cifar10_ddpmpp", "vp.cifar10_ddpmpp_continuous",
                "vp.cifar10_ddpmpp_deep_continuous", "vp.cifar10_ncsnpp",
                "vp.cifar10_ncsnpp_continuous", "vp.cifar10_ncsnpp_deep_continuous",
                "subvp.cifar10_ddpm_continuous", "subvp.cifar10_ddpmpp_continuous",
                "subvp.cifar10_ddpmpp_deep_continuous", "subvp.cifar10_ncsnpp_continuous",
                "subvp.cifar10_ncsnpp_deep_continuous", "ve.cifar10_ncsnpp",
                "ve.cifar10_ncsnpp_continuous", "ve.cifar10_ncsnpp_deep_continuous",
                "ve.cifar10_ddpm", "ve.church_ncsnpp_continuous", "ve.ffhq_ncsnpp_continuous"]


@pytest.mark.parametrize("name", UNET_CONFIGS)
def test_unet_parameter_count_matches_architecture_formula(name):
  cfg = load(name)
  _, shapes = param_shapes(cfg)
  n = sum(int(np.prod(s)) for s in shapes.values())
  assert n == _expected_unet_params(cfg)


def test_cifar10_parameter_counts_match_published_sizes():
  """Published sizes: DDPM 35.7M (Ho et al. 2020), DDPM++ cont. ~62M, NCSN++ cont. ~63M,
  NCSN++ cont. deep ~108M (score_sde). score_sde's DDPM applies attention once per up level
  instead of after each of its 3 blocks, i.e. two 256-channel attention blocks fewer than Ho et al.
  """
  count = lambda n: sum(int(np.prod(s)) for s in param_shapes(load(n))[1].values()) / 1e6
  attn256 = (2 * 256 + 4 * (256 * 256 + 256)) / 1e6
  assert abs(count("vp.cifar10_ddpm") + 2 * attn256 - 35.7) < 0.05
  assert abs(count("vp.cifar10_ddpmpp_continuous") - 62) < 0.5
  assert abs(count("ve.cifar10_ncsnpp_continuous") - 63) < 0.5
  assert abs(count("ve.cifar10_ncsnpp_deep_continuous") - 108) < 0.5


def test_parameter_tree_follows_reference_naming():
  """Names / shapes of the original score_sde NCSNpp tree (auto-named submodules)."""
  _, s = param_shapes(load("ve.cifar10_ncsnpp_continuous"))
  assert s["GaussianFourierProjection_0/W"] == (128,)
  assert s["Dense_0/kernel"] == (256, 512) and s["Dense_1/kernel"] == (512, 512)
  assert s["Conv_0/kernel"] == (3, 3, 3, 128) and s["Conv_1/kernel"] == (3, 3, 128, 3)
  # 4 levels x 4 blocks + 3 down; 2 middle; 4 levels x 5 blocks + 3 up = 44 BigGAN blocks.
  blocks = {k.split("/")[0] for k in s if k.startswith("ResnetBlockBigGANpp_")}
  assert blocks == {f"ResnetBlockBigGANpp_{i}" for i in range(44)}
  assert s["ResnetBlockBigGANpp_4/Conv_2/kernel"] == (1, 1, 128, 128)  # down block shortcut
  assert s["ResnetBlockBigGANpp_5/Dense_0/kernel"] == (512, 256)
  assert {k.split("/")[0] for k in s if k.startswith("AttnBlockpp_")} == {
      f"AttnBlockpp_{i}" for i in range(6)}
  assert s["AttnBlockpp_0/NIN_3/W"] == (256, 256)
  assert s["Downsample_1/Conv2d_0/weight"] == (3, 3, 128, 256)
  _, s = param_shapes(load("vp.cifar10_ddpm"))
  assert s["ResnetBlockDDPM_2/NIN_0/W"] == (128, 256) and s["Downsample_0/Conv_0/kernel"] == (
      3, 3, 128, 128)
  _, s = param_shapes(load("ve.ncsnv2.cifar10"))
  assert s["ResidualBlock_2/ConvMeanPool_1/Conv_0/kernel"] == (1, 1, 128, 256)
  assert s["RefineBlock_3/RCUBlock_2/Conv_5/kernel"] == (3, 3, 128, 128)  # end: 3 x 2 convs
  assert s["InstanceNorm2dPlus_0/alpha"] == (1, 1, 1, 128)


def test_every_config_builds():
  """Every vp/ subvp/ ve/ config defines get_config() whose network constructs (validated)."""
  files = sorted(f for d in ("vp", "subvp", "ve")
                 for f in glob.glob(os.path.join(ROOT, "configs", d, "**", "*.py"), recursive=True)
                 if not f.endswith("__init__.py"))
  assert len(files) >= 40
  for f in files:
    name = os.path.relpath(f, os.path.join(ROOT, "configs"))[:-3].replace(os.sep, ".")
    cfg = load(name)
    for section in ("training", "sampling", "eval", "data", "model", "optim"):
      assert section in cfg, (name, section)
    mutils.get_model(cfg.model.name)(config=cfg)
  for name, arch in (("ve.ncsnv2.bedroom", "ncsnv2_128"), ("ve.ncsn.celeba", "ncsn"),
                     ("ve.celebahq_256_ncsnpp_continuous", "ncsnpp")):
    assert load(name).model.name == arch
  _, s = param_shapes(load("ve.ncsnv2.bedroom"))
  assert s["Conv_1/kernel"] == (3, 3, 128, 3)


# ------------------------------------------------------------------------------------------------
# Behaviour of shrunken networks (one compile per network).
# ------------------------------------------------------------------------------------------------


def test_ncsnpp_fourier_residual_scale_by_sigma_and_frozen_fourier():
  cfg = shrink(load("ve.cifar10_ncsnpp_continuous"))
  cfg_raw = cfg.copy_and_resolve_references()
  cfg_raw.model.scale_by_sigma = False
  cfg_c = cfg_raw.copy_and_resolve_references()
  cfg_c.data.centered = True
  model, params = random_params(cfg)
  raw = mutils.get_model("ncsnpp")(config=cfg_raw)
  cen = mutils.get_model("ncsnpp")(config=cfg_c)
  x = jax.random.uniform(jax.random.PRNGKey(1), (2, 8, 8, 3))
  sig = jnp.array([0.3, 20.0])

  @jax.jit
  def run(p):
    out = model.apply({"params": p}, x, sig)
    loss = lambda q: jnp.sum(model.apply({"params": q}, x, sig, train=True,
                                         rngs={"dropout": jax.random.PRNGKey(3)}) ** 2)
    return (out, raw.apply({"params": p}, x, sig), cen.apply({"params": p}, 2 * x - 1, sig),
            jax.grad(loss)(p))

  out, out_raw, out_c, g = run(params)
  assert out.shape == x.shape and out.dtype == jnp.float32
  np.testing.assert_allclose(out * sig[:, None, None, None], out_raw, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(out_c, out_raw, rtol=1e-4, atol=1e-5)  # uncentered = 2x - 1 input
  assert np.all(np.asarray(g["GaussianFourierProjection_0"]["W"]) == 0)  # frozen features
  leaves = jax.tree_util.tree_leaves(g)
  assert all(np.isfinite(np.asarray(l)).all() for l in leaves)
  assert np.abs(np.asarray(g["Downsample_0"]["Conv2d_0"]["weight"])).sum() > 0


def test_ncsnpp_ddpm_blocks_output_skip_input_skip_cat_dropout():
  cfg = shrink(load("ve.bedroom_ncsnpp_continuous"), ch_mult=(1, 2, 2), image_size=8,
               resblock_type="ddpm", progressive_combine="cat", embedding_type="positional",
               dropout=0.5, fir=False, attn_resolutions=(2,))
  cfg.training.continuous = False
  model, params = random_params(cfg)
  assert any(k.startswith("Combine_") for k in params)
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 8, 3))
  labels = jnp.array([3, 999])

  @jax.jit
  def run(p, k1, k2):
    f = lambda k: model.apply({"params": p}, x, labels, train=True, rngs={"dropout": k})
    return f(k1), f(k2), model.apply({"params": p}, x, labels), model.apply({"params": p}, x,
                                                                            labels)

  a, b, e1, e2 = run(params, jax.random.PRNGKey(0), jax.random.PRNGKey(1))
  assert a.shape == x.shape
  assert not np.allclose(a, b)  # dropout active in training
  np.testing.assert_array_equal(e1, e2)  # deterministic at eval


def test_ddpm_bfloat16_matches_float32():
  cfg = shrink(load("vp.cifar10_ddpm"), nf=32)
  cfg16 = cfg.copy_and_resolve_references()
  cfg16.model.dtype = "bfloat16"
  model, params = random_params(cfg, scale=0.05)
  m16 = mutils.get_model("ddpm")(config=cfg16)
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 8, 3))
  t = jnp.array([10.0, 500.0])
  out, out16, g16 = jax.jit(lambda p: (
      model.apply({"params": p}, x, t), m16.apply({"params": p}, x, t),
      jax.grad(lambda q: jnp.sum(m16.apply({"params": q}, x, t) ** 2))(p)))(params)
  assert out16.dtype == jnp.float32
  assert all(l.dtype == jnp.float32 for l in jax.tree_util.tree_leaves(g16))  # f32 grads
  rel = np.linalg.norm(np.asarray(out16) - np.asarray(out)) / np.linalg.norm(np.asarray(out))
  assert rel < 0.05


def test_ncsn_v1_and_v2_refinenets():
  cfg2 = shrink(load("ve.ncsnv2.cifar10"), image_size=8)
  cfg1 = shrink(load("ve.ncsn.cifar10"), image_size=8)
  m2, p2 = random_params(cfg2, scale=0.1)
  m1, p1 = random_params(cfg1, scale=0.1)
  x = jax.random.uniform(jax.random.PRNGKey(1), (2, 8, 8, 3))
  lab = jnp.array([0, 7])
  out2, out1, out1b = jax.jit(lambda a, b: (m2.apply({"params": a}, x, lab),
                                            m1.apply({"params": b}, x, lab),
                                            m1.apply({"params": b}, x, lab[::-1])))(p2, p1)
  assert out2.shape == out1.shape == x.shape
  assert np.all(np.isfinite(out2)) and np.all(np.isfinite(out1))
  assert not np.allclose(out1, out1b)  # NCSN conditions on the noise level index
  assert p1["ConditionalResidualBlock_0"]["ConditionalInstanceNorm2dPlus_0"]["Embed_0"][
      "embedding"].shape == (10, 24)


# ------------------------------------------------------------------------------------------------
# Build-time config errors.
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("field,value,match", [
    ("attn_resolutions", (7,), "attn_resolutions"),
    ("resblock_type", "vgg", "resblock_type"),
    ("progressive", "skip", "progressive"),
    ("progressive_input", "sum", "progressive_input"),
    ("progressive_combine", "mul", "progressive_combine"),
    ("embedding_type", "learned", "embedding_type"),
    ("nonlinearity", "gelu2", "nonlinearity"),
    ("dtype", "float16", "dtype"),
    ("ch_mult", (1,) * 7, "image_size"),
    ("normalization", "InstanceNorm++", "normalization"),
])
def test_bad_ncsnpp_config_fails_at_build(field, value, match):
  cfg = load("ve.cifar10_ncsnpp_continuous")
  cfg.model[field] = value
  with pytest.raises(ValueError, match=match):
    mutils.get_model("ncsnpp")(config=cfg)


def test_bad_other_configs_fail_at_build():
  cfg = load("ve.cifar10_ncsnpp")
  cfg.model.embedding_type = "fourier"  # discrete training cannot use Fourier features of sigma
  with pytest.raises(ValueError, match="continuous"):
    mutils.get_model("ncsnpp")(config=cfg)
  cfg = load("vp.cifar10_ddpm")
  cfg.data.image_size = 36
  with pytest.raises(ValueError, match="image_size"):
    mutils.get_model("ddpm")(config=cfg)
  cfg = load("ve.ncsnv2.bedroom")
  cfg.data.image_size = 102
  with pytest.raises(ValueError, match="image_size"):
    mutils.get_model("ncsnv2_128")(config=cfg)
  cfg = load("ve.ncsnv2.cifar10")
  cfg.model.normalization = "BatchNorm"
  with pytest.raises(ValueError, match="normalization"):
    mutils.get_model("ncsnv2_64")(config=cfg)


def test_startup_validation_reports_network_errors_with_the_others():
  """validate_config (run before anything compiles) builds the network, so a bad model field is
  listed with every other problem; every shipped config passes it."""
  from score_sde.config_validation import validate_config
  cfg = load("vp.cifar10_ddpmpp_continuous")
  cfg.model.attn_resolutions = (7,)
  cfg.optim.lr = -1.0
  with pytest.raises(ValueError) as e:
    validate_config(cfg, num_devices=8)
  assert "config.model.attn_resolutions=(7,)" in str(e.value) and "config.optim.lr" in str(e.value)
  cfg = load("vp.cifar10_ddpm")
  cfg.model.normalization = "BatchNorm"
  with pytest.raises(ValueError, match="config.model.normalization='BatchNorm'"):
    validate_config(cfg, num_devices=8)
  cfg = load("ve.cifar10_ncsnpp_continuous")
  cfg.model.name = "ncsnpp_typo"
  with pytest.raises(ValueError, match="ncsnpp_typo"):
    validate_config(cfg, num_devices=8)
  files = sorted(f for f in glob.glob(os.path.join(ROOT, "configs", "**", "*.py"), recursive=True)
                 if not f.endswith("__init__.py") and "default_" not in f)
  for f in files:
    name = os.path.relpath(f, os.path.join(ROOT, "configs"))[:-3].replace(os.sep, ".")
    validate_config(load(name), num_devices=8)


# ------------------------------------------------------------------------------------------------
# Runs of identical blocks under lax.scan (score_sde.models.scan): same values, same tree.
# ------------------------------------------------------------------------------------------------


class _Chain(nn.Module):
  """Dense units of the given widths (tanh), optionally adding a per-unit input."""
  widths: tuple
  scan: bool = True
  with_xs: bool = False

  @nn.compact
  def __call__(self, h, xs=None):
    units = [(nn.Dense(w),) for w in self.widths]
    step = lambda mods, h, x: jnp.tanh(mods[0](h if x is None else h + x))
    return scan_lib.apply_units(self, units, step, h, xs, scan=self.scan)


def _count_scans(fn, *args):
  return str(jax.make_jaxpr(fn)(*args)).count(" scan[")


def test_apply_units_groups_runs_and_matches_the_plain_loop():
  widths = (4, 4, 4, 6, 6, 6, 6, 3)  # runs: [4 4 4] (in 4 -> out 4), 4->6 alone, [6 6 6], 6->3
  h = jax.random.normal(jax.random.PRNGKey(0), (2, 4))
  scanned, plain = _Chain(widths), _Chain(widths, scan=False)
  v = plain.init(jax.random.PRNGKey(1), h)
  assert jax.tree.structure(scanned.init(jax.random.PRNGKey(1), h)) == jax.tree.structure(v)
  assert sorted(v["params"]) == [f"Dense_{i}" for i in range(len(widths))]
  a, b = scanned.apply(v, h), plain.apply(v, h)
  assert [x.shape for x in a] == [(2, w) for w in widths]
  for x, y in zip(a, b):
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6)
  assert _count_scans(lambda v: scanned.apply(v, h), v) == 2
  assert _count_scans(lambda v: plain.apply(v, h), v) == 0
  loss = lambda m: jax.grad(lambda v: sum(jnp.sum(o ** 2) for o in m.apply(v, h)))(v)
  ga, gb = loss(scanned), loss(plain)
  for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
  # Per-unit inputs: a differently shaped input splits a run; min_run=2 needs two alike.
  xs = [jnp.ones((2, 4)), jnp.ones((2, 4)), jnp.ones((1, 4))]
  m, m0 = _Chain((4, 4, 4), with_xs=True), _Chain((4, 4, 4), scan=False, with_xs=True)
  v = m0.init(jax.random.PRNGKey(2), h, xs)
  for x, y in zip(m.apply(v, h, xs), m0.apply(v, h, xs)):
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6)
  assert _count_scans(lambda v: m.apply(v, h, xs), v) == 1


def test_apply_units_runs_parameterless_units_one_by_one():
  class Plain(nn.Module):
    @nn.compact
    def __call__(self, h):
      units = [(nn.Dropout(0.5, deterministic=True),) for _ in range(3)]
      return scan_lib.apply_units(self, units, lambda mods, h, x: mods[0](h) + 1.0, h)

  h = jnp.zeros((2, 3))
  v = Plain().init(jax.random.PRNGKey(0), h)
  out = Plain().apply(v, h)
  np.testing.assert_array_equal(out[-1], 3.0 * np.ones((2, 3)))
  assert _count_scans(lambda v: Plain().apply(v, h), v) == 0


def test_apply_units_rejects_non_param_collections():
  class WithStats(nn.Module):
    @nn.compact
    def __call__(self, h):
      h = nn.BatchNorm(use_running_average=True)(h)
      return scan_lib.apply_units(self, [(nn.Dense(4),), (nn.Dense(4),)],
                                  lambda mods, h, x: mods[0](h), h)[-1]

  h = jnp.ones((2, 4))
  v = WithStats().init(jax.random.PRNGKey(0), h)
  with pytest.raises(ValueError, match="scans only 'params'"):
    WithStats().apply(v, h)


@pytest.mark.parametrize("name,model", [
    ("ve.cifar10_ncsnpp_continuous", dict(dropout=0.0)),
    ("vp.cifar10_ddpmpp", dict(resblock_type="ddpm", dropout=0.3)),
])
def test_ncsnpp_scanned_blocks_equal_unrolled_blocks(name, model):
  # Two levels of equal width, two res blocks each: down [2 alike], [2 alike with attention at
  # 4x4]; up [3 alike] twice.
  cfg = shrink(load(name), num_res_blocks=2, ch_mult=(1, 1), **model)
  scanned, params = random_params(cfg)
  assert scanned.scan_blocks
  unrolled = mutils.get_model("ncsnpp")(config=cfg, scan_blocks=False)
  s = cfg.data.image_size
  tree = lambda m: jax.tree.structure(jax.eval_shape(lambda: m.init(
      {"params": jax.random.PRNGKey(0)}, jnp.zeros((1, s, s, 3)), jnp.ones((1,)))))
  assert tree(scanned) == tree(unrolled)
  x = jax.random.normal(jax.random.PRNGKey(1), (2, s, s, 3))
  labels = jnp.array([0.3, 20.0]) if cfg.model.embedding_type == "fourier" else jnp.array([3., 900.])

  def run(m):
    out = m.apply({"params": params}, x, labels)
    g = jax.grad(lambda p: jnp.sum(m.apply({"params": p}, x, labels) ** 2))(params)
    drop = [m.apply({"params": params}, x, labels, train=True, rngs={"dropout": jax.random.PRNGKey(k)})
            for k in ((0, 1) if m.scan_blocks and cfg.model.dropout > 0 else ())]
    return out, g, drop

  out, g, drop = jax.jit(lambda: run(scanned))()
  out0, g0, _ = jax.jit(lambda: run(unrolled))()
  np.testing.assert_allclose(out, out0, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(out0))))
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g0)):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4 * float(jnp.max(jnp.abs(b))) + 1e-7)
  if drop:
    assert all(np.isfinite(d).all() for d in drop)
    assert not np.allclose(drop[0], drop[1])  # per-block dropout keys inside the scan
  f = lambda m: jax.jit(lambda p: m.apply({"params": p}, x, labels)).lower(params).as_text()
  assert f(scanned).count("stablehlo.while") >= 3 and "stablehlo.while" not in f(unrolled)
  assert f(scanned).count("stablehlo.convolution") < f(unrolled).count("stablehlo.convolution")


def test_jit_init_gives_the_variables_of_the_optimized_compile():
  """create_model compiles the initializer unoptimized (jit_init); the variables must be those of a
  plain jax.jit: bitwise for uniform draws and constants, to float rounding (an ulp, from erf_inv)
  for the normal draws, over every initializer kind the networks use, on shapes small enough that
  the optimized compile stays cheap."""
  from score_sde.models import layers

  class Mix(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = nn.Conv(4, (3, 3), kernel_init=layers.default_init())(x)
      h = nn.Conv(4, (3, 3), kernel_init=nn.initializers.variance_scaling(2.0, "fan_out",
                                                                          "normal"))(h)
      h = nn.Conv(4, (1, 1), kernel_init=nn.initializers.lecun_normal())(h)
      h = h * self.param("W", nn.initializers.normal(0.3), (4,))
      h = nn.GroupNorm(num_groups=2)(h) + nn.Embed(3, 4)(jnp.ones((1,), jnp.int32))[:, None, None]
      return nn.Dense(5, kernel_init=nn.initializers.xavier_uniform())(h.mean((1, 2)))

  x = jnp.ones((1, 6, 6, 3))
  init = lambda k: Mix().init(k, x)
  key = jax.random.PRNGKey(7)
  plain, unopt = jax.jit(init)(key), mutils.jit_init(init, key)
  a, b = flatten_dict(plain["params"]), flatten_dict(unopt["params"])
  assert a.keys() == b.keys() and len(a) == 12
  for k in a:
    x1, x2 = np.asarray(a[k]), np.asarray(b[k])
    if k in (("Conv_0", "kernel"), ("Dense_0", "kernel")) or k[-1] in ("bias", "scale"):
      np.testing.assert_array_equal(x1, x2, err_msg="/".join(k))
    else:
      np.testing.assert_allclose(x1, x2, rtol=1e-6, atol=1e-7, err_msg="/".join(k))
      assert np.std(x1) > 0.01
