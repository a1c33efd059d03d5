"""Time-step schedules for the fast samplers, generic over any SDE with a Gaussian kernel.

Every schedule returns ``M + 1`` decreasing times ``t_start = t_0 > t_1 > ... > t_M = eps`` as a
float64 numpy array, computed on the host before compiling (``t_start = sde.T`` unless a sampler
starts later in the reverse process, see :func:`start_scale`). They only use the SDE's kernel
methods (below, T means t_start):

  * ``'time_uniform'``: t_i = T + i / M (eps - T)  (DDIM / DPM-Solver "time_uniform").
  * ``'logSNR'``: uniform in the half log-SNR lambda(t) = log(alpha(t) / sigma(t)) between
    lambda(T) and lambda(eps), mapped back with ``sde.t_from_log_snr`` (DPM-Solver, Lu et al. 2022).
  * ``'edm'``: EDM's rho schedule (Karras et al. 2022, eq. 5) on sigma_edm = sigma / alpha:
    sigma_i = (sigma_max^(1/rho) + i / M (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho, rho = 7 by
    default, mapped back with ``t = sde.t_from_log_snr(-2 log sigma_i)``.
"""
from __future__ import annotations

from typing import Optional

import jax
import numpy as np

from score_sde.sampling.base import check_eps
from score_sde.sde_lib import SDE

__all__ = ["SCHEDULES", "check_times", "get_time_steps", "kernel_np", "start_scale", "t_from_lambda_np"]

SCHEDULES = ("time_uniform", "logSNR", "edm")


def kernel_np(sde: SDE, t) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """``(alpha(t), sigma(t), lambda(t) = log(alpha / sigma))`` in float64 numpy, shaped like t."""
  with jax.enable_x64(True):
    t = np.asarray(t, np.float64)
    alpha, sigma = sde.marginal_coef(t)
    alpha, sigma = np.array(alpha, np.float64), np.array(sigma, np.float64)
  return alpha, sigma, np.log(alpha) - np.log(sigma)


def t_from_lambda_np(sde: SDE, lam) -> np.ndarray:
  """Inverse of lambda(t) = log(alpha / sigma) = log_snr / 2, in float64 numpy."""
  with jax.enable_x64(True):
    return np.array(sde.t_from_log_snr(2.0 * np.asarray(lam, np.float64)), np.float64)


def check_times(sde: SDE, eps: Optional[float], t_start: Optional[float]) -> tuple[float, float]:
  """``(eps, t_start)`` with their defaults ``sde.sampling_eps`` and ``sde.T``; ValueError unless
  0 < eps < t_start <= T."""
  T = float(sde.T)
  eps = check_eps(sde, eps)
  t_start = T if t_start is None else float(t_start)
  if not eps < t_start <= T:
    raise ValueError(f"The start time t_start must lie in (eps={eps}, T={T}], got {t_start}.")
  return eps, t_start


def start_scale(sde: SDE, t_start: float) -> float:
  """Factor that turns a prior draw x_T into the starting point of a sampler that begins at t_start.

  x_{t_start} = k x_T with k = s(t_start) / s(T), s(t)^2 = alpha(t)^2 + sigma(t)^2: the marginal
  standard deviation at t of data with zero mean and unit variance. So k = 1 at t_start = T (the
  prior itself) and for every t on the VP SDE, whose marginals of such data are all N(0, I) (the
  start of diffusers' 'leading' / 'trailing' timestep spacings); on the VE SDE
  k sigma_max ~ sqrt(sigma(t_start)^2 + 1). Starting below T skips the steps where the
  score is nearly that of pure noise (Lin et al. 2024, "Common diffusion noise schedules and sample
  steps are flawed", discuss the trade-off); it is exact only for unit-variance Gaussian data.
  """
  T = float(sde.T)
  alpha, sigma, _ = kernel_np(sde, np.array([float(t_start), T]))
  s = np.sqrt(alpha**2 + sigma**2)
  return float(s[0] / s[1])


def get_time_steps(sde: SDE, num_steps: int, schedule: str = "time_uniform",
                   eps: Optional[float] = None, rho: float = 7.0,
                   t_start: Optional[float] = None) -> np.ndarray:
  """``num_steps + 1`` decreasing times from ``t_start`` to ``eps`` (float64, ``[num_steps + 1]``).

  Args:
    sde: any :class:`~score_sde.sde_lib.SDE`.
    num_steps: M >= 1 intervals.
    schedule: one of :data:`SCHEDULES` (see the module docstring).
    eps: the last time; ``sde.sampling_eps`` by default.
    rho: the EDM exponent (``schedule='edm'`` only).
    t_start: the first time, in (eps, T]; ``sde.T`` by default.
  """
  if schedule not in SCHEDULES:
    raise ValueError(f"Unknown time schedule {schedule!r}; choose one of {list(SCHEDULES)}.")
  if int(num_steps) < 1:
    raise ValueError(f"A time schedule needs num_steps >= 1, got {num_steps}.")
  eps, T = check_times(sde, eps, t_start)
  u = np.linspace(0.0, 1.0, int(num_steps) + 1)
  if schedule == "time_uniform":
    ts = T + u * (eps - T)
  else:
    _, _, lam = kernel_np(sde, np.array([T, eps]))
    if schedule == "logSNR":
      lams = lam[0] + u * (lam[1] - lam[0])
    else:
      if not rho > 0:
        raise ValueError(f"The EDM schedule needs rho > 0, got {rho}.")
      s_max, s_min = np.exp(-lam[0]), np.exp(-lam[1])
      sig = (s_max ** (1 / rho) + u * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho
      lams = -np.log(sig)
    ts = t_from_lambda_np(sde, lams)
  ts[0], ts[-1] = T, eps  # exact endpoints (the inverse map round-trips to ~1e-15)
  if np.any(np.diff(ts) >= 0):
    raise ValueError(f"Schedule {schedule!r} with {num_steps} steps is not strictly decreasing "
                     f"between t_start={T} and eps={eps}; use fewer steps or a larger eps.")
  return ts
