"""Run runs of identically shaped blocks under one ``lax.scan``, keeping per-block parameters.

Why: the deep NCSN++ has 76 residual blocks; unrolled, each is a separate copy in the XLA program
(forward and backward), and compiling that program is what makes the network slow to start
(XLA:CPU spends most of its compile time generating code per copy). Consecutive blocks that have
the same parameter shapes and see the same input shapes compute the same function of (params,
input), so they can run as one loop body: ``h_i = f(params_i, h_{i-1}, x_i)``.

How: the parameter tree is NOT changed -- every block keeps its own name and subtree (the
original score_sde names, so released checkpoints still load). At ``init`` the blocks are called
one by one (creating their parameters in the reference order); at ``apply`` their parameter
subtrees are stacked on a new leading axis and scanned. Gradients flow back through the stack
into each block's own leaves, so training, EMA and checkpoints see the usual tree.

Only blocks whose variables are all in the ``params`` collection can be scanned (true for the
NCSN++ / DDPM++ blocks); dropout keys are split per block from the parent's ``'dropout'`` stream.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
Unit = Sequence[nn.Module]
# step(modules, h, x) -> new h; ``modules`` are the unit's modules, or stand-ins with the same
# call signature that apply the scanned parameters.
Step = Callable[[Sequence[Callable[..., Array]], Array, Optional[Array]], Array]


def _shapes(tree: Any) -> Any:
  return jax.tree.map(lambda a: (a.shape, a.dtype), tree)


def _applied(module: nn.Module, params: Any, rng: Optional[Array]) -> Callable[..., Array]:
  """``module``'s call signature, running an unbound copy on explicit ``params``."""
  unbound = module.clone(parent=None, name=None)
  rngs = {} if rng is None else {"dropout": rng}
  return lambda *args, **kwargs: unbound.apply({"params": params}, *args, rngs=rngs, **kwargs)


def apply_units(parent: nn.Module, units: Sequence[Unit], step: Step, h: Array,
                xs: Optional[Sequence[Optional[Array]]] = None, *, scan: bool = True,
                min_run: int = 2, remat: Any = False) -> list[Array]:
  """``[h_1, ..., h_n]`` with ``h_i = step(units[i], h_{i-1}, xs[i])``, ``h_0 = h``.

  ``units[i]`` is a tuple of submodules of ``parent`` (declared in its compact method, not yet
  called); ``xs[i]`` an optional per-unit input (e.g. a skip connection). With ``scan`` (and
  outside ``init``), each maximal run of at least ``min_run`` consecutive units with equal
  parameter shapes and equal ``xs`` shapes whose output shape equals its input shape runs as one
  ``lax.scan``; other units run one by one. Same values as the plain loop (up to float
  reassociation by XLA), same parameter tree. With ``remat`` every unit is rematerialized in the
  backward pass (``model.remat='blocks'``; or a ``jax.checkpoint`` policy, 'elementwise':
  :func:`score_sde.models.remat.blocks_of`): a scanned run's loop body is a ``jax.checkpoint``,
  a unit run on its own calls each module under ``nn.remat`` (:func:`score_sde.models.remat.call`).
  """
  n = len(units)
  xs = [None] * n if xs is None else list(xs)
  if len(xs) != n:
    raise ValueError(f"apply_units: {n} units but {len(xs)} per-unit inputs.")
  outs: list[Array] = []
  if remat:
    from score_sde.models.remat import call
    one = lambda unit, h_, x_: step([functools.partial(call, m, enabled=remat) for m in unit], h_,
                                    x_)
  else:
    one = step
  if not scan or parent.is_initializing() or n < min_run:
    for unit, x in zip(units, xs):
      h = one(unit, h, x)
      outs.append(h)
    return outs

  params = parent.variables.get("params", {})
  if set(parent.variables) - {"params"}:
    raise ValueError(f"apply_units scans only 'params'; {parent.name} also has collections "
                     f"{sorted(set(parent.variables) - {'params'})}.")
  if any(m.name not in params for unit in units for m in unit):  # parameterless modules
    return apply_units(parent, units, step, h, xs, scan=False, remat=remat)
  subtrees = [tuple(params[m.name] for m in unit) for unit in units]
  sigs = [(_shapes(p), None if x is None else (x.shape, x.dtype)) for p, x in zip(subtrees, xs)]
  use_rng = parent.has_rng("dropout")
  i = 0
  while i < n:
    j = i + 1
    while j < n and sigs[j] == sigs[i]:
      j += 1
    if j - i >= min_run:
      probe = [_applied(m, p, jax.random.PRNGKey(0)) for m, p in zip(units[i], subtrees[i])]
      out = jax.eval_shape(lambda h_, x_: step(probe, h_, x_), h, xs[i])
      if (out.shape, out.dtype) == (h.shape, h.dtype):
        h, ys = _scan_run(parent, units[i], subtrees[i:j], xs[i:j], step, h, use_rng, remat)
        outs.extend(ys[k] for k in range(j - i))
        i = j
        continue
    h = one(units[i], h, xs[i])
    outs.append(h)
    i += 1
  return outs


def _scan_run(parent: nn.Module, template: Unit, subtrees: Sequence[tuple], xs: Sequence,
              step: Step, h: Array, use_rng: bool, remat: Any = False) -> tuple[Array, Array]:
  """One ``lax.scan`` over a run of units shaped like ``template``; returns (h, stacked outputs).
  With ``remat`` the loop body (one unit) is a ``jax.checkpoint``."""
  n = len(subtrees)
  stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *subtrees)
  x_stack = None if xs[0] is None else jnp.stack(xs)
  keys = jax.random.split(parent.make_rng("dropout"), n) if use_rng else None

  def body(carry: Array, inputs: tuple) -> tuple[Array, Array]:
    p, x, key = inputs
    mods = [_applied(m, p_m, None if key is None else jax.random.fold_in(key, k))
            for k, (m, p_m) in enumerate(zip(template, p))]
    new = step(mods, carry, x)
    return new, new

  from score_sde.models.remat import checkpoint
  return jax.lax.scan(checkpoint(body, remat), h, (stacked, x_stack, keys))
