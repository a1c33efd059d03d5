"""Consistency models on the framework's SDEs: distillation (CD) and training (iCT).

Consistency models (Song, Dhariwal, Chen & Sutskever, ICML 2023) learn f(x_t, t) that maps every
point of a probability-flow ODE trajectory to its start, so one network evaluation samples;
improved consistency training (iCT: Song & Dhariwal, ICLR 2024) trains them without a teacher.
Everything here is written in the SDE's own time t and state x_t = alpha(t) x_0 + sigma(t) n, read
on EDM's variables y = x_t / alpha and sigma_e = sigma / alpha (the noise level):

* Parametrization ('consistency', :class:`score_sde.parametrizations.ConsistencyOutput`):
  f(x_t, t) = c_skip y + c_out F(c_in y, sigma_e) with c_skip = s_d^2 / (d^2 + s_d^2),
  c_out = s_d d / sqrt(s_d^2 + sigma_e^2), d = sigma_e - sigma_e(eps): f(x, eps) = y exactly
  (the boundary condition; eps = ``sde.sampling_eps``).
* Discretization (:func:`karras_times`): N times eps = t_0 < t_1 < ... < t_{N-1} = T with EDM's rho
  schedule on sigma_e (CM eq. / iCT): sigma_i = (s_min^(1/rho) + i / (N - 1) (s_max^(1/rho) -
  s_min^(1/rho)))^rho, s_min = sigma_e(eps), s_max = sigma_e(T), t_i = ``sde.t_from_log_snr``
  (-2 ln sigma_i).
* Consistency distillation (CD, CM Algorithm 2): n ~ U{0, ..., N - 2},
  x_{t_{n+1}} = alpha x_0 + sigma z, x^_{t_n} = one step of the teacher's probability-flow ODE
  from t_{n+1} to t_n (:func:`teacher_step`: Euler = DDIM, or Heun, in (y, sigma_e) as EDM),
      L = lambda_n d(f_theta(x_{t_{n+1}}, t_{n+1}), f_theta-(x^_{t_n}, t_n)),
  theta- = stopgrad(mu theta- + (1 - mu) theta) (the target EMA, ``consistency.target_ema``;
  mu = 0: theta- = stopgrad(theta)). The teacher is any ``score_fn(x, t)`` (a trained model of this
  framework, or an exact analytic score).
* Consistency training (iCT): the same loss with x^_{t_n} = alpha(t_n) x_0 + sigma(t_n) z (the same
  z: the one-sample score estimate), no EMA target (theta- = stopgrad(theta)), the discretization
  curriculum N(k) = min(s_0 2^floor(k / K'), s_1) + 1, K' = floor(K / (log2(s_1 / s_0) + 1))
  (k the step, K = ``training.n_iters``, s_0 = 10, s_1 = 1280), lognormal index sampling
  p(n) ~ erf((ln sigma_{n+1} - P_mean) / (sqrt 2 P_std)) - erf((ln sigma_n - P_mean) / (sqrt 2
  P_std)) (P_mean = -1.1, P_std = 2.0: ``training.t_mean`` / ``t_std``), weights
  lambda_n = 1 / (sigma_{n+1} - sigma_n) and the pseudo-Huber metric
  d(a, b) = sqrt(||a - b||^2 + c^2) - c, c = 0.00054 sqrt(D) (D = data dimensions).

Student and target share the dropout key (iCT). The loss function has the signature of
:mod:`score_sde.losses` plus the train state's step and target params:
``loss_fn(key, params, batch, state_info=None) -> (loss, aux)`` with ``state_info = {'step',
'target_params'}`` (``loss_fn.uses_train_state`` is True; the train step passes them).

Shapes: ``x``, ``x0`` ``[batch, *data_shape]``; times, indices, sigmas ``[batch]``.
"""
from __future__ import annotations

import importlib.util
import math
import os
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from score_sde import sde_lib
from score_sde.models.utils import get_model_fn, get_network_fn
from score_sde.parametrizations import ConsistencyOutput
from score_sde.sde_lib import batch_mul
from score_sde.utils import data_shape, parametrization_of

Array = jax.Array
ScoreFn = Callable[[Array, Array], Array]

__all__ = ["CONSISTENCY_LOSSES", "SOLVERS", "METRICS", "WEIGHTINGS", "karras_sigmas",
           "karras_times", "sde_sigma_range", "teacher_step", "ict_num_scales", "ict_index_logits", "pseudo_huber",
           "get_consistency_loss_fn", "load_teacher_config", "teacher_config_errors",
           "is_consistency_loss", "settings_of", "target_ema_of"]

CONSISTENCY_LOSSES = ("consistency_distillation", "consistency_training")
SOLVERS = ("euler", "heun")
METRICS = ("l2", "pseudo_huber")
WEIGHTINGS = ("uniform", "ict")
# iCT's lognormal index distribution on sigma_e (Song & Dhariwal 2024, Sec. 3.5)
ICT_P_MEAN, ICT_P_STD = -1.1, 2.0
# iCT's pseudo-Huber constant per sqrt(data dimension) (Sec. 3.3)
HUBER_C_PER_SQRT_DIM = 0.00054


def is_consistency_loss(config) -> bool:
  return str(config.training.get("loss", None) or "dsm") in CONSISTENCY_LOSSES


def target_ema_of(config) -> float:
  """mu of the CD target network theta- (0: none, theta- = stopgrad(theta); always 0 for iCT)."""
  if str(config.training.get("loss", None)) != "consistency_distillation":
    return 0.0
  return settings_of(config)["target_ema"]


def settings_of(config) -> dict:
  """The consistency settings of ``config`` with their defaults (``config.consistency.*``; CD:
  Heun teacher, N = 18, mu = 0.95, l2, uniform; iCT: pseudo-Huber, iCT weights, s_0 = 10,
  s_1 = 1280)."""
  cc = config.get("consistency", None) or {}
  get = lambda k, d: d if cc.get(k, None) is None else cc.get(k)
  ct = str(config.training.get("loss", None)) == "consistency_training"
  return dict(teacher=get("teacher", None), teacher_workdir=get("teacher_workdir", None),
              solver=str(get("solver", "heun")), num_scales=int(get("num_scales", 18)),
              target_ema=float(get("target_ema", 0.0 if ct else 0.95)),
              metric=str(get("metric", "pseudo_huber" if ct else "l2")),
              huber_c=get("huber_c", None),
              weighting=str(get("weighting", "ict" if ct else "uniform")),
              s0=int(get("s0", 10)), s1=int(get("s1", 1280)), rho=float(get("rho", 7.0)))


# --- discretization --------------------------------------------------------------------------
def _sigma_e(sde: sde_lib.SDE, t: Array) -> Array:
  alpha, sigma = sde.marginal_coef(t)
  return sigma / alpha


def karras_sigmas(s_min: float, s_max: float, i: Array, num_scales: Array, rho: float) -> Array:
  """sigma_i = (s_min^(1/rho) + i / (N - 1) (s_max^(1/rho) - s_min^(1/rho)))^rho, increasing in i
  (``i`` and ``num_scales`` may be traced)."""
  lo, hi = s_min ** (1.0 / rho), s_max ** (1.0 / rho)
  frac = jnp.asarray(i, jnp.float32) / (jnp.asarray(num_scales, jnp.float32) - 1.0)
  return (lo + frac * (hi - lo)) ** rho


def sde_sigma_range(sde: sde_lib.SDE, eps: Optional[float] = None) -> tuple[float, float]:
  """``(sigma_e(eps), sigma_e(T))`` in float64 on the host (eps: ``sde.sampling_eps``)."""
  eps = float(sde.sampling_eps if eps is None else eps)
  return (float(np.exp(-0.5 * _log_snr64(sde, eps))),
          float(np.exp(-0.5 * _log_snr64(sde, float(sde.T)))))


def karras_times(sde: sde_lib.SDE, i: Array, num_scales: Array, eps: float, s_min: float,
                 s_max: float, rho: float = 7.0) -> tuple[Array, Array]:
  """``(t_i, sigma_i)``: the i-th of N times of the consistency discretization (module docstring),
  t_0 = eps and t_{N-1} = T exactly. ``i`` int ``[batch]``, ``num_scales`` N an int (traced ok),
  ``(s_min, s_max)`` = :func:`sde_sigma_range`."""
  sig = karras_sigmas(s_min, s_max, i, num_scales, rho)
  t = sde.t_from_log_snr(-2.0 * jnp.log(sig))
  t = jnp.where(i <= 0, jnp.float32(eps), jnp.where(i >= num_scales - 1, jnp.float32(sde.T), t))
  return jnp.clip(t, eps, sde.T), sig


def _log_snr64(sde: sde_lib.SDE, t: float) -> float:
  """log SNR(t) in float64 on the host (also when called while tracing)."""
  with jax.ensure_compile_time_eval(), jax.enable_x64(True):
    return float(sde.log_snr(jnp.asarray([t], jnp.float64))[0])


def ict_num_scales(step: Array, total_steps: int, s0: int = 10, s1: int = 1280) -> Array:
  """iCT's curriculum N(k) = min(s0 2^floor(k / K'), s1) + 1, K' = floor(K / (log2(s1/s0) + 1))."""
  k_prime = max(int(math.floor(total_steps / (math.log2(s1 / s0) + 1))), 1)
  doublings = jnp.asarray(step, jnp.int32) // k_prime
  n = jnp.minimum(s0 * jnp.exp2(jnp.minimum(doublings, 30).astype(jnp.float32)), float(s1))
  return n.astype(jnp.int32) + 1


def ict_index_logits(sigmas: Array, num_scales: Array, p_mean: float, p_std: float) -> Array:
  """log p(n) for n = 0 .. len(sigmas) - 2 (``-inf`` for n >= N - 1): iCT's lognormal index
  distribution, p(n) ~ erf((ln sigma_{n+1} - P_mean) / (sqrt 2 P_std)) - erf((ln sigma_n -
  P_mean) / (sqrt 2 P_std)). ``sigmas [M]`` the grid of N <= M points (padded)."""
  z = (jnp.log(sigmas) - p_mean) / (math.sqrt(2.0) * p_std)
  mass = jax.scipy.special.erf(z[1:]) - jax.scipy.special.erf(z[:-1])
  valid = jnp.arange(mass.shape[0]) < num_scales - 1
  return jnp.where(valid, jnp.log(jnp.maximum(mass, 1e-30)), -jnp.inf)


# --- the teacher's ODE step --------------------------------------------------------------------
def teacher_step(sde: sde_lib.SDE, score_fn: ScoreFn, x: Array, t: Array, t_next: Array,
                 solver: str = "heun") -> Array:
  """One probability-flow ODE step of the teacher from ``t`` to ``t_next`` (per example).

  In EDM's variables (as the 'euler' / 'heun' samplers of :mod:`score_sde.sampling.fast`):
  dy / d sigma_e = (y - x0(x, t)) / sigma_e, x0 = (x + sigma^2 score(x, t)) / alpha;
  Euler (= DDIM): y' = y + (s' - s) d, d = (y - x0) / s; Heun: y' = y + (s' - s)(d + d') / 2 with
  d' = (y'_Euler - x0(alpha' y'_Euler, t')) / s'. Returns x_{t_next} = alpha(t_next) y'.
  """
  if solver not in SOLVERS:
    raise ValueError(f"Unknown config.consistency.solver {solver!r}; choose one of {SOLVERS}.")
  a, s = sde.marginal_coef(t)
  a2, s2 = sde.marginal_coef(t_next)
  se, se2 = s / a, s2 / a2

  def x0(x, t, a, s):
    return batch_mul(1.0 / a, x + batch_mul(s**2, score_fn(x, t)))

  y = batch_mul(1.0 / a, x)
  d = batch_mul(1.0 / se, y - x0(x, t, a, s))
  y_next = y + batch_mul(se2 - se, d)
  if solver == "heun":
    d2 = batch_mul(1.0 / se2, y_next - x0(batch_mul(a2, y_next), t_next, a2, s2))
    y_next = y + batch_mul(0.5 * (se2 - se), d + d2)
  return batch_mul(a2, y_next)


# --- metric ------------------------------------------------------------------------------------
def pseudo_huber(a: Array, b: Array, c: float) -> Array:
  """sqrt(||a - b||^2 + c^2) - c per example ``[batch]`` (iCT's metric)."""
  sq = jnp.sum(jnp.square(a - b).reshape(a.shape[0], -1), axis=-1)
  return jnp.sqrt(sq + c**2) - c


# --- teacher configs ---------------------------------------------------------------------------
def load_teacher_config(path: str):
  """``get_config()`` of the config file ``path`` (``config.consistency.teacher``)."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  if not os.path.isfile(path) and os.path.isfile(os.path.join(root, path)):
    path = os.path.join(root, path)   # a path relative to the repository
  if not os.path.isfile(path):
    raise ValueError(f"config.consistency.teacher={path!r} is neither 'exact' nor a config file; "
                     "give the teacher's config file (e.g. configs/mnist/vp_continuous.py).")
  spec = importlib.util.spec_from_file_location("_consistency_teacher_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def teacher_config_errors(config, teacher_config) -> list[str]:
  """Why the teacher of ``teacher_config`` cannot be distilled into ``config``: another data shape
  or another forward process (each message names the fields)."""
  errors = []
  name = config.consistency.teacher
  ours, theirs = data_shape(config), data_shape(teacher_config)
  if ours != theirs:
    errors.append(f"config.consistency.teacher={name!r} has data shape {theirs} but this config's "
                  f"(config.data) is {ours}: distil from a teacher of the same data shape, or set "
                  "config.data to the teacher's.")
  ours, theirs = sde_lib.get_sde(config), sde_lib.get_sde(teacher_config)
  if repr(ours) != repr(theirs):
    errors.append(f"config.consistency.teacher={name!r} was trained on {theirs!r} but this config "
                  f"(config.training.sde, config.model.*) builds {ours!r}: distil on the teacher's "
                  "forward process.")
  return errors


# --- the loss ----------------------------------------------------------------------------------
def get_consistency_loss_fn(config, sde: sde_lib.SDE, model, train: bool,
                            teacher_score_fn: Optional[ScoreFn] = None):
  """``loss_fn(key, params, batch, state_info=None) -> (loss, aux)`` of ``config.training.loss``
  ('consistency_distillation' with ``teacher_score_fn``, or 'consistency_training'); module
  docstring. ``aux = {'losses' [batch], 't' [batch] (the student's times), 'noise',
  'metrics': {'num_scales'}}``."""
  loss = str(config.training.loss)
  if loss not in CONSISTENCY_LOSSES:
    raise ValueError(f"config.training.loss={loss!r} is not a consistency loss "
                     f"{CONSISTENCY_LOSSES}.")
  st = settings_of(config)
  distil = loss == "consistency_distillation"
  if distil and teacher_score_fn is None:
    raise ValueError("Consistency distillation needs a teacher: set config.consistency.teacher "
                     "('exact' for the toy mixture, or the teacher's config file with "
                     "config.consistency.teacher_workdir).")
  p = parametrization_of(config)
  if not isinstance(p, ConsistencyOutput):
    raise ValueError(f"config.training.loss={loss!r} trains a consistency model: set "
                     "config.model.parametrization='consistency'.")
  for field, value, choices in (("solver", st["solver"], SOLVERS),
                                ("metric", st["metric"], METRICS),
                                ("weighting", st["weighting"], WEIGHTINGS)):
    if value not in choices:
      raise ValueError(f"Unknown config.consistency.{field} {value!r}; choose one of {choices}.")
  expected = data_shape(config)
  dim = int(np.prod(expected))
  eps = float(sde.sampling_eps)
  rho = st["rho"]
  huber_c = (HUBER_C_PER_SQRT_DIM * math.sqrt(dim) if st["huber_c"] is None
             else float(st["huber_c"]))
  reduce_mean = bool(config.training.reduce_mean)
  total = int(config.training.n_iters)
  tc = config.training
  p_mean = ICT_P_MEAN if tc.get("t_mean", None) is None else float(tc.t_mean)
  p_std = ICT_P_STD if tc.get("t_std", None) is None else float(tc.t_std)
  s_min, s_max = sde_sigma_range(sde, eps)
  max_scales = st["num_scales"] if distil else st["s1"] + 1

  def distance(a, b):
    if st["metric"] == "pseudo_huber":
      return pseudo_huber(a, b, huber_c)
    sq = jnp.square(a - b).reshape(a.shape[0], -1)
    return jnp.mean(sq, axis=-1) if reduce_mean else 0.5 * jnp.sum(sq, axis=-1)

  def consistency_fn(params, dropout_key):
    network = get_network_fn(sde, get_model_fn(model, params, train=train, rng=dropout_key),
                             True, p)

    def f(x, t):
      out, alpha, sigma, _ = network(x, t)
      return p.denoise(out, x, alpha, sigma)
    return f

  def loss_fn(key: Array, params: Any, batch: Any, state_info: Optional[dict] = None):
    if isinstance(batch, dict):
      batch = batch["image"]
    if tuple(batch.shape[1:]) != expected:
      raise ValueError(f"Batch of shape {tuple(batch.shape)} does not match the config's data "
                       f"shape {expected}.")
    state_info = state_info or {}
    n_key, z_key, dropout_key = jax.random.split(key, 3)
    b = batch.shape[0]
    if distil:
      num_scales = jnp.asarray(st["num_scales"], jnp.int32)
      n = jax.random.randint(n_key, (b,), 0, st["num_scales"] - 1)
    else:
      step = state_info.get("step", jnp.asarray(total, jnp.int32))
      num_scales = ict_num_scales(step, total, st["s0"], st["s1"])
      grid = karras_sigmas(s_min, s_max, jnp.arange(max_scales), num_scales, rho)
      logits = ict_index_logits(grid, num_scales, p_mean, p_std)
      n = jax.random.categorical(n_key, logits, shape=(b,))
    t_lo, sig_lo = karras_times(sde, n, num_scales, eps, s_min, s_max, rho)
    t_hi, sig_hi = karras_times(sde, n + 1, num_scales, eps, s_min, s_max, rho)
    z = jax.random.normal(z_key, batch.shape, batch.dtype)
    a_hi, s_hi = sde.marginal_coef(t_hi)
    x_hi = batch_mul(a_hi, batch) + batch_mul(s_hi, z)
    if distil:
      x_lo = jax.lax.stop_gradient(teacher_step(sde, teacher_score_fn, x_hi, t_hi, t_lo,
                                                st["solver"]))
    else:
      a_lo, s_lo = sde.marginal_coef(t_lo)
      x_lo = batch_mul(a_lo, batch) + batch_mul(s_lo, z)
    target_params = state_info.get("target_params", None)
    target_params = params if target_params is None else target_params
    target = jax.lax.stop_gradient(
        consistency_fn(jax.lax.stop_gradient(target_params), dropout_key)(x_lo, t_lo))
    student = consistency_fn(params, dropout_key)(x_hi, t_hi)
    weight = (1.0 / (sig_hi - sig_lo)) if st["weighting"] == "ict" else jnp.ones_like(sig_hi)
    losses = distance(student, target) * weight
    return jnp.mean(losses), {"losses": losses, "t": t_hi, "noise": z,
                              "metrics": {"num_scales": num_scales.astype(jnp.float32)}}

  loss_fn.uses_train_state = True
  return loss_fn
