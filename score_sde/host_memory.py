"""Giving the host memory that XLA's compiler freed back to the operating system.

XLA compiles on the host with the C heap. After a large program is compiled (the DDPM++ cont.
train step: about 1.4 GB of heap on top of the 1 GB train state, docs/networks.md), glibc keeps
the freed pages in its arenas: the process's resident set stays that much larger for the whole
run, and every step's temporary buffers are allocated on top of it, so the peak RSS of training
is that much higher too. ``malloc_trim(0)`` returns every free page of every arena. It changes no
value and no buffer that is in use; it costs a few milliseconds, so it is called once after the
compiles, not per step.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools

__all__ = ["release_freed_memory"]


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
