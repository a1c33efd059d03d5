"""Image evaluation: reference statistics, per-sample seeds, resumable FID / IS / KID, bad input.

Tiny everything: 8x8 CIFAR-like images from a tfds mock, a 2-level U-Net at init (no training),
a 6-step PC sampler, and the Inception with RANDOM variables (init_inception) at its smallest
input (75 x 75): the mechanics are what is tested, not the numbers.
"""
import json
import shutil

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from score_sde.evaluation import evaluate
from score_sde.evaluation import image_eval, inception, metrics, weights
from score_sde.train import Trainer

IMAGE = 8


@pytest.fixture(scope="module")
def variables():
  return inception.init_inception(seed=0)


def _config(**eval_overrides):
  import importlib
  c = importlib.import_module("configs.default_mnist_configs").get_default_configs()
  c.data.dataset = "cifar10"
  c.data.image_size = IMAGE
  c.data.num_channels = 3
  c.data.uniform_dequantization = False
  c.data.data_dir = None
  c.model.nf = 8
  c.model.ch_mult = (1, 2)
  c.model.num_scales = 6
  c.training.batch_size = 8
  c.training.sde = "vpsde"
  c.sampling.method = "pc"
  c.sampling.predictor = "euler_maruyama"
  c.sampling.corrector = "none"
  ev = c.eval
  ev.begin_ckpt, ev.end_ckpt = 1, -1
  ev.enable_loss, ev.enable_bpd, ev.enable_sampling = True, False, True
  ev.batch_size = 8
  ev.num_bpd_samples = 8
  ev.num_samples = 20
  ev.inception_size = 75
  ev.kid_num_features = 12
  ev.is_splits = 2
  ev.fid_stats_split = "train"
  for k, v in eval_overrides.items():
    ev[k] = v
  return c


def _mock(n_train=12, n_test=8):
  rng = np.random.default_rng(0)
  ex = {s: [{"image": rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), "label": i % 10,
             "id": str(i)} for i in range(n)] for s, n in (("train", n_train), ("test", n_test))}

  def as_data_source(self, split, decoders=None, deserialize_method=None, **kwargs):
    return ex[split]
  return (lambda: tfds.testing.mock_data(as_data_source_fn=as_data_source)), ex


def _workdir_with_checkpoint(path, config):
  t = Trainer(config, str(path))
  t.checkpoints.save(1, t.state, snapshot=True)
  t.checkpoints.close()


def test_is_stats_and_feature_stats_merge_like_full_computation():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(23, 7)) * 3
  ref = metrics.inception_score(logits, splits=4)
  order = rng.permutation(23)
  a = metrics.ISStats.zeros(4, 7).update(logits[order[:10]], order[:10], 23)
  b = metrics.ISStats.zeros(4, 7).update(logits[order[10:]], order[10:], 23)
  np.testing.assert_allclose(metrics.merge_stats(a, b).score(), ref, rtol=1e-12)
  feats = rng.normal(size=(23, 2048))
  s = metrics.merge_stats(metrics.FeatureStats.zeros().update(feats[:5]),
                          metrics.FeatureStats.zeros().update(feats[5:]))
  np.testing.assert_allclose(s.cov, np.cov(feats, rowvar=False), atol=1e-12)


def test_fid_stats_mode_writes_checked_stats(tmp_path, variables):
  config = _config()
  mock, ex = _mock()
  with mock():
    path = evaluate.run_fid_stats(config, str(tmp_path), variables)
  assert path == str(tmp_path / "fid_stats" / f"cifar10_train_{IMAGE}.npz")
  fn = image_eval.load_feature_fn(config, variables)
  st = metrics.load_stats(path, fn.feature_extractor, IMAGE)
  assert st.count == 12 and st.feature_extractor.endswith("/75") and st.features.shape == (12, 2048)
  # Against a direct computation over the same 12 (resized 32 -> 8) images, one batch.
  with mock():
    from score_sde import datasets
    cfg = _config()
    cfg.training.batch_size = 12
    x = next(datasets.get_dataset(cfg, "train", shuffle=False, num_epochs=1))["image"]
  out = fn(np.floor(x * 255 + 0.5).astype(np.uint8))
  direct = metrics.InceptionStats.from_features(out["pool_3"])
  np.testing.assert_allclose(st.mu, direct.mu, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(st.sigma, direct.sigma, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(st.features, out["pool_3"], rtol=1e-5, atol=1e-5)


def test_sample_i_does_not_depend_on_batch_size(variables):
  config = _config()
  t = Trainer(config)
  fn = image_eval.per_sample_sampler(config, t.sde, t.shape, t.score_fn, t.inverse_scaler, t.mesh)
  key = image_eval.per_seed_key(config, 0)
  shard = jax.sharding.NamedSharding(t.mesh, jax.sharding.PartitionSpec("data"))
  put = lambda idx: jax.device_put(np.asarray(idx, np.int32), shard)
  x8, _ = fn(t.state.ema_params, key, put(np.arange(8)))
  x16, nfe = fn(t.state.ema_params, key, put(np.arange(16)))
  x_shift, _ = fn(t.state.ema_params, key, put(np.arange(4, 12)))
  x8, x16, x_shift = map(np.asarray, (x8, x16, x_shift))
  assert x8.dtype == np.uint8 and x8.shape == (8, IMAGE, IMAGE, 3)
  assert np.abs(x8[:4].astype(int) - x16[:4]).max() <= 1         # uint8 rounding at most
  assert np.abs(x8[4:].astype(int) - x_shift[:4]).max() <= 1
  assert np.mean(x8[:4] == x16[:4]) > 0.99
  assert not np.array_equal(x8[0], x8[1])                        # different seeds differ
  assert int(np.max(nfe)) == 6


def test_eval_resumes_mid_checkpoint_and_equals_uninterrupted(tmp_path, variables):
  config = _config()
  mock, _ = _mock()
  full, part = tmp_path / "full", tmp_path / "part"
  _workdir_with_checkpoint(full, config)
  shutil.copytree(full / "checkpoints", part / "checkpoints")
  with mock():
    stats = evaluate.run_fid_stats(config, str(full), variables)
    config.eval.stats_path = stats
    ref = evaluate.run_eval(config, str(full), variables)
    # Interrupted after 2 of 3 batches, then resumed (the batch size could change too: sample i
    # depends only on its seed, test_sample_i_does_not_depend_on_batch_size).
    assert evaluate.run_eval(config, str(part), variables, stop_after_batches=2) == []
    prog = np.load(part / "eval" / "ckpt_1" / "seed_0.npz")
    assert int(prog["n_done"]) == 16
    assert not (part / "eval" / "results.json").exists()
    res = evaluate.run_eval(config, str(part), variables)
  assert len(ref) == len(res) == 1
  for k in ("fid", "inception_score", "inception_score_std", "kid", "test_loss"):
    assert np.isfinite(ref[0][k]), k
    np.testing.assert_allclose(res[0][k], ref[0][k], rtol=1e-4, atol=1e-6, err_msg=k)
  assert ref[0]["fid"] > 0 and ref[0]["sample_nfe"] == 6
  assert json.loads((full / "eval" / "results.json").read_text())[0]["step"] == 1
  assert list((full / "eval" / "tensorboard").glob("events.out.tfevents*"))


def test_seed_protocol_reports_each_min_and_mean():
  config = _config(num_seeds=3)
  keys = [np.asarray(image_eval.per_seed_key(config, s)) for s in range(3)]
  assert len({k.tobytes() for k in keys}) == 3
  rec = image_eval.summarize_seeds([{"fid": 3.0, "kid": 0.1, "num_samples": 20},
                                    {"fid": 2.0, "kid": 0.3, "num_samples": 20},
                                    {"fid": 4.0, "kid": 0.2, "num_samples": 20}])
  assert rec["fid_seed1"] == 2.0 and rec["fid_min"] == 2.0 and rec["fid_mean"] == rec["fid"] == 3.0
  assert rec["kid_min"] == 0.1 and rec["num_samples"] == 20 and rec["num_seeds"] == 3
  assert image_eval.summarize_seeds([{"fid": 3.0}]) == {"fid": 3.0}
  with pytest.raises(ValueError, match="num_seeds"):
    image_eval.eval_options(_config(num_seeds=0))
  with pytest.raises(ValueError, match="not divisible"):
    image_eval.eval_options(_config(batch_size=12))


def test_bad_inputs_fail_clearly_and_overwrite_nothing(tmp_path, variables, monkeypatch):
  config = _config()
  mock, _ = _mock(n_train=0)
  with mock(), pytest.raises(ValueError, match="empty"):
    evaluate.run_fid_stats(config, str(tmp_path), variables)
  assert not (tmp_path / "fid_stats").exists() or not any((tmp_path / "fid_stats").iterdir())
  # Stats of another resolution / another feature extractor: refused before the model is built.
  other = tmp_path / "other.npz"
  rng = np.random.default_rng(0)
  for fx, res, match in (("inception-2015-12-05/pool_3/bilinear/pytorch_fid/75", 16, "16x16"),
                         ("inception-2015-12-05/pool_3/bilinear/pytorch_fid", IMAGE,
                          "feature extractor")):
    metrics.save_stats(other, metrics.InceptionStats(rng.normal(size=2048), np.eye(2048), 10, fx,
                                                     res))
    before = other.read_bytes()
    config.eval.stats_path = str(other)
    with pytest.raises(ValueError, match=match):
      evaluate.run_eval(config, str(tmp_path), variables)
    assert other.read_bytes() == before
    assert not (tmp_path / "eval" / "results.json").exists()
  # Missing weights offline: a clear error naming the file, nothing downloaded or written.
  monkeypatch.setenv("SCORE_SDE_CACHE", str(tmp_path / "cache"))
  config.eval.inception_download = False
  with pytest.raises(FileNotFoundError, match="downloading is disabled"):
    evaluate.run_eval(config, str(tmp_path))
  config.eval.inception_weights = str(tmp_path / "nope.pth")
  config.eval.stats_path = None
  with pytest.raises(FileNotFoundError, match="does not exist"):
    evaluate.run_fid_stats(config, str(tmp_path / "w2"))
  assert not (tmp_path / "cache").exists() and not (tmp_path / "w2" / "fid_stats").exists()
  # Missing reference statistics: says to run --mode fid_stats.
  with pytest.raises(FileNotFoundError, match="fid_stats"):
    evaluate.run_eval(config, str(tmp_path), variables)


def test_weights_from_a_local_pth_file(tmp_path, variables):
  """config.eval.inception_weights reads a .pth in pytorch-fid's layout (checksum off here)."""
  from test_inception import _Storage, _Tensor, _torch_layout, _write_pth
  tensors = {}
  for i, (k, v) in enumerate(_torch_layout(variables).items()):
    strides = tuple(int(np.prod(v.shape[j + 1:])) for j in range(v.ndim))
    tensors[k] = _Tensor(_Storage(str(i), v), 0, v.shape, strides)
  path = tmp_path / "random_inception.pth"
  _write_pth(path, tensors)
  config = _config(inception_weights=str(path), inception_sha256=None, inception_download=False)
  fn = image_eval.load_feature_fn(config)
  ref = image_eval.load_feature_fn(config, variables)
  x = np.random.default_rng(0).integers(0, 256, (2, IMAGE, IMAGE, 3), dtype=np.uint8)
  np.testing.assert_allclose(fn(x)["pool_3"], ref(x)["pool_3"], rtol=1e-6, atol=1e-6)
  config.eval.inception_sha256 = weights.WEIGHTS_SHA256_PREFIX
  with pytest.raises(ValueError, match="Checksum"):
    image_eval.load_feature_fn(config)
