"""One command for the accelerator numbers: training, sampling, likelihood and Inception throughput.

  python -m experiments.benchmark_accelerator              # one GPU: about 8 minutes at most
  python -m experiments.benchmark_accelerator --smoke      # tiny sizes, any CPU, under a minute

Rows (in this order; each is written to the JSON as soon as it is done):

* ``train``: one full training update (DSM loss, backward, clipping, Adam, EMA;
  :func:`experiments.benchmark_networks.benchmark`) of DDPM++ cont.
  (``vp/cifar10_ddpmpp_continuous``) and deep NCSN++ cont. (``ve/cifar10_ncsnpp_deep_continuous``)
  at batch 128, ``config.model.dtype`` float32 and bfloat16, ``config.model.remat``
  'elementwise' (the configs' default), 'none' and 'blocks': images/s, trace + lower and XLA
  compile seconds, peak device memory
  (``device.memory_stats()['peak_bytes_in_use']``; a CPU reports the process's peak RSS instead)
  and XLA's ``memory_analysis()`` of the step.
* ``sample``: DDPM++ cont. (VP SDE), batch 256: PC with 1000 Euler-Maruyama steps and no corrector
  (the paper's VP setting) and DPM-Solver++ at 20 NFE; images/s of a second call (the first one
  compiles; its extra seconds are reported as compile time) and the NFE the sampler reports.
* ``likelihood``: the PF-ODE bits/dim (:func:`score_sde.likelihood.get_likelihood_fn`, dopri5,
  rtol = atol = 1e-5, Rademacher probe) of DDPM++ cont. on a batch of 16: seconds per image, NFE.
* ``inception``: the FID Inception-v3 (:func:`score_sde.evaluation.inception.get_inception_fn`,
  32 px uint8 resized to 299, ``precision='highest'``) at batch 256: images/s.

Every network has its random initial parameters (the cost of a step does not depend on the
weights, except the adaptive ODE solver's number of steps: compare its ``s_per_image_per_nfe``
with a trained model's NFE). Each row runs in a fresh subprocess by default (``--isolate``), so its
peak device memory is its own and a crash or hang is recorded, not fatal; rows that no longer fit
in ``--budget_s`` are recorded as skipped. ``--smoke`` shrinks every network (8 px, nf 16, two
levels of one block), every batch and step count and runs the rows in this process, on any CPU
(``tests/test_benchmark_accelerator.py`` checks its JSON).

Output: ``--out`` (default ``docs/results/accelerator_<device>.json``, ``..._smoke.json`` with
``--smoke``), holding the device name, jax version, the settings and every row.
"""
from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
import time
from typing import Any, Optional

from absl import app, flags

FLAGS = flags.FLAGS
TRAIN_CONFIGS = {"ddpmpp_cont": "vp.cifar10_ddpmpp_continuous",
                 "ncsnpp_deep_cont": "ve.cifar10_ncsnpp_deep_continuous"}
SAMPLE_CONFIG = "vp.cifar10_ddpmpp_continuous"
# (full, smoke) sizes
SIZES = {"train_batch": (128, 2), "train_steps": (10, 1), "train_warmup": (2, 1),
         "sample_batch": (256, 2), "pc_steps": (1000, 3), "dpm_nfe": (20, 3),
         "likelihood_batch": (16, 2), "inception_batch": (256, 2), "inception_iters": (10, 1),
         "inception_size": (299, 75)}


def define_flags(flag_values: flags.FlagValues = FLAGS) -> None:
  """Defines this script's flags on ``flag_values`` (called when the script runs)."""
  fv = dict(flag_values=flag_values)
  flags.DEFINE_bool("smoke", False, "Tiny networks and batches (runs on a CPU in < 1 min).", **fv)
  flags.DEFINE_string("out", None, "JSON path (default docs/results/accelerator_<device>.json).",
                      **fv)
  flags.DEFINE_bool("isolate", None, "Run each row in a fresh subprocess (default: yes, no with "
                    "--smoke).", **fv)
  flags.DEFINE_float("budget_s", 450.0, "Wall-clock budget; rows that would start after it are "
                     "recorded as skipped, a running isolated row is stopped at it.", **fv)
  flags.DEFINE_list("rows", None, "Only these row names (see --list_rows).", **fv)
  flags.DEFINE_bool("list_rows", False, "Print the row names and exit.", **fv)
  flags.DEFINE_string("row", None, "Internal: run this one row and print its JSON record.", **fv)


def size(name: str, smoke: bool) -> int:
  return SIZES[name][1 if smoke else 0]


def row_names() -> list[str]:
  """Every row, in the order they run: the training rows at the configs' own ``model.remat``
  ('elementwise') first, then sampling, Inception, the likelihood, then the training rows
  without remat ('none') and with whole-block remat ('blocks')."""
  train = lambda remat: [f"train/{net}/{dtype}/{remat}" for net in TRAIN_CONFIGS
                         for dtype in ("float32", "bfloat16")]
  return (train("elementwise") + ["sample/pc_1000", "sample/dpm_solver_pp_20", "inception",
                                  "likelihood/ode"] + train("none") + train("blocks"))


def device_info() -> dict:
  """The first device: kind, platform, device count, jax version, and ``name`` (its kind in lower
  case with each run of other characters as one '_', 'cpu' on a CPU) for the file name."""
  import jax
  d = jax.devices()[0]
  kind = d.device_kind if d.platform != "cpu" else "cpu"
  return {"device": str(d.device_kind), "platform": d.platform, "device_count": jax.device_count(),
          "jax": jax.__version__,
          "name": re.sub(r"[^a-z0-9]+", "_", str(kind).lower()).strip("_") or d.platform}


def load_config(name: str, smoke: bool):
  """``configs.<name>``; with ``smoke`` shrunk to an 8 px, nf 16 network of the same kind (same
  blocks, embedding, FIR and progressive settings; two levels of one block each)."""
  config = importlib.import_module(f"configs.{name}").get_config()
  if smoke:
    config.data.image_size = 8
    config.model.nf = 16
    config.model.ch_mult = (1, 2)
    config.model.num_res_blocks = 1
    config.model.attn_resolutions = (4,)
  return config


def _score_model(name: str, smoke: bool, seed: int = 0):
  """(config, sde, model, params, shape) of a randomly initialized network of ``configs.<name>``."""
  import jax
  from score_sde import sde_lib
  from score_sde.models import create_model
  from score_sde.utils import data_shape
  config = load_config(name, smoke)
  model, variables = create_model(config, jax.random.PRNGKey(seed))
  return config, sde_lib.get_sde(config), model, variables["params"], data_shape(config)


def _score_fn_of(config, sde, model):
  from score_sde.models import get_model_fn, get_score_fn
  from score_sde.utils import parametrization_of
  return lambda params: get_score_fn(sde, get_model_fn(model, params, train=False),
                                     continuous=config.training.continuous,
                                     parametrization=parametrization_of(config))


def _timed_twice(fn, *args) -> tuple[float, float, Any]:
  """(first call s, second call s, second output): the first call compiles and runs."""
  import jax
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))
  first = time.perf_counter() - t0
  t0 = time.perf_counter()
  out = jax.block_until_ready(fn(*args))
  return first, time.perf_counter() - t0, out


def _peak_device_bytes() -> tuple[Optional[int], str]:
  from experiments import benchmark_networks
  import jax
  return benchmark_networks.peak_memory(jax.devices()[0])


def run_train(net: str, dtype: str, remat: str, smoke: bool) -> dict:
  from experiments import benchmark_networks
  name = TRAIN_CONFIGS[net]
  config = load_config(name, smoke)
  return benchmark_networks.benchmark(name, size("train_batch", smoke), size("train_steps", smoke),
                                      size("train_warmup", smoke), dtype, config=config,
                                      remat=remat)


def run_sample(which: str, smoke: bool) -> dict:
  import jax
  from score_sde import sampling
  config, sde, model, params, shape = _score_model(SAMPLE_CONFIG, smoke)
  batch = size("sample_batch", smoke)
  if which == "pc_1000":
    sampler = sampling.get_sampler("pc", sde, (batch,) + shape, predictor="euler_maruyama",
                                   corrector="none", num_steps=size("pc_steps", smoke))
  else:
    sampler = sampling.get_sampler("dpm_solver_pp", sde, (batch,) + shape,
                                   nfe=size("dpm_nfe", smoke))
  score_of = _score_fn_of(config, sde, model)
  fn = jax.jit(lambda p, k: sampler(k, score_of(p)))
  first, second, (x, nfe) = _timed_twice(fn, params, jax.random.PRNGKey(1))
  peak, source = _peak_device_bytes()
  return {"config": SAMPLE_CONFIG, "batch": batch, "nfe": int(nfe),
          "compile_s": round(max(first - second, 0.0), 3), "run_s": round(second, 4),
          "images_per_s": round(batch / second, 3), "finite": bool(jax.numpy.isfinite(x).all()),
          "peak_memory_bytes": peak, "peak_memory_source": source}


def run_likelihood(smoke: bool) -> dict:
  import jax
  import jax.numpy as jnp
  from score_sde import likelihood
  config, sde, model, params, shape = _score_model(SAMPLE_CONFIG, smoke)
  batch = size("likelihood_batch", smoke)
  lik = likelihood.get_likelihood_fn(sde, rtol=1e-5, atol=1e-5, method="dopri5",
                                     hutchinson_type="rademacher")
  score_of = _score_fn_of(config, sde, model)
  fn = jax.jit(lambda p, k, x: lik(k, score_of(p), x))
  x = jax.random.uniform(jax.random.PRNGKey(2), (batch,) + shape, jnp.float32)
  x = 2 * x - 1 if config.data.centered else x
  first, second, (bpd, _, nfe) = _timed_twice(fn, params, jax.random.PRNGKey(3), x)
  nfe = int(jnp.max(nfe))
  peak, source = _peak_device_bytes()
  return {"config": SAMPLE_CONFIG, "batch": batch, "method": "dopri5", "rtol": 1e-5,
          "atol": 1e-5, "nfe": nfe, "compile_s": round(max(first - second, 0.0), 3),
          "run_s": round(second, 4), "s_per_image": round(second / batch, 5),
          "s_per_image_per_nfe": round(second / batch / max(nfe, 1), 7),
          "finite": bool(jnp.isfinite(bpd).all()), "peak_memory_bytes": peak,
          "peak_memory_source": source}


def run_inception(smoke: bool) -> dict:
  import jax
  import numpy as np
  from score_sde.evaluation import inception
  batch, iters = size("inception_batch", smoke), size("inception_iters", smoke)
  resize = size("inception_size", smoke)
  variables = jax.device_put(inception.init_inception(seed=0))
  fn = inception.get_inception_fn(variables, resize=True if resize == 299 else resize)
  images = jax.device_put(np.random.default_rng(0).integers(0, 256, (batch, 32, 32, 3),
                                                            dtype=np.uint8))
  first, _, _ = _timed_twice(fn, images)
  t0 = time.perf_counter()
  for _ in range(iters):
    out = fn(images)
  jax.block_until_ready(out)
  run_s = (time.perf_counter() - t0) / iters
  peak, source = _peak_device_bytes()
  return {"batch": batch, "input_size": resize, "weights": "random (same cost as the real ones)",
          "precision": "highest", "compile_and_first_call_s": round(first, 3),
          "batch_s": round(run_s, 4), "images_per_s": round(batch / run_s, 2),
          "finite": bool(np.isfinite(np.asarray(out["pool_3"])).all()),
          "peak_memory_bytes": peak, "peak_memory_source": source}


def run_row(row: str, smoke: bool) -> dict:
  """Runs one row in this process; returns its record (with 'row', 'seconds')."""
  t0 = time.perf_counter()
  kind, *rest = row.split("/")
  if kind == "train":
    record = run_train(*rest, smoke=smoke)
  elif kind == "sample":
    record = run_sample(rest[0], smoke)
  elif kind == "likelihood":
    record = run_likelihood(smoke)
  elif kind == "inception":
    record = run_inception(smoke)
  else:
    raise ValueError(f"Unknown row {row!r}; rows: {row_names()}")
  record.update(row=row, status="ok", seconds=round(time.perf_counter() - t0, 2),
                device_info=device_info())
  return record


def _run_isolated(row: str, smoke: bool, timeout: float) -> dict:
  """``row`` in a fresh ``python -m experiments.benchmark_accelerator --row`` subprocess."""
  cmd = [sys.executable, "-m", "experiments.benchmark_accelerator", f"--row={row}"]
  cmd += ["--smoke"] if smoke else []
  t0 = time.perf_counter()
  try:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
  except subprocess.TimeoutExpired:
    return {"row": row, "status": "timed out", "seconds": round(time.perf_counter() - t0, 1)}
  lines = [l for l in out.stdout.splitlines() if l.startswith("{")]
  if out.returncode != 0 or not lines:
    return {"row": row, "status": "failed", "returncode": out.returncode,
            "error": out.stderr[-2000:], "seconds": round(time.perf_counter() - t0, 1)}
  return json.loads(lines[-1])


def _describe(r: dict) -> str:
  if r.get("status") != "ok":
    return f"{r['row']}: {r.get('status')} ({r.get('error', '')[-200:].strip()})"
  mem = r.get("peak_memory_bytes")
  mem = f", peak {mem / 2**30:.2f} GiB" if mem else ""
  if r["row"].startswith("train"):
    return (f"{r['row']}: {r['images_per_s']:.1f} images/s, compile {r['compile_s']:.1f} s"
            f"{mem}, loss {r['final_loss']:.4g}")
  if r["row"].startswith("likelihood"):
    return f"{r['row']}: {r['s_per_image']:.4f} s/image at {r['nfe']} NFE{mem}"
  return f"{r['row']}: {r['images_per_s']:.1f} images/s{mem}"


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if FLAGS.list_rows:
    print("\n".join(row_names()))
    return
  if FLAGS.row:
    print(json.dumps(run_row(FLAGS.row, FLAGS.smoke)), flush=True)
    return
  from score_sde.utils import write_json
  rows = row_names()
  if FLAGS.rows:
    unknown = sorted(set(FLAGS.rows) - set(rows))
    if unknown:
      raise app.UsageError(f"Unknown --rows {unknown}; rows: {rows}")
    rows = [r for r in rows if r in FLAGS.rows]
  isolate = (not FLAGS.smoke) if FLAGS.isolate is None else FLAGS.isolate
  # With isolated rows this process never initializes a backend (on a GPU it would hold memory
  # the rows need): the device is taken from the first row that reports it.
  result = {"device": None, "platform": None, "device_count": None, "jax": None,
            "smoke": FLAGS.smoke, "isolated": isolate, "budget_s": FLAGS.budget_s,
            "sizes": {k: size(k, FLAGS.smoke) for k in SIZES}, "rows": []}
  out_path = FLAGS.out
  start = time.perf_counter()
  for row in rows:
    left = FLAGS.budget_s - (time.perf_counter() - start)
    if left <= 0:
      record = {"row": row, "status": "skipped (budget)"}
    elif isolate:
      record = _run_isolated(row, FLAGS.smoke, left)
    else:
      record = run_row(row, FLAGS.smoke)
    info = record.pop("device_info", None)
    if info and result["device"] is None:
      result.update({k: v for k, v in info.items() if k != "name"})
      out_path = out_path or os.path.join(
          "docs", "results", f"accelerator_{info['name']}{'_smoke' if FLAGS.smoke else ''}.json")
    result["rows"].append(record)
    result["total_s"] = round(time.perf_counter() - start, 1)
    if out_path:
      write_json(out_path, result)
    print(_describe(record), flush=True)
  out_path = out_path or os.path.join("docs", "results", "accelerator_unknown.json")
  write_json(out_path, result)
  print(f"wrote {out_path} ({result['total_s']} s)")


if __name__ == "__main__":
  define_flags()
  app.run(main)
