"""Consistency sampling (Song et al., ICML 2023, Algorithm 1): one step, or multistep at given times.

A consistency model f(x_t, t) maps any point of a probability-flow trajectory to its start; this
sampler reads it through the score, as every sampler does (:mod:`score_sde.sampling.base`):

    f(x, t) = (x + sigma(t)^2 score(x, t)) / alpha(t)          (the data prediction)

which is exact for the 'consistency' parametrization (its score is (alpha f - x) / sigma^2,
:class:`score_sde.parametrizations.ConsistencyOutput`); given an ordinary score model it is
Tweedie's denoiser E[x_0 | x_t]. With t_0 = t_start (``sde.T``) > t_1 > ... > t_{n-1} > eps:

    x0 = f(x_{t_0}, t_0),   x_{t_0} = x_T
    for k = 1 .. n-1:  x_{t_k} = alpha(t_k) x0 + alpha(t_k) sqrt(sigma_e(t_k)^2 - sigma_e(eps)^2) z_k,
                       x0 = f(x_{t_k}, t_k)
    return x0

with sigma_e = sigma / alpha (EDM's noise level) and z_k ~ N(0, I): re-noising the estimate of
y_eps = x_eps / alpha(eps) = x_0 + sigma_e(eps) n to time t_k (CM's x + sqrt(t^2 - eps^2) z, for any
SDE). n = ``nfe`` network evaluations. The times: ``times`` (the n - 1 intermediate times, in the
SDE's own time, decreasing, in (eps, t_start)), or by default the interior points of EDM's rho = 7
schedule with n steps (:func:`score_sde.sampling.schedules.get_time_steps`).
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from score_sde.sampling import register_sampler
from score_sde.sampling.base import (ScoreFn, check_score_fn_shape, check_shape, check_x_T,
                                     count_score_evals, jit_with_score_fn)
from score_sde.sampling.schedules import check_times, get_time_steps, kernel_np, start_scale
from score_sde.sde_lib import SDE

Array = jax.Array

__all__ = ["consistency_sampler", "consistency_times", "greedy_consistency_times"]


def consistency_times(sde: SDE, nfe: int, times: Optional[Sequence[float]] = None,
                      eps: Optional[float] = None, t_start: Optional[float] = None,
                      rho: float = 7.0) -> np.ndarray:
  """The ``nfe`` evaluation times ``[t_start, t_1, ..., t_{nfe-1}]`` (float64, decreasing).

  ValueError naming ``times`` when it holds fewer than ``nfe - 1`` times (more steps than times
  given), more, or times outside (eps, t_start) or not decreasing.
  """
  nfe = int(nfe)
  if nfe < 1:
    raise ValueError(f"consistency: nfe (the number of steps) must be >= 1, got {nfe}.")
  eps, t_start = check_times(sde, eps, t_start)
  if times is None:
    interior = get_time_steps(sde, nfe, "edm", eps, rho, t_start)[1:-1] if nfe > 1 else []
  else:
    interior = np.asarray([float(t) for t in np.ravel(np.asarray(times, np.float64))])
    if len(interior) != nfe - 1:
      raise ValueError(
          f"consistency: nfe={nfe} steps need {nfe - 1} intermediate time(s) in `times` "
          f"(config.sampling.options.times), got {len(interior)}: {interior.tolist()}. Give "
          f"nfe - 1 decreasing times in (eps={eps:g}, t_start={t_start:g}), or lower nfe to "
          f"{len(interior) + 1}.")
    if np.any(~np.isfinite(interior)) or np.any(interior <= eps) or np.any(interior >= t_start) \
        or np.any(np.diff(interior) >= 0):
      raise ValueError(f"consistency: `times` (config.sampling.options.times) must be decreasing "
                       f"and inside (eps={eps:g}, t_start={t_start:g}), got "
                       f"{interior.tolist()}.")
  return np.concatenate([[t_start], np.asarray(interior, np.float64)])


@register_sampler("consistency")
def consistency_sampler(sde: SDE, shape: Sequence[int], *, nfe: int = 1,
                        times: Optional[Sequence[float]] = None, eps: Optional[float] = None,
                        t_start: Optional[float] = None, rho: float = 7.0):
  """Consistency sampling with ``nfe`` steps (module docstring): 1 step, or multistep at ``times``.

  Options: ``nfe`` (steps = network evaluations), ``times`` (the nfe - 1 intermediate times;
  None: EDM's rho schedule), ``eps`` (the boundary time; ``sde.sampling_eps``), ``t_start`` (the
  first time, ``sde.T``; the prior draw is scaled by ``start_scale``), ``rho``.
  Returns ``sampler(key, score_fn, x_T=None) -> (samples [*shape], nfe)``.
  """
  shape = check_shape(shape)
  eps_, t0 = check_times(sde, eps, t_start)
  ts = consistency_times(sde, nfe, times, eps_, t0, rho)
  al, si, lam = kernel_np(sde, ts)
  _, _, lam_eps = kernel_np(sde, np.array([eps_]))
  sig_e, sig_eps = np.exp(-lam), float(np.exp(-lam_eps[0]))
  # per step k >= 1: x_{t_k} = a_k x0 + s_k z with s_k = alpha_k sqrt(sigma_e_k^2 - sigma_e(eps)^2)
  renoise = [(float(al[k]), float(al[k] * math.sqrt(max(sig_e[k] ** 2 - sig_eps**2, 0.0))))
             for k in range(1, len(ts))]
  scale = start_scale(sde, t0)

  def data_prediction(score_fn, x, k):
    t = jnp.full((shape[0],), ts[k], jnp.float32)
    return (x + float(si[k]) ** 2 * score_fn(x, t)) / float(al[k])

  def run(score_fn, x, key):
    x0 = data_prediction(score_fn, x, 0)
    for k, (a, s) in enumerate(renoise, start=1):
      z = jax.random.normal(jax.random.fold_in(key, k), shape, x.dtype)
      x0 = data_prediction(score_fn, a * x0 + s * z, k)
    return x0

  spec = jax.ShapeDtypeStruct(shape, jnp.float32)
  n_evals = count_score_evals(
      lambda wrap: jax.eval_shape(lambda x: run(wrap(lambda x, t: x), x, jax.random.PRNGKey(0)),
                                  spec))

  def program(key, score_fn, x_T):
    check_score_fn_shape(score_fn, spec, "consistency sampler")
    prior_key, noise_key = jax.random.split(key)
    if x_T is None:
      x_T = sde.prior_sampling(prior_key, shape)
    x = x_T.astype(jnp.float32)
    x = jnp.float32(scale) * x if scale != 1.0 else x
    return run(score_fn, x, noise_key), jnp.asarray(n_evals, jnp.int32)

  jitted = jit_with_score_fn(program)

  def sampler(key: Array, score_fn: ScoreFn, x_T: Optional[Array] = None):
    return jitted(key, score_fn, check_x_T(x_T, shape, "consistency sampler"))

  sampler.nfe = n_evals
  sampler.times = ts
  return sampler


def greedy_consistency_times(sde: SDE, score_fn: ScoreFn, x0: Array, max_steps: int,
                             distance: Callable[[np.ndarray], float],
                             step_key: Callable[[int], Array], *, candidates: int = 40,
                             batch: Optional[int] = None, rho: float = 7.0
                             ) -> dict[int, list[float]]:
  """Intermediate times of multistep consistency sampling, chosen greedily (as Song et al., 2023,
  choose theirs): ``{k: [t_1, ..., t_{k-1}]}`` for k = 2 .. ``max_steps``.

  ``x0`` [n, ...]: one-step samples f(x_T, T). With the times of k - 1 steps fixed, step k re-noises
  the current samples to each candidate t below the last chosen time and denoises them once (the
  sampler's step, module docstring), ``x_t = alpha(t) x0 + alpha(t) sqrt(sigma_e(t)^2 -
  sigma_e(eps)^2) z``, ``x0 <- (x_t + sigma(t)^2 score(x_t, t)) / alpha(t)``, and keeps the t whose
  samples have the smallest ``distance(samples) -> float`` (e.g. an FD or energy distance to data
  held apart from the reported evaluation). Candidates: the interior of EDM's rho schedule with
  ``candidates`` points. ``z`` for step k: ``step_key(k)``, folded with the batch index when
  ``batch`` splits ``x0`` into several calls.
  """
  from score_sde.sampling.schedules import get_time_steps
  grid = get_time_steps(sde, int(candidates), "edm", rho=rho)[1:-1]
  a_e, s_e = sde.marginal_coef(jnp.float32(sde.sampling_eps))
  sig_eps = float(s_e / a_e)

  @jax.jit
  def renoise_denoise(x, key, t):
    a, sig = sde.marginal_coef(t)
    x_t = a * x + a * jnp.sqrt(jnp.maximum((sig / a) ** 2 - sig_eps**2, 0.0)) * \
        jax.random.normal(key, x.shape)
    return (x_t + sig**2 * score_fn(x_t, jnp.full((x.shape[0],), t, jnp.float32))) / a

  x0 = np.asarray(x0)
  n = len(x0)
  slices = [slice(0, n)] if batch is None or batch >= n else \
      [slice(i, i + batch) for i in range(0, n, batch)]
  chosen: list[float] = []
  out: dict[int, list[float]] = {}
  for k in range(2, int(max_steps) + 1):
    key = step_key(k)
    keys = [key] if len(slices) == 1 else [jax.random.fold_in(key, i) for i in range(len(slices))]
    best = None
    for t in grid:
      if chosen and t >= chosen[-1]:
        continue
      x = np.concatenate([np.asarray(renoise_denoise(x0[b], kb, jnp.float32(t)))
                          for b, kb in zip(slices, keys)])
      d = float(distance(x))
      if best is None or d < best[0]:
        best = (d, float(t), x)
    chosen.append(best[1])
    x0 = best[2]
    out[k] = list(chosen)
  return out
