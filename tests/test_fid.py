"""FID / IS / KID / running statistics / statistics files against independent references."""
import jax
import numpy as np
import pytest
from scipy import linalg, special, stats

from score_sde.evaluation import metrics


def _scipy_fid(mu1, s1, mu2, s2, eps=1e-6):
  """pytorch-fid's reference formula (scipy.linalg.sqrtm of S1 S2, eps * I retry, real part)."""
  covmean = linalg.sqrtm(s1.dot(s2))
  if not np.isfinite(covmean).all():
    offset = np.eye(s1.shape[0]) * eps
    covmean = linalg.sqrtm((s1 + offset).dot(s2 + offset))
  covmean = covmean.real
  diff = mu1 - mu2
  return diff.dot(diff) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)


def _gaussian_features(rng, n, d, shift=0.0):
  a = rng.normal(size=(d, d)) / np.sqrt(d)
  return rng.normal(size=(n, d)) @ a + shift


def test_fid_matches_scipy_on_full_rank_covariances():
  rng = np.random.default_rng(0)
  for d in (1, 8, 64):
    x, y = _gaussian_features(rng, 4 * d + 10, d), _gaussian_features(rng, 3 * d + 10, d, 0.3)
    mu1, s1 = x.mean(0), np.atleast_2d(np.cov(x, rowvar=False))
    mu2, s2 = y.mean(0), np.atleast_2d(np.cov(y, rowvar=False))
    ours = metrics.frechet_distance(mu1, s1, mu2, s2)
    ref = _scipy_fid(mu1, s1, mu2, s2)
    assert abs(ours - ref) <= 1e-9 * max(1.0, abs(ref)), (d, ours, ref)


def test_fid_closed_forms():
  """Commuting (diagonal) covariances: ||dmu||^2 + sum (sqrt a - sqrt b)^2; FID(P, P) = 0."""
  rng = np.random.default_rng(1)
  a, b = rng.uniform(0.1, 3, 16), rng.uniform(0.1, 3, 16)
  mu1, mu2 = rng.normal(size=16), rng.normal(size=16)
  expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
  np.testing.assert_allclose(metrics.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)), expected,
                             rtol=1e-12)
  x = _gaussian_features(rng, 100, 32)
  s = np.cov(x, rowvar=False)
  assert abs(metrics.frechet_distance(x.mean(0), s, x.mean(0), s)) < 1e-10 * np.trace(s)


def test_fid_nearly_singular_covariances():
  """Fewer samples than dimensions (rank-deficient S, as with 2048-d features of small sets).

  Exact reference: with S1 = A A^T, S2 = B B^T (A = X_c^T / sqrt(n - 1)), the eigenvalues of S1 S2
  are the squared singular values of A^T B, so tr((S1 S2)^{1/2}) = ||A^T B||_* (small SVD).
  """
  rng = np.random.default_rng(2)
  d = 96
  x, y = _gaussian_features(rng, 40, d), _gaussian_features(rng, 30, d, 0.1) * 2.0
  xc, yc = x - x.mean(0), y - y.mean(0)
  s1, s2 = xc.T @ xc / 39, yc.T @ yc / 29
  nuclear = np.linalg.svd(xc @ yc.T / np.sqrt(39 * 29), compute_uv=False).sum()
  diff = x.mean(0) - y.mean(0)
  exact = diff @ diff + np.trace(s1) + np.trace(s2) - 2 * nuclear
  ours = metrics.frechet_distance(x.mean(0), s1, y.mean(0), s2)
  ref = _scipy_fid(x.mean(0), s1, y.mean(0), s2)
  assert abs(ours - exact) <= 1e-8 * exact, (ours, exact)
  assert abs(ref - exact) <= 1e-7 * exact       # scipy's sqrtm: ~2e-8 relative here, ours ~3e-9
  # a near-singular perturbation (eigenvalues down to 1e-12) stays finite and continuous
  s1n = s1 + 1e-12 * np.eye(d)
  assert abs(metrics.frechet_distance(x.mean(0), s1n, y.mean(0), s2) - exact) <= 1e-6 * exact


def test_fid_rejects_bad_shapes():
  with pytest.raises(ValueError, match="sigma1, sigma2"):
    metrics.frechet_distance(np.zeros(3), np.eye(2), np.zeros(3), np.eye(3))
  with pytest.raises(ValueError, match="mu1, mu2"):
    metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(3))


def test_running_stats_match_numpy_and_merge():
  rng = np.random.default_rng(3)
  x = (rng.normal(size=(257, 12)) * rng.uniform(0.01, 2, 12) + 1e3).astype(np.float32)
  acc = metrics.FeatureStats.zeros(12)
  for s in range(0, 257, 50):                         # last batch padded to 50 and masked
    batch = np.zeros((50, 12), np.float32)
    batch[:len(x[s:s + 50])] = x[s:s + 50]
    acc = acc.update(batch, valid=np.arange(50) < len(x[s:s + 50]))
  np.testing.assert_allclose(acc.mean, x.astype(np.float64).mean(0), rtol=1e-14)
  np.testing.assert_allclose(acc.cov, np.cov(x.astype(np.float64), rowvar=False), rtol=1e-7,
                             atol=1e-9)
  assert acc.count == 257 and acc.sum.dtype == np.float64
  shards = [metrics.FeatureStats.zeros(12).update(x[i::3]) for i in range(3)]
  merged = metrics.merge_stats(*shards)
  summed = jax.tree.map(lambda *leaves: sum(leaves), *shards)   # what a psum / gather-sum does
  for a, b in zip(merged, acc):
    np.testing.assert_allclose(a, b, rtol=1e-12)
  for a, b in zip(summed, merged):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError, match=r"\[B, 12\]"):
    acc.update(np.zeros((3, 5)))
  with pytest.raises(ValueError, match="at least 2"):
    metrics.FeatureStats.zeros(12).update(x[:1]).cov


def test_inception_score_closed_forms_and_scipy():
  k, n = 10, 200
  labels = np.arange(n) % k                              # each split holds every class equally
  confident = 1e4 * np.eye(k)[labels]
  mean, std = metrics.inception_score(confident, splits=10)
  np.testing.assert_allclose([mean, std], [k, 0.0], atol=1e-9)
  mean, _ = metrics.inception_score(np.zeros((n, k)) + np.arange(k), splits=4)
  np.testing.assert_allclose(mean, 1.0, atol=1e-12)      # identical predictions: IS = 1
  logits = np.random.default_rng(4).normal(size=(103, 7)) * 3
  mean, std = metrics.inception_score(logits, splits=3)
  per_split = []
  for i in range(3):
    p = special.softmax(logits[i * 103 // 3:(i + 1) * 103 // 3], axis=1)
    per_split.append(np.exp(np.mean([stats.entropy(pi, p.mean(0)) for pi in p])))
  np.testing.assert_allclose([mean, std], [np.mean(per_split), np.std(per_split)], rtol=1e-10)
  with pytest.raises(ValueError, match="splits"):
    metrics.inception_score(logits, splits=500)


def _mmd2_loops(x, y):
  k = lambda a, b: (a @ b / x.shape[1] + 1.0) ** 3
  m, n = len(x), len(y)
  kxx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
  kyy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
  kxy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
  return kxx + kyy - 2 * kxy


def test_kid_unbiased_mmd():
  rng = np.random.default_rng(5)
  x, y = rng.normal(size=(15, 5)), rng.normal(size=(15, 5)) + 0.5
  mean, std = metrics.kernel_inception_distance(x, y, num_subsets=1)   # m = 15: full sets
  np.testing.assert_allclose(mean, _mmd2_loops(x, y), rtol=1e-12)
  assert std == 0.0
  np.testing.assert_allclose(metrics.mmd2_unbiased_poly(x, y[:9]), _mmd2_loops(x, y[:9]),
                             rtol=1e-12)
  # unbiased: same law -> mean over many subsets ~ 0; shifted law -> clearly positive
  a, b, c = rng.normal(size=(3, 400, 16))
  same, same_std = metrics.kernel_inception_distance(a, b, num_subsets=50, max_subset_size=100)
  diff, _ = metrics.kernel_inception_distance(a, c + 0.3, num_subsets=50, max_subset_size=100)
  assert abs(same) < 3 * same_std / np.sqrt(50) + 1e-3 and diff > 20 * abs(same)
  assert metrics.kernel_inception_distance(a, c, 5, 50, seed=1) == \
      metrics.kernel_inception_distance(a, c, 5, 50, seed=1)


def test_stats_files_round_trip_and_mismatches(tmp_path):
  rng = np.random.default_rng(6)
  feats = rng.normal(size=(50, 8))
  st = metrics.InceptionStats.from_features(feats, "inception-2015-12-05/pool_3/bilinear/pytorch_fid", 32)
  path = metrics.save_stats(tmp_path / "cifar10.npz", st)
  got = metrics.load_stats(path, st.feature_extractor, 32)
  np.testing.assert_array_equal(got.mu, st.mu)
  np.testing.assert_array_equal(got.sigma, st.sigma)
  assert (got.count, got.feature_extractor, got.resolution) == (50, st.feature_extractor, 32)
  with pytest.raises(ValueError, match="16x16 images|32x32 images"):
    metrics.load_stats(path, st.feature_extractor, resolution=64)
  with pytest.raises(ValueError, match="feature extractor"):
    metrics.load_stats(path, "clip-vit-b32", 32)
  other = metrics.InceptionStats(st.mu, st.sigma, 50, st.feature_extractor, 64)
  with pytest.raises(ValueError, match="resolution"):
    metrics.fid_from_stats(got, other)
  assert metrics.fid_from_stats(got, st) == pytest.approx(0.0, abs=1e-9)
  # pytorch-fid style (mu, sigma only) and score_sde style (pool_3 features) files
  np.savez(tmp_path / "ptfid.npz", mu=st.mu, sigma=st.sigma)
  legacy = metrics.load_stats(tmp_path / "ptfid.npz", st.feature_extractor, 32)
  assert legacy.feature_extractor is None and legacy.resolution is None
  np.savez(tmp_path / "sde.npz", pool_3=feats.astype(np.float32))
  from_feats = metrics.load_stats(tmp_path / "sde.npz")
  np.testing.assert_allclose(from_feats.sigma, st.sigma, rtol=1e-5, atol=1e-6)
  with pytest.raises(FileNotFoundError):
    metrics.load_stats(tmp_path / "nope.npz")


def test_save_stats_never_leaves_a_broken_file(tmp_path, monkeypatch):
  st = metrics.InceptionStats(np.zeros(3), np.eye(3), 10, "fx", 32)
  path = metrics.save_stats(tmp_path / "s.npz", st)
  before = path.read_bytes()

  def failing_savez(*args, **kwargs):
    with open(args[0], "wb") as f:
      f.write(b"partial")
    raise OSError("disk full")
  monkeypatch.setattr(np, "savez", failing_savez)
  with pytest.raises(OSError, match="disk full"):
    metrics.save_stats(path, metrics.InceptionStats(np.ones(3), np.eye(3), 5, "fx", 32))
  assert path.read_bytes() == before
  assert sorted(p.name for p in tmp_path.iterdir()) == ["s.npz"]
  with pytest.raises(ValueError, match=".npz"):
    metrics.save_stats(tmp_path / "s.txt", st)
