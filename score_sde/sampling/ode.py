"""Probability-flow ODE sampler and encoder (Song et al., ICLR 2021, Sec. 4.3).

The probability-flow ODE

    dx/dt = f(x, t) - 1/2 g(t)^2 score(x, t)                        (``sde.reverse(.., True).sde``)

has the marginals p_t of the forward SDE. Integrating it from T to eps maps prior samples to data
(the sampler); from eps to T it maps data to latents (the encoder).

Each example is solved by its own adaptive diffrax solve (``jax.vmap`` of a per-example
``diffeqsolve`` whose vector field calls ``score_fn`` on ``x[None]``), so every example gets its
own step sizes and its result does not depend on the rest of the batch. Under vmap the network
still sees the whole batch per evaluation; the batched loop runs until the slowest example is
done, so the number of batched score evaluations is set by the example that needs most steps.

NFE is the number of batched ``score_fn`` evaluations executed: for a Runge-Kutta method with s
stages, s per step attempt (accepted or rejected) or s - 1 with FSAL plus one at the start, times
the largest per-example number of step attempts. :func:`solver_nfe` holds that formula; the tests
check it by counting calls.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import diffrax
import jax
import jax.numpy as jnp

from score_sde.sampling import register_sampler
from score_sde.sampling.base import (Sampler, ScoreFn, check_eps, check_score_fn_shape,
                                     check_shape, check_x_T, jit_with_score_fn, split_score_fn)
from score_sde.sampling.pc import reverse_diffusion
from score_sde.sde_lib import SDE

Array = jax.Array

__all__ = ["ODE_METHODS", "get_ode_sampler", "get_ode_encoder", "solve_per_example", "solver_nfe",
           "probability_flow_drift", "check_ode_options", "single_example_field"]

ODE_METHODS: dict[str, type[diffrax.AbstractSolver]] = {
    "dopri5": diffrax.Dopri5, "tsit5": diffrax.Tsit5, "bosh3": diffrax.Bosh3,
    "heun": diffrax.Heun, "euler": diffrax.Euler,
}


def check_ode_options(method: str, rtol: float, atol: float, num_steps: Optional[int]) -> None:
  """Fails early on an unknown method, non-positive tolerances or a missing step count."""
  if method not in ODE_METHODS:
    raise ValueError(f"Unknown ODE method {method!r}; choose one of {sorted(ODE_METHODS)}.")
  adaptive = issubclass(ODE_METHODS[method], diffrax.AbstractAdaptiveSolver)
  if num_steps is None and not adaptive:
    raise ValueError(f"method={method!r} has no error estimate: give num_steps for a fixed-step "
                     "solve, or use an adaptive method ('dopri5', 'tsit5', 'bosh3', 'heun').")
  if num_steps is not None and int(num_steps) < 1:
    raise ValueError(f"num_steps must be a positive integer, got {num_steps}.")
  if num_steps is None and not (rtol > 0 and atol > 0):
    raise ValueError(f"rtol and atol must be positive, got rtol={rtol}, atol={atol}.")


def solver_nfe(method: str, num_step_attempts: Array) -> Array:
  """Batched vector-field evaluations of a diffrax solve with ``num_step_attempts`` attempts.

  s stages per attempt; FSAL methods reuse the last stage, so s - 1 per attempt plus the first
  stage of the first step. ``num_step_attempts`` is the batch's largest ``stats['num_steps']``.
  """
  solver = ODE_METHODS[method]()
  tableau = getattr(solver, "tableau", None)
  if tableau is None:  # Euler: one evaluation per step.
    per_step, extra = 1, 0
  else:
    stages = len(tableau.c) + 1
    per_step, extra = (stages - 1, 1) if tableau.fsal else (stages, 0)
  return per_step * jnp.asarray(num_step_attempts, jnp.int32) + extra


def solve_per_example(vector_field: Callable[[Array, Any, Any], Any], y0: Any, args: Any,
                      t0: float, t1: float, method: str = "dopri5", rtol: float = 1e-5,
                      atol: float = 1e-5, num_steps: Optional[int] = None,
                      max_steps: int = 4096) -> tuple[Any, dict, Array]:
  """Solves dy/dt = vector_field(t, y, args) from t0 to t1 separately for every example.

  ``y0`` and ``args`` are pytrees whose leaves have a leading batch axis; ``vector_field`` sees
  one example (leaves without that axis). Adaptive methods use a PID controller with
  (rtol, atol) per example; ``num_steps`` switches to a constant step (t1 - t0) / num_steps.

  Returns ``(y1, stats, nfe)``: y1 batched like y0, diffrax's per-example ``stats``
  (``num_steps`` counts attempts, rejected included) and the batched evaluation count.
  """
  solver = ODE_METHODS[method]()
  if num_steps is None:
    controller, dt0 = diffrax.PIDController(rtol=rtol, atol=atol), None
  else:
    controller, dt0 = diffrax.ConstantStepSize(), (t1 - t0) / int(num_steps)
    max_steps = max(max_steps, int(num_steps))

  def solve_one(y, a):
    sol = diffrax.diffeqsolve(diffrax.ODETerm(vector_field), solver, t0, t1, dt0, y, args=a,
                              stepsize_controller=controller, saveat=diffrax.SaveAt(t1=True),
                              max_steps=max_steps, adjoint=diffrax.ForwardMode())
    return jax.tree_util.tree_map(lambda leaf: leaf[0], sol.ys), sol.stats

  y1, stats = jax.vmap(solve_one)(y0, args)
  return y1, stats, solver_nfe(method, jnp.max(stats["num_steps"]))


def probability_flow_drift(sde: SDE, score_fn: ScoreFn) -> Callable[[Array, Array], Array]:
  """``drift(x [B, ...], t [B])`` = f(x, t) - 1/2 g(t)^2 score(x, t)."""
  rsde = sde.reverse(score_fn, probability_flow=True)
  return lambda x, t: rsde.sde(x, t)[0]


def single_example_field(sde: SDE, score_fn: ScoreFn):
  """The probability-flow drift as a diffrax vector field ``field(t, x, args)`` of one example
  ``x [*data_shape]`` at scalar t (calls score_fn on x[None]); ``args`` is that example's slice of
  a :class:`~score_sde.sampling.base.PerExampleScore`'s conditioning (or None)."""
  fn, _ = split_score_fn(score_fn)

  def field(t, x, args):
    cond = jax.tree_util.tree_map(lambda c: c[None], args)
    drift = probability_flow_drift(sde, lambda xx, tt: fn(xx, tt, cond))
    return drift(x[None], jnp.full((1,), t, x.dtype))[0]
  return field


@register_sampler("ode")
def get_ode_sampler(sde: SDE, shape, rtol: float = 1e-5, atol: float = 1e-5,
                    method: str = "dopri5", denoise: bool = False, eps: Optional[float] = None,
                    num_steps: Optional[int] = None, max_steps: int = 4096) -> Sampler:
  """Samples by integrating the probability-flow ODE from T to eps.

  Args:
    sde: the forward SDE; shape: ``[batch, *data_shape]``.
    rtol, atol: per-example tolerances of the adaptive solve.
    method: one of :data:`ODE_METHODS`; 'euler' (and any method, if wanted) takes ``num_steps``.
    denoise: finish with one reverse-diffusion step at eps and return its mean (+1 NFE).
    eps: last time; ``None`` means ``sde.sampling_eps``.
    num_steps: fixed step count (constant steps) instead of adaptive steps.
    max_steps: per-example bound on step attempts.

  Returns:
    ``sampler(key, score_fn, x_T=None) -> (samples [*shape], nfe)``; ``x_T [*shape]`` decodes a
    given latent instead of drawing it from the prior. ``nfe`` is an int32 scalar.
    ``sampler(..., constraint=c)`` solves with a hard data constraint
    (:mod:`score_sde.sampling.constrained`).
  """
  shape = check_shape(shape)
  check_ode_options(method, rtol, atol, num_steps)
  eps = check_eps(sde, eps)

  def program(key, score_fn, x_T, constraint):
    check_score_fn_shape(score_fn, jax.ShapeDtypeStruct(shape, jnp.float32), "ODE sampler")
    field, cond = single_example_field(sde, score_fn), split_score_fn(score_fn)[1]
    if constraint is None:
      x, _, nfe = solve_per_example(field, x_T, cond, sde.T, eps, method, rtol, atol, num_steps,
                                    max_steps)
    else:
      key, pin_key = jax.random.split(key)
      y0, args, field = constraint.ode_problem(sde, field, x_T, cond, pin_key)
      y1, _, nfe = solve_per_example(field, y0, args, sde.T, eps, method, rtol, atol, num_steps,
                                     max_steps)
      x = constraint.ode_solution(sde, y1, args, eps)
    if denoise:
      _, x = reverse_diffusion(key, x, jnp.full(shape[:1], eps), sde=sde, score_fn=score_fn)
      nfe = nfe + 1
    if constraint is not None:
      x = constraint.finish(x)
    return x, nfe

  jitted = jit_with_score_fn(program)

  def sampler(key, score_fn, x_T: Optional[Array] = None, constraint=None):
    prior_key, key = jax.random.split(key)
    x_T = check_x_T(x_T, shape, "ODE sampler")
    if x_T is None:
      x_T = sde.prior_sampling(prior_key, shape)
    return jitted(key, score_fn, x_T, constraint)
  return sampler


def get_ode_encoder(sde: SDE, shape, rtol: float = 1e-5, atol: float = 1e-5,
                    method: str = "dopri5", eps: Optional[float] = None,
                    num_steps: Optional[int] = None, max_steps: int = 4096):
  """Encodes data into latents by integrating the probability-flow ODE from eps to T.

  Returns ``encoder(score_fn, x [*shape]) -> (z [*shape], nfe)``, the inverse of the sampler's
  decoding map (up to solver error). ``eps=None`` means ``sde.sampling_eps``.
  """
  shape = check_shape(shape)
  check_ode_options(method, rtol, atol, num_steps)
  eps = check_eps(sde, eps)

  def program(key, score_fn, x):
    del key
    check_score_fn_shape(score_fn, jax.ShapeDtypeStruct(shape, jnp.float32), "ODE encoder")
    z, _, nfe = solve_per_example(single_example_field(sde, score_fn), x,
                                  split_score_fn(score_fn)[1], eps, sde.T,
                                  method, rtol, atol, num_steps, max_steps)
    return z, nfe

  jitted = jit_with_score_fn(program)

  def encoder(score_fn, x):
    x = jnp.asarray(x, jnp.float32)
    if tuple(x.shape) != shape:
      raise ValueError(f"ODE encoder: x must have shape {shape}, got {tuple(x.shape)}.")
    return jitted(jax.random.key(0), score_fn, x)
  return encoder
