"""Exact log-likelihoods through the probability-flow ODE (Song et al., ICLR 2021, App. D.2).

Along the probability-flow ODE dx/dt = f~(x, t) = f(x, t) - 1/2 g(t)^2 score(x, t),
d log p_t(x(t)) / dt = -div f~(x(t), t), so for data x at time eps and z = x(T),

    log p_eps(x) = log p_T(z) + int_eps^T div f~(x(t), t) dt.

We integrate the augmented state (x, delta_logp) from eps to T with d delta_logp / dt = div f~,
delta_logp(eps) = 0, and take log p(x) = ``sde.prior_logp(z)`` + delta_logp(T).

The divergence is the Skilling-Hutchinson estimate v^T (d f~ / dx) v with v Rademacher or
Gaussian (fixed over the trajectory, drawn per example), or the exact trace of the Jacobian
('exact', D vector-Jacobian products; low-dimensional data only). The drift and the divergence
come from ONE ``jax.vjp`` of f~. Each example is solved with its own adaptive steps
(:func:`score_sde.sampling.ode.solve_per_example`).

bits/dim: :func:`get_likelihood_fn` returns the model-space value -log p(x) / (D ln 2) of x as
given (no offsets). For 8-bit images use :func:`dequantize` and :func:`discrete_bpd`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from score_sde.sampling.base import ScoreFn, check_eps, check_score_fn_shape, jit_with_score_fn
from score_sde.sampling.ode import check_ode_options, probability_flow_drift, solve_per_example
from score_sde.sde_lib import SDE

Array = jax.Array

__all__ = ["HUTCHINSON_TYPES", "get_likelihood_fn", "dequantize", "discrete_bpd"]

HUTCHINSON_TYPES = ("rademacher", "gaussian", "exact")


def _divergence_field(sde: SDE, score_fn: ScoreFn, hutchinson_type: str):
  """Vector field of one example: (x [*data_shape], delta_logp) -> (f~(x, t), div f~(x, t))."""
  drift = probability_flow_drift(sde, score_fn)

  def field(t, state, v):
    x, _ = state
    f, vjp = jax.vjp(lambda y: drift(y[None], jnp.full((1,), t, y.dtype))[0], x)
    if hutchinson_type == "exact":
      d = x.size
      basis = jnp.eye(d, dtype=x.dtype).reshape((d,) + x.shape)
      rows = jax.vmap(lambda e: vjp(e)[0])(basis).reshape(d, d)  # rows[i] = e_i^T J
      div = jnp.trace(rows)
    else:
      div = jnp.sum(vjp(v)[0] * v)
    return f, div
  return field


def get_likelihood_fn(sde: SDE, rtol: float = 1e-5, atol: float = 1e-5, method: str = "dopri5",
                      hutchinson_type: str = "rademacher", eps: float = 1e-5,
                      num_steps=None, max_steps: int = 4096):
  """Builds ``fn(key, score_fn, x [B, *data_shape]) -> (bpd [B], z [B, ...], nfe)``.

  bpd = -(log p_T(z) + delta_logp) / (D ln 2), D = prod(data_shape): the model-space bits/dim of x
  exactly as given. ``key`` draws the Hutchinson probes (unused for 'exact'). ``nfe`` counts the
  batched evaluations of the augmented vector field (each one forward pass of score_fn plus one
  vector-Jacobian product, D of them for 'exact'). ``num_steps`` switches to constant steps.
  """
  hutchinson_type = str(hutchinson_type).lower()
  if hutchinson_type not in HUTCHINSON_TYPES:
    raise ValueError(f"Unknown hutchinson_type {hutchinson_type!r}; choose one of "
                     f"{list(HUTCHINSON_TYPES)}.")
  check_ode_options(method, rtol, atol, num_steps)
  eps = check_eps(sde, eps)

  def program(key, score_fn, x):
    check_score_fn_shape(score_fn, jax.ShapeDtypeStruct(x.shape, x.dtype), "likelihood")
    if hutchinson_type == "gaussian":
      v = jax.random.normal(key, x.shape, x.dtype)
    elif hutchinson_type == "rademacher":
      v = jax.random.rademacher(key, x.shape, x.dtype)
    else:
      v = jnp.zeros(x.shape[:1], x.dtype)
    delta0 = jnp.zeros(x.shape[:1], x.dtype)
    (z, delta_logp), _, nfe = solve_per_example(
        _divergence_field(sde, score_fn, hutchinson_type), (x, delta0), v, eps, sde.T, method,
        rtol, atol, num_steps, max_steps)
    d = int(np.prod(x.shape[1:]))
    bpd = -(sde.prior_logp(z) + delta_logp) / (d * np.log(2.0))
    return bpd, z, nfe

  jitted = jit_with_score_fn(program)

  def likelihood_fn(key, score_fn, x):
    if x.ndim < 2:
      raise ValueError(f"likelihood: x must be [batch, *data_shape], got shape {x.shape}.")
    return jitted(key, score_fn, jnp.asarray(x, jnp.float32))
  return likelihood_fn


def dequantize(key: Array, x_uint8: Array, centered: bool = False) -> Array:
  """Uniform dequantization of 8-bit data: y = scaler((x + u) / 256), u ~ U[0, 1)^D.

  x_uint8 holds integers in {0, ..., 255}; returns float32 y in [0, 1) (``centered=False``) or
  y = 2 (x + u) / 256 - 1 in [-1, 1) (``centered=True``), the model space of the reference's
  data scaler.
  """
  x = jnp.asarray(x_uint8, jnp.float32)
  v = (x + jax.random.uniform(key, x.shape)) / 256.0
  return 2.0 * v - 1.0 if centered else v


def discrete_bpd(model_bpd: Array, centered: bool = False) -> Array:
  """Bits/dim of 8-bit data from the model-space bpd of its dequantized version.

  With y = c (x + u) / 256 + b (c = 1, b = 0 for data in [0, 1]; c = 2, b = -1 for centered
  data in [-1, 1]) the density of w = x + u is p_w(w) = p_y(y) (c / 256)^D, and by Jensen
  (uniform dequantization, Theis et al. 2016)

      -log2 P(x) / D <= E_u[ -(log p_y(y) + D log(c / 256)) / (D ln 2) ]
                      = E_u[ model_bpd(y) ] + 8 - log2(c),

  where model_bpd(y) = -log p_y(y) / (D ln 2) is what :func:`get_likelihood_fn` returns. So the
  offset is +8 bits/dim for data in [0, 1] and +7 for centered data in [-1, 1] (the reference's
  ``offset = 7 - inverse_scaler(-1)``). Average the result over u to estimate the bound.
  """
  return jnp.asarray(model_bpd) + 8.0 - (1.0 if centered else 0.0)
