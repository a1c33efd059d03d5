"""Two-sample distances used to compare samplers with ground truth (tests and benchmarks)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


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
