"""Benchmark: compile time, training throughput and peak memory of the paper's score networks.

For each config: build the network, initialize it (jitted ``model.init``, timed apart), then trace,
lower and XLA-compile one full training update (DSM loss of the config's SDE, backward pass,
gradient clipping, Adam, EMA; ``score_sde.losses.get_train_step_fn``) on one device, run it
``--warmup`` times untimed and ``--steps`` times timed, and report images/s = batch * steps /
seconds. Peak memory: ``device.memory_stats()['peak_bytes_in_use']`` on GPU / TPU, the process's
peak RSS (``resource.getrusage``) on CPU; plus XLA's own estimate of the step's temporary buffers.
Compile time is reported as wall seconds and as CPU seconds of the process (``compile_cpu_s``,
all threads), with the host's 1-minute load average: on a shared machine the CPU seconds are the
figure that does not depend on what else runs.

  # CPU (the defaults: batch 8, 3 timed steps, both configs, float32)
  python experiments/benchmark_networks.py --out docs/benchmark_networks_cpu.json
  # GPU: paper batch, bf16 mixed precision as a second run
  python experiments/benchmark_networks.py --batch 128 --steps 20 --out bench_gpu_f32.json
  python experiments/benchmark_networks.py --batch 128 --steps 20 --dtype bfloat16 \
      --out bench_gpu_bf16.json

``--dtype bfloat16`` sets ``config.model.dtype='bfloat16'``: bf16 convolutions / matmuls, float32
parameters, normalization statistics, network output, loss and optimizer.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import resource
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from score_sde import losses, sde_lib  # noqa: E402
from score_sde.models import utils as mutils  # noqa: E402
from score_sde.utils import data_shape  # noqa: E402

DEFAULT_CONFIGS = ("vp.cifar10_ddpmpp_continuous", "ve.cifar10_ncsnpp_deep_continuous")


def _peak_memory(device) -> tuple[int | None, str]:
  """(bytes, source): device allocator peak where the backend reports it, else process max RSS."""
  stats = None
  try:
    stats = device.memory_stats()
  except Exception:  # pylint: disable=broad-except
    pass
  if stats and "peak_bytes_in_use" in stats:
    return int(stats["peak_bytes_in_use"]), "device.memory_stats peak_bytes_in_use"
  return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "process max RSS"


def benchmark(name: str, batch: int, steps: int, warmup: int, dtype: str, seed: int = 0) -> dict:
  """Times one training update of ``configs.<name>`` at ``batch`` on the default device."""
  config = importlib.import_module(f"configs.{name}").get_config()
  config.model.dtype = dtype
  config.training.batch_size = batch
  device = jax.devices()[0]
  sde = sde_lib.get_sde(config)
  model = mutils.get_model(config.model.name)(config=config)
  shape = (batch,) + data_shape(config)
  key = jax.random.PRNGKey(seed)

  t0 = time.perf_counter()
  variables = jax.jit(lambda k: model.init({"params": k, "dropout": k}, jnp.zeros((1,) + shape[1:]),
                                           jnp.ones((1,)), train=False))(key)
  jax.block_until_ready(variables)
  init_s = time.perf_counter() - t0
  state = losses.init_train_state(config, variables, jax.random.PRNGKey(seed + 1))
  n_params = int(sum(np.prod(p.shape) for p in jax.tree.leaves(state.params)))
  x = jax.random.uniform(jax.random.PRNGKey(seed + 2), shape, jnp.float32)
  x = 2 * x - 1 if config.data.centered else x

  step = jax.jit(losses.get_train_step_fn(config, sde, model), donate_argnums=(0,))
  t0 = time.perf_counter()
  lowered = step.lower(state, x)
  lower_s = time.perf_counter() - t0
  t0, c0 = time.perf_counter(), time.process_time()
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t0
  compile_cpu_s = time.process_time() - c0  # CPU seconds of all threads: robust to contention
  temp_bytes = None
  try:
    analysis = compiled.memory_analysis()
    temp_bytes = int(analysis.temp_size_in_bytes) if analysis is not None else None
  except Exception:  # pylint: disable=broad-except
    pass

  for _ in range(warmup):
    state, metrics = compiled(state, x)
  jax.block_until_ready(state)
  t0 = time.perf_counter()
  for _ in range(steps):
    state, metrics = compiled(state, x)
  jax.block_until_ready((state, metrics))
  run_s = time.perf_counter() - t0
  peak, source = _peak_memory(device)
  return {
      "config": name, "network": config.model.name, "params": n_params, "dtype": dtype,
      "batch": batch, "steps": steps, "warmup": warmup,
      "device": str(device.device_kind), "platform": device.platform,
      "num_devices_visible": jax.device_count(), "jax": jax.__version__,
      "init_s": round(init_s, 3), "trace_lower_s": round(lower_s, 3),
      "compile_s": round(compile_s, 3), "compile_cpu_s": round(compile_cpu_s, 3),
      "host_cpus": os.cpu_count(), "load_avg_1min": round(os.getloadavg()[0], 2),
      "compile_total_s": round(lower_s + compile_s, 3),
      "step_s": round(run_s / max(steps, 1), 5),
      "images_per_s": round(batch * steps / run_s, 3) if steps else None,
      "peak_memory_bytes": peak, "peak_memory_source": source,
      "xla_temp_bytes": temp_bytes, "final_loss": float(metrics["loss"]),
      "loss_finite": bool(np.isfinite(float(metrics["loss"]))),
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--configs", default=",".join(DEFAULT_CONFIGS),
                      help="Comma-separated config modules under configs/.")
  parser.add_argument("--batch", type=int, default=8, help="Images per training step.")
  parser.add_argument("--steps", type=int, default=3, help="Timed training steps.")
  parser.add_argument("--warmup", type=int, default=1, help="Untimed steps after compiling.")
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                      help="config.model.dtype: compute dtype (params / loss stay float32).")
  parser.add_argument("--out", default=None, help="Write the records as JSON here.")
  args = parser.parse_args()
  records = []
  for name in args.configs.split(","):
    r = benchmark(name.strip(), args.batch, args.steps, args.warmup, args.dtype)
    records.append(r)
    mem = f"{r['peak_memory_bytes'] / 2**30:.2f} GiB ({r['peak_memory_source']})"
    print(f"{r['config']} [{r['network']}, {r['params'] / 1e6:.1f}M params, {r['dtype']}, "
          f"{r['platform']}: {r['device']}] batch {r['batch']}: init {r['init_s']:.1f} s, "
          f"trace+lower {r['trace_lower_s']:.1f} s, compile {r['compile_s']:.1f} s "
          f"({r['compile_cpu_s']:.1f} CPU s, load {r['load_avg_1min']}), "
          f"{r['step_s']:.3f} s/step, {r['images_per_s']:.1f} images/s, peak memory {mem}, "
          f"loss {r['final_loss']:.4g}", flush=True)
    if args.out:
      os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
      with open(args.out, "w") as f:
        json.dump(records, f, indent=1)


if __name__ == "__main__":
  main()
