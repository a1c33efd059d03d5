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
  python -m experiments.benchmark_networks --out docs/benchmark_networks_cpu.json
  # GPU: paper batch, bf16 mixed precision as a second run
  python -m experiments.benchmark_networks --batch 128 --steps 20 --out bench_gpu_f32.json
  python -m experiments.benchmark_networks --batch 128 --steps 20 --dtype bfloat16 \
      --out bench_gpu_bf16.json

``--remat none,elementwise,blocks,full`` runs each config once per ``config.model.remat`` value
(rematerialization, docs/networks.md); on CPU the peak RSS is the process's, so measure one value
per process.

``--dtype bfloat16`` sets ``config.model.dtype='bfloat16'``: bf16 convolutions / matmuls, float32
parameters, normalization statistics, network output, loss and optimizer.
"""
from __future__ import annotations

import importlib
import os
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from experiments import common
from score_sde import host_memory, losses, sde_lib
from score_sde.models import utils as mutils
from score_sde.utils import data_shape

FLAGS = flags.FLAGS
DEFAULT_CONFIGS = ("vp.cifar10_ddpmpp_continuous", "ve.cifar10_ncsnpp_deep_continuous")


def define_flags(flag_values: flags.FlagValues = FLAGS) -> None:
  """Defines this script's flags on ``flag_values``. Called when the script runs, so that importing
  the module defines no flags."""
  fv = dict(flag_values=flag_values)
  flags.DEFINE_list("configs", list(DEFAULT_CONFIGS), "Config modules under configs/.", **fv)
  flags.DEFINE_integer("batch", 8, "Images per training step.", **fv)
  flags.DEFINE_integer("steps", 3, "Timed training steps.", **fv)
  flags.DEFINE_integer("warmup", 1, "Untimed steps after compiling.", **fv)
  flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "config.model.dtype: compute "
                    "dtype (params / loss stay float32).", **fv)
  flags.DEFINE_list("remat", ["none"], "config.model.remat values to run for each config "
                    "('none', 'elementwise', 'blocks', 'full'): one record per (config, remat).",
                    **fv)
  flags.DEFINE_string("out", None, "Write the records as JSON here.", **fv)


def peak_memory(device) -> tuple[int | None, str]:
  """(bytes, source): device allocator peak where the backend reports it, else process max RSS."""
  stats = None
  try:
    stats = device.memory_stats()
  except Exception:  # pylint: disable=broad-except
    pass
  if stats and "peak_bytes_in_use" in stats:
    return int(stats["peak_bytes_in_use"]), "device.memory_stats peak_bytes_in_use"
  return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "process max RSS"


def _rss_now() -> int:
  """Current resident set size of this process in bytes (Linux /proc/self/statm; 0 elsewhere)."""
  try:
    with open("/proc/self/statm") as f:
      return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
  except OSError:
    return 0


MEMORY_FIELDS = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
                 "temp_size_in_bytes", "generated_code_size_in_bytes", "peak_memory_in_bytes")


def memory_analysis(compiled) -> dict:
  """XLA's ``compiled.memory_analysis()`` as a dict of the fields the backend reports: arguments,
  outputs, aliased (donated input buffers reused for outputs), temporaries, generated code."""
  try:
    analysis = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    return {}
  if analysis is None:
    return {}
  return {f: int(getattr(analysis, f)) for f in MEMORY_FIELDS if hasattr(analysis, f)}


def benchmark(name: str, batch: int, steps: int, warmup: int, dtype: str, seed: int = 0,
              config=None, remat: str | None = None, trim: bool = True) -> dict:
  """Times one training update of ``configs.<name>`` at ``batch`` on the default device.

  ``config``: use this config instead of importing ``configs.<name>`` (``name`` only labels the
  record); ``remat``: set ``config.model.remat`` ('none' / 'elementwise' / 'blocks' / 'full');
  ``trim``: return the compiler's freed heap to the OS after compiling, as the Trainer does
  (:func:`score_sde.host_memory.release_freed_memory`).
  """
  if config is None:
    config = importlib.import_module(f"configs.{name}").get_config()
  config.model.dtype = dtype
  if remat is not None:
    config.model.remat = remat
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
  xla_memory = memory_analysis(compiled)
  temp_bytes = xla_memory.get("temp_size_in_bytes")
  rss_compiled = _rss_now()
  if trim:  # as the Trainer does after its first (compiling) call: score_sde.host_memory
    host_memory.release_freed_memory()
  rss_trimmed = _rss_now()

  for _ in range(warmup):
    state, metrics = compiled(state, x)
  jax.block_until_ready(state)
  t0 = time.perf_counter()
  for _ in range(steps):
    state, metrics = compiled(state, x)
  jax.block_until_ready((state, metrics))
  run_s = time.perf_counter() - t0
  peak, source = peak_memory(device)
  return {
      "config": name, "network": config.model.name, "params": n_params, "dtype": dtype,
      "remat": str(config.model.get("remat", None) or "none"),
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
      "xla_temp_bytes": temp_bytes, "xla_memory_analysis": xla_memory,
      "rss_after_compile_bytes": rss_compiled, "rss_after_trim_bytes": rss_trimmed,
      "malloc_trim": bool(trim), "final_loss": float(metrics["loss"]),
      "loss_finite": bool(np.isfinite(float(metrics["loss"]))),
  }


def main(argv) -> None:
  common.no_arguments(argv)
  records = []
  for name, remat in [(n, m) for n in FLAGS.configs for m in FLAGS.remat]:
    r = benchmark(name, FLAGS.batch, FLAGS.steps, FLAGS.warmup, FLAGS.dtype, remat=remat)
    records.append(r)
    mem = f"{r['peak_memory_bytes'] / 2**30:.2f} GiB ({r['peak_memory_source']})"
    print(f"{r['config']} [{r['network']}, {r['params'] / 1e6:.1f}M params, {r['dtype']}, "
          f"remat {r['remat']}, "
          f"{r['platform']}: {r['device']}] batch {r['batch']}: init {r['init_s']:.1f} s, "
          f"trace+lower {r['trace_lower_s']:.1f} s, compile {r['compile_s']:.1f} s "
          f"({r['compile_cpu_s']:.1f} CPU s, load {r['load_avg_1min']}), "
          f"{r['step_s']:.3f} s/step, {r['images_per_s']:.1f} images/s, peak memory {mem}, "
          f"loss {r['final_loss']:.4g}", flush=True)
    common.write_result(FLAGS.out, records, say=False)  # after every config


if __name__ == "__main__":
  define_flags()
  app.run(main)
