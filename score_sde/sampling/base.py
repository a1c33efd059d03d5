"""The one contract every sampler keeps, and the checks they share.

A sampler is built as ``get_sampler(name, sde, shape, **options)`` and called as

    samples, nfe = sampler(key, score_fn, x_T=None)

* ``key``: a PRNG key; it drives the prior draw (when ``x_T`` is None) and any sampler noise.
* ``score_fn(x [batch, *data_shape], t [batch]) -> score [batch, *data_shape]``: any function of
  that shape (:data:`ScoreFn`): a trained network's wrapper, an exact analytic score, a guided one.
  A plain Python function is a static argument (one compile per function object: build it once);
  a ``jax.tree_util.Partial`` is a pytree, so its bound arrays (network parameters) are traced and
  new parameters reuse the compiled program (:func:`jit_with_score_fn`).
* ``x_T [*shape]``: the starting point, a draw from the prior ``sde.prior_sampling`` (None: drawn
  from ``key``). A deterministic sampler maps the same ``x_T`` to the same samples, bitwise,
  whatever ``key`` and however it is called (directly, inside ``jax.jit``, with a ``Partial``).
* ``samples [*shape]`` and ``nfe``, an int32 scalar array: the score evaluations the program
  made, counted honestly (an adaptive solver's rejected steps included).

``shape`` is ``[batch, *data_shape]``. Every sampler integrates down to the last time ``eps`` and
accepts it as an option: ``None`` means ``sde.sampling_eps``; otherwise 0 < eps < T
(:func:`check_eps`, the one rule for all of them).
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Protocol

import jax
import jax.numpy as jnp

Array = jax.Array
ScoreFn = Callable[[Array, Array], Array]

__all__ = ["ScoreFn", "Sampler", "check_shape", "check_eps", "check_x_T", "check_score_fn_shape",
           "jit_with_score_fn", "count_score_evals", "PerExampleScore", "split_score_fn"]


class Sampler(Protocol):
  """``sampler(key, score_fn, x_T=None) -> (samples [*shape], nfe int32 [])``."""

  def __call__(self, key: Array, score_fn: ScoreFn,
               x_T: Optional[Array] = None) -> tuple[Array, Array]:
    ...


def check_shape(shape) -> tuple[int, ...]:
  """``shape`` as a tuple of ints; ValueError unless it is ``[batch, *data_shape]``, all positive."""
  try:
    shape = tuple(int(s) for s in shape)
  except (TypeError, ValueError) as e:
    raise ValueError(f"shape must be a sequence of integers [batch, *data_shape], got {shape!r}.") \
        from e
  if len(shape) < 2 or any(s < 1 for s in shape):
    raise ValueError(f"shape must be [batch, *data_shape] with positive sizes, got {shape}.")
  return shape


def check_eps(sde, eps: Optional[float]) -> float:
  """The last sampling time: ``sde.sampling_eps`` if None; ValueError unless 0 < eps < T."""
  T = float(sde.T)
  eps = float(sde.sampling_eps if eps is None else eps)
  if not 0.0 < eps < T:
    raise ValueError(f"The last sampling time eps must lie in (0, T={T}), got {eps}.")
  return eps


def check_x_T(x_T: Optional[Array], shape: tuple[int, ...], where: str) -> Optional[Array]:
  """``x_T`` as float32 (None stays None); ValueError unless it has the sampler's shape."""
  if x_T is None:
    return None
  if tuple(getattr(x_T, "shape", ())) != tuple(shape):
    raise ValueError(f"{where}: x_T must have the sampler's shape {tuple(shape)}, got "
                     f"{tuple(getattr(x_T, 'shape', ()))}.")
  return jnp.asarray(x_T, jnp.float32)


def check_score_fn_shape(score_fn: ScoreFn, x: Any, where: str) -> None:
  """ValueError unless ``score_fn(x, t [batch])`` returns an array shaped like ``x`` (traced with
  ``jax.eval_shape``: nothing runs). ``x`` is an array or a ``ShapeDtypeStruct``."""
  t = jax.ShapeDtypeStruct((x.shape[0],), jnp.float32)
  out = jax.eval_shape(score_fn, jax.ShapeDtypeStruct(x.shape, x.dtype), t)
  if getattr(out, "shape", None) != tuple(x.shape):
    raise ValueError(f"{where}: score_fn(x, t) must return an array shaped like x "
                     f"{tuple(x.shape)}, got {getattr(out, 'shape', out)}.")


def jit_with_score_fn(program: Callable) -> Callable:
  """jit ``program(key, score_fn, *args)``.

  A plain Python ``score_fn`` is a static argument (one compile per function object: build it
  once and reuse it). A ``jax.tree_util.Partial`` (or a :class:`PerExampleScore`) is passed as a
  pytree, so its bound arrays (for example network parameters or class labels) are traced inputs
  and new values reuse the compiled program.
  """
  static = jax.jit(program, static_argnums=(1,))
  dynamic = jax.jit(program)

  def call(key, score_fn, *args):
    if isinstance(score_fn, (jax.tree_util.Partial, PerExampleScore)):
      return dynamic(key, score_fn, *args)
    return static(key, score_fn, *args)
  return call


def count_score_evals(update: Callable[[Callable[[ScoreFn], ScoreFn]], object]) -> int:
  """Number of ``score_fn`` calls made when tracing ``update(wrap)``, where ``wrap(score_fn)``
  returns a counting copy of a score function (traced with ``jax.eval_shape``: nothing runs)."""
  count = [0]

  def wrap(score_fn):
    def counting(x, t):
      count[0] += 1
      return score_fn(x, t)
    return counting
  update(wrap)
  return count[0]


@jax.tree_util.register_pytree_node_class
class PerExampleScore:
  """``score_fn(x, t) = fn(x, t, cond)`` with per-example conditioning ``cond`` (a pytree whose
  leaves have a leading batch axis, e.g. class labels ``[batch]``).

  Plain callers see an ordinary ``score_fn(x, t)``. Solvers that evaluate examples one at a time
  (the per-example ODE solves) slice ``cond`` along with ``x`` instead of closing over the whole
  batch's conditioning (:func:`split_score_fn`). It is a pytree (``cond`` its leaves, ``fn``
  static), so new labels reuse a compiled sampler.
  """

  def __init__(self, fn: Callable[[Array, Array, Any], Array], cond: Any):
    self.fn, self.cond = fn, cond

  def __call__(self, x: Array, t: Array) -> Array:
    return self.fn(x, t, self.cond)

  def tree_flatten(self):
    return (self.cond,), self.fn

  @classmethod
  def tree_unflatten(cls, fn, children):
    return cls(fn, children[0])


def split_score_fn(score_fn: ScoreFn) -> tuple[Callable[[Array, Array, Any], Array], Any]:
  """``(fn(x, t, cond), cond)`` of a :class:`PerExampleScore`; ``(fn ignoring cond, None)`` else."""
  if isinstance(score_fn, PerExampleScore):
    return score_fn.fn, score_fn.cond
  return (lambda x, t, cond: score_fn(x, t)), None
