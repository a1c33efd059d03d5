"""FID Inception: .pth reader, weight conversion, resize, and agreement with a PyTorch reference.

Torch-free tests write `.pth` files by hand (zip and legacy layouts, built with a pickler that
emits torch's global names) and check the reader against explicit strided indexing. When torch is
installed, real `torch.save` files are read back, and a PyTorch FID-Inception written here from
pytorch-fid's structure (FIDInceptionA/C/E_1/E_2, count_include_pad=False, max-pool in Mixed_7c,
F.interpolate bilinear align_corners=False, 2x - 1) is compared with our Flax network after the
conversion.
"""
import collections
import pickle
import zipfile

import flax
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from score_sde.evaluation import inception, weights
# The hand-made .pth writer (tests/torch_pth.py, shared with the checkpoint-import tests).
from torch_pth import G as _G
from torch_pth import Rebuild as _Rebuild
from torch_pth import Storage as _Storage
from torch_pth import Tensor as _Tensor
from torch_pth import write_pth as _write_pth

# ------------------------------------------------------------------ the Inception in torch layout


def _torch_layout(variables):
  """Flax variables -> pytorch-fid state dict (the inverse of weights.convert_state_dict)."""
  sd = {}
  flat = flax.traverse_util.flatten_dict(variables)
  for (col, *mods, leaf), v in flat.items():
    prefix, v = ".".join(mods), np.asarray(v)
    if leaf == "kernel" and mods[-1] == "conv":
      sd[prefix + ".weight"] = np.transpose(v, (3, 2, 0, 1))
    elif mods == ["fc"]:
      sd["fc." + ("weight" if leaf == "kernel" else "bias")] = v.T if leaf == "kernel" else v
    else:
      sd[prefix + "." + {"scale": "weight", "bias": "bias", "mean": "running_mean",
                         "var": "running_var"}[leaf]] = v
  return sd


# ------------------------------------------------------------------ torch-free tests


@pytest.mark.parametrize("legacy", [False, True])
def test_hand_written_pth_reads_back_exactly(tmp_path, legacy):
  """Dtypes (bf16 too), offsets, transposed / sliced strides, shared storages, scalars, Parameters."""
  rng = np.random.default_rng(0)
  f32 = _Storage("0", rng.normal(size=40).astype(np.float32))
  bf16 = _Storage("1", rng.normal(size=12).astype(ml_dtypes.bfloat16))
  i64 = _Storage("2", rng.integers(-2**40, 2**40, size=10))
  boo = _Storage("3", rng.random(6) < 0.5)
  f16 = _Storage("4", rng.normal(size=8).astype(np.float16))
  tensors = collections.OrderedDict([
      ("contig", _Tensor(f32, 4, (2, 3), (3, 1))),
      ("transposed", _Tensor(f32, 0, (4, 5), (1, 4))),             # shares storage "0"
      ("sliced", _Tensor(f32, 7, (3, 2), (10, 3), as_parameter=True)),
      ("scalar", _Tensor(i64, 9, (), ())),
      ("bf16", _Tensor(bf16, 2, (2, 5), (5, 1))),
      ("long", _Tensor(i64, 0, (10,), (1,))),
      ("bool", _Tensor(boo, 1, (5,), (1,))),
      ("half_conv", _Tensor(f16, 0, (2, 1, 2, 2), (4, 4, 2, 1))),
      ("empty", _Tensor(f32, 0, (0, 3), (3, 1))),
  ])
  path = tmp_path / "sd.pth"
  _write_pth(path, tensors, legacy=legacy)
  assert zipfile.is_zipfile(path) != legacy
  got = weights.read_torch_state_dict(path)
  assert list(got) == list(tensors)
  for name, t in tensors.items():
    assert got[name].dtype == t.storage.array.dtype, name
    np.testing.assert_array_equal(got[name], t.expected(), err_msg=name)


def test_reader_refuses_arbitrary_globals(tmp_path):
  path = tmp_path / "evil.pth"
  _write_pth(path, {"x": _Rebuild(_G("os", "system"), ("echo hi",))})
  with pytest.raises(pickle.UnpicklingError, match="os.system"):
    weights.read_torch_state_dict(path)


def test_conversion_round_trip_and_shape_errors(tmp_path):
  """Random Flax variables -> torch layout -> hand-written .pth -> reader -> converter."""
  variables = inception.init_inception(seed=1)
  sd = _torch_layout(variables)
  assert len(sd) == 4 * 94 + 94 + 2    # 94 BasicConv2d (conv + 4 BN tensors) + fc
  tensors = collections.OrderedDict()
  for i, (k, v) in enumerate(sd.items()):
    strides = tuple(int(np.prod(v.shape[j + 1:])) for j in range(v.ndim))
    tensors[k] = _Tensor(_Storage(str(i), v), 0, v.shape, strides)
  tensors["Mixed_5b.branch1x1.bn.num_batches_tracked"] = _Tensor(
      _Storage("n", np.zeros(1, np.int64)), 0, (), ())
  path = tmp_path / "fid_inception.pth"
  _write_pth(path, tensors)
  got = weights.load_inception_variables(path, sha256_prefix=None)
  flat_got, flat_ref = (flax.traverse_util.flatten_dict(x) for x in (got, variables))
  assert flat_got.keys() == flat_ref.keys()
  for k in flat_ref:
    np.testing.assert_array_equal(flat_got[k], flat_ref[k], err_msg=str(k))
  bad = dict(sd, **{"fc.weight": sd["fc.weight"][:1000]})       # a 1000-class torchvision fc
  with pytest.raises(ValueError, match="fc.weight"):
    weights.convert_state_dict(bad)
  with pytest.raises(ValueError, match="lacks 'Mixed_7c.branch_pool.conv.weight'"):
    weights.convert_state_dict({k: v for k, v in sd.items() if not k.startswith("Mixed_7c.branch_pool.conv")})
  with pytest.raises(ValueError, match="Checksum mismatch"):       # not the real weights
    weights.load_inception_variables(path)


def test_fetch_weights_download_checksum_and_offline(tmp_path, monkeypatch):
  monkeypatch.setenv("SCORE_SDE_CACHE", str(tmp_path / "cache"))
  src = tmp_path / "served.pth"
  src.write_bytes(b"pretend weights " * 1000)
  url, good = src.as_uri(), weights.sha256_file(src)[:8]
  with pytest.raises(FileNotFoundError, match="downloading is disabled") as e:
    weights.fetch_weights(download=False, filename="w.pth")
  assert str(tmp_path / "cache" / "w.pth") in str(e.value)
  bad = "00000000" if good != "00000000" else "11111111"
  with pytest.raises(ValueError, match="Checksum mismatch"):
    weights.fetch_weights(url=url, filename="w.pth", sha256_prefix=bad)
  assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())
  got = weights.fetch_weights(url=url, filename="w.pth", sha256_prefix=good)
  assert got == tmp_path / "cache" / "w.pth" and got.read_bytes() == src.read_bytes()
  assert weights.fetch_weights(download=False, filename="w.pth", sha256_prefix=good) == got
  with pytest.raises(FileNotFoundError, match="Could not download"):
    weights.fetch_weights(url=(tmp_path / "nope").as_uri(), filename="x.pth")
  with pytest.raises(FileNotFoundError, match="does not exist"):
    weights.fetch_weights(tmp_path / "missing.pth")


def test_bilinear_resize_matches_jax_image_resize():
  """Half-pixel bilinear == jax.image.resize(linear, antialias=False) (PyTorch align_corners=False).

  Upsampling only: for downsampling jax's float32 kernel weights drift by ~2e-5 (the torch test
  below covers downsampling)."""
  x = jax.random.uniform(jax.random.key(0), (2, 32, 72, 3))
  ours = inception.resize(x, 299, "bilinear")
  ref = jax.image.resize(x, (2, 299, 299, 3), "linear", antialias=False)
  np.testing.assert_allclose(ours, ref, atol=1e-5)   # jax builds its weights in float32


def test_tf1_resize_samples_the_input_grid():
  """TF1 resize_bilinear (no half-pixel centres): out[k i] = in[i] for an integer factor k."""
  r = inception.interpolation_matrix(10, 30, "tf1_bilinear")
  np.testing.assert_allclose(r.sum(1), 1.0)
  np.testing.assert_array_equal(r[::3], np.eye(10))
  r2 = inception.interpolation_matrix(10, 30, "bilinear")
  assert np.abs(r2 - r).max() > 0.3     # the two conventions really differ


def test_preprocess_input_conventions():
  """uint8 [0, 255] == float [0, 1]; grayscale == repeated channels; both normalizations."""
  rng = np.random.default_rng(0)
  gray = rng.integers(0, 256, (2, 20, 24, 1), dtype=np.uint8)
  rgb = np.repeat(gray, 3, axis=-1)
  ref = inception.preprocess(rgb)
  assert ref.shape == (2, 299, 299, 3) and ref.dtype == jnp.float32
  np.testing.assert_array_equal(inception.preprocess(gray), ref)
  np.testing.assert_allclose(inception.preprocess(rgb.astype(np.float32) / 255.0), ref, atol=1e-5)
  same = inception.preprocess(rgb, resize_to=None)
  np.testing.assert_allclose(same, rgb / 127.5 - 1.0, atol=1e-6)
  np.testing.assert_allclose(inception.preprocess(rgb, None, normalization="tf_graph"),
                             (rgb - 128.0) / 128.0, atol=1e-6)
  assert float(ref.min()) >= -1.0 and float(ref.max()) <= 1.0


def test_inception_fn_outputs():
  """Shapes, finite non-degenerate features, logits = pool_3 W + b, grayscale uint8 end to end."""
  variables = inception.init_inception(seed=0)
  fn = inception.get_inception_fn(variables)
  gray = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 1), dtype=np.uint8)
  out = fn(gray)
  assert out["pool_3"].shape == (2, 2048) and out["logits"].shape == (2, 1008)
  assert np.all(np.isfinite(out["pool_3"])) and np.std(out["pool_3"]) > 0.1
  assert np.all(np.asarray(out["pool_3"]) >= 0)   # average of ReLU outputs
  fc = variables["params"]["fc"]
  np.testing.assert_allclose(out["logits"], np.asarray(out["pool_3"], np.float64) @ fc["kernel"]
                             + fc["bias"], rtol=1e-4, atol=1e-4)
  assert fn.feature_extractor == "inception-2015-12-05/pool_3/bilinear/pytorch_fid"


def test_bad_inputs_fail_early():
  variables = inception.init_inception(seed=0)
  with pytest.raises(ValueError, match="resize_method"):
    inception.get_inception_fn(variables, resize_method="bicubic")
  with pytest.raises(ValueError, match="normalization"):
    inception.get_inception_fn(variables, normalization="imagenet")
  with pytest.raises(ValueError, match="batch_stats"):
    inception.get_inception_fn({"params": variables["params"]})
  fn = inception.get_inception_fn(variables, resize=False)
  with pytest.raises(ValueError, match="NHWC"):
    fn(np.zeros((2, 3, 80, 80), np.uint8))
  with pytest.raises(ValueError, match=">= 75"):
    fn(np.zeros((2, 32, 32, 3), np.uint8))


# ------------------------------------------------------------------ against PyTorch

def _torch():
  return pytest.importorskip("torch")


def _build_torch_fid_inception(torch):
  """pytorch-fid's FID Inception, written out without torchvision (same state-dict names)."""
  nn, F = torch.nn, torch.nn.functional

  class BasicConv2d(nn.Module):
    def __init__(self, cin, cout, **kw):
      super().__init__()
      self.conv = nn.Conv2d(cin, cout, bias=False, **kw)
      self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
      return F.relu(self.bn(self.conv(x)))

  def avg(x):
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)

  class FIDInceptionA(nn.Module):
    def __init__(self, cin, pool_features):
      super().__init__()
      self.branch1x1 = BasicConv2d(cin, 64, kernel_size=1)
      self.branch5x5_1 = BasicConv2d(cin, 48, kernel_size=1)
      self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
      self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
      self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
      self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
      self.branch_pool = BasicConv2d(cin, pool_features, kernel_size=1)

    def forward(self, x):
      return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                        self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                        self.branch_pool(avg(x))], 1)

  class InceptionB(nn.Module):
    def __init__(self, cin):
      super().__init__()
      self.branch3x3 = BasicConv2d(cin, 384, kernel_size=3, stride=2)
      self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
      self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
      self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
      return torch.cat([self.branch3x3(x),
                        self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                        F.max_pool2d(x, kernel_size=3, stride=2)], 1)

  class FIDInceptionC(nn.Module):
    def __init__(self, cin, c7):
      super().__init__()
      self.branch1x1 = BasicConv2d(cin, 192, kernel_size=1)
      self.branch7x7_1 = BasicConv2d(cin, c7, kernel_size=1)
      self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
      self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
      self.branch7x7dbl_1 = BasicConv2d(cin, c7, kernel_size=1)
      self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
      self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
      self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
      self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
      self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
      b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
      bd = self.branch7x7dbl_1(x)
      for m in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                self.branch7x7dbl_5):
        bd = m(bd)
      return torch.cat([self.branch1x1(x), b7, bd, self.branch_pool(avg(x))], 1)

  class InceptionD(nn.Module):
    def __init__(self, cin):
      super().__init__()
      self.branch3x3_1 = BasicConv2d(cin, 192, kernel_size=1)
      self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
      self.branch7x7x3_1 = BasicConv2d(cin, 192, kernel_size=1)
      self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
      self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
      self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
      b7 = x
      for m in (self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
        b7 = m(b7)
      return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7,
                        F.max_pool2d(x, kernel_size=3, stride=2)], 1)

  class FIDInceptionE(nn.Module):
    def __init__(self, cin, max_pool):
      super().__init__()
      self.max_pool = max_pool
      self.branch1x1 = BasicConv2d(cin, 320, kernel_size=1)
      self.branch3x3_1 = BasicConv2d(cin, 384, kernel_size=1)
      self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
      self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
      self.branch3x3dbl_1 = BasicConv2d(cin, 448, kernel_size=1)
      self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
      self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
      self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
      self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
      b3 = self.branch3x3_1(x)
      b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
      bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
      bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
      pool = (F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else avg(x))
      return torch.cat([self.branch1x1(x), b3, bd, self.branch_pool(pool)], 1)

  class FIDInception(nn.Module):
    def __init__(self):
      super().__init__()
      self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
      self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
      self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
      self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
      self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
      self.Mixed_5b = FIDInceptionA(192, 32)
      self.Mixed_5c = FIDInceptionA(256, 64)
      self.Mixed_5d = FIDInceptionA(288, 64)
      self.Mixed_6a = InceptionB(288)
      self.Mixed_6b = FIDInceptionC(768, 128)
      self.Mixed_6c = FIDInceptionC(768, 160)
      self.Mixed_6d = FIDInceptionC(768, 160)
      self.Mixed_6e = FIDInceptionC(768, 192)
      self.Mixed_7a = InceptionD(768)
      self.Mixed_7b = FIDInceptionE(1280, max_pool=False)
      self.Mixed_7c = FIDInceptionE(2048, max_pool=True)
      self.fc = nn.Linear(2048, 1008)

    def forward(self, images01):
      """pytorch-fid's pipeline: NCHW in [0, 1] -> resize 299 -> 2x - 1 -> pool3, logits."""
      x = F.interpolate(images01, size=(299, 299), mode="bilinear", align_corners=False)
      x = 2 * x - 1
      x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
      x = F.max_pool2d(x, kernel_size=3, stride=2)
      x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
      x = F.max_pool2d(x, kernel_size=3, stride=2)
      for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
        x = getattr(self, "Mixed_" + name)(x)
      pool3 = F.adaptive_avg_pool2d(x, (1, 1)).flatten(1)
      return pool3, self.fc(pool3)

  return FIDInception()


def test_torch_save_files_read_identically(tmp_path):
  torch = _torch()
  g = torch.Generator().manual_seed(0)
  base = torch.randn(6, 7, generator=g)
  sd = collections.OrderedDict(
      f32=torch.randn(3, 4, generator=g), f64=torch.randn(5, generator=g, dtype=torch.float64),
      f16=torch.randn(2, 3, generator=g).half(), bf16=torch.randn(4, 2, generator=g).bfloat16(),
      i64=torch.randint(-10**12, 10**12, (7,), generator=g), u8=torch.randint(0, 255, (3, 3),
                                                                             dtype=torch.uint8),
      boolean=torch.rand(5, generator=g) > 0.5, scalar=torch.tensor(3.5),
      transposed=base.t(), offset_slice=base[2:5, 1::2], shared=base,
      conv=torch.nn.Conv2d(3, 4, 3).weight.detach().permute(0, 2, 3, 1))
  sd["param"] = torch.nn.Parameter(torch.randn(2, 2, generator=g))
  for legacy in (False, True):
    path = tmp_path / f"t{legacy}.pth"
    torch.save(sd, path, _use_new_zipfile_serialization=not legacy)
    got = weights.read_torch_state_dict(path)
    assert list(got) == list(sd)
    for k, v in sd.items():
      ref = v.detach().float().numpy() if v.dtype == torch.bfloat16 else v.detach().numpy()
      out = got[k].astype(np.float32) if v.dtype == torch.bfloat16 else got[k]
      assert out.shape == tuple(v.shape), k
      np.testing.assert_array_equal(out, ref, err_msg=f"{k} legacy={legacy}")


def test_flax_inception_matches_torch_reference(tmp_path):
  """Random FID-Inception weights in torch -> torch.save -> our reader + converter -> Flax:
  same pool_3 / logits on the same uint8 images through each side's full pipeline."""
  torch = _torch()
  torch.manual_seed(0)
  model = _build_torch_fid_inception(torch).eval()
  # Non-trivial BN statistics, like trained weights (default init has mean 0, var 1, scale 1).
  ref_vars = inception.init_inception(seed=3)
  missing, unexpected = model.load_state_dict(
      {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in _torch_layout(ref_vars).items()},
      strict=False)
  assert not unexpected and all(k.endswith("num_batches_tracked") for k in missing)
  path = tmp_path / "fid_inception.pth"
  torch.save(model.state_dict(), path)
  variables = weights.load_inception_variables(path, sha256_prefix=None)

  images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
  with torch.no_grad():
    pool3_t, logits_t = model(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0)
  out = inception.get_inception_fn(variables)(images)
  pool3_t, logits_t = pool3_t.numpy(), logits_t.numpy()
  rel = lambda a, b: np.max(np.abs(np.asarray(a) - b)) / np.max(np.abs(b))
  assert rel(out["pool_3"], pool3_t) < 1e-4, rel(out["pool_3"], pool3_t)
  assert rel(out["logits"], logits_t) < 1e-4, rel(out["logits"], logits_t)
  np.testing.assert_allclose(out["pool_3"], pool3_t, rtol=1e-3, atol=1e-4 * np.abs(pool3_t).max())


def test_resize_matches_torch_interpolate():
  """Against F.interpolate(bilinear, align_corners=False) run in float64 (torch's float32 path
  rounds its source positions: up to 3e-5 off on 512 -> 299; ours is exact to ~1e-7)."""
  torch = _torch()
  F = torch.nn.functional
  rng = np.random.default_rng(0)
  for h, w in ((32, 32), (17, 64), (512, 380)):
    x = rng.random((2, h, w, 3))
    ref = F.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=(299, 299), mode="bilinear",
                        align_corners=False).permute(0, 2, 3, 1).numpy()
    ours = inception.resize(jnp.asarray(x, jnp.float32), 299, "bilinear")
    np.testing.assert_allclose(ours, ref, atol=1e-6, err_msg=f"{h}x{w}")
