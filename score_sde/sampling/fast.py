"""Fast samplers (DDIM, EDM Euler / Heun, DPM-Solver, DPM-Solver++, UniPC) for every SDE.

All of them work through the SDE's Gaussian kernel x_t = alpha(t) x_0 + sigma(t) eps, with the
half log-SNR lambda(t) = log(alpha(t) / sigma(t)) (= ``sde.log_snr(t) / 2``) and its inverse
(``sde.t_from_log_snr``). The score gives both predictions the solvers use:

    data prediction   x0(x, t)  = (x + sigma(t)^2 score(x, t)) / alpha(t),
    noise prediction  eps(x, t) = -sigma(t) score(x, t).

The EDM samplers read the same kernel in EDM's coordinates y = x / alpha, sigma_edm = sigma / alpha
= exp(-lambda), where the probability-flow ODE is dy / d sigma_edm = (y - x0) / sigma_edm.

Implementation. Every update below is *linear* in the current state and in the model outputs,
with coefficients that only depend on the time steps. So the coefficients are computed once on
the host in float64 (before compiling) and two jitted engines run them:

  * an explicit exponential Runge-Kutta engine (one ``lax.scan`` per run of equal-order steps):
    DDIM, Euler, Heun (with EDM churn), singlestep DPM-Solver / DPM-Solver++;
  * a linear multistep engine with an optional corrector (one ``lax.scan``): multistep
    DPM-Solver / DPM-Solver++ (with the SDE variants) and UniPC.

Each sampler is registered with :func:`score_sde.sampling.register_sampler` and built as
``get_sampler(name, sde, shape, **options)``; it returns ``sampler(key, score_fn, x_T=None) ->
(samples [*shape], nfe)`` (:mod:`score_sde.sampling.base`) where nfe (int32) counts the score
evaluations the program really makes (known before it runs, also as ``sampler.nfe``). Common
options:

  nfe: total budget of score evaluations (default 20), or ``steps``: number of time intervals
    (one of the two).
  schedule: 'time_uniform' | 'logSNR' | 'edm' (:mod:`score_sde.sampling.schedules`); rho for 'edm'.
  eps: the last time (``sde.sampling_eps`` by default).
  t_start: the first time, in (eps, T] (``sde.T`` by default); the prior draw is scaled by
    :func:`~score_sde.sampling.schedules.start_scale` (1 on the VP SDE) to start there.
  denoise: finish with one extra evaluation, returning x0(x_eps, eps) (Tweedie's denoising step).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from score_sde.sampling import register_sampler
from score_sde.sampling.base import (Sampler, ScoreFn, check_score_fn_shape, check_shape,
                                     check_x_T, jit_with_score_fn)
from score_sde.sampling.schedules import (SCHEDULES, check_times, get_time_steps, kernel_np,
                                         start_scale, t_from_lambda_np)
from score_sde.sde_lib import SDE

Array = jax.Array

__all__ = ["ddim_sampler", "edm_sampler", "euler_sampler", "heun_sampler", "dpm_solver_sampler",
           "dpm_solver_pp_sampler", "unipc_sampler"]


# ------------------------------------------------------------------------------------------------
# Model outputs
# ------------------------------------------------------------------------------------------------
def _model_out(score_fn: ScoreFn, x: Array, t: Array, alpha: Array, sigma: Array,
               pred: str) -> Array:
  """x0 = (x + sigma^2 score) / alpha (``pred='data'``) or eps = -sigma score (``'noise'``)."""
  score = score_fn(x, jnp.full((x.shape[0],), t, x.dtype))
  if pred == "data":
    return (x + sigma**2 * score) / alpha
  return -sigma * score


# ------------------------------------------------------------------------------------------------
# Engine 1: explicit exponential Runge-Kutta steps
# ------------------------------------------------------------------------------------------------
@dataclass
class _RKRun:
  """``n`` steps with ``k`` stages each. Per step (all float64 host arrays, leading dim n):

      x <- pre_a x + pre_s z                            (EDM churn; only if ``churn``)
      u_0 = x,  u_j = a_j x + sum_{l<j} b_{jl} m_l,  m_j = model(u_j, tau_j)
      x <- fa x + sum_j fb_j m_j + s z                  (noise only if ``noisy``)
  """
  tau: np.ndarray      # [n, k] stage times
  alpha: np.ndarray    # [n, k] alpha(tau)
  sigma: np.ndarray    # [n, k] sigma(tau)
  a: np.ndarray        # [n, k]
  b: np.ndarray        # [n, k, k]
  fa: np.ndarray       # [n]
  fb: np.ndarray       # [n, k]
  s: np.ndarray        # [n]
  pre_a: np.ndarray    # [n]
  pre_s: np.ndarray    # [n]

  @property
  def stages(self) -> int:
    return self.tau.shape[1]

  @property
  def nfe(self) -> int:
    return self.tau.shape[0] * self.tau.shape[1]


def _rk_apply(run: _RKRun, pred: str, score_fn: ScoreFn, x: Array, key: Array) -> Array:
  k = run.stages
  churn = bool(np.any(run.pre_s != 0) or np.any(run.pre_a != 1))
  noisy = bool(np.any(run.s != 0))
  f32 = lambda v: jnp.asarray(v, x.dtype)
  xs = dict(tau=f32(run.tau), alpha=f32(run.alpha), sigma=f32(run.sigma), a=f32(run.a),
            b=f32(run.b), fa=f32(run.fa), fb=f32(run.fb), s=f32(run.s), pre_a=f32(run.pre_a),
            pre_s=f32(run.pre_s), key=jax.random.split(key, run.tau.shape[0]))

  def body(x, c):
    k_pre, k_post = jax.random.split(c["key"])
    if churn:
      x = c["pre_a"] * x + c["pre_s"] * jax.random.normal(k_pre, x.shape, x.dtype)
    ms = []
    for j in range(k):
      u = x
      if j > 0:
        u = c["a"][j] * x + sum(c["b"][j, l] * ms[l] for l in range(j))
      ms.append(_model_out(score_fn, u, c["tau"][j], c["alpha"][j], c["sigma"][j], pred))
    x = c["fa"] * x + sum(c["fb"][j] * ms[j] for j in range(k))
    if noisy:
      x = x + c["s"] * jax.random.normal(k_post, x.shape, x.dtype)
    return x, None

  x, _ = jax.lax.scan(body, x, xs)
  return x


def _rk_runs(steps: Sequence[dict]) -> list[_RKRun]:
  """Groups per-step dicts (same keys as :class:`_RKRun`, one step each) into equal-stage runs."""
  runs, i = [], 0
  while i < len(steps):
    j = i
    while j < len(steps) and len(steps[j]["tau"]) == len(steps[i]["tau"]):
      j += 1
    group = steps[i:j]
    runs.append(_RKRun(**{f: np.stack([np.asarray(s[f], np.float64) for s in group])
                          for f in _RKRun.__dataclass_fields__}))
    i = j
  return runs


def _rk_step(tau, alpha, sigma, a, b, fa, fb, s=0.0, pre_a=1.0, pre_s=0.0) -> dict:
  return dict(tau=tau, alpha=alpha, sigma=sigma, a=a, b=b, fa=fa, fb=fb, s=s, pre_a=pre_a,
              pre_s=pre_s)


# ------------------------------------------------------------------------------------------------
# Engine 2: linear multistep with an optional corrector
# ------------------------------------------------------------------------------------------------
@dataclass
class _MSRun:
  """M steps, 1 evaluation each. Step i (host float64 arrays, leading dim M):

      m_i   = model(xp_i, t_i)                                     (xp_0 = x_T)
      xc_i  = P_i xp_i + Q_i xc_{i-1} + sum_{j=0..3} Cc_ij m_{i-j}  (corrector; P=1, Q=Cc=0: none)
      xp_{i+1} = A_i xc_i + sum_{j=0..2} C_ij m_{i-j} + S_i z_i
  """
  t: np.ndarray      # [M]
  alpha: np.ndarray  # [M]
  sigma: np.ndarray  # [M]
  A: np.ndarray      # [M]
  C: np.ndarray      # [M, 3]
  S: np.ndarray      # [M]
  P: np.ndarray      # [M]
  Q: np.ndarray      # [M]
  Cc: np.ndarray     # [M, 4]

  @property
  def nfe(self) -> int:
    return self.t.shape[0]


def _ms_apply(run: _MSRun, pred: str, score_fn: ScoreFn, x: Array, key: Array) -> Array:
  corrector = bool(np.any(run.Q != 0) or np.any(run.Cc != 0))
  noisy = bool(np.any(run.S != 0))
  f32 = lambda v: jnp.asarray(v, x.dtype)
  xs = {f: f32(getattr(run, f)) for f in _MSRun.__dataclass_fields__}
  xs["key"] = jax.random.split(key, run.t.shape[0])

  def body(carry, c):
    xc_prev, xp, hist = carry
    m = _model_out(score_fn, xp, c["t"], c["alpha"], c["sigma"], pred)
    ms = (m,) + hist
    xc = xp
    if corrector:
      xc = c["P"] * xp + c["Q"] * xc_prev + sum(c["Cc"][j] * ms[j] for j in range(4))
    x_next = c["A"] * xc + sum(c["C"][j] * ms[j] for j in range(3))
    if noisy:
      x_next = x_next + c["S"] * jax.random.normal(c["key"], x.shape, x.dtype)
    return (xc, x_next, ms[:3]), None

  zeros = jnp.zeros_like(x)
  (_, x, _), _ = jax.lax.scan(body, (x, x, (zeros, zeros, zeros)), xs)
  return x


# ------------------------------------------------------------------------------------------------
# The sampler program
# ------------------------------------------------------------------------------------------------
def _make_sampler(sde: SDE, shape: tuple[int, ...], runs: list, pred: str, denoise: bool,
                  t_end: float, t_start: float) -> Sampler:
  """Wraps runs into ``sampler(key, score_fn, x_T=None) -> (samples, nfe)`` (the contract of
  :mod:`score_sde.sampling.base`). ``x_T [*shape]`` replaces the prior draw (the deterministic
  samplers then map x_T to x_eps; ``key`` only drives the sampler's noise); with ``t_start`` < T
  it is scaled like the prior draw. ``sampler.nfe`` is the count as a Python int."""
  a_end, s_end, _ = kernel_np(sde, np.array(t_end))
  scale = start_scale(sde, t_start)
  nfe = sum(r.nfe for r in runs) + int(denoise)

  def program(key: Array, score_fn: ScoreFn, x_T: Optional[Array]) -> tuple[Array, Array]:
    check_score_fn_shape(score_fn, jax.ShapeDtypeStruct(shape, jnp.float32), "Fast sampler")
    k_prior, k_run = jax.random.split(key)
    x = sde.prior_sampling(k_prior, shape) if x_T is None else x_T
    x = x.astype(jnp.float32)
    if scale != 1.0:
      x = jnp.float32(scale) * x
    for i, run in enumerate(runs):
      k = jax.random.fold_in(k_run, i)
      x = (_rk_apply if isinstance(run, _RKRun) else _ms_apply)(run, pred, score_fn, x, k)
    if denoise:
      x = _model_out(score_fn, x, jnp.float32(t_end), jnp.float32(a_end), jnp.float32(s_end),
                     "data")
    return x, jnp.asarray(nfe, jnp.int32)

  jitted = jit_with_score_fn(program)

  def sampler(key: Array, score_fn: ScoreFn, x_T: Optional[Array] = None) -> tuple[Array, Array]:
    return jitted(key, score_fn, check_x_T(x_T, shape, "Fast sampler"))

  sampler.nfe = nfe
  return sampler


# ------------------------------------------------------------------------------------------------
# Option checking
# ------------------------------------------------------------------------------------------------
def _check_common(sde: SDE, shape, schedule: str, rho: Optional[float], eps: Optional[float],
                  t_start: Optional[float]):
  if not isinstance(sde, SDE):
    raise ValueError(f"sde must be a score_sde.sde_lib.SDE, got {type(sde).__name__}.")
  shape = check_shape(shape)
  if schedule not in SCHEDULES:
    raise ValueError(f"Unknown schedule {schedule!r}; choose one of {list(SCHEDULES)}.")
  if rho is not None and schedule != "edm":
    raise ValueError(f"rho only applies to schedule='edm', not {schedule!r}: drop rho.")
  eps, t_start = check_times(sde, eps, t_start)
  return shape, (7.0 if rho is None else float(rho)), eps, t_start


def _budget(name: str, nfe: Optional[int], steps: Optional[int], denoise: bool,
            per_step: int = 1) -> tuple[Optional[int], Optional[int]]:
  """Returns (budget for the solver steps, steps) with exactly one of them set."""
  if nfe is not None and steps is not None:
    raise ValueError(f"{name}: give nfe or steps, not both.")
  if steps is not None:
    if int(steps) < 1:
      raise ValueError(f"{name}: steps must be >= 1, got {steps}.")
    return None, int(steps)
  nfe = 20 if nfe is None else int(nfe)
  budget = nfe - int(denoise)
  if budget < per_step:
    raise ValueError(f"{name}: nfe={nfe} is too small: it needs at least {per_step + int(denoise)} "
                     f"evaluations{' (one goes to the denoising step)' if denoise else ''}.")
  return budget, None


def _order_check(name: str, order: int, n_eval: int, what: str):
  if order not in (1, 2, 3):
    raise ValueError(f"{name}: order must be 1, 2 or 3, got {order}.")
  if n_eval < order:
    raise ValueError(f"{name}: order {order} needs at least {order} {what}, got {n_eval}; "
                     f"raise nfe/steps or lower the order.")


# ------------------------------------------------------------------------------------------------
# DDIM / Euler / Heun
# ------------------------------------------------------------------------------------------------
@register_sampler("ddim")
def ddim_sampler(sde: SDE, shape: Sequence[int], *, nfe: Optional[int] = None,
                 steps: Optional[int] = None, eta: float = 0.0, schedule: str = "time_uniform",
                 rho: Optional[float] = None, eps: Optional[float] = None,
                 t_start: Optional[float] = None, denoise: bool = False):
  """DDIM (Song, Meng & Ermon, ICLR 2021), generalized to any Gaussian kernel.

  From s = t_i to t = t_{i+1}, with x0 = x0(x_s, s) and eps_hat = (x_s - alpha_s x0) / sigma_s:

      x_t = alpha_t x0 + sqrt(sigma_t^2 - c^2) eps_hat + c z,
      c = eta sigma_t sqrt(1 - exp(-2 h)),   h = lambda_t - lambda_s,

  i.e. c^2 = eta^2 Var[x_t | x_s, x_0] (the DDPM posterior variance); eta = 0 is deterministic and
  equals DPM-Solver-1 (and EDM's Euler step), eta = 1 is ancestral sampling. One evaluation per
  step; default schedule uniform in t.
  """
  shape, rho, eps, t_start = _check_common(sde, shape, schedule, rho, eps, t_start)
  if not eta >= 0:
    raise ValueError(f"ddim: eta must be >= 0, got {eta}.")
  budget, steps = _budget("ddim", nfe, steps, denoise)
  ts = get_time_steps(sde, steps or budget, schedule, eps, rho, t_start)
  al, si, lam = kernel_np(sde, ts)
  out = []
  for i in range(len(ts) - 1):
    h = lam[i + 1] - lam[i]
    c = eta * si[i + 1] * math.sqrt(-math.expm1(-2 * h))
    if c > si[i + 1]:
      raise ValueError(f"ddim: eta={eta} gives a noise std above sigma(t); use eta <= 1.")
    A = math.sqrt(si[i + 1] ** 2 - c**2) / si[i]
    out.append(_rk_step([ts[i]], [al[i]], [si[i]], [1.0], [[0.0]], A, [al[i + 1] - A * al[i]], c))
  return _make_sampler(sde, shape, _rk_runs(out), "data", denoise, eps, t_start)


def _edm_steps(sde: SDE, ts: np.ndarray, heun_steps: int, S_churn: float, S_tmin: float,
               S_tmax: float, S_noise: float) -> list[dict]:
  """EDM Algorithm 2 in x-space (coefficients derived on y = x / alpha, sigma_edm = sigma / alpha)."""
  M = len(ts) - 1
  al, si, lam = kernel_np(sde, ts)
  sig = np.exp(-lam)  # sigma_edm
  out = []
  for i in range(M):
    gamma = min(S_churn / M, math.sqrt(2) - 1) if S_tmin <= sig[i] <= S_tmax else 0.0
    sig_hat = sig[i] * (1 + gamma)
    if gamma > 0:
      t_hat = float(t_from_lambda_np(sde, -np.log(sig_hat)))
      a_hat, s_hat, _ = (float(v) for v in kernel_np(sde, np.array(t_hat)))
      pre_a = a_hat / al[i]
      pre_s = a_hat * math.sqrt(sig_hat**2 - sig[i] ** 2) * S_noise
    else:
      t_hat, a_hat, s_hat, pre_a, pre_s = ts[i], al[i], si[i], 1.0, 0.0
    an, sn, sig_n = al[i + 1], si[i + 1], sig[i + 1]
    r = sig_n / sig_hat
    d = sig_n - sig_hat
    if i < heun_steps:
      # y' = r y + (1 - r) D0;  y_next = y + d/2 ((y - D0)/sig_hat + (y' - D1)/sig_n).
      out.append(_rk_step([t_hat, ts[i + 1]], [a_hat, an], [s_hat, sn], [1.0, sn / s_hat],
                          [[0.0, 0.0], [an * (1 - r), 0.0]], sn / s_hat,
                          [an * d / 2 * (1 / sig_n - 2 / sig_hat), -an * d / (2 * sig_n)],
                          0.0, pre_a, pre_s))
    else:
      out.append(_rk_step([t_hat], [a_hat], [s_hat], [1.0], [[0.0]], sn / s_hat,
                          [an * (1 - r)], 0.0, pre_a, pre_s))
  return out


def edm_sampler(sde: SDE, shape: Sequence[int], *, second_order: bool,
                nfe: Optional[int] = None, steps: Optional[int] = None, schedule: str = "edm",
                rho: Optional[float] = None, eps: Optional[float] = None,
                t_start: Optional[float] = None, denoise: bool = False, S_churn: float = 0.0,
                S_tmin: float = 0.0, S_tmax: float = float("inf"), S_noise: float = 1.0):
  """EDM's Algorithm 2 (Karras et al., NeurIPS 2022) on the probability-flow ODE: registered as
  'euler' (``second_order=False``) and 'heun' (``second_order=True``).

  With y = x / alpha and sigma = sigma_edm = sigma(t) / alpha(t), dy / d sigma = (y - x0) / sigma:

      (churn)  gamma_i = min(S_churn / M, sqrt(2) - 1) if S_tmin <= sigma_i <= S_tmax else 0,
               sigma_hat = (1 + gamma_i) sigma_i,  y_hat = y_i + sqrt(sigma_hat^2 - sigma_i^2) S_noise z,
      d_i = (y_hat - x0(y_hat, sigma_hat)) / sigma_hat,
      Euler:   y_{i+1} = y_hat + (sigma_{i+1} - sigma_hat) d_i,
      Heun:    y' = y_hat + (sigma_{i+1} - sigma_hat) d_i,
               y_{i+1} = y_hat + (sigma_{i+1} - sigma_hat) (d_i + (y' - x0(y', sigma_{i+1})) / sigma_{i+1}) / 2.

  Euler makes one evaluation per step; with S_churn = 0 it is DDIM (eta = 0) = DPM-Solver-1 on the
  EDM schedule. Heun makes two: given ``nfe``, an odd budget makes the last step an Euler step (as
  EDM's final step); with ``denoise`` the extra evaluation is EDM's Euler step to sigma = 0, so
  heun with nfe=35, denoise=True is EDM's 18-step setting; given ``steps``, all steps are Heun
  steps. The times of sigma_hat come from ``sde.t_from_log_snr``.
  """
  name = "heun" if second_order else "euler"
  shape, rho, eps, t_start = _check_common(sde, shape, schedule, rho, eps, t_start)
  if S_churn < 0 or S_noise < 0 or S_tmin < 0 or S_tmax < S_tmin:
    raise ValueError(f"{name}: need S_churn >= 0, S_noise >= 0 and 0 <= S_tmin <= S_tmax; got "
                     f"{S_churn}, {S_noise}, {S_tmin}, {S_tmax}.")
  budget, steps = _budget(name, nfe, steps, denoise, per_step=2 if second_order else 1)
  heun_steps = 0
  if second_order:
    if steps is None:
      steps, heun_steps = (budget + 1) // 2, budget // 2
    else:
      heun_steps = steps
  ts = get_time_steps(sde, steps or budget, schedule, eps, rho, t_start)
  out = _edm_steps(sde, ts, heun_steps, S_churn, S_tmin, S_tmax, S_noise)
  return _make_sampler(sde, shape, _rk_runs(out), "data", denoise, eps, t_start)


euler_sampler = register_sampler("euler")(functools.partial(edm_sampler, second_order=False))
heun_sampler = register_sampler("heun")(functools.partial(edm_sampler, second_order=True))


# ------------------------------------------------------------------------------------------------
# DPM-Solver / DPM-Solver++
# ------------------------------------------------------------------------------------------------
def _singlestep_orders(budget: int, order: int) -> list[int]:
  """DPM-Solver's "fast" order plan (Lu et al. 2022, Sec. 3.4): orders summing to ``budget``."""
  if order == 3:
    K = budget // 3 + 1
    rem = budget % 3
    return [3] * (K - 2) + [2, 1] if rem == 0 else [3] * (K - 1) + [rem]
  if order == 2:
    return [2] * (budget // 2) + [1] * (budget % 2)
  return [1] * budget


def _singlestep_step(sde: SDE, ts: np.ndarray, i: int, order: int, pred: str) -> dict:
  """One DPM-Solver-k (noise) / DPM-Solver++(kS) (data) step from t_i to t_{i+1}."""
  s, t = ts[i], ts[i + 1]
  (a_s, a_t), (s_s, s_t), (l_s, l_t) = kernel_np(sde, np.array([s, t]))
  h = l_t - l_s
  rs = {1: [], 2: [0.5], 3: [1 / 3, 2 / 3]}[order]
  taus = [s] + [float(t_from_lambda_np(sde, l_s + r * h)) for r in rs]
  als, sis, _ = kernel_np(sde, np.array(taus))
  k = order
  a = np.ones(k)
  b = np.zeros((k, k))
  fb = np.zeros(k)
  # Noise prediction: u = (alpha_u / alpha_s) x - sigma_u (e^{r h} - 1) eps_s [+ corrections].
  # Data prediction (DPM-Solver++): the same formulas with alpha <-> sigma, h -> -h, x0 for eps.
  if pred == "noise":
    (lin_s, lin_t, lin_u), (out_t, out_u), hh = (a_s, a_t, als), (s_t, sis), h
  else:
    (lin_s, lin_t, lin_u), (out_t, out_u), hh = (s_s, s_t, sis), (a_t, als), -h
  phi = lambda r: math.expm1(r * hh)
  fa = lin_t / lin_s
  fb[0] = -out_t * phi(1)
  for j, r in enumerate(rs, start=1):
    a[j] = lin_u[j] / lin_s
    b[j, 0] = -out_u[j] * phi(r)
  if k == 2:
    c = out_t / (2 * rs[0]) * phi(1)
    fb[0] += c
    fb[1] = -c
  elif k == 3:
    r1, r2 = rs
    c = out_u[2] * r2 / r1 * (phi(r2) / (r2 * hh) - 1)
    b[2, 0] += c
    b[2, 1] = -c
    d = out_t / r2 * (phi(1) / hh - 1)
    fb[0] += d
    fb[2] = -d
  return _rk_step(taus, als, sis, a, b, fa, fb)


def _multistep_run(sde: SDE, ts: np.ndarray, order: int, pred: str, eta: float,
                   lower_order_final: bool, denoise: bool = False) -> _MSRun:
  """Multistep DPM-Solver (noise) / DPM-Solver++(kM) (data, eta > 0: the SDE variants)."""
  M = len(ts) - 1
  al, si, lam = kernel_np(sde, ts)
  A, C, S = np.zeros(M), np.zeros((M, 3)), np.zeros(M)
  for i in range(M):
    p = _ms_order(order, i, M, lower_order_final, denoise)
    h = lam[i + 1] - lam[i]
    at, st = al[i + 1], si[i + 1]
    e0 = np.array([1.0, 0.0, 0.0])
    if p >= 2:
      r0 = (lam[i] - lam[i - 1]) / h
      D1_0 = np.array([1.0, -1.0, 0.0]) / r0
    if p == 3:
      r1 = (lam[i - 1] - lam[i - 2]) / h
      D1_1 = np.array([0.0, 1.0, -1.0]) / r1
      D1 = D1_0 + r0 / (r0 + r1) * (D1_0 - D1_1)
      D2 = (D1_0 - D1_1) / (r0 + r1)
    if pred == "noise":
      A[i] = at / al[i]
      ph = math.expm1(h)
      C[i] = -st * ph * e0
      if p == 2:
        C[i] += -0.5 * st * ph * D1_0
      elif p == 3:
        C[i] += -st * (ph / h - 1) * D1 - st * ((ph - h) / h**2 - 0.5) * D2
    else:
      he = h * (1 + eta)
      A[i] = at / al[i] * math.exp(-he)
      phi1 = -math.expm1(-he)
      C[i] = at * phi1 * e0
      if p == 2:
        C[i] += 0.5 * at * phi1 * D1_0
      elif p == 3:
        phi2 = 1 - phi1 / he
        phi3 = phi2 / he - 0.5
        C[i] += at * (phi2 * D1 - phi3 * D2)
      S[i] = st * math.sqrt(-math.expm1(-2 * h * eta)) if eta > 0 else 0.0
  return _MSRun(t=ts[:-1], alpha=al[:-1], sigma=si[:-1], A=A, C=C, S=S, P=np.ones(M),
                Q=np.zeros(M), Cc=np.zeros((M, 4)))


def _ms_order(order: int, i: int, M: int, lower_order_final: bool, denoise: bool = False) -> int:
  """Warm-up (order <= i + 1) and, for M < 15 steps, lower orders on the last steps.

  The last step is first order and the one before it at most second order. With ``denoise`` the
  final denoising evaluation (x0 at eps, itself a first-order step towards sigma = 0) is that last
  step, so the solver's last step keeps order 2, as in DPM-Solver++'s step to sigma = 0.
  """
  p = min(order, i + 1)
  if lower_order_final and M < 15:
    p = min(p, M - i + int(denoise))
  return p


def _dpm(name: str, sde, shape, pred, nfe, steps, order, method, schedule, rho, eps, t_start,
         denoise, eta, lower_order_final):
  shape, rho, eps, t_start = _check_common(sde, shape, schedule, rho, eps, t_start)
  if method not in ("singlestep", "multistep"):
    raise ValueError(f"{name}: method must be 'singlestep' or 'multistep', got {method!r}.")
  if order not in (1, 2, 3):
    raise ValueError(f"{name}: order must be 1, 2 or 3, got {order}.")
  if not eta >= 0:
    raise ValueError(f"{name}: eta must be >= 0, got {eta}.")
  if eta > 0 and method != "multistep":
    raise ValueError(f"{name}: the SDE variants (eta > 0) are multistep only: set "
                     f"method='multistep' or eta=0.")
  budget, steps = _budget(name, nfe, steps, denoise)
  if method == "multistep":
    M = steps or budget
    _order_check(name, order, M, "steps")
    ts = get_time_steps(sde, M, schedule, eps, rho, t_start)
    runs = [_multistep_run(sde, ts, order, pred, eta, lower_order_final, denoise)]
  else:
    if steps is not None:
      orders = [order] * steps
    else:
      _order_check(name, order, budget, "evaluations")
      orders = _singlestep_orders(budget, order)
    ts = get_time_steps(sde, len(orders), schedule, eps, rho, t_start)
    runs = _rk_runs([_singlestep_step(sde, ts, i, k, pred) for i, k in enumerate(orders)])
  return _make_sampler(sde, shape, runs, pred, denoise, eps, t_start)


@register_sampler("dpm_solver")
def dpm_solver_sampler(sde: SDE, shape: Sequence[int], *, nfe: Optional[int] = None,
                       steps: Optional[int] = None, order: int = 3, method: str = "singlestep",
                       schedule: str = "logSNR", rho: Optional[float] = None,
                       eps: Optional[float] = None, t_start: Optional[float] = None,
                       denoise: bool = False,
                       lower_order_final: bool = True):
  """DPM-Solver (Lu et al., NeurIPS 2022): exponential integrators on the noise prediction.

  The PF-ODE solution from s to t, h = lambda_t - lambda_s, is
  x_t = (alpha_t / alpha_s) x_s - alpha_t int_{lambda_s}^{lambda_t} e^{-lambda} eps(lambda) dlambda.
  Singlestep DPM-Solver-k (r1 = 1/2 for k = 2; r1 = 1/3, r2 = 2/3 for k = 3; s_j at lambda_s + r_j h):

      k=1: x_t = (alpha_t / alpha_s) x_s - sigma_t (e^h - 1) eps_s                    (= DDIM)
      k=2: u = (alpha_{s1}/alpha_s) x_s - sigma_{s1} (e^{r1 h} - 1) eps_s,
           x_t = (alpha_t / alpha_s) x_s - sigma_t (e^h - 1) eps_s
                 - sigma_t / (2 r1) (e^h - 1) (eps(u, s1) - eps_s)
      k=3: u1 as u; D1 = eps(u1, s1) - eps_s;
           u2 = (alpha_{s2}/alpha_s) x_s - sigma_{s2} (e^{r2 h} - 1) eps_s
                - sigma_{s2} r2 / r1 ((e^{r2 h} - 1) / (r2 h) - 1) D1;  D2 = eps(u2, s2) - eps_s;
           x_t = (alpha_t / alpha_s) x_s - sigma_t (e^h - 1) eps_s - sigma_t / r2 ((e^h - 1) / h - 1) D2.

  Given ``nfe``, singlestep uses the paper's "fast" plan (orders 3, ..., 3 then 2 / 1 so the
  evaluations add up to nfe). ``method='multistep'`` (one evaluation per step, warm-up with lower
  orders): order 2 x_t = (alpha_t/alpha_s) x_s - sigma_t (e^h - 1) (eps_0 + D1_0 / 2) with
  D1_0 = (eps_0 - eps_{-1}) / r0, r0 = h_{-1} / h; order 3 the Taylor form of DPM-Solver++(3M)
  with eps in place of x0. ``lower_order_final``: with under 15 steps, drop the order on the last
  steps (Lu et al. 2022b); with ``denoise`` the denoising step counts as the last, first-order one.
  """
  return _dpm("dpm_solver", sde, shape, "noise", nfe, steps, order, method, schedule, rho, eps,
              t_start, denoise, 0.0, lower_order_final)


@register_sampler("dpm_solver_pp")
def dpm_solver_pp_sampler(sde: SDE, shape: Sequence[int], *, nfe: Optional[int] = None,
                          steps: Optional[int] = None, order: int = 2, method: str = "multistep",
                          schedule: str = "logSNR", rho: Optional[float] = None,
                          eps: Optional[float] = None, t_start: Optional[float] = None,
                          denoise: bool = False, eta: float = 0.0,
                          lower_order_final: bool = True):
  """DPM-Solver++ (Lu et al. 2022b, arXiv:2211.01095): exponential integrators on the data prediction.

  x_t = (sigma_t / sigma_s) x_s + sigma_t int_{lambda_s}^{lambda_t} e^{lambda} x0(lambda) dlambda.
  Multistep (default; ``eta`` > 0 gives the SDE variants, eta = 1 is DPM-Solver++(kM)-SDE), with
  h_eta = (1 + eta) h, phi1 = 1 - e^{-h_eta}, phi2 = 1 - phi1 / h_eta, phi3 = phi2 / h_eta - 1/2:

      1:  x_t = (alpha_t / alpha_s) e^{-h_eta} x_s + alpha_t phi1 D0 + sigma_t sqrt(1 - e^{-2 eta h}) z
      2M: ... + alpha_t phi1 D1_0 / 2,  D1_0 = (D0 - D_{-1}) / r0,  r0 = h_{-1} / h
      3M: ... + alpha_t (phi2 D1 - phi3 D2),  D1 = D1_0 + r0 / (r0 + r1) (D1_0 - D1_1),
          D2 = (D1_0 - D1_1) / (r0 + r1),  D1_1 = (D_{-1} - D_{-2}) / r1

  (with eta = 0, (alpha_t / alpha_s) e^{-h} = sigma_t / sigma_s). Singlestep DPM-Solver++(2S/3S):
  the formulas of :func:`dpm_solver_sampler` with x0 in place of eps, sigma <-> alpha and h -> -h:
  x_t = (sigma_t / sigma_s) x_s - alpha_t (e^{-h} - 1) x0_s + (alpha_t / r2) ((e^{-h} - 1) / h + 1) D2
  for k = 3, u2 = (sigma_{s2}/sigma_s) x_s - alpha_{s2} (e^{-r2 h} - 1) x0_s
  + alpha_{s2} r2 / r1 ((e^{-r2 h} - 1) / (r2 h) + 1) D1.
  """
  return _dpm("dpm_solver_pp", sde, shape, "data", nfe, steps, order, method, schedule, rho, eps,
              t_start, denoise, float(eta), lower_order_final)


# ------------------------------------------------------------------------------------------------
# UniPC
# ------------------------------------------------------------------------------------------------
def _unipc_rhos(h: float, rks: np.ndarray, variant: str, corrector: bool) -> np.ndarray:
  """UniPC's rho coefficients (Zhao et al. 2023, Alg. 2 / 3) for data prediction.

  R_{ij} = rk_j^(i-1), b_i = h phi_{i+1}(h) i! / B(h) with hh = -h, phi_1 = e^{hh} - 1 and
  phi_{k+1} = phi_k / hh - 1 / k!; B(h) = hh (bh1) or e^{hh} - 1 (bh2). rks ends with 1.
  """
  p = len(rks)
  hh = -h
  h_phi_1 = math.expm1(hh)
  h_phi_k = h_phi_1 / hh - 1
  B = hh if variant == "bh1" else math.expm1(hh)
  R, b, fact = [], [], 1
  for i in range(1, p + 1):
    R.append(rks ** (i - 1))
    b.append(h_phi_k * fact / B)
    fact *= i + 1
    h_phi_k = h_phi_k / hh - 1 / fact
  R, b = np.stack(R), np.array(b)
  if corrector:
    return np.array([0.5]) if p == 1 else np.linalg.solve(R, b)
  if p == 1:
    return np.zeros(0)
  return np.array([0.5]) if p == 2 else np.linalg.solve(R[:-1, :-1], b[:-1])


@register_sampler("unipc")
def unipc_sampler(sde: SDE, shape: Sequence[int], *, nfe: Optional[int] = None,
                  steps: Optional[int] = None, order: int = 3, variant: str = "bh2",
                  corrector: bool = True, schedule: str = "logSNR", rho: Optional[float] = None,
                  eps: Optional[float] = None, t_start: Optional[float] = None,
                  denoise: bool = False,
                  lower_order_final: bool = True):
  """UniPC (Zhao et al., NeurIPS 2023): multistep UniP-p predictor + UniC corrector on x0.

  Step s = t_i -> t = t_{i+1}, h = lambda_t - lambda_s, history x0 at t_{i-k} (k = 1..p-1) with
  r_k = (lambda_{i-k} - lambda_i) / h and D_k = (x0_{i-k} - x0_i) / r_k:

      UniP:  x_t = (sigma_t / sigma_s) x_s + alpha_t (1 - e^{-h}) x0_s - alpha_t B(h) sum_k a_k D_k
      UniC:  x_t^c = (sigma_t / sigma_s) x_s^c + alpha_t (1 - e^{-h}) x0_s
                     - alpha_t B(h) (sum_k c_k D_k + c_p (x0(x_t, t) - x0_s))

  with B(h) = -h ('bh1') or e^{-h} - 1 ('bh2') and a, c solving R a = b (see :func:`_unipc_rhos`;
  a = 1/2 for p = 2, c = 1/2 for p = 1). The corrector reuses the evaluation at x_t that the next
  predictor needs, so it costs no NFE (and is skipped after the last step): nfe = steps.
  Warm-up with lower orders; ``lower_order_final`` as in DPM-Solver++.
  """
  shape, rho, eps, t_start = _check_common(sde, shape, schedule, rho, eps, t_start)
  if variant not in ("bh1", "bh2"):
    raise ValueError(f"unipc: variant must be 'bh1' or 'bh2', got {variant!r}.")
  budget, steps = _budget("unipc", nfe, steps, denoise)
  M = steps or budget
  _order_check("unipc", order, M, "steps")
  ts = get_time_steps(sde, M, schedule, eps, rho, t_start)
  al, si, lam = kernel_np(sde, ts)
  A, C, S = np.zeros(M), np.zeros((M, 3)), np.zeros(M)
  P, Q, Cc = np.ones(M), np.zeros(M), np.zeros((M, 4))
  for i in range(M):
    p = _ms_order(order, i, M, lower_order_final, denoise)
    h = lam[i + 1] - lam[i]
    at = al[i + 1]
    rks = np.array([(lam[i - k] - lam[i]) / h for k in range(1, p)] + [1.0])
    B = -h if variant == "bh1" else math.expm1(-h)
    base = -at * math.expm1(-h)
    A[i] = si[i + 1] / si[i]
    rp = _unipc_rhos(h, rks, variant, corrector=False)
    C[i, 0] = base
    for k in range(1, p):
      C[i, 0] += at * B * rp[k - 1] / rks[k - 1]
      C[i, k] = -at * B * rp[k - 1] / rks[k - 1]
    if corrector and i + 1 < M:  # corrects x_{i+1} inside step i + 1, where x0_{i+1} is known
      rc = _unipc_rhos(h, rks, variant, corrector=True)
      P[i + 1], Q[i + 1] = 0.0, A[i]
      Cc[i + 1, 0] = -at * B * rc[-1]
      Cc[i + 1, 1] = base + at * B * (rc[-1] + sum(rc[k - 1] / rks[k - 1] for k in range(1, p)))
      for k in range(1, p):
        Cc[i + 1, k + 1] = -at * B * rc[k - 1] / rks[k - 1]
  run = _MSRun(t=ts[:-1], alpha=al[:-1], sigma=si[:-1], A=A, C=C, S=S, P=P, Q=Q, Cc=Cc)
  return _make_sampler(sde, shape, [run], "data", denoise, eps, t_start)
