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

``--profile_steps k`` traces k more steps with ``jax.profiler`` and adds ``profile`` to the record:
milliseconds per step by part of the program, forward and backward, found from each executed
instruction's ``op_name`` (the JAX call stack XLA keeps: ``conv_general_dilated``, ``GroupNorm``,
``Dropout`` ...; backward when it is under ``transpose(``), plus the slowest instructions
(docs/networks.md, Throughput). Events of instructions that run side by side overlap, so parts
can sum to more than the step.

``--dtype bfloat16`` sets ``config.model.dtype='bfloat16'``: bf16 convolutions / matmuls, float32
parameters, normalization statistics, network output, loss and optimizer.
"""
from __future__ import annotations

import collections
import glob
import gzip
import importlib
import json
import os
import re
import resource
import tempfile
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
  flags.DEFINE_integer("profile_steps", 0, "Steps traced with jax.profiler after the timed ones "
                       "(0: none); the record gets 'profile', ms per step by program part.",
                       lower_bound=0, **fv)
  flags.DEFINE_integer("jitted_steps", 1, "Updates per compiled call (lax.scan), as the Trainer "
                       "runs config.training.n_jitted_steps; times are per update.", lower_bound=1,
                       **fv)
  flags.DEFINE_string("out", None, "Write the records as JSON here.", **fv)


# (part, regular expression searched in the op_name), first match wins; 'other' for the rest.
PROFILE_PARTS = (
    ("convolution kernel gradient", r"Conv_\d+/while/"),  # score_sde.models.conv's tap loop
    ("convolution", r"conv_general_dilated"), ("GroupNorm", r"GroupNorm"),
    ("dropout", r"Dropout"), ("attention", r"AttnBlock"),
    ("scanned-run parameter stacking", r"/(un)?stack$"), ("matmul", r"dot_general"))


def profile_parts(compiled, run, steps: int, top: int = 10) -> dict:
  """Milliseconds per step of ``run()`` (``steps`` calls of ``compiled``) by part of the program:
  ``{'forward': {part: ms}, 'backward': {part: ms}, 'step_ms': wall per step under the profiler,
  'top': [[ms, instruction, op_name], ...]}`` (see the module docstring)."""
  names = {}
  for line in compiled.as_text().splitlines():
    m = re.match(r'\s*(?:ROOT )?%([\w.\-]+) = .*?op_name="([^"]+)"', line)
    if m:
      names[m.group(1)] = m.group(2)
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      t0 = time.perf_counter()
      run()
      step_ms = (time.perf_counter() - t0) / steps * 1e3
    (path,) = glob.glob(os.path.join(trace_dir, "**", "*perfetto_trace.json.gz"), recursive=True)
    with gzip.open(path) as f:
      events = json.load(f)
  events = events["traceEvents"] if isinstance(events, dict) else events
  per_instruction = collections.Counter()
  for e in events:
    if e.get("ph") == "X" and e.get("name") in names:
      per_instruction[e["name"]] += e["dur"] / 1e3 / steps
  out = {"forward": collections.Counter(), "backward": collections.Counter()}
  for name, ms in per_instruction.items():
    op = names[name]
    part = next((p for p, pattern in PROFILE_PARTS if re.search(pattern, op)), "other")
    out["backward" if "transpose(" in op else "forward"][part] += ms
  return {"step_ms": round(step_ms, 1),
          **{k: {p: round(v, 1) for p, v in c.most_common()} for k, c in out.items()},
          "top": [[round(ms, 1), n, names[n]] for n, ms in per_instruction.most_common(top)]}


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
              config=None, remat: str | None = None, trim: bool = True,
              profile_steps: int = 0, jitted_steps: int = 1) -> dict:
  """Times one training update of ``configs.<name>`` at ``batch`` on the default device.

  ``config``: use this config instead of importing ``configs.<name>`` (``name`` only labels the
  record); ``remat``: set ``config.model.remat`` ('none' / 'elementwise' / 'blocks' / 'full');
  ``trim``: return the compiler's freed heap to the OS after compiling, as the Trainer does
  (:func:`score_sde.host_memory.release_freed_memory`); ``profile_steps``: trace that many more
  steps (:func:`profile_parts`); ``jitted_steps``: updates per compiled call (the Trainer's
  ``config.training.n_jitted_steps``, :func:`score_sde.losses.get_multi_step_fn`): ``steps``,
  ``warmup`` and ``profile_steps`` are rounded up to whole calls, times are per update.
  """
  jitted_steps = int(jitted_steps)
  if jitted_steps < 1:
    raise ValueError(f"jitted_steps must be >= 1, got {jitted_steps}.")
  calls = lambda n: -(-int(n) // jitted_steps)  # whole compiled calls covering n updates
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
  # As the Trainer does: the step is compiled from the state's shapes before the state exists.
  make_state = lambda v: losses.init_train_state(config, v, jax.random.PRNGKey(seed + 1))
  abstract_state = jax.eval_shape(make_state, variables)
  n_params = int(sum(np.prod(p.shape) for p in jax.tree.leaves(abstract_state.params)))
  x = jax.random.uniform(jax.random.PRNGKey(seed + 2), shape, jnp.float32)
  x = 2 * x - 1 if config.data.centered else x
  step_fn = losses.get_train_step_fn(config, sde, model)
  if jitted_steps > 1:  # as the Trainer runs it; the same batch for every update
    step_fn = losses.get_multi_step_fn(step_fn, jitted_steps)
    x = jnp.broadcast_to(x, (jitted_steps,) + x.shape)

  step = jax.jit(step_fn, donate_argnums=(0,))
  t0 = time.perf_counter()
  lowered = step.lower(abstract_state, x)
  lower_s = time.perf_counter() - t0
  t0, c0 = time.perf_counter(), time.process_time()
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t0
  compile_cpu_s = time.process_time() - c0  # CPU seconds of all threads: robust to contention
  xla_memory = memory_analysis(compiled)
  temp_bytes = xla_memory.get("temp_size_in_bytes")
  rss_compiled = _rss_now()
  if trim:  # as the Trainer does after compiling the step: score_sde.host_memory
    host_memory.release_freed_memory()
  rss_trimmed = _rss_now()
  state = make_state(variables)
  if trim:
    host_memory.release_freed_memory()

  for _ in range(calls(warmup)):
    state, metrics = compiled(state, x)
  jax.block_until_ready(state)
  timed_calls = calls(steps)
  steps = timed_calls * jitted_steps
  t0 = time.perf_counter()
  for _ in range(timed_calls):
    state, metrics = compiled(state, x)
  jax.block_until_ready((state, metrics))
  run_s = time.perf_counter() - t0
  peak, source = peak_memory(device)
  profile = None
  if profile_steps:
    profile_calls = calls(profile_steps)

    def run():
      nonlocal state, metrics
      for _ in range(profile_calls):
        state, metrics = compiled(state, x)
      jax.block_until_ready((state, metrics))
    profile = profile_parts(compiled, run, profile_calls * jitted_steps)
  record = {
      "config": name, "network": config.model.name, "params": n_params, "dtype": dtype,
      "remat": str(config.model.get("remat", None) or "none"),
      "batch": batch, "steps": steps, "warmup": warmup, "jitted_steps": jitted_steps,
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
      "malloc_trim": bool(trim), "final_loss": float(np.ravel(metrics["loss"])[-1]),
      "loss_finite": bool(np.all(np.isfinite(metrics["loss"]))),
  }
  if profile is not None:
    record["profile"] = profile
  return record


def main(argv) -> None:
  common.no_arguments(argv)
  records = []
  for name, remat in [(n, m) for n in FLAGS.configs for m in FLAGS.remat]:
    r = benchmark(name, FLAGS.batch, FLAGS.steps, FLAGS.warmup, FLAGS.dtype, remat=remat,
                  profile_steps=FLAGS.profile_steps, jitted_steps=FLAGS.jitted_steps)
    records.append(r)
    mem = f"{r['peak_memory_bytes'] / 2**30:.2f} GiB ({r['peak_memory_source']})"
    print(f"{r['config']} [{r['network']}, {r['params'] / 1e6:.1f}M params, {r['dtype']}, "
          f"remat {r['remat']}, "
          f"{r['platform']}: {r['device']}] batch {r['batch']}: init {r['init_s']:.1f} s, "
          f"trace+lower {r['trace_lower_s']:.1f} s, compile {r['compile_s']:.1f} s "
          f"({r['compile_cpu_s']:.1f} CPU s, load {r['load_avg_1min']}), "
          f"{r['step_s']:.3f} s/step ({r['jitted_steps']} per call), "
          f"{r['images_per_s']:.1f} images/s, peak memory {mem}, "
          f"loss {r['final_loss']:.4g}", flush=True)
    if "profile" in r:
      for side in ("forward", "backward"):
        parts = r["profile"][side].items()
        print(f"  {side} ms per step: " + ", ".join(f"{k} {v}" for k, v in parts))
    common.write_result(FLAGS.out, records, say=False)  # after every config


if __name__ == "__main__":
  define_flags()
  app.run(main)
