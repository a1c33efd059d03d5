"""Host memory: the compiler's freed heap back to the OS; XLA:CPU programs ordered for memory.

XLA compiles on the host with the C heap. After a large program is compiled (the DDPM++ cont.
train step: about 1.4 GB of heap on top of the 1 GB train state, docs/networks.md), glibc keeps
the freed pages in its arenas: the process's resident set stays that much larger for the whole
run, and every step's temporary buffers are allocated on top of it, so the peak RSS of training
is that much higher too. ``malloc_trim(0)`` returns every free page of every arena. It changes no
value and no buffer that is in use; it costs a few milliseconds, so it is called once after the
compiles, not per step.

:func:`use_memory_ordered_schedule_on_cpu` (run by ``import score_sde``) asks XLA:CPU to order
each program's instructions for memory rather than for running independent ones side by side:
fewer buffers alive at once, so smaller temporaries per call.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os

__all__ = ["release_freed_memory", "use_memory_ordered_schedule_on_cpu", "SCHEDULER_FLAG",
           "SCHEDULER_ENV_VAR"]

# XLA:CPU orders a program's instructions to run independent ones side by side by default, which
# keeps more buffers alive at once (DDPM++ cont. train step at batch 8: 0.94 GiB of temporaries);
# with this flag it orders them for memory (0.69 GiB), and the step ran faster too (3.63 vs
# 3.85 s on 2 cores: fewer fresh pages per call), docs/networks.md.
SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"
SCHEDULER_ENV_VAR = "SCORE_SDE_CPU_SCHEDULER"  # 'concurrency' keeps XLA's default
# jaxlib releases whose XLA has the flag (checked: 0.7.0, 0.10.2). XLA aborts the process on an
# unknown flag in XLA_FLAGS, so releases outside this range are left alone.
SCHEDULER_JAXLIB_RANGE = ((0, 7), (0, 10))


def _jaxlib_version() -> tuple[int, int]:
  try:
    import jaxlib.version
    major, minor = jaxlib.version.__version__.split(".")[:2]
    return int(major), int(minor)
  except (ImportError, ValueError):
    return (-1, -1)


@functools.lru_cache(maxsize=1)
def _malloc_trim():
  name = ctypes.util.find_library("c")
  try:
    return ctypes.CDLL(name).malloc_trim if name else None
  except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
    return None


def release_freed_memory() -> bool:
  """Returns the C heap's free pages to the OS (glibc ``malloc_trim(0)``); True when something was
  released, False when nothing was or the C library has no ``malloc_trim``."""
  trim = _malloc_trim()
  return bool(trim(0)) if trim is not None else False


def use_memory_ordered_schedule_on_cpu() -> bool:
  """Adds :data:`SCHEDULER_FLAG` to ``XLA_FLAGS`` (called by ``import score_sde``); True if added.

  XLA reads ``XLA_FLAGS`` once, when JAX makes its first backend, so this does nothing once a
  backend exists (import score_sde before running any JAX computation), nothing when ``XLA_FLAGS``
  already names the flag (either value: the user's choice wins), and nothing with the environment
  variable ``SCORE_SDE_CPU_SCHEDULER=concurrency`` (:data:`SCHEDULER_ENV_VAR`). The flag only
  concerns the CPU backend. Applied on the jaxlib releases of :data:`SCHEDULER_JAXLIB_RANGE` only.
  """
  if os.environ.get(SCHEDULER_ENV_VAR, "").lower() == "concurrency":
    return False
  low, high = SCHEDULER_JAXLIB_RANGE
  if not low <= _jaxlib_version() <= high:
    return False
  flags = os.environ.get("XLA_FLAGS", "")
  if SCHEDULER_FLAG.split("=")[0] in flags:
    return False
  try:
    from jax._src import xla_bridge
    initialized = xla_bridge.backends_are_initialized
  except (ImportError, AttributeError):  # cannot tell whether XLA has read its flags: leave them
    return False
  if initialized():  # too late: the flags were read
    return False
  os.environ["XLA_FLAGS"] = f"{flags} {SCHEDULER_FLAG}".strip()
  return True
