"""Data-parallel scaling: training steps/s against the number of devices, fixed per-device batch.

  python experiments/benchmark_scaling.py --out benchmarks/out/scaling.json               # all devices
  python experiments/benchmark_scaling.py --host_devices 8 --per_device_batch 16          # CPU

For each device count d in 1, 2, 4, ... up to the devices present, a ``Trainer`` on a mesh of the
first d devices runs the U-Net of ``--config`` at global batch d * per_device_batch;
efficiency(d) = images/s(d) / (d * images/s(1)). ``--host_devices N`` forces N CPU devices (set
before JAX starts): they share the machine's cores, so on a CPU this measures the data-parallel
overhead rather than a speed-up. Prints a table and writes JSON.
"""
from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
for _i, _arg in enumerate(sys.argv):  # XLA reads this once, before JAX initialises
  if _arg.startswith("--host_devices"):
    _n = _arg.split("=", 1)[1] if "=" in _arg else sys.argv[_i + 1]
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={_n}")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("out", "benchmarks/out/scaling.json", "Where to write the JSON results.")
flags.DEFINE_string("config", "configs/mnist/vp_continuous.py", "Config file of the model.")
flags.DEFINE_integer("per_device_batch", 16, "Batch per device.")
flags.DEFINE_integer("host_devices", None, "Force this many CPU devices (CPU only).")
flags.DEFINE_integer("timed_calls", 5, "Compiled calls timed after the first.")
flags.DEFINE_integer("n_jitted_steps", 5, "Training steps per compiled call.")


def _load_config(path: str):
  import importlib.util
  spec = importlib.util.spec_from_file_location("bench_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _steps_per_s(config, devices) -> float:
  from score_sde.train import Trainer
  from jax.sharding import AxisType, Mesh
  mesh = Mesh(np.asarray(devices), ("data",), axis_types=(AxisType.Auto,))
  trainer = Trainer(config, mesh=mesh)
  rng = np.random.default_rng(0)
  n = int(config.training.n_jitted_steps)
  shape = (config.training.batch_size,) + trainer.shape
  batches = lambda: [{"image": rng.random(shape, dtype=np.float32)} for _ in range(n)]
  jax.block_until_ready(trainer.train_steps(batches()))  # compile
  t0 = time.perf_counter()
  for _ in range(FLAGS.timed_calls):
    jax.block_until_ready(trainer.train_steps(batches()))
  return FLAGS.timed_calls * n / (time.perf_counter() - t0)


def main(argv):
  del argv
  devices = jax.devices()
  counts = [d for d in (1, 2, 4, 8, 16, 32, 64, 128, 256) if d <= len(devices)]
  rows = []
  for d in counts:
    config = _load_config(FLAGS.config)
    config.training.batch_size = d * FLAGS.per_device_batch
    config.training.n_jitted_steps = FLAGS.n_jitted_steps
    rate = _steps_per_s(config, devices[:d])
    images = rate * config.training.batch_size
    rows.append({"devices": d, "global_batch": config.training.batch_size, "steps_per_s": rate,
                 "images_per_s": images})
  base = rows[0]["images_per_s"]
  for r in rows:
    r["efficiency"] = r["images_per_s"] / (r["devices"] * base)
    print(f"{r['devices']:4d} devices | batch {r['global_batch']:5d} | {r['steps_per_s']:7.2f} "
          f"steps/s | {r['images_per_s']:8.1f} images/s | efficiency {r['efficiency']:.2f}")
  result = {"platform": devices[0].platform, "device": devices[0].device_kind,
            "cpu_count": os.cpu_count(), "config": FLAGS.config,
            "per_device_batch": FLAGS.per_device_batch, "rows": rows}
  os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
  with open(FLAGS.out, "w") as f:
    json.dump(result, f, indent=1)
  print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
  app.run(main)
