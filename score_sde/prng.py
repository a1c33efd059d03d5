"""Random bits on CPU at the speed of the other backends: JAX's threefry hash lowered unrolled.

Every ``jax.random`` draw with the default (threefry) key hashes a counter with Threefry-2x32:
20 rounds of add / rotate / xor. On GPU and TPU, JAX lowers the rounds straight-line and XLA fuses
them into one elementwise kernel. On CPU it lowers them as a ``fori_loop`` of 5 iterations (less
code to compile), and XLA:CPU runs each iteration as its own pass over the whole counter array:
4.5x slower for a dropout mask of the DDPM++ cont. shapes ([8, 32, 32, 256]: 15.8 vs 3.5 ms),
0.33 s of that model's train step at batch 8 on two cores, more than PyTorch's Bernoulli draws
(docs/networks.md, Throughput).

:func:`use_unrolled_threefry_on_cpu` registers JAX's own straight-line lowering for the CPU
platform too. The hash is the same function, so every key, split and draw gives the same bits as
before, bit for bit (``tests/test_prng.py`` compares them with a process that keeps the loop); only
the compiled code differs. ``import score_sde`` calls it once. Set the environment variable
``SCORE_SDE_CPU_THREEFRY=loop`` before importing to keep JAX's loop lowering.

It reaches into JAX's private lowering registry (``jax._src``): on a JAX version where the names
differ it changes nothing and returns False, and draws keep JAX's CPU lowering.
"""
from __future__ import annotations

import os

__all__ = ["use_unrolled_threefry_on_cpu", "ENV_VAR"]

ENV_VAR = "SCORE_SDE_CPU_THREEFRY"


def use_unrolled_threefry_on_cpu() -> bool:
  """Lowers ``threefry2x32`` straight-line on CPU (module docstring). True when it is now in
  effect, False when the environment variable asks for the loop or this JAX lacks the hooks."""
  if os.environ.get(ENV_VAR, "").strip().lower() == "loop":
    return False
  try:
    from jax._src.interpreters import mlir
    from jax._src.random import threefry2x32
    rule = threefry2x32._threefry2x32_lowering_rule  # the straight-line (GPU / TPU) lowering
    primitive = threefry2x32.threefry2x32_p
  except (ImportError, AttributeError):
    return False
  mlir.register_lowering(primitive, rule, platform="cpu", inline=False)
  return True
