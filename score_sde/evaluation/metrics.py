"""FID, Inception Score, KID, running feature statistics and statistics files (numpy float64).

These run on the host in float64: the inputs are small (2048-d means / covariances, or feature
matrices) and the matrix square root needs double precision.

FID  (Heusel et al. 2017):  ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^{1/2}).
IS   (Salimans et al. 2016): exp(E_x KL(p(y|x) || p(y))), mean and std over `splits` chunks.
KID  (Binkowski et al. 2018): unbiased MMD^2 with the cubic polynomial kernel
     k(x, y) = (x.y / d + 1)^3, averaged over random subsets (StyleGAN / torch-fidelity protocol).

Two-sample distances between raw samples (in JAX; vector data, samplers against ground truth):
energy distance and sliced Wasserstein (end of this module).
"""
from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path
from typing import NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

PathLike = Union[str, os.PathLike]
Array = jax.Array


# ------------------------------------------------------------------ FID


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
  w, v = np.linalg.eigh((s + s.T) / 2)
  return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
  """tr((S1 S2)^{1/2}) for symmetric PSD S1, S2, in float64.

  With R_i = S_i^{1/2} (symmetric), S1 S2 = R1 (R1 R2 R2) has the eigenvalues of
  (R1 R2 R2) R1 = (R1 R2)(R1 R2)^T (eig(AB) = eig(BA)): the squared singular values of R1 R2, so
  tr((S1 S2)^{1/2}) = ||R1 R2||_* (nuclear norm). Two symmetric eigendecompositions and one SVD
  replace scipy.linalg.sqrtm's Schur method: no complex round-off parts, no eps * I retries for
  (nearly) singular covariances (fewer samples than dimensions), and small singular values come
  out with absolute error ~eps ||R1 R2|| instead of sqrt(eps) (5x closer to the exact value than
  scipy on rank-deficient covariances, tests/test_fid.py).
  """
  r1 = _psd_sqrt(np.asarray(sigma1, np.float64))
  r2 = _psd_sqrt(np.asarray(sigma2, np.float64))
  return float(np.sum(np.linalg.svd(r1 @ r2, compute_uv=False)))


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray,
                     sigma2: np.ndarray) -> float:
  """Frechet distance of N(mu1, S1) and N(mu2, S2):
  ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^{1/2}).   mu: [d], sigma: [d, d]."""
  mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
  sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
  if mu1.ndim != 1 or mu1.shape != mu2.shape:
    raise ValueError(f"mu1, mu2 must be equal-length vectors, got {mu1.shape} and {mu2.shape}.")
  d = mu1.shape[0]
  if sigma1.shape != (d, d) or sigma2.shape != (d, d):
    raise ValueError(f"sigma1, sigma2 must be [{d}, {d}], got {sigma1.shape} and {sigma2.shape}.")
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2)
               - 2.0 * trace_sqrt_product(sigma1, sigma2))


# ------------------------------------------------------------------ running statistics


class FeatureStats(NamedTuple):
  """Sufficient statistics of a feature set, float64: a pytree whose leaves add.

  sum: [d] sum_i x_i; sum_outer: [d, d] sum_i x_i x_i^T; count: [] number of rows.
  Merging shards (devices, hosts, resumed runs) is leaf-wise addition, `merge_stats` or
  `jax.tree.map(np.add, a, b)` / a psum of each leaf.
  """
  sum: np.ndarray
  sum_outer: np.ndarray
  count: np.ndarray

  @classmethod
  def zeros(cls, dim: int = 2048) -> "FeatureStats":
    return cls(np.zeros(dim, np.float64), np.zeros((dim, dim), np.float64),
               np.zeros((), np.float64))

  def update(self, features, valid=None) -> "FeatureStats":
    """Add a batch `[B, d]` (numpy or jax array; pulled to the host and promoted to float64).

    valid: optional bool `[B]`; rows marked False (padding of a last, partial sharded batch)
    are left out.
    """
    x = np.asarray(features, np.float64)
    if x.ndim != 2 or x.shape[1] != self.sum.shape[0]:
      raise ValueError(f"features must be [B, {self.sum.shape[0]}], got {x.shape}.")
    if valid is not None:
      valid = np.asarray(valid, bool)
      if valid.shape != (x.shape[0],):
        raise ValueError(f"valid must be a bool [{x.shape[0]}] mask, got shape {valid.shape}.")
      x = x[valid]
    return FeatureStats(self.sum + x.sum(0), self.sum_outer + x.T @ x,
                        self.count + np.float64(x.shape[0]))

  @property
  def mean(self) -> np.ndarray:
    return self.sum / self.count

  @property
  def cov(self) -> np.ndarray:
    """Unbiased covariance (S - n mu mu^T) / (n - 1), like np.cov(rowvar=False)."""
    n = float(self.count)
    if n < 2:
      raise ValueError(f"Need at least 2 feature rows for a covariance, have {n:g}.")
    mu = self.mean
    return (self.sum_outer - n * np.outer(mu, mu)) / (n - 1)


def merge_stats(*stats):
  """Sum of several FeatureStats (or ISStats) of shards of one feature set."""
  if not stats:
    raise ValueError("merge_stats needs at least one FeatureStats.")
  return type(stats[0])(*(sum(leaves) for leaves in zip(*stats)))


# ------------------------------------------------------------------ statistics files


@dataclasses.dataclass(frozen=True)
class InceptionStats:
  """mu [d], sigma [d, d] (float64) of a feature set, with where they come from.

  feature_extractor: e.g. `inception.feature_extractor_name()`; resolution: side of the images
  the features were computed from (before the resize to 299); count: number of images.
  Files without metadata (pytorch-fid's `.npz`) load with these set to None.
  features: optional `[n, d]` float32 feature rows kept for KID (a subset of the images: KID
  needs features, not moments); stored as `pool_3` in the file, like score_sde's statistics.
  """
  mu: np.ndarray
  sigma: np.ndarray
  count: Optional[int] = None
  feature_extractor: Optional[str] = None
  resolution: Optional[int] = None
  features: Optional[np.ndarray] = None

  @classmethod
  def from_stats(cls, stats: FeatureStats, feature_extractor: Optional[str] = None,
                 resolution: Optional[int] = None,
                 features: Optional[np.ndarray] = None) -> "InceptionStats":
    return cls(stats.mean, stats.cov, int(stats.count), feature_extractor, resolution, features)

  @classmethod
  def from_features(cls, features, feature_extractor: Optional[str] = None,
                    resolution: Optional[int] = None) -> "InceptionStats":
    x = np.asarray(features, np.float64)
    return cls(x.mean(0), np.cov(x, rowvar=False), x.shape[0], feature_extractor, resolution)


def save_stats(path: PathLike, stats: InceptionStats) -> Path:
  """Write `stats` to an .npz (mu, sigma, count, feature_extractor, resolution[, pool_3]).

  Written to a temporary file in the same folder, then renamed over `path`: an existing file is
  replaced only by a complete new one, never left half-written.
  """
  path = Path(path)
  if path.suffix != ".npz":
    raise ValueError(f"Statistics files are .npz; got {path}.")
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp.npz", dir=path.parent)
  os.close(fd)
  try:
    meta = {}
    if stats.count is not None:
      meta["count"] = np.int64(stats.count)
    if stats.feature_extractor is not None:
      meta["feature_extractor"] = np.str_(stats.feature_extractor)
    if stats.resolution is not None:
      meta["resolution"] = np.int64(stats.resolution)
    if stats.features is not None:
      meta["pool_3"] = np.asarray(stats.features, np.float32)
    np.savez(tmp, mu=np.asarray(stats.mu, np.float64), sigma=np.asarray(stats.sigma, np.float64),
             **meta)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return path


def load_stats(path: PathLike, feature_extractor: Optional[str] = None,
               resolution: Optional[int] = None) -> InceptionStats:
  """Read a statistics file, checking it was made with `feature_extractor` at `resolution`.

  Accepts our files, pytorch-fid's (mu, sigma) and score_sde's (`pool_3` features: mu and sigma
  are computed from them; they are also returned as `features`, for KID). A mismatch with
  metadata stored in the file raises ValueError; files without metadata cannot be checked and
  are accepted.
  """
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"Statistics file {path} does not exist.")
  with np.load(path, allow_pickle=False) as f:
    features = f["pool_3"].astype(np.float32) if "pool_3" in f else None
    if "mu" in f and "sigma" in f:
      mu, sigma = f["mu"].astype(np.float64), f["sigma"].astype(np.float64)
      count = int(f["count"]) if "count" in f else None
    elif features is not None:
      feats = features.astype(np.float64)
      mu, sigma, count = feats.mean(0), np.cov(feats, rowvar=False), feats.shape[0]
    else:
      raise ValueError(f"{path} holds neither mu/sigma nor pool_3 features (keys: {list(f)}).")
    stored_fx = str(f["feature_extractor"]) if "feature_extractor" in f else None
    stored_res = int(f["resolution"]) if "resolution" in f else None
  if feature_extractor is not None and stored_fx is not None and stored_fx != feature_extractor:
    raise ValueError(f"{path} was computed with feature extractor {stored_fx!r}, not "
                     f"{feature_extractor!r}: FIDs across extractors / preprocessing are not "
                     "comparable. Recompute the reference statistics with this extractor.")
  if resolution is not None and stored_res is not None and stored_res != resolution:
    raise ValueError(f"{path} holds statistics of {stored_res}x{stored_res} images, but the "
                     f"samples are {resolution}x{resolution}. Use the reference statistics of "
                     "the matching resolution.")
  return InceptionStats(mu, sigma, count, stored_fx, stored_res, features)


def fid_from_stats(a: InceptionStats, b: InceptionStats) -> float:
  """FID between two statistics, refusing pairs whose known metadata disagree."""
  for field in ("feature_extractor", "resolution"):
    va, vb = getattr(a, field), getattr(b, field)
    if va is not None and vb is not None and va != vb:
      raise ValueError(f"Cannot compare statistics with different {field}: {va!r} vs {vb!r}.")
  return frechet_distance(a.mu, a.sigma, b.mu, b.sigma)


# ------------------------------------------------------------------ IS and KID


def _log_softmax(logits: np.ndarray) -> np.ndarray:
  z = logits - logits.max(axis=1, keepdims=True)
  return z - np.log(np.sum(np.exp(z), axis=1, keepdims=True))


def inception_score(logits, splits: int = 10) -> tuple[float, float]:
  """Inception Score from classifier logits `[N, K]` -> (mean, std) over `splits` equal chunks.

  Per chunk: exp(mean_i sum_k p_ik (log p_ik - log pbar_k)), pbar = chunk mean of p_i = softmax.
  Chunk i is rows [i N // splits, (i + 1) N // splits), as in the original code.
  """
  logits = np.asarray(logits, np.float64)
  if logits.ndim != 2:
    raise ValueError(f"logits must be [N, K], got {logits.shape}.")
  if not 1 <= splits <= logits.shape[0]:
    raise ValueError(f"splits must be in [1, N={logits.shape[0]}], got {splits}.")
  n = logits.shape[0]
  scores = []
  for i in range(splits):
    chunk = logits[i * n // splits:(i + 1) * n // splits]
    log_p = _log_softmax(chunk)
    p = np.exp(log_p)
    log_pbar = np.log(p.mean(0))
    kl = np.sum(p * (log_p - log_pbar[None]), axis=1)
    scores.append(np.exp(kl.mean()))
  return float(np.mean(scores)), float(np.std(scores))


class ISStats(NamedTuple):
  """Mergeable sufficient statistics of the Inception Score over `splits` fixed chunks, float64.

  For a run of N images, image i (its global index, not its arrival order) belongs to chunk
  c(i) = max{c : c N // splits <= i} (rows [c N // splits, (c + 1) N // splits), as in
  `inception_score`). Per chunk c, with p_i = softmax(logits_i):
    plogp [splits]     = sum_{i in c} sum_k p_ik log p_ik,
    p_sum [splits, K]  = sum_{i in c} p_i,
    count [splits]     = |c|.
  Then KL_c = plogp_c / n_c - sum_k pbar_ck log pbar_ck with pbar_c = p_sum_c / n_c, and
  IS = (mean_c exp(KL_c), std_c exp(KL_c)): exactly `inception_score` of the full logits, from
  pieces that add across batches, devices, hosts and resumed runs (`merge_stats` works on them).
  """
  plogp: np.ndarray
  p_sum: np.ndarray
  count: np.ndarray

  @classmethod
  def zeros(cls, splits: int = 10, num_classes: int = 1008) -> "ISStats":
    return cls(np.zeros(splits, np.float64), np.zeros((splits, num_classes), np.float64),
               np.zeros(splits, np.float64))

  def update(self, logits, indices, total: int) -> "ISStats":
    """Add logits `[B, K]` of the images with global indices `[B]` (rows with index >= total or
    < 0 are padding and skipped) of a run of `total` images."""
    logits = np.asarray(logits, np.float64)
    indices = np.asarray(indices, np.int64)
    keep = (indices >= 0) & (indices < total)
    logits, indices = logits[keep], indices[keep]
    splits = self.count.shape[0]
    bounds = np.arange(splits + 1) * total // splits
    chunk = np.searchsorted(bounds, indices, side="right") - 1
    log_p = _log_softmax(logits) if len(logits) else logits
    p = np.exp(log_p)
    plogp = np.zeros(splits)
    np.add.at(plogp, chunk, np.sum(p * log_p, axis=1))
    p_sum = np.zeros_like(self.p_sum)
    np.add.at(p_sum, chunk, p)
    count = np.bincount(chunk, minlength=splits).astype(np.float64)
    return ISStats(self.plogp + plogp, self.p_sum + p_sum, self.count + count)

  def score(self) -> tuple[float, float]:
    """(mean, std) of exp(KL_c) over the chunks."""
    if np.any(self.count < 1):
      raise ValueError(f"Every IS chunk needs at least one image; counts {self.count}.")
    pbar = self.p_sum / self.count[:, None]
    kl = self.plogp / self.count - np.sum(pbar * np.log(np.maximum(pbar, 1e-300)), axis=1)
    scores = np.exp(kl)
    return float(np.mean(scores)), float(np.std(scores))


def mmd2_unbiased_poly(x: np.ndarray, y: np.ndarray, degree: int = 3, gamma: Optional[float] = None,
                       coef0: float = 1.0) -> float:
  """Unbiased MMD^2 with k(a, b) = (gamma a.b + coef0)^degree, gamma = 1/d by default:
  sum_{i!=j} k(x_i, x_j) / (m(m-1)) + sum_{i!=j} k(y_i, y_j) / (n(n-1)) - 2 sum_ij k(x_i, y_j) / (mn).
  """
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  gamma = 1.0 / x.shape[1] if gamma is None else gamma
  m, n = x.shape[0], y.shape[0]
  kxx = (gamma * x @ x.T + coef0) ** degree
  kyy = (gamma * y @ y.T + coef0) ** degree
  kxy = (gamma * x @ y.T + coef0) ** degree
  return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1))
               + (kyy.sum() - np.trace(kyy)) / (n * (n - 1)) - 2.0 * kxy.mean())


def kernel_inception_distance(feats1, feats2, num_subsets: int = 100,
                              max_subset_size: int = 1000, seed: int = 0
                              ) -> tuple[float, float]:
  """KID: unbiased polynomial-kernel MMD^2 of two feature sets `[N1, d]`, `[N2, d]`.

  Averaged over `num_subsets` pairs of random subsets (without replacement) of size
  m = min(N1, N2, max_subset_size), as in StyleGAN / torch-fidelity; returns (mean, std) over the
  subsets. Deterministic given `seed`. With m = N1 = N2 the subsets are the full sets.
  """
  x, y = np.asarray(feats1, np.float64), np.asarray(feats2, np.float64)
  if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
    raise ValueError(f"feature sets must be [N, d] with equal d, got {x.shape} and {y.shape}.")
  m = min(x.shape[0], y.shape[0], max_subset_size)
  if m < 2:
    raise ValueError(f"KID needs at least 2 features per set, got {x.shape[0]} and {y.shape[0]}.")
  rng = np.random.default_rng(seed)
  values = [mmd2_unbiased_poly(x[rng.choice(x.shape[0], m, replace=False)],
                               y[rng.choice(y.shape[0], m, replace=False)])
            for _ in range(num_subsets)]
  return float(np.mean(values)), float(np.std(values))


# ------------------------------------------------------------------ two-sample distances


def _flat(x: Array) -> Array:
  return jnp.asarray(x, jnp.float32).reshape(x.shape[0], -1)


def _mean_pairwise_dist(a: Array, b: Array, block: int = 1024) -> Array:
  """mean_{i,j} ||a_i - b_j||, in row blocks so memory stays O(block * len(b))."""
  def row_block(ab):
    d2 = jnp.sum(ab**2, -1)[:, None] + jnp.sum(b**2, -1)[None] - 2 * ab @ b.T
    return jnp.sum(jnp.sqrt(jnp.maximum(d2, 0.0)))
  total = 0.0
  for s in range(0, a.shape[0], block):
    total = total + row_block(a[s:s + block])
  return total / (a.shape[0] * b.shape[0])


def energy_distance(x: Array, y: Array) -> Array:
  """Energy distance 2 E||X - Y|| - E||X - X'|| - E||Y - Y'|| (>= 0, 0 iff same law).

  x: ``[n, ...]``, y: ``[m, ...]``. The V-statistic (diagonals included), so two independent
  samples of the same law give a small positive value of order 1/n: compare against that floor.
  """
  x, y = _flat(x), _flat(y)
  return 2 * _mean_pairwise_dist(x, y) - _mean_pairwise_dist(x, x) - _mean_pairwise_dist(y, y)


def sliced_wasserstein(key: Array, x: Array, y: Array, num_projections: int = 256) -> Array:
  """Sliced 1-Wasserstein distance over random unit directions; x and y need equal sizes."""
  x, y = _flat(x), _flat(y)
  if x.shape != y.shape:
    raise ValueError(f"sliced_wasserstein needs equal sample shapes, got {x.shape} and {y.shape}.")
  dirs = jax.random.normal(key, (x.shape[1], num_projections))
  dirs = dirs / jnp.linalg.norm(dirs, axis=0, keepdims=True)
  px, py = jnp.sort(x @ dirs, axis=0), jnp.sort(y @ dirs, axis=0)
  return jnp.mean(jnp.abs(px - py))
