"""Time-step schedules for the fast samplers, generic over any SDE with a Gaussian kernel.

Every schedule returns ``M + 1`` decreasing times ``T = t_0 > t_1 > ... > t_M = eps`` as a float64
numpy array, computed on the host before compiling. They only use the SDE's kernel methods:

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

from score_sde.sde_lib import SDE

__all__ = ["SCHEDULES", "get_time_steps", "kernel_np", "t_from_lambda_np"]

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


def get_time_steps(sde: SDE, num_steps: int, schedule: str = "time_uniform",
                   eps: Optional[float] = None, rho: float = 7.0) -> np.ndarray:
  """``num_steps + 1`` decreasing times from ``sde.T`` to ``eps`` (float64, ``[num_steps + 1]``).

  Args:
    sde: any :class:`~score_sde.sde_lib.SDE`.
    num_steps: M >= 1 intervals.
    schedule: one of :data:`SCHEDULES` (see the module docstring).
    eps: the last time; ``sde.sampling_eps`` by default.
    rho: the EDM exponent (``schedule='edm'`` only).
  """
  if schedule not in SCHEDULES:
    raise ValueError(f"Unknown time schedule {schedule!r}; choose one of {list(SCHEDULES)}.")
  if int(num_steps) < 1:
    raise ValueError(f"A time schedule needs num_steps >= 1, got {num_steps}.")
  T = float(sde.T)
  eps = float(sde.sampling_eps if eps is None else eps)
  if not 0.0 < eps < T:
    raise ValueError(f"The last sampling time eps must lie in (0, T={T}), got {eps}.")
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
                     f"between T={T} and eps={eps}; use fewer steps or a larger eps.")
  return ts
