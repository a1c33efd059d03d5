"""Predictor-corrector (PC) samplers (Song et al., ICLR 2021, Algorithms 2-4).

Sampling walks the time grid ``t_0 = T > t_1 > ... > t_{N-1} = eps`` (``linspace(T, eps, N)``,
N = ``num_steps``, by default ``sde.N``). At every t_i a *corrector* (n_steps score-based MCMC steps targeting p_{t_i}) runs
first and then a *predictor* (one step of a reverse-time SDE solver) moves x to the next time.

Predictors, each ``predictor(key, x, t, *, sde, score_fn, probability_flow) -> (x, x_mean)``:

  * ``euler_maruyama``: x_mean = x - f_rev(x, t) / N,  x = x_mean + g_rev(t) sqrt(1/N) z, where
    (f_rev, g_rev) = ``sde.reverse(score_fn, probability_flow).sde``  (dt = -T/N).
  * ``reverse_diffusion``: x_mean = x - F_rev,  x = x_mean + G_rev z with
    (F_rev, G_rev) = ``sde.reverse(score_fn, probability_flow).discretize`` (paper eq. 46).
  * ``ancestral_sampling``: for the forward chain x_i = a_i x_{i-1} + b_i z of ``sde.discretize``
    (DDPM: a_i = sqrt(1 - beta_i), b_i^2 = beta_i; SMLD: a_i = 1, b_i^2 = sigma_i^2 - sigma_{i-1}^2)
      x_mean = (x + b_i^2 score(x, t)) / a_i          (= E[x_{i-1} | x_i], exact by Tweedie)
      x      = x_mean + s_i z,  s_i^2 = b_i^2 (sigma(t)^2 - b_i^2) / (a_i^2 sigma(t)^2),
    the variance of q(x_{i-1} | x_i, x_0) with sigma(t) the marginal std of ``sde``. For SMLD this
    is the paper's eq. 47 (sigma_{i-1}^2 (sigma_i^2 - sigma_{i-1}^2) / sigma_i^2); for DDPM it is
    Ho et al.'s sigma^2 = beta_tilde choice (the paper's DDPM rule uses sigma^2 = beta).
  * ``none``: x_mean = x.

Correctors, each ``corrector(key, x, t, *, sde, score_fn, snr) -> (x, x_mean)`` (one MCMC step;
the sampler repeats it ``n_steps`` times):

  * ``langevin``: e = 2 a_i^2 (snr ||z|| / ||score||)^2 with norms averaged over the batch (as in
    the reference), x_mean = x + e score, x = x_mean + sqrt(2 e) z. a_i^2 is the per-step mean
    coefficient of ``sde.discretize`` squared (the DDPM alpha_i; 1 for SMLD).
  * ``ald`` (annealed Langevin dynamics, Song & Ermon 2019): e = 2 a_i^2 (snr sigma(t))^2.
  * ``none``: x_mean = x.

A new predictor or corrector is one function decorated with :func:`register_predictor` /
:func:`register_corrector`. It must call ``score_fn`` outside of any ``lax`` control flow: the
sampler counts score evaluations by tracing one call (the NFE it reports is that count, not a
guess).

Shapes: ``x [batch, *data_shape]``, ``t [batch]``.
"""
from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from score_sde.sampling import register_sampler
from score_sde.sampling.base import (Sampler, check_eps, check_score_fn_shape, check_shape,
                                     check_x_T, count_score_evals, jit_with_score_fn)
from score_sde.sde_lib import SDE, batch_mul

Array = jax.Array
Update = Callable[..., tuple[Array, Array]]

__all__ = ["register_predictor", "register_corrector", "get_predictor", "get_corrector",
           "available_predictors", "available_correctors", "get_pc_sampler"]

_PREDICTORS: dict[str, Update] = {}
_CORRECTORS: dict[str, Update] = {}


def _registrar(table: dict[str, Update], kind: str):
  def register(name: str):
    def _register(fn: Update) -> Update:
      if name in table and table[name] is not fn:
        raise ValueError(f"A {kind} named {name!r} is already registered.")
      table[name] = fn
      return fn
    return _register
  return register


register_predictor = _registrar(_PREDICTORS, "predictor")
register_predictor.__doc__ = (
    "Decorator: registers ``fn(key, x, t, *, sde, score_fn, probability_flow)``.")
register_corrector = _registrar(_CORRECTORS, "corrector")
register_corrector.__doc__ = "Decorator: registers ``fn(key, x, t, *, sde, score_fn, snr)``."


def available_predictors() -> list[str]:
  return sorted(_PREDICTORS)


def available_correctors() -> list[str]:
  return sorted(_CORRECTORS)


def get_predictor(name: str) -> Update:
  if name not in _PREDICTORS:
    raise ValueError(f"Unknown predictor {name!r}; choose one of {available_predictors()}.")
  return _PREDICTORS[name]


def get_corrector(name: str) -> Update:
  if name not in _CORRECTORS:
    raise ValueError(f"Unknown corrector {name!r}; choose one of {available_correctors()}.")
  return _CORRECTORS[name]


def _chain_coef(sde: SDE, x: Array, t: Array) -> tuple[Array, Array]:
  """(a_i [batch], b_i [batch]) of the forward step x_i = a_i x_{i-1} + b_i z at time t.

  Every SDE here is linear, so ``sde.discretize`` returns f_i = (a_i - 1) x; evaluating it on ones
  reads a_i off without any per-SDE code.
  """
  ones = jnp.ones((x.shape[0], 1), x.dtype)
  f, b = sde.discretize(ones, t)
  return 1.0 + f[:, 0], b


# --- predictors -----------------------------------------------------------------------------
@register_predictor("euler_maruyama")
def euler_maruyama(key, x, t, *, sde, score_fn, probability_flow=False):
  """x_mean = x + f_rev dt, x = x_mean + g_rev sqrt(-dt) z with dt = -T/N."""
  dt = -sde.T / sde.N
  drift, diffusion = sde.reverse(score_fn, probability_flow).sde(x, t)
  x_mean = x + drift * dt
  z = jax.random.normal(key, x.shape, x.dtype)
  return x_mean + batch_mul(diffusion * jnp.sqrt(-dt), z), x_mean


@register_predictor("reverse_diffusion")
def reverse_diffusion(key, x, t, *, sde, score_fn, probability_flow=False):
  """x_mean = x - F_rev, x = x_mean + G_rev z from the reversed discretization."""
  f, G = sde.reverse(score_fn, probability_flow).discretize(x, t)
  x_mean = x - f
  z = jax.random.normal(key, x.shape, x.dtype)
  return x_mean + batch_mul(G, z), x_mean


@register_predictor("ancestral_sampling")
def ancestral_sampling(key, x, t, *, sde, score_fn, probability_flow=False):
  """x_mean = (x + b_i^2 score) / a_i, x = x_mean + s_i z (module docstring)."""
  if probability_flow:
    raise ValueError("ancestral_sampling has no probability-flow form; use predictor="
                     "'euler_maruyama' or 'reverse_diffusion' with probability_flow=True.")
  a, b = _chain_coef(sde, x, t)
  _, sigma = sde.marginal_coef(t)
  x_mean = batch_mul(1.0 / a, x + batch_mul(b**2, score_fn(x, t)))
  var = b**2 * jnp.maximum(sigma**2 - b**2, 0.0) / (a**2 * sigma**2)
  z = jax.random.normal(key, x.shape, x.dtype)
  return x_mean + batch_mul(jnp.sqrt(var), z), x_mean


@register_predictor("none")
def no_predictor(key, x, t, *, sde, score_fn, probability_flow=False):
  return x, x


# --- correctors -----------------------------------------------------------------------------
def _batch_mean_norm(v: Array) -> Array:
  return jnp.mean(jnp.linalg.norm(v.reshape(v.shape[0], -1), axis=-1))


@register_corrector("langevin")
def langevin(key, x, t, *, sde, score_fn, snr):
  """One Langevin step with e = 2 a_i^2 (snr ||z|| / ||score||)^2."""
  a, _ = _chain_coef(sde, x, t)
  grad = score_fn(x, t)
  z = jax.random.normal(key, x.shape, x.dtype)
  step = 2.0 * a**2 * (snr * _batch_mean_norm(z) / _batch_mean_norm(grad)) ** 2
  x_mean = x + batch_mul(step, grad)
  return x_mean + batch_mul(jnp.sqrt(2.0 * step), z), x_mean


@register_corrector("ald")
def annealed_langevin(key, x, t, *, sde, score_fn, snr):
  """One annealed Langevin step with e = 2 a_i^2 (snr sigma(t))^2."""
  a, _ = _chain_coef(sde, x, t)
  _, sigma = sde.marginal_coef(t)
  grad = score_fn(x, t)
  z = jax.random.normal(key, x.shape, x.dtype)
  step = 2.0 * a**2 * (snr * sigma) ** 2
  x_mean = x + batch_mul(step, grad)
  return x_mean + batch_mul(jnp.sqrt(2.0 * step), z), x_mean


@register_corrector("none")
def no_corrector(key, x, t, *, sde, score_fn, snr):
  return x, x


# --- the PC sampler -------------------------------------------------------------------------
@register_sampler("pc")
def get_pc_sampler(sde: SDE, shape, predictor: str = "euler_maruyama", corrector: str = "none",
                   snr: float = 0.16, n_steps: int = 1, probability_flow: bool = False,
                   denoise: bool = True, eps: Optional[float] = None,
                   num_steps: Optional[int] = None) -> Sampler:
  """Predictor-corrector sampler over ``linspace(T, eps, num_steps)``.

  Args:
    sde: the forward SDE.
    shape: ``[batch, *data_shape]`` of the samples.
    predictor, corrector: registered names (see :func:`available_predictors` /
      :func:`available_correctors`); at most one of them may be ``'none'``.
    snr: signal-to-noise ratio of the corrector step size.
    n_steps: corrector steps per time step.
    probability_flow: predict with the probability-flow ODE instead of the reverse SDE.
    denoise: return the last step's noise-free mean ``x_mean`` instead of ``x``.
    eps: the last time; ``None`` means ``sde.sampling_eps`` (1e-3 VP / sub-VP, 1e-5 VE).
    num_steps: number of time steps N; ``None`` means ``sde.N`` (``config.model.num_scales``).
      The predictors and correctors then run on ``sde.replace(N=num_steps)`` (dt = T / N, and the
      DDPM / SMLD chains of N steps).

  Returns:
    ``sampler(key, score_fn, x_T=None) -> (samples [*shape], nfe)``: one jitted program; ``nfe``
    (int32 scalar) counts the score evaluations executed, N (predictor) + N n_steps (corrector).
    ``x_T`` replaces the prior draw. ``sampler(..., constraint=c)`` applies a hard data
    constraint (:mod:`score_sde.sampling.constrained`) after every update.
  """
  predictor_fn = get_predictor(predictor)
  corrector_fn = get_corrector(corrector)
  if predictor == "none" and corrector == "none":
    raise ValueError("predictor='none' and corrector='none' would not sample; pick a predictor "
                     f"from {available_predictors()} or a corrector from {available_correctors()}.")
  if predictor == "ancestral_sampling" and probability_flow:
    raise ValueError("ancestral_sampling has no probability-flow form; use 'euler_maruyama' or "
                     "'reverse_diffusion' with probability_flow=True.")
  shape = check_shape(shape)
  n_steps = int(n_steps)
  if n_steps < 0 or (corrector != "none" and n_steps < 1):
    raise ValueError(f"n_steps must be >= 1 with a corrector, got {n_steps}.")
  if corrector != "none" and not snr > 0:
    raise ValueError(f"snr must be positive, got {snr}.")
  eps = check_eps(sde, eps)
  if num_steps is not None:
    if int(num_steps) < 1:
      raise ValueError(f"num_steps must be a positive integer, got {num_steps}.")
    if int(num_steps) != sde.N:
      sde = sde.replace(N=int(num_steps))
  N = sde.N
  n_corr = n_steps if corrector != "none" else 0
  # (alpha, sigma) of the time each predictor step reaches, (1, 0) after the last one: where a
  # constraint (inpainting, colorization) pins the known part.
  alpha_np, sigma_np = (np.asarray(v, np.float64) for v in jax.device_get(
      sde.marginal_coef(jnp.asarray(np.linspace(sde.T, eps, N), jnp.float32))))
  reached_np = (np.append(alpha_np[1:], 1.0).astype(np.float32),
                np.append(sigma_np[1:], 0.0).astype(np.float32))

  def predict(key, x, t, score_fn):
    return predictor_fn(key, x, t, sde=sde, score_fn=score_fn, probability_flow=probability_flow)

  def correct(key, x, t, score_fn):
    return corrector_fn(key, x, t, sde=sde, score_fn=score_fn, snr=snr)

  def program(key, score_fn, x_T, constraint):
    x_spec = jax.ShapeDtypeStruct(shape, jnp.float32)
    t_spec = jax.ShapeDtypeStruct(shape[:1], jnp.float32)
    key_spec = jax.eval_shape(lambda: jax.random.key(0))
    check_score_fn_shape(score_fn, x_spec, "PC sampler")
    nfe_p = count_score_evals(lambda w: jax.eval_shape(
        lambda k, x, t: predict(k, x, t, w(score_fn)), key_spec, x_spec, t_spec))
    nfe_c = count_score_evals(lambda w: jax.eval_shape(
        lambda k, x, t: correct(k, x, t, w(score_fn)), key_spec, x_spec, t_spec))

    key, prior_key = jax.random.split(key)
    x = sde.prior_sampling(prior_key, shape) if x_T is None else x_T
    timesteps = jnp.linspace(sde.T, eps, N)
    if constraint is not None:
      reached = (jnp.asarray(reached_np[0]), jnp.asarray(reached_np[1]))
      x, _ = constraint.project(jax.random.fold_in(prior_key, 1), x, x,
                                *sde.marginal_coef(jnp.full(shape[:1], timesteps[0])))

    def step(i, carry):
      key, x, _ = carry
      t = jnp.full(shape[:1], timesteps[i])
      key, corr_key, pred_key = jax.random.split(key, 3)
      x_mean = x
      if n_corr:
        def corr_step(j, xs):
          kj = jax.random.fold_in(corr_key, j)
          x, x_mean = correct(kj, xs[0], t, score_fn)
          if constraint is not None:
            x, x_mean = constraint.project(jax.random.fold_in(kj, 1), x, x_mean,
                                           *sde.marginal_coef(t))
          return x, x_mean
        x, x_mean = jax.lax.fori_loop(0, n_corr, corr_step, (x, x))
      if predictor != "none":
        x, x_mean = predict(pred_key, x, t, score_fn)
        if constraint is not None:
          x, x_mean = constraint.project(jax.random.fold_in(pred_key, 1), x, x_mean,
                                         jnp.full(shape[:1], reached[0][i]),
                                         jnp.full(shape[:1], reached[1][i]))
      return key, x, x_mean

    _, x, x_mean = jax.lax.fori_loop(0, N, step, (key, x, x))
    out = x_mean if denoise else x
    if constraint is not None:
      out = constraint.finish(out)
    nfe = N * (nfe_p + n_corr * nfe_c)
    return out, jnp.asarray(nfe, jnp.int32)

  jitted = jit_with_score_fn(program)

  def sampler(key, score_fn, x_T=None, constraint=None):
    return jitted(key, score_fn, check_x_T(x_T, shape, "PC sampler"), constraint)
  return sampler
