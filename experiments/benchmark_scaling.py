"""Data-parallel scaling: training steps/s against the number of devices, fixed per-device batch.

  python -m experiments.benchmark_scaling --out benchmarks/out/scaling.json        # all devices
  python -m experiments.benchmark_scaling --host_devices 8 --per_device_batch 16   # CPU

For each device count d in 1, 2, 4, ... up to the devices present, a ``Trainer`` on a mesh of the
first d devices runs the U-Net of ``--config`` at global batch d * per_device_batch;
efficiency(d) = images/s(d) / (d * images/s(1)). ``--host_devices N`` forces N CPU devices
(``jax_num_cpu_devices``, set before JAX starts its backend): they share the machine's cores, so on
a CPU this measures the data-parallel overhead rather than a speed-up. Prints a table and writes
JSON.
"""
from __future__ import annotations

import copy
import os
import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from experiments import common

FLAGS = flags.FLAGS


def define_flags(flag_values: flags.FlagValues = FLAGS) -> None:
  """Defines this script's flags on ``flag_values``. Called when the script runs, so that importing
  the module defines no flags."""
  fv = dict(flag_values=flag_values)
  flags.DEFINE_string("out", "benchmarks/out/scaling.json", "Where to write the JSON results.",
                      **fv)
  config_flags.DEFINE_config_file("config", "configs/mnist/vp_continuous.py",
                                  "Config file of the model (--config.<field>=value "
                                  "overrides).", **fv)
  flags.DEFINE_integer("per_device_batch", 16, "Batch per device.", **fv)
  flags.DEFINE_integer("host_devices", None, "Force this many CPU devices (CPU only).", **fv)
  flags.DEFINE_integer("timed_calls", 5, "Compiled calls timed after the first.", **fv)
  flags.DEFINE_integer("n_jitted_steps", 5, "Training steps per compiled call.", **fv)


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


def main(argv) -> None:
  common.no_arguments(argv)
  if FLAGS.host_devices:
    jax.config.update("jax_num_cpu_devices", FLAGS.host_devices)  # before the backend starts
  devices = jax.devices()
  counts = [d for d in (1, 2, 4, 8, 16, 32, 64, 128, 256) if d <= len(devices)]
  rows = []
  for d in counts:
    config = copy.deepcopy(FLAGS.config)
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
            "cpu_count": os.cpu_count(),
            "config": config_flags.get_config_filename(FLAGS["config"]),
            "per_device_batch": FLAGS.per_device_batch, "rows": rows}
  common.write_result(FLAGS.out, result)


if __name__ == "__main__":
  define_flags()
  app.run(main)
