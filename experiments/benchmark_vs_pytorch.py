"""Side by side on one CPU: our DDPM++ cont. training step vs score_sde_pytorch's, same config.

Each side runs in a fresh subprocess (so one side's allocator, thread pools and compile caches never
touch the other's figures) that builds ``vp/cifar10_ddpmpp_continuous`` (61,804,419 parameters) and
runs its own full training update at ``--batch`` (default 8) on uniform random images in the
config's data range:

* **jax** (this framework): ``score_sde.losses.get_train_step_fn`` jitted with the state donated
  (DSM loss, backward, global-norm clipping, Adam, EMA), as ``experiments.benchmark_networks``
  builds it (``benchmark_networks.benchmark``), plus XLA's ``memory_analysis()`` of the step
  (argument / output / alias / temporary / generated-code bytes). ``--jitted_steps 5`` times the
  program the Trainer runs for this config (``config.training.n_jitted_steps = 5`` updates per
  compiled call, :func:`score_sde.losses.get_multi_step_fn`); the default 1 calls the step once
  per update, which pays XLA's per-call costs (its temporaries are fresh pages every call) on
  every update.
* **pytorch**: score_sde_pytorch's own ``losses.get_step_fn(sde, train=True, optimize_fn=
  losses.optimization_manager(config), ...)`` on ``state = dict(optimizer, model, ema, step)``
  exactly as its ``run_lib.train`` builds it (loss, ``backward``, ``clip_grad_norm_``, Adam,
  ``ExponentialMovingAverage.update``), with the reference's own config module. Nothing of it is
  copied here: the reference checkout is imported from ``--pytorch_repo`` (only its ``models``,
  ``losses``, ``sde_lib`` and ``configs``; no TensorFlow). Its ``op`` package builds CUDA kernels at
  import with ``torch.utils.cpp_extension.load``; the DDPM++ config never calls them (``fir=False``;
  on CPU ``upfirdn2d`` takes its native path anyway), so ``load`` is replaced by a stub first.

Per side and repeat: ``--warmup`` untimed steps (JAX: after compiling), then ``--steps`` timed
steps; images/s = batch * steps / seconds; peak memory = the child's peak resident set size
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``: everything, compiling included), also the RSS
after building and the RSS at the end. Sides alternate (jax, pytorch, jax, pytorch, ...) for
``--repeats`` rounds so both see the same machine load; the 1-minute load average is recorded with
every run. Ratios in the summary use the median of each side's repeats.

  pip install torch==2.13.0 --target /tmp/torchsite     # not a dependency of this project
  python -m experiments.benchmark_vs_pytorch --pytorch_repo /path/to/score_sde_pytorch \
      --torch_path /tmp/torchsite --out docs/results/vs_pytorch_cpu.json
  # one side only, printed as one JSON line (what the parent runs):
  python -m experiments.benchmark_vs_pytorch --side jax
"""
from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time

from absl import app, flags

FLAGS = flags.FLAGS
CONFIG = "vp.cifar10_ddpmpp_continuous"
SIDES = ("jax", "pytorch")


def define_flags(flag_values: flags.FlagValues = FLAGS) -> None:
  """Defines this script's flags on ``flag_values`` (called when the script runs)."""
  fv = dict(flag_values=flag_values)
  flags.DEFINE_enum("side", "both", ("both",) + SIDES, "Run both sides in fresh subprocesses "
                    "('both'), or one side in this process and print its record.", **fv)
  flags.DEFINE_integer("batch", 8, "Images per training step.", **fv)
  flags.DEFINE_integer("steps", 5, "Timed training steps per run.", **fv)
  flags.DEFINE_integer("warmup", 1, "Untimed steps before timing (JAX: after compiling).", **fv)
  flags.DEFINE_integer("repeats", 2, "Alternating rounds (jax, pytorch) per invocation.", **fv)
  flags.DEFINE_string("pytorch_repo", None, "A checkout of yang-song/score_sde_pytorch.", **fv)
  flags.DEFINE_string("torch_path", None, "A directory prepended to the PyTorch child's "
                      "PYTHONPATH (e.g. a 'pip install --target' of torch).", **fv)
  flags.DEFINE_list("xla_flags", [], "Extra XLA_FLAGS for the JAX child.", **fv)
  flags.DEFINE_bool("malloc_trim", True, "JAX side: give the compiler's freed heap back to the OS "
                    "after compiling, as the Trainer does (--nomalloc_trim: the old behaviour).",
                    **fv)
  flags.DEFINE_enum("remat", None, ["none", "elementwise", "blocks", "full"], "JAX side: "
                    "config.model.remat (None: the config's own).", **fv)
  flags.DEFINE_integer("profile_steps", 0, "Steps profiled after the timed ones (0: none): the "
                       "JAX side by program part (benchmark_networks --profile_steps), PyTorch's "
                       "by aten op (torch.profiler self CPU time).", lower_bound=0, **fv)
  flags.DEFINE_integer("jitted_steps", 1, "JAX side: updates per compiled call (lax.scan), as "
                       "the Trainer runs config.training.n_jitted_steps (5 for this config); "
                       "times are per update either way.", lower_bound=1, **fv)
  flags.DEFINE_string("label", "", "A note stored with the records (e.g. 'before').", **fv)
  flags.DEFINE_string("out", None, "Write the records and the summary as JSON here.", **fv)


def _rss_now() -> int:
  """Current resident set size in bytes (Linux /proc/self/statm)."""
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss() -> int:
  return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def run_jax(batch: int, steps: int, warmup: int, trim: bool = True,
            remat: str | None = None, profile_steps: int = 0, jitted_steps: int = 1) -> dict:
  """Our step, measured by :func:`experiments.benchmark_networks.benchmark` (float32; ``trim``:
  the compiler's freed heap is given back after compiling, as the Trainer does; ``remat``:
  ``config.model.remat``, None for the config's own; ``jitted_steps``: updates per compiled call,
  as the Trainer runs ``config.training.n_jitted_steps``)."""
  from experiments import benchmark_networks
  record = benchmark_networks.benchmark(CONFIG, batch, steps, warmup, "float32", trim=trim,
                                        remat=remat, profile_steps=profile_steps,
                                        jitted_steps=jitted_steps)
  record.update(side="jax", peak_rss_bytes=_peak_rss(), end_rss_bytes=_rss_now())
  return record


def run_pytorch(batch: int, steps: int, warmup: int, repo: str, profile_steps: int = 0) -> dict:
  """score_sde_pytorch's own train step, built as its ``run_lib.train`` builds it; with
  ``profile_steps`` also ``profile``: self CPU milliseconds per step of its 15 costliest aten ops
  and of all of them (``torch.profiler``)."""
  import importlib
  import torch
  import torch.utils.cpp_extension as cpp_extension
  cpp_extension.load = lambda *args, **kwargs: None  # op/ builds CUDA kernels at import
  for name in [m for m in sys.modules if m == "configs" or m.startswith("configs.")]:
    del sys.modules[name]  # this repository's configs package would shadow the reference's
  sys.path.insert(0, os.path.abspath(repo))
  config = importlib.import_module("configs.vp.cifar10_ddpmpp_continuous").get_config()
  config.device = torch.device("cpu")
  config.training.batch_size = batch
  losses = importlib.import_module("losses")
  sde_lib = importlib.import_module("sde_lib")
  mutils = importlib.import_module("models.utils")
  importlib.import_module("models.ncsnpp")  # registers 'ncsnpp'
  ema_lib = importlib.import_module("models.ema")

  torch.manual_seed(0)
  t0 = time.perf_counter()
  score_model = mutils.create_model(config)
  ema = ema_lib.ExponentialMovingAverage(score_model.parameters(), decay=config.model.ema_rate)
  optimizer = losses.get_optimizer(config, score_model.parameters())
  state = dict(optimizer=optimizer, model=score_model, ema=ema, step=0)
  sde = sde_lib.VPSDE(beta_min=config.model.beta_min, beta_max=config.model.beta_max,
                      N=config.model.num_scales)
  step_fn = losses.get_step_fn(sde, train=True, optimize_fn=losses.optimization_manager(config),
                               reduce_mean=config.training.reduce_mean,
                               continuous=config.training.continuous,
                               likelihood_weighting=config.training.likelihood_weighting)
  build_s = time.perf_counter() - t0
  n_params = sum(p.numel() for p in score_model.parameters())
  x = torch.rand((batch, config.data.num_channels, config.data.image_size,
                  config.data.image_size), generator=torch.Generator().manual_seed(2))
  x = 2 * x - 1 if config.data.centered else x
  rss_built = _rss_now()
  for _ in range(warmup):
    step_fn(state, x)
  t0 = time.perf_counter()
  for _ in range(steps):
    loss = step_fn(state, x)
  run_s = time.perf_counter() - t0
  profile = None
  if profile_steps:
    from torch.profiler import ProfilerActivity
    with torch.profiler.profile(activities=[ProfilerActivity.CPU]) as prof:
      for _ in range(profile_steps):
        step_fn(state, x)
    ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    per_step = lambda us: round(us / 1e3 / profile_steps, 1)
    profile = {"total_ms": per_step(sum(e.self_cpu_time_total for e in ops)),
               "ops_ms": {e.key: per_step(e.self_cpu_time_total) for e in ops[:15]}}
  return {"side": "pytorch", "profile": profile, "config": CONFIG, "params": int(n_params),
          "batch": batch,
          "steps": steps, "warmup": warmup, "torch": torch.__version__,
          "torch_threads": torch.get_num_threads(), "host_cpus": os.cpu_count(),
          "load_avg_1min": round(os.getloadavg()[0], 2), "build_s": round(build_s, 3),
          "step_s": round(run_s / max(steps, 1), 5),
          "images_per_s": round(batch * steps / run_s, 3), "rss_after_build_bytes": rss_built,
          "peak_rss_bytes": _peak_rss(), "end_rss_bytes": _rss_now(),
          "final_loss": float(loss)}


def _child(side: str) -> dict:
  """Runs one side in a fresh ``python -m`` subprocess; returns its JSON record."""
  cmd = [sys.executable, "-m", "experiments.benchmark_vs_pytorch", f"--side={side}",
         f"--batch={FLAGS.batch}", f"--steps={FLAGS.steps}", f"--warmup={FLAGS.warmup}",
         f"--profile_steps={FLAGS.profile_steps}"]
  env = dict(os.environ)
  if side == "pytorch":
    if not FLAGS.pytorch_repo:
      raise app.UsageError("--pytorch_repo (a score_sde_pytorch checkout) is needed for the "
                           "pytorch side; pass --side=jax to run ours only.")
    cmd.append(f"--pytorch_repo={FLAGS.pytorch_repo}")
    if FLAGS.torch_path:
      env["PYTHONPATH"] = os.pathsep.join(p for p in (FLAGS.torch_path, env.get("PYTHONPATH"))
                                          if p)
  else:
    cmd += [f"--malloc_trim={FLAGS.malloc_trim}", f"--jitted_steps={FLAGS.jitted_steps}"]
    if FLAGS.remat:
      cmd.append(f"--remat={FLAGS.remat}")
    env["JAX_PLATFORMS"] = env.get("JAX_PLATFORMS", "cpu")
    if FLAGS.xla_flags:
      env["XLA_FLAGS"] = " ".join([env.get("XLA_FLAGS", "")] + FLAGS.xla_flags).strip()
  out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
  lines = [l for l in out.stdout.splitlines() if l.startswith("{")]
  if out.returncode != 0 or not lines:
    raise RuntimeError(f"{side} child failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
  record = json.loads(lines[-1])
  if side == "jax" and FLAGS.xla_flags:
    record["xla_flags"] = list(FLAGS.xla_flags)
  return record


def summarize(records: list[dict]) -> dict:
  """Median images/s and peak RSS per side, and the ratios ours / PyTorch's."""
  out = {}
  for side in SIDES:
    rows = [r for r in records if r["side"] == side]
    if rows:
      out[side] = {"images_per_s": statistics.median(r["images_per_s"] for r in rows),
                   "peak_rss_gib": round(statistics.median(r["peak_rss_bytes"] for r in rows)
                                         / 2**30, 3), "runs": len(rows)}
  if len(out) == 2:
    out["throughput_ratio_jax_over_pytorch"] = round(
        out["jax"]["images_per_s"] / out["pytorch"]["images_per_s"], 3)
    out["memory_ratio_jax_over_pytorch"] = round(
        out["jax"]["peak_rss_gib"] / out["pytorch"]["peak_rss_gib"], 3)
  return out


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if FLAGS.side == "jax":
    print(json.dumps(run_jax(FLAGS.batch, FLAGS.steps, FLAGS.warmup, FLAGS.malloc_trim,
                             FLAGS.remat, FLAGS.profile_steps, FLAGS.jitted_steps)), flush=True)
    return
  if FLAGS.side == "pytorch":
    print(json.dumps(run_pytorch(FLAGS.batch, FLAGS.steps, FLAGS.warmup, FLAGS.pytorch_repo,
                                 FLAGS.profile_steps)), flush=True)
    return
  records = []
  sides = SIDES if FLAGS.pytorch_repo else ("jax",)
  for i in range(FLAGS.repeats):
    for side in sides:
      r = _child(side)
      r.update(repeat=i, label=FLAGS.label)
      records.append(r)
      print(f"[{i}] {side}: {r['images_per_s']:.3f} images/s ({r['step_s']:.2f} s/step), peak "
            f"RSS {r['peak_rss_bytes'] / 2**30:.2f} GiB, load {r['load_avg_1min']}", flush=True)
  summary = summarize(records)
  print(json.dumps(summary), flush=True)
  if FLAGS.out:
    from score_sde.utils import write_json
    write_json(FLAGS.out, {"label": FLAGS.label, "summary": summary, "records": records})
    print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
