"""score_sde.host_memory: freed C-heap pages go back to the OS; the Trainer calls it once."""
from __future__ import annotations

import ctypes
import ctypes.util
import os

import pytest

from score_sde import host_memory

libc_name = ctypes.util.find_library("c")
glibc = pytest.mark.skipif(host_memory._malloc_trim() is None,  # pylint: disable=protected-access
                           reason="no glibc malloc_trim on this platform")


def _rss() -> int:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@glibc
def test_release_returns_freed_holes_of_the_heap():
  """Chunks freed between live ones stay resident after free() (heap holes glibc keeps, like the
  compiler's freed memory); release_freed_memory gives them back."""
  libc = ctypes.CDLL(libc_name)
  libc.malloc.restype = ctypes.c_void_p
  libc.malloc.argtypes = [ctypes.c_size_t]
  libc.free.argtypes = [ctypes.c_void_p]
  size, n = 64 * 1024, 1600  # below the mmap threshold: on the heap; 2 x 100 MiB
  ptrs = []
  for _ in range(2 * n):
    p = libc.malloc(size)
    ctypes.memset(p, 1, size)  # make it resident
    ptrs.append(p)
  host_memory.release_freed_memory()
  for p in ptrs[0::2]:  # every other chunk: holes the heap top cannot shrink past
    libc.free(p)
  before = _rss()
  assert host_memory.release_freed_memory() is True
  released = before - _rss()
  for p in ptrs[1::2]:
    libc.free(p)
  assert released > 0.5 * n * size, released / 2**20


def test_trainer_trims_once_after_its_first_step(monkeypatch):
  from score_sde import train
  calls = []
  monkeypatch.setattr(train, "release_freed_memory", lambda: calls.append(1) or True)
  from configs.toy import vp
  config = vp.get_config()
  config.training.batch_size = 8
  trainer = train.Trainer(config)
  import numpy as np
  batch = {"image": np.zeros((8,) + trainer.shape, np.float32)}
  n = int(config.training.n_jitted_steps)
  trainer.train_steps([batch] * n)
  trainer.train_steps([batch] * n)
  assert calls == [1]
