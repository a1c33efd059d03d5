"""Import of score_sde_pytorch `.pth` checkpoints, written here in torch's exact file format.

No PyTorch: `tests/torch_pth.py` pickles like `torch.save`. The state dicts are built by
`_reference_modules`, which walks the PyTorch port's constructors (yang-song/score_sde_pytorch
`models/ncsnpp.py` NCSNpp.__init__, `models/ddpm.py` DDPM.__init__, the blocks of
`models/layerspp.py` / `models/layers.py`) and writes for each entry of `all_modules` its tensors
in registration order and PyTorch layout, together with the Flax path each one must land on
(Flax's automatic names: the class name and a per-class counter in call order). It is written
independently of `score_sde.checkpoint_import.pytorch` (which pairs modules by tracing the Flax
model), so a wrong pairing, name or transpose in the importer fails here.

The checkpoint dict is what `utils.save_checkpoint` writes: `{'optimizer': Adam.state_dict(),
'model': DataParallel(model).state_dict(), 'ema': ExponentialMovingAverage.state_dict(), 'step'}`.
"""
import collections
import os

import jax
import numpy as np
import optax
import pytest
from flax.traverse_util import flatten_dict

from score_sde import checkpoint_import as ci
from score_sde.models.utils import param_shapes
from checkpoint_helpers import restore_train_state as _restore
from checkpoint_helpers import tiny_config as _config
from torch_pth import save as torch_save


# ------------------------------------------------------------------ the PyTorch port's modules
# Each helper returns [(torch name relative to the module, torch shape, flax path relative to the
# Flax module, layout)] in registration order; layout 'conv' = [out, in, kh, kw] (Flax
# [kh, kw, in, out]), 'linear' = [out, in] (Flax [in, out]), 'same' = identical.

def _conv(prefix, cin, cout, k=3, flax_name=None, leaf="kernel"):
  p = prefix + "." if prefix else ""
  f = (flax_name or prefix,) if (flax_name or prefix) else ()
  return [(p + "weight", (cout, cin, k, k), f + (leaf,), "conv"),
          (p + "bias", (cout,), f + ("bias",), "same")]


def _linear(prefix, cin, cout):
  p, f = (prefix + ".", (prefix,)) if prefix else ("", ())
  return [(p + "weight", (cout, cin), f + ("kernel",), "linear"),
          (p + "bias", (cout,), f + ("bias",), "same")]


def _group_norm(prefix, c):
  p, f = (prefix + ".", (prefix,)) if prefix else ("", ())
  return [(p + "weight", (c,), f + ("scale",), "same"), (p + "bias", (c,), f + ("bias",), "same")]


def _nin(prefix, cin, cout):
  return [(prefix + ".W", (cin, cout), (prefix, "W"), "same"),
          (prefix + ".b", (cout,), (prefix, "b"), "same")]


def _attn(c):  # layerspp.AttnBlockpp and layers.AttnBlock
  return _group_norm("GroupNorm_0", c) + sum((_nin(f"NIN_{i}", c, c) for i in range(4)), [])


def _biggan(cin, cout, temb, up=False, down=False):  # layerspp.ResnetBlockBigGANpp
  out = (_group_norm("GroupNorm_0", cin) + _conv("Conv_0", cin, cout) +
         _linear("Dense_0", temb, cout) + _group_norm("GroupNorm_1", cout) +
         _conv("Conv_1", cout, cout))
  return out + (_conv("Conv_2", cin, cout, k=1) if cin != cout or up or down else [])


def _ddpmpp(cin, cout, temb):  # layerspp.ResnetBlockDDPMpp (conv_shortcut=False)
  out = (_group_norm("GroupNorm_0", cin) + _conv("Conv_0", cin, cout) +
         _linear("Dense_0", temb, cout) + _group_norm("GroupNorm_1", cout) +
         _conv("Conv_1", cout, cout))
  return out + (_nin("NIN_0", cin, cout) if cin != cout else [])


def _ddpm_block(cin, cout, temb):  # layers.ResnetBlockDDPM: both GroupNorms registered first
  out = (_group_norm("GroupNorm_0", cin) + _group_norm("GroupNorm_1", cout) +
         _conv("Conv_0", cin, cout) + _conv("Conv_1", cout, cout) + _linear("Dense_0", temb, cout))
  return out + (_nin("NIN_0", cin, cout) if cin != cout else [])


def _resample(cin, cout, with_conv, fir):  # layerspp.Upsample / Downsample
  if not with_conv:
    return []
  return _conv("Conv2d_0", cin, cout, leaf="weight") if fir else _conv("Conv_0", cin, cout)


class _Modules:
  """`all_modules` being built: Flax names by class counter, PyTorch indices by list position."""

  def __init__(self):
    self.index, self.counts, self.entries = 0, collections.Counter(), []

  def add(self, flax_class, tensors, in_list=True):
    name = f"{flax_class}_{self.counts[flax_class]}"
    self.counts[flax_class] += 1
    if not in_list:  # a PyTorch attribute outside all_modules (never with parameters)
      assert not tensors
      return
    for sub, shape, path, layout in tensors:
      self.entries.append((f"all_modules.{self.index}.{sub}", shape, (name,) + path, layout))
    self.index += 1


def _reference_ncsnpp(cfg, pyramid_in_list=False):
  """NCSNpp.__init__ of score_sde_pytorch. ``pyramid_in_list``: the later variant that appends
  the parameterless output_skip / input_skip pyramid resamplers to all_modules (the released code
  keeps them as attributes ``self.pyramid_upsample`` / ``self.pyramid_downsample``)."""
  m, out = cfg.model, _Modules()
  nf, C = m.nf, cfg.data.num_channels
  fir, rt = m.fir, m.resblock_type
  res = [cfg.data.image_size // 2 ** i for i in range(len(m.ch_mult))]
  temb = 4 * nf
  if m.embedding_type == "fourier":
    out.add("GaussianFourierProjection", [("W", (nf,), ("W",), "same")])
  out.add("Dense", _linear("", 2 * nf if m.embedding_type == "fourier" else nf, temb))
  out.add("Dense", _linear("", temb, temb))
  block_class = "ResnetBlockBigGANpp" if rt == "biggan" else "ResnetBlockDDPMpp"

  def block(cin, cout=None, up=False, down=False):
    cout = cout or cin
    out.add(block_class, _biggan(cin, cout, temb, up, down) if rt == "biggan"
            else _ddpmpp(cin, cout, temb))

  out.add("Conv", _conv("", C, nf))
  hs_c, in_ch, pyr_ch = [nf], nf, C
  for i_level, mult in enumerate(m.ch_mult):
    for _ in range(m.num_res_blocks):
      block(in_ch, nf * mult)
      in_ch = nf * mult
      if res[i_level] in m.attn_resolutions:
        out.add("AttnBlockpp", _attn(in_ch))
      hs_c.append(in_ch)
    if i_level != len(m.ch_mult) - 1:
      if rt == "ddpm":
        out.add("Downsample", _resample(in_ch, in_ch, m.resamp_with_conv, fir))
      else:
        block(in_ch, down=True)
      if m.progressive_input == "input_skip":
        out.add("Downsample", [], in_list=pyramid_in_list)
        out.add("Combine", _conv("Conv", pyr_ch, in_ch, k=1, flax_name="Conv_0"))
        if m.progressive_combine == "cat":
          in_ch *= 2
      elif m.progressive_input == "residual":
        out.add("Downsample", _resample(pyr_ch, in_ch, True, fir))
        pyr_ch = in_ch
      hs_c.append(in_ch)
  in_ch = hs_c[-1]
  block(in_ch)
  out.add("AttnBlockpp", _attn(in_ch))
  block(in_ch)
  pyramid_ch = 0
  for i_level in reversed(range(len(m.ch_mult))):
    for _ in range(m.num_res_blocks + 1):
      block(in_ch + hs_c.pop(), nf * m.ch_mult[i_level])
      in_ch = nf * m.ch_mult[i_level]
    if res[i_level] in m.attn_resolutions:
      out.add("AttnBlockpp", _attn(in_ch))
    if m.progressive != "none":
      if i_level == len(m.ch_mult) - 1:
        out.add("GroupNorm", _group_norm("", in_ch))
        out.add("Conv", _conv("", in_ch, C if m.progressive == "output_skip" else in_ch))
        pyramid_ch = C if m.progressive == "output_skip" else in_ch
      elif m.progressive == "output_skip":
        out.add("Upsample", [], in_list=pyramid_in_list)
        out.add("GroupNorm", _group_norm("", in_ch))
        out.add("Conv", _conv("", in_ch, C))
      else:
        out.add("Upsample", _resample(pyramid_ch, in_ch, True, fir))
        pyramid_ch = in_ch
    if i_level != 0:
      if rt == "ddpm":
        out.add("Upsample", _resample(in_ch, in_ch, m.resamp_with_conv, fir))
      else:
        block(in_ch, up=True)
  assert not hs_c
  if m.progressive != "output_skip":
    out.add("GroupNorm", _group_norm("", in_ch))
    out.add("Conv", _conv("", in_ch, C))
  return out.entries


def _reference_ddpm(cfg):
  """DDPM.__init__ of score_sde_pytorch (models/ddpm.py)."""
  m, out = cfg.model, _Modules()
  nf, C = m.nf, cfg.data.num_channels
  res = [cfg.data.image_size // 2 ** i for i in range(len(m.ch_mult))]
  out.add("Dense", _linear("", nf, 4 * nf))
  out.add("Dense", _linear("", 4 * nf, 4 * nf))
  out.add("Conv", _conv("", C, nf))
  hs_c, in_ch = [nf], nf
  conv_resample = lambda c: _conv("Conv_0", c, c) if m.resamp_with_conv else []
  for i_level, mult in enumerate(m.ch_mult):
    for _ in range(m.num_res_blocks):
      out.add("ResnetBlockDDPM", _ddpm_block(in_ch, nf * mult, 4 * nf))
      in_ch = nf * mult
      if res[i_level] in m.attn_resolutions:
        out.add("AttnBlock", _attn(in_ch))
      hs_c.append(in_ch)
    if i_level != len(m.ch_mult) - 1:
      out.add("Downsample", conv_resample(in_ch))
      hs_c.append(in_ch)
  out.add("ResnetBlockDDPM", _ddpm_block(in_ch, in_ch, 4 * nf))
  out.add("AttnBlock", _attn(in_ch))
  out.add("ResnetBlockDDPM", _ddpm_block(in_ch, in_ch, 4 * nf))
  for i_level in reversed(range(len(m.ch_mult))):
    for _ in range(m.num_res_blocks + 1):
      out.add("ResnetBlockDDPM", _ddpm_block(in_ch + hs_c.pop(), nf * m.ch_mult[i_level], 4 * nf))
      in_ch = nf * m.ch_mult[i_level]
    if res[i_level] in m.attn_resolutions:
      out.add("AttnBlock", _attn(in_ch))
    if i_level != 0:
      out.add("Upsample", conv_resample(in_ch))
  assert not hs_c
  out.add("GroupNorm", _group_norm("", in_ch))
  out.add("Conv", _conv("", in_ch, C))
  return out.entries


def _reference_modules(cfg, **kw):
  return (_reference_ddpm(cfg) if cfg.model.name == "ddpm" else _reference_ncsnpp(cfg, **kw))


def _to_flax(array, layout):
  return {"conv": lambda a: a.transpose(2, 3, 1, 0), "linear": lambda a: a.T,
          "same": lambda a: a}[layout](array)


def _checkpoint(cfg, entries, seed=0, step=1300, prefix="module.", skip_adam=()):
  """A score_sde_pytorch checkpoint dict of random tensors (numpy), and the expected Flax trees
  {'params', 'ema', 'mu', 'nu'} (flat: path -> array)."""
  rng = np.random.default_rng(seed)
  rand = lambda shape: rng.normal(size=shape).astype(np.float32)
  model = collections.OrderedDict()
  model["module.sigmas" if prefix else "sigmas"] = np.geomspace(50, 0.01, cfg.model.num_scales
                                                                ).astype(np.float32)
  model._metadata = collections.OrderedDict([("", {"version": 1}), ("module", {"version": 1})])
  expected = {k: {} for k in ("params", "ema", "mu", "nu")}
  shadow, adam_state, index = [], {}, 0
  for key, shape, path, layout in entries:
    value = rand(shape)
    model[prefix + key] = value
    expected["params"][path] = _to_flax(value, layout)
    frozen = path[0].startswith("GaussianFourierProjection")   # requires_grad=False
    if frozen:
      expected["ema"][path] = expected["params"][path]
    else:
      averaged = rand(shape)
      shadow.append(averaged)
      expected["ema"][path] = _to_flax(averaged, layout)
    if frozen or index in skip_adam:   # no gradient yet: no Adam state for this index
      expected["mu"][path] = expected["nu"][path] = np.zeros(expected["params"][path].shape)
    else:
      mu, nu = rand(shape), rand(shape) ** 2
      adam_state[index] = {"step": np.asarray(float(step), np.float32), "exp_avg": mu,
                           "exp_avg_sq": nu}
      expected["mu"][path], expected["nu"][path] = _to_flax(mu, layout), _to_flax(nu, layout)
    index += 1
  optimizer = {"state": adam_state,
               "param_groups": [{"lr": 2e-4, "betas": (0.9, 0.999), "eps": 1e-8,
                                 "weight_decay": 0, "amsgrad": False, "maximize": False,
                                 "foreach": None, "capturable": False, "differentiable": False,
                                 "fused": None, "params": list(range(index))}]}
  ema = {"decay": 0.9999, "num_updates": step, "shadow_params": shadow}
  return {"optimizer": optimizer, "model": model, "ema": ema, "step": step}, expected


def _assert_flat_equal(tree, flat_expected):
  got = {k: np.asarray(v) for k, v in flatten_dict(tree).items()}
  assert sorted(got) == sorted(flat_expected)
  for k, v in flat_expected.items():
    np.testing.assert_array_equal(got[k], v, err_msg="/".join(k))


_CASES = {
    # NCSN++ cont. (CIFAR-10 VE): BigGAN blocks, FIR, Fourier features, residual input pyramid.
    "ncsnpp_cifar10": ("ve.cifar10_ncsnpp_continuous", {}, {}),
    # DDPM++ cont.: BigGAN blocks, no FIR, positional embedding, no pyramids.
    "ddpmpp_cifar10": ("vp.cifar10_ddpmpp_continuous", {}, {}),
    # NCSN++ 256px / 1024px: output_skip + input_skip (sum), as released ...
    "ncsnpp_256": ("ve.celebahq_256_ncsnpp_continuous", {}, {}),
    # ... and with the pyramid resamplers inside all_modules (later score_sde_pytorch variant).
    "ncsnpp_256_pyramid_in_list": ("ve.celebahq_256_ncsnpp_continuous", {},
                                   {"pyramid_in_list": True}),
    # DDPM++ blocks (ResnetBlockDDPMpp, NIN shortcut), FIR conv resampling, residual output
    # pyramid (FIR Conv2d up), concatenating input combiner.
    "ddpm_blocks_fir": ("vp.cifar10_ddpmpp_continuous",
                        dict(resblock_type="ddpm", fir=True, progressive="residual",
                             progressive_input="input_skip", progressive_combine="cat"), {}),
    # DDPM++ blocks without FIR: plain conv resampling, output_skip, residual input pyramid.
    "ddpm_blocks_nofir": ("vp.cifar10_ddpmpp_continuous",
                          dict(resblock_type="ddpm", fir=False, progressive="output_skip",
                               progressive_input="residual"), {}),
    # DDPM (Ho et al.): layers.ResnetBlockDDPM / AttnBlock / Up- and Downsample with conv.
    "ddpm": ("vp.cifar10_ddpm", dict(nf=32), {}),
}


@pytest.mark.parametrize("case", sorted(_CASES))
def test_import_matches_pytorch_names_and_layouts(tmp_path, case):
  """Random PyTorch-layout checkpoint -> .pth -> import: every Flax parameter is the transposed
  tensor of its PyTorch name (raw and EMA), and the reference covers the whole Flax tree."""
  name, model_kw, ref_kw = _CASES[case]
  cfg = _config(name, **model_kw)
  entries = _reference_modules(cfg, **ref_kw)
  ckpt, expected = _checkpoint(cfg, entries)
  path = str(tmp_path / "checkpoint_26.pth")
  torch_save(path, ckpt)
  assert ci.is_torch_checkpoint(path)
  # The PyTorch port's parameters are exactly the Flax tree's (names via the reference walk).
  template = {k: tuple(v.shape) for k, v in flatten_dict(param_shapes(cfg)).items()}
  assert {p: expected["params"][p].shape for p in expected["params"]} == template
  out = ci.import_checkpoint(path, cfg)  # EMA by default
  assert out["step"] == 1300
  _assert_flat_equal(out["params"], expected["ema"])
  _assert_flat_equal(ci.import_checkpoint(path, cfg, ema=False)["params"], expected["params"])


def test_formats_prefix_directory_and_bare_state_dict(tmp_path):
  """Legacy torch format, zip folder named like the file, no DataParallel prefix, newest
  checkpoint_<N>.pth of a directory, detection by content (not extension)."""
  cfg = _config("ve.cifar10_ncsnpp_continuous")
  entries = _reference_modules(cfg)
  old, _ = _checkpoint(cfg, entries, seed=1, step=50)
  new, expected = _checkpoint(cfg, entries, seed=2, step=600, prefix="")
  torch_save(str(tmp_path / "checkpoint_8.pth"), old, legacy=True)
  torch_save(str(tmp_path / "checkpoint_26.pth"), new, root="checkpoint_26")
  assert ci.latest_checkpoint(str(tmp_path)).endswith("checkpoint_26.pth")
  out = ci.import_checkpoint(str(tmp_path), cfg)
  assert out["step"] == 600
  _assert_flat_equal(out["params"], expected["ema"])
  legacy = ci.import_checkpoint(str(tmp_path / "checkpoint_8.pth"), cfg, ema=False)
  assert legacy["step"] == 50
  # A torch file without the extension is still recognized, a msgpack file named .pth is not.
  os.rename(tmp_path / "checkpoint_8.pth", tmp_path / "checkpoint_8")
  assert ci.is_torch_checkpoint(str(tmp_path / "checkpoint_8"))
  assert ci.import_checkpoint(str(tmp_path / "checkpoint_8"), cfg)["step"] == 50
  (tmp_path / "flax.pth").write_bytes(b"\x82\xa4step\x01\xa3rng\x00")
  assert not ci.is_torch_checkpoint(str(tmp_path / "flax.pth"))
  with pytest.raises(ValueError, match="is a PyTorch .*checkpoint, not flax msgpack"):
    ci.read_state_dict(str(tmp_path / "checkpoint_26.pth"))
  # A bare model state dict (torch.save(model.state_dict())): its weights, whatever `ema` says.
  torch_save(str(tmp_path / "weights.pth"), new["model"])
  bare = ci.import_checkpoint(str(tmp_path / "weights.pth"), cfg)
  assert bare["step"] is None
  _assert_flat_equal(bare["params"], expected["params"])
  # A full checkpoint without 'ema': only ema=False works.
  del new["ema"]
  torch_save(str(tmp_path / "no_ema.pth"), new)
  with pytest.raises(ValueError, match="has no 'ema'; pass ema=False"):
    ci.import_checkpoint(str(tmp_path / "no_ema.pth"), cfg)
  _assert_flat_equal(ci.import_checkpoint(str(tmp_path / "no_ema.pth"), cfg, ema=False)["params"],
                     expected["params"])


def test_mismatches_name_the_first_key(tmp_path):
  cfg = _config("ve.cifar10_ncsnpp_continuous")
  entries = _reference_modules(cfg)
  ckpt, _ = _checkpoint(cfg, entries)
  path = str(tmp_path / "checkpoint_1.pth")
  torch_save(path, ckpt)
  # Another width: the first tensor (Fourier W) differs.
  with pytest.raises(ValueError, match=r"'module.all_modules.0.W' has shape \(8,\) in the "
                                       r"checkpoint but the model's 'GaussianFourierProjection_0/W' "
                                       r"\(16,\) needs \(16,\)"):
    ci.import_checkpoint(path, _config("ve.cifar10_ncsnpp_continuous", nf=16))
  # No attention at 4x4 in the config: all_modules.8 is an attention block in the checkpoint
  # (after Fourier, 2 Dense, Conv, 2 blocks, pyramid Downsample, block), the model's 9th module
  # with parameters a residual block.
  with pytest.raises(ValueError, match=r"'module.all_modules.8.Conv_0.bias' is missing from the "
                                       r"checkpoint \(the model's 'ResnetBlockBigGANpp_3/Conv_0/bias'"
                                       r" \(16,\) .*all_modules.8 holds \['GroupNorm_0.bias'"):
    ci.import_checkpoint(path, _config("ve.cifar10_ncsnpp_continuous", attn_resolutions=()))
  # Fewer resolutions in the checkpoint than in the config: the model has modules left over.
  small = _config("ve.cifar10_ncsnpp_continuous", ch_mult=(1,), attn_resolutions=())
  small_ckpt, _ = _checkpoint(small, _reference_modules(small))
  torch_save(path, small_ckpt)
  with pytest.raises(ValueError, match="does not fit the model 'ncsnpp'"):
    ci.import_checkpoint(path, cfg)
  # A transposed (wrong-layout) conv weight.
  bad, _ = _checkpoint(cfg, entries)
  bad["model"]["module.all_modules.4.Conv_0.weight"] = np.zeros((8, 8, 3, 3), np.float32)
  bad["model"]["module.all_modules.4.Conv_1.weight"] = np.zeros((3, 3, 8, 8), np.float32)
  torch_save(path, bad)
  with pytest.raises(ValueError, match=r"'module.all_modules.4.Conv_1.weight' has shape "
                                       r"\(3, 3, 8, 8\) .*ResnetBlockBigGANpp_0/Conv_1/kernel' "
                                       r"\(3, 3, 8, 8\) needs \(8, 8, 3, 3\)"):
    ci.import_checkpoint(path, cfg)
  # An NCSNv2-style state dict, and an NCSNv2 config.
  torch_save(path, {"model": {"module.begin_conv.weight": np.zeros((8, 3, 3, 3), np.float32)}})
  with pytest.raises(ValueError, match="'module.begin_conv.weight' is not an entry of a "
                                       "score_sde_pytorch NCSN\\+\\+ / DDPM state dict"):
    ci.import_checkpoint(path, cfg)
  with pytest.raises(ValueError, match="not 'ncsnv2_64'"):
    ci.import_checkpoint(path, _config("ve.ncsnv2.cifar10"))
  # An EMA of another model, an optimizer of another model.
  ckpt, _ = _checkpoint(cfg, entries)
  ckpt["ema"]["shadow_params"] = ckpt["ema"]["shadow_params"][:-1]
  torch_save(path, ckpt)
  with pytest.raises(ValueError, match=r"ema.shadow_params holds \d+ tensors but .* \d+ trainable"):
    ci.import_checkpoint(path, cfg)
  ckpt, _ = _checkpoint(cfg, entries)
  ckpt["ema"]["shadow_params"][3] = ckpt["ema"]["shadow_params"][3][:2]
  torch_save(path, ckpt)
  with pytest.raises(ValueError, match=r"ema.shadow_params\[3\] has shape \(2,\) but the 3-th "
                                       r"trainable parameter 'module.all_modules.2.bias'"):
    ci.import_checkpoint(path, cfg)
  ckpt, _ = _checkpoint(cfg, entries)
  ckpt["optimizer"]["param_groups"][0]["params"].pop()
  torch_save(path, ckpt)
  with pytest.raises(ValueError, match="optimizer's param_groups list"):
    ci.import_to_workdir(cfg, path, str(tmp_path / "run"))
  # Not a checkpoint dict at all.
  torch_save(path, [np.zeros(3, np.float32)])
  with pytest.raises(ValueError, match="not a score_sde_pytorch checkpoint"):
    ci.import_checkpoint(path, cfg)


def test_import_to_workdir_adam_ema_step(tmp_path):
  """.pth -> orbax workdir: raw params, EMA, Adam exp_avg / exp_avg_sq (zeros where a parameter
  has no state), counters at the training step. (The workdir is the same train state the JAX
  import writes; test_checkpoint_import.py samples from one with --mode sample.)"""
  cfg = _config("ve.cifar10_ncsnpp_continuous")
  entries = _reference_modules(cfg)
  ckpt, expected = _checkpoint(cfg, entries, step=70, skip_adam=(5,))
  path = str(tmp_path / "checkpoint_7.pth")
  torch_save(path, ckpt)
  workdir = str(tmp_path / "run")
  assert ci.import_to_workdir(cfg, path, workdir) == 70
  state = _restore(cfg, workdir, 70)
  assert int(state.step) == 70
  _assert_flat_equal(state.params, expected["params"])
  _assert_flat_equal(state.ema_params, expected["ema"])
  is_adam = lambda s: isinstance(s, optax.ScaleByAdamState)
  adam = [s for s in jax.tree.leaves(state.opt_state, is_leaf=is_adam) if is_adam(s)]
  assert len(adam) == 1 and int(adam[0].count) == 70
  _assert_flat_equal(adam[0].mu, expected["mu"])
  _assert_flat_equal(adam[0].nu, expected["nu"])
  # The parameter without Adam state (index 5: all_modules.3.weight) got zero moments.
  assert not np.any(expected["mu"][("Conv_0", "kernel")])
  assert np.all(expected["mu"][("Dense_1", "kernel")] != 0)
  # ema=False: sampling weights are the raw model.
  assert ci.import_to_workdir(cfg, path, str(tmp_path / "raw"), ema=False, step=3) == 3
  _assert_flat_equal(_restore(cfg, str(tmp_path / "raw"), 3).ema_params, expected["params"])


# ------------------------------------------------------------------ with PyTorch, if installed


def test_real_torch_save_and_adam(tmp_path):
  """Real torch: a module tree with the PyTorch port's names (from the reference walk), wrapped
  in DataParallel, one Adam step, the port's EMA rule, torch.save -> import."""
  torch = pytest.importorskip("torch")
  cfg = _config("ve.cifar10_ncsnpp_continuous")
  entries = _reference_modules(cfg)

  def module_at(root, dotted):
    for part in dotted:
      if part not in root._modules:
        root.add_module(part, torch.nn.Module())
      root = root._modules[part]
    return root

  net = torch.nn.Module()
  net.register_buffer("sigmas", torch.linspace(50, 0.01, cfg.model.num_scales))
  net.all_modules = torch.nn.ModuleList()
  gen = torch.Generator().manual_seed(0)
  for key, shape, path, _ in entries:
    _, index, *mods, leaf = key.split(".")
    while len(net.all_modules) <= int(index):
      net.all_modules.append(torch.nn.Module())
    owner = module_at(net.all_modules[int(index)], mods)
    frozen = path[0].startswith("GaussianFourierProjection")
    owner.register_parameter(leaf, torch.nn.Parameter(torch.randn(*shape, generator=gen),
                                                      requires_grad=not frozen))
  model = torch.nn.DataParallel(net)
  optimizer = torch.optim.Adam(model.parameters(), lr=2e-4)
  shadow = [p.clone().detach() for p in model.parameters() if p.requires_grad]
  loss = sum((p * p).sum() for p in model.parameters() if p.requires_grad)
  loss.backward()
  optimizer.step()
  with torch.no_grad():
    for s, p in zip(shadow, [p for p in model.parameters() if p.requires_grad]):
      s.sub_(0.1 * (s - p))
  path = str(tmp_path / "checkpoint_1.pth")
  torch.save({"optimizer": optimizer.state_dict(), "model": model.state_dict(),
              "ema": {"decay": 0.9, "num_updates": 1, "shadow_params": shadow}, "step": 1}, path)
  layouts = {path_: layout for _, _, path_, layout in entries}
  params = dict(model.named_parameters())
  trainable = [n for n, p in params.items() if p.requires_grad]
  by_key = {"module." + key: path_ for key, _, path_, _ in entries}
  ema = ci.import_checkpoint(path, cfg)["params"]
  flat = flatten_dict(ema)
  for name, s in zip(trainable, shadow):
    p = by_key[name]
    np.testing.assert_allclose(np.asarray(flat[p]), _to_flax(s.numpy(), layouts[p]), err_msg=name)
  workdir = str(tmp_path / "run")
  ci.import_to_workdir(cfg, path, workdir)
  state = _restore(cfg, workdir, 1)
  is_adam = lambda s: isinstance(s, optax.ScaleByAdamState)
  adam = [s for s in jax.tree.leaves(state.opt_state, is_leaf=is_adam) if is_adam(s)][0]
  mu = flatten_dict(adam.mu)
  for name in trainable:
    p = by_key[name]
    exp_avg = optimizer.state[params[name]]["exp_avg"].numpy()
    np.testing.assert_allclose(np.asarray(mu[p]), _to_flax(exp_avg, layouts[p]), err_msg=name)
