"""Embedded 2-D toy sets (no download), generated example by example from counter-based uniforms.

Example p of a toy stream is ``sampler(hash_uniform(seed, stream, p))``: a pure function of
``(seed, stream, p)``, so toy training data are fresh i.i.d. samples that still resume exactly.

  * ``gmm``: ``score_sde.analytic.standard_mixture`` built from ``config.data`` (exact score and
    log-density available through :func:`get_toy_mixture`); label = mixture component.
  * ``checkerboard``: uniform on the 8 dark cells of a 4x4 board on [-2, 2]^2, scaled by
    sqrt(3/4) (each coordinate uniform with variance 1); label = cell 0..7.
  * ``rings``: radius r_k = k + 1 (k = 0..3, equiprobable), uniform angle, isotropic noise 0.1,
    scaled by 1 / sqrt(E[r^2] / 2 + 0.1^2) = 1 / sqrt(3.76) (unit variance per coordinate);
    label = ring k.
  * ``swiss_roll``: (t cos t, t sin t) with t ~ U[1.5 pi, 4.5 pi] plus isotropic noise 0.5,
    centered and scaled to unit mean variance per coordinate (moments by quadrature); label 0.
"""
from __future__ import annotations

import functools
from typing import Callable, Optional

import numpy as np

from score_sde import analytic
from score_sde.datasets.pipeline import box_muller, hash_uniform

TOY_DATASETS = ("gmm", "checkerboard", "swiss_roll", "rings")
# Fixed seed of the toy eval sets: the same test points in every run, whatever config.seed is.
TOY_EVAL_SEED = 20210101

RING_NOISE = 0.1
SWISS_ROLL_NOISE = 0.5
_RING_SCALE = 1.0 / np.sqrt(np.mean(np.arange(1, 5) ** 2) / 2 + RING_NOISE**2)
_CHECKER_SCALE = np.sqrt(3.0 / 4.0)


def get_toy_mixture(config) -> analytic.GaussianMixture:
  """The ``gmm`` toy distribution as an exact :class:`score_sde.analytic.GaussianMixture`.

  Reads ``config.data.{dim, num_components, gmm_radius, gmm_std}`` and optionally
  ``gmm_seed`` (directions of the means when dim > 2, default 0) and ``gmm_weights``.
  """
  data = config.data
  if str(data.dataset).lower() != "gmm":
    raise ValueError(f"get_toy_mixture needs config.data.dataset='gmm', got {data.dataset!r}.")
  missing = [k for k in ("dim", "num_components", "gmm_radius", "gmm_std") if data.get(k) is None]
  if missing:
    raise ValueError(f"The gmm toy set needs config.data.{{{', '.join(missing)}}}.")
  weights = data.get("gmm_weights", None)
  return analytic.standard_mixture(
      dim=int(data.dim), num_components=int(data.num_components), radius=float(data.gmm_radius),
      std=float(data.gmm_std), seed=int(data.get("gmm_seed", 0) or 0),
      weights=None if weights is None else np.asarray(weights, np.float64))


def _gmm_sampler(mixture: analytic.GaussianMixture):
  """u [n, 1 + 2 ceil(D/2)] -> x = mu_k + L_k z; k ~ w by inverse CDF, z ~ N(0, I) by Box-Muller."""
  K, D = mixture.num_components, mixture.dim
  covs = np.asarray(mixture.covs_np, np.float64)
  chol = np.sqrt(covs) if covs.ndim == 2 else np.linalg.cholesky(covs)
  cdf = np.cumsum(mixture.weights_np)
  means = np.asarray(mixture.means_np, np.float64)
  num_pairs = (D + 1) // 2

  def sample(u: np.ndarray):
    k = np.minimum(np.searchsorted(cdf, u[:, 0] * cdf[-1], side="right"), K - 1)
    z1, z2 = box_muller(u[:, 1:1 + num_pairs], u[:, 1 + num_pairs:])
    z = np.concatenate([z1, z2], axis=1)[:, :D]
    if chol.ndim == 2:
      x = means[k] + chol[k] * z
    else:
      x = means[k] + np.einsum("nij,nj->ni", chol[k], z)
    return x.reshape((-1,) + mixture.data_shape), k

  return sample, 1 + 2 * num_pairs


def _checkerboard(u: np.ndarray):
  cell = np.minimum((u[:, 0] * 8).astype(np.int64), 7)
  i = cell // 2
  j = 2 * (cell % 2) + i % 2        # (i + j) even: the dark cells
  x = np.stack([i + u[:, 1], j + u[:, 2]], axis=1) - 2.0
  return x * _CHECKER_SCALE, cell


def _rings(u: np.ndarray):
  k = np.minimum((u[:, 0] * 4).astype(np.int64), 3)
  theta = 2 * np.pi * u[:, 1]
  z1, z2 = box_muller(u[:, 2], u[:, 3])
  r = k + 1.0
  x = np.stack([r * np.cos(theta) + RING_NOISE * z1, r * np.sin(theta) + RING_NOISE * z2], axis=1)
  return x * _RING_SCALE, k


@functools.lru_cache(maxsize=1)
def swiss_roll_moments() -> tuple[np.ndarray, float]:
  """Mean [2] and scale of the raw swiss roll: E over t ~ U[1.5 pi, 4.5 pi] by Simpson's rule."""
  t = np.linspace(1.5 * np.pi, 4.5 * np.pi, 200_001)
  w = np.ones_like(t)
  w[1:-1:2], w[2:-1:2] = 4.0, 2.0
  w /= w.sum()
  c = np.stack([t * np.cos(t), t * np.sin(t)])
  mean = c @ w
  var = ((c - mean[:, None]) ** 2) @ w + SWISS_ROLL_NOISE**2
  return mean, float(np.sqrt(var.mean()))


def _swiss_roll(u: np.ndarray):
  mean, scale = swiss_roll_moments()
  t = 1.5 * np.pi * (1 + 2 * u[:, 0])
  z1, z2 = box_muller(u[:, 1], u[:, 2])
  x = np.stack([t * np.cos(t) + SWISS_ROLL_NOISE * z1, t * np.sin(t) + SWISS_ROLL_NOISE * z2], 1)
  return (x - mean) / scale, np.zeros(len(u), np.int64)


class ToySource:
  """Endless (``num_examples=None``) or finite generated source of a toy set."""
  is_image = False

  def __init__(self, sampler: Callable, num_uniforms: int, data_shape: tuple[int, ...],
               seed: int, stream: int, num_examples: Optional[int] = None):
    self.sampler, self.num_uniforms = sampler, num_uniforms
    self.data_shape, self.seed, self.stream = tuple(data_shape), seed, stream
    self.num_examples = num_examples

  def read(self, indices: np.ndarray):
    u = hash_uniform(self.seed, self.stream, indices, self.num_uniforms)
    x, labels = self.sampler(u)
    return np.asarray(x, np.float32), np.asarray(labels, np.int32)


def toy_source(config, name: str, *, seed: int, stream: int,
               num_examples: Optional[int]) -> ToySource:
  dim = config.data.get("dim", None)
  if name == "gmm":
    mixture = get_toy_mixture(config)
    sampler, nu = _gmm_sampler(mixture)
    return ToySource(sampler, nu, mixture.data_shape, seed, stream, num_examples)
  if dim not in (None, 2):
    raise ValueError(f"The {name!r} toy set is 2-D; set config.data.dim=2 (got {dim}).")
  sampler, nu = {"checkerboard": (_checkerboard, 3), "rings": (_rings, 4),
                 "swiss_roll": (_swiss_roll, 3)}[name]
  return ToySource(sampler, nu, (2,), seed, stream, num_examples)
