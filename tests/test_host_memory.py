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


_TEMPS = """
import os, score_sde
from experiments import benchmark_accelerator, benchmark_networks
c = benchmark_accelerator.load_config("vp.cifar10_ddpmpp_continuous", smoke=True)
r = benchmark_networks.benchmark("vp.cifar10_ddpmpp_continuous", batch=2, steps=1, warmup=0,
                                 dtype="float32", config=c)
print(repr(os.environ.get("XLA_FLAGS")), r["xla_temp_bytes"], r["final_loss"])
"""


def _run(script: str, **env) -> list[str]:
  import subprocess
  import sys
  from conftest import REPO
  base = {k: v for k, v in os.environ.items()
          if k not in ("XLA_FLAGS", host_memory.SCHEDULER_ENV_VAR)}
  out = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=dict(base, **env),
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  return out.stdout.strip().splitlines()[-1].rsplit(" ", 2)


def test_import_orders_cpu_programs_for_memory():
  """import score_sde adds the scheduler flag: the (shrunk) DDPM++ train step compiles with fewer
  temporary bytes than under XLA's concurrency-ordered default, with the same loss."""
  flags, temps, loss = _run(_TEMPS)
  assert host_memory.SCHEDULER_FLAG in flags
  flags_default, temps_default, loss_default = _run(
      _TEMPS, **{host_memory.SCHEDULER_ENV_VAR: "concurrency"})
  assert flags_default == "None"
  assert int(temps) < int(temps_default), (temps, temps_default)
  assert float(loss) == pytest.approx(float(loss_default), rel=1e-5)


def test_the_users_xla_flags_win():
  script = "import os, score_sde; print(repr(os.environ.get('XLA_FLAGS')), 0, 0)"
  flags, _, _ = _run(script, XLA_FLAGS="--xla_cpu_enable_concurrency_optimized_scheduler=true")
  assert flags == repr("--xla_cpu_enable_concurrency_optimized_scheduler=true")
  flags, _, _ = _run(script, XLA_FLAGS="--xla_force_host_platform_device_count=2")
  assert flags == repr("--xla_force_host_platform_device_count=2 " + host_memory.SCHEDULER_FLAG)
  # Too late once a backend exists (XLA has read its flags): nothing is changed.
  late = ("import os, jax; jax.numpy.zeros(1).block_until_ready(); import score_sde; "
          "print(repr(os.environ.get('XLA_FLAGS')), 0, 0)")
  flags, _, _ = _run(late)
  assert flags == "None"


def test_scheduler_flag_only_on_jaxlib_releases_known_to_have_it(monkeypatch):
  """XLA aborts on an unknown flag in XLA_FLAGS: outside the checked jaxlib range nothing is
  added."""
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  monkeypatch.delenv(host_memory.SCHEDULER_ENV_VAR, raising=False)
  from jax._src import xla_bridge
  monkeypatch.setattr(xla_bridge, "backends_are_initialized", lambda: False)  # as at start-up
  monkeypatch.setattr(host_memory, "_jaxlib_version", lambda: (0, 11))
  assert host_memory.use_memory_ordered_schedule_on_cpu() is False
  assert "XLA_FLAGS" not in os.environ
  monkeypatch.setattr(host_memory, "_jaxlib_version", lambda: (0, 10))
  assert host_memory.use_memory_ordered_schedule_on_cpu() is True
  assert os.environ["XLA_FLAGS"] == host_memory.SCHEDULER_FLAG
