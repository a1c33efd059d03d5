"""Test session set-up: 8 forced host CPU devices, so sharded code paths run everywhere.

Set before JAX is imported; subprocesses started by tests inherit it. Tests that want a single
device build their own one-device mesh.

Each process also runs XLA:CPU ops single-threaded: the suite runs as ``pytest -n 2`` on two
cores, and two workers whose Eigen thread pools each want every core thrash (measured: the two
slowest tests side by side took 214 s with the default pools, 94 s single-threaded).
"""
import os

_FLAGS = {"xla_force_host_platform_device_count": "8", "xla_cpu_multi_thread_eigen": "false"}
for _name, _value in _FLAGS.items():
  if _name not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --{_name}={_value}").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Same for numpy's OpenBLAS (the float64 2048x2048 eigh / SVD of every FID): the xdist workers are
# spawned after this file is imported, so they and their subprocesses start with one BLAS thread.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
  os.environ.setdefault(_var, "1")

import pathlib  # noqa: E402

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
MNIST_DIR = REPO.parent / "shared" / "data" / "mnist"


@pytest.fixture
def mnist_dir():
  """The real MNIST idx files beside the checkout; tests using it skip where it is absent."""
  if not (MNIST_DIR / "train-images-idx3-ubyte.gz").exists():
    pytest.skip(f"real MNIST not found at {MNIST_DIR}")
  return str(MNIST_DIR)


def tiny_toy_config(sde: str = "vpsde", **overrides):
  """A toy config small enough for a test: a few hundred steps in seconds."""
  import importlib
  cfg = importlib.import_module("configs.default_toy_configs").get_default_configs()
  cfg.training.sde = sde
  cfg.training.batch_size = 64
  cfg.training.n_iters = 40
  cfg.training.n_jitted_steps = 10
  cfg.training.log_freq = 10
  cfg.training.snapshot_freq = 20
  cfg.training.snapshot_freq_for_preemption = 10
  cfg.model.nf = 32
  cfg.model.num_layers = 2
  cfg.sampling.num_samples = 64
  cfg.sampling.batch_size = 64
  cfg.eval.num_bpd_samples = 64
  cfg.eval.batch_size = 64
  cfg.eval.num_samples = 64
  for key, value in overrides.items():
    node = cfg
    *path, last = key.split(".")
    for p in path:
      node = node[p]
    node[last] = value
  return cfg
