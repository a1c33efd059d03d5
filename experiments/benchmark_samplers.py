"""Benchmark: sample quality vs NFE of every sampler in the registry, on an exact score.

The default score source is the exact score of a Gaussian mixture (score_sde.analytic), so all
error comes from the sampler. For each dimension, NFE and sampler we draw ``--num-samples``
samples and measure the energy distance (and the sliced Wasserstein distance) to true samples;
the noise floor is the same distance between independent true sample sets. Every sampler starts
from the same prior draw x_T except the PC row, which draws its own from the sampling key (as the
published results did; ``common.OWN_PRIOR_DRAW``).

  python -m experiments.benchmark_samplers --dims 2,64,784 --sdes vp,ve \
      --out docs/results/samplers_gmm.json --plot-dir docs/figures

Another score (e.g. a trained checkpoint) plugs in with ``--source module:function``: the
function gets ``(dim, flag_values)`` and returns an object with ``data_shape``, ``score_fn(sde) ->
score_fn(x, t)`` and ``sample(key, n) -> [n, *data_shape]`` reference samples (the interface of
:class:`score_sde.analytic.GaussianMixture`); or call :func:`benchmark` from Python.
"""
from __future__ import annotations

import importlib
import json
import math
import os
import time
from typing import Callable, Optional

import jax
import numpy as np
from absl import app, flags

from experiments import common
from experiments.common import SAMPLER_CONFIGS, STOCHASTIC
from score_sde.sampling import available_samplers, get_sampler

FLAGS = flags.FLAGS
ODE_TOLERANCES = (1e-1, 3e-2, 1e-2, 1e-3, 1e-4, 1e-5)


def define_flags(flag_values: flags.FlagValues = FLAGS) -> None:
  """Defines this script's flags on ``flag_values``. Called when the script runs, so that importing
  the module defines no flags."""
  fv = dict(flag_values=flag_values)
  flags.DEFINE_list("dims", ["2", "64", "784"], "Data dimensions (784 = MNIST size, shaped "
                    "28x28x1).", **fv)
  flags.DEFINE_list("nfes", ["5", "10", "20", "35", "50", "100", "1000"], "NFE grid.", **fv)
  flags.DEFINE_string("num-samples", "2:4000,64:2000,784:1000", "One count, or dim:count pairs.",
                      **fv)
  flags.DEFINE_list("sdes", ["vp", "ve"], f"SDEs, from {sorted(common.SDE_NAMES)}.", **fv)
  flags.DEFINE_list("samplers", [], "Sampler labels of common.SAMPLER_CONFIGS (default: all).",
                    **fv)
  flags.DEFINE_string("source", "", "module:function returning a score source (default: "
                      "common.mixture_source).", **fv)
  flags.DEFINE_integer("seed", 0, "Seed of the reference samples, x_T and the sampler noise.", **fv)
  flags.DEFINE_string("out", "", "JSON output path (e.g. docs/results/samplers_gmm.json).", **fv)
  flags.DEFINE_string("plot-dir", "", "Write samplers_<sde>_d<dim>.png here (e.g. docs/figures).",
                      **fv)
  flags.DEFINE_string("from-json", "", "Only print the tables and redraw the plots of a saved "
                      "result (no sampling).", **fv)


def _run_one(label: str, name: str, options: dict, sde, setting, shape, score_fn, key, x_T):
  """(samples, nfe, seconds) of one grid row at one setting; ValueError when it cannot run.

  Every row starts from the same ``x_T`` (common random numbers) except those of
  common.OWN_PRIOR_DRAW, which draw their own from ``key`` as in the published results.
  """
  sampler = common.build_sampler(name, options, sde, shape, setting)
  t0 = time.time()
  x, nfe = sampler(key, score_fn, common.start_point(label, x_T))
  x = jax.block_until_ready(x)
  return x, int(nfe), time.time() - t0


def exact_ode_solution(sde, score_fn, x_T, tol: float = 1e-6):
  """The PF-ODE solution from x_T to eps by the adaptive solver at a tight tolerance."""
  sampler = get_sampler("ode", sde, tuple(x_T.shape), rtol=tol, atol=tol)
  x, nfe = sampler(jax.random.PRNGKey(0), score_fn, x_T)
  return jax.block_until_ready(x), int(nfe)


def rms_error(x, y) -> float:
  """sqrt(mean_i ||x_i - y_i||^2 / D): per-coordinate RMS distance of paired samples."""
  d = np.asarray(x, np.float64).reshape(x.shape[0], -1) - np.asarray(y, np.float64).reshape(
      y.shape[0], -1)
  return float(np.sqrt(np.mean(d**2)))


def benchmark(source, sde_name: str, nfes, num_samples: int, configs: dict,
              seed: int = 0, log: Callable[[str], None] = print) -> dict:
  """Runs every config at every NFE for one score source; returns a JSON-able dict."""
  shape = (num_samples,) + tuple(source.data_shape)
  k_ref, k_floor, k_sample, k_sw, k_T = jax.random.split(jax.random.PRNGKey(seed), 5)
  ref, floor, floors = common.reference_and_floor(source, num_samples, k_ref, k_floor, k_sw)
  log(f"  noise floor (mean of 3 true-vs-true): energy {floor['energy']:.3g}, "
      f"sliced W {floor['sliced_w']:.3g}")
  sde = common.make_sde(sde_name)
  score_fn = source.score_fn(sde)
  x_T = sde.prior_sampling(k_T, shape)
  t0 = time.time()
  x_exact, nfe_exact = exact_ode_solution(sde, score_fn, x_T)
  exact = {"nfe": nfe_exact, "seconds": round(time.time() - t0, 2),
           **common.distances(k_sw, x_exact, ref)}
  log(f"  exact PF-ODE solution (rtol = atol = 1e-6, {nfe_exact} NFE): energy "
      f"{exact['energy']:.3g}, sliced W {exact['sliced_w']:.3g}")
  registered = set(available_samplers())
  results = {}
  for label, (name, options) in configs.items():
    if name not in registered:
      log(f"  {label}: sampler {name!r} not registered, skipped")
      continue
    rows = []
    grid = ODE_TOLERANCES if name == "ode" else nfes
    for v in grid:
      try:
        x, nfe, secs = _run_one(label, name, options, sde, v, shape, score_fn, k_sample, x_T)
      except ValueError as e:  # e.g. NFE below the order
        log(f"  {label} @ {v}: skipped ({e})")
        continue
      d = common.distances(k_sw, x, ref)
      if label not in STOCHASTIC:
        d["ode_rmse"] = rms_error(x, x_exact)
      finite = bool(np.all(np.isfinite(np.asarray(x))))
      rows.append({"nfe": nfe, "setting": v, "seconds": round(secs, 2), "finite": finite, **d})
      log(f"  {label:22s} nfe={nfe:5d}  energy={d['energy']:.4g}  sliced_w={d['sliced_w']:.4g}"
          + (f"  ode_rmse={d['ode_rmse']:.3g}" if "ode_rmse" in d else "") + f"  ({secs:.1f}s)")
    results[label] = {"sampler": name, "options": options, "rows": rows}
  return {"floor": floor, "floors": floors, "exact_ode": exact, "num_samples": num_samples,
          "sde": sde_name, "data_shape": list(source.data_shape), "results": results}


METRIC_LABELS = {"energy": "energy distance to true samples",
                 "sliced_w": "sliced Wasserstein distance to true samples",
                 "ode_rmse": "RMS error vs the exact PF-ODE solution (same x_T)"}


def plot(res: dict, path: str, title: str, metrics_: tuple[str, ...] = ("energy", "ode_rmse")):
  """Error vs NFE, one line per sampler, log-log; one panel per metric."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, len(metrics_), figsize=(6.5 * len(metrics_), 5), squeeze=False)
  styles = ["-o", "-s", "-^", "-v", "-D", "-<", "->", "-p", "-h", "-*", "--o", "--s", "--^",
            "--v", "--D"]
  for ax, metric in zip(axes[0], metrics_):
    for i, (label, r) in enumerate(res["results"].items()):
      rows = sorted([row for row in r["rows"] if metric in row], key=lambda row: row["nfe"])
      if rows:
        ax.loglog([row["nfe"] for row in rows], [max(row[metric], 1e-7) for row in rows],
                  styles[i % len(styles)], label=label, ms=4, lw=1.2)
    if metric in res["floor"]:
      ax.axhline(res["floor"][metric], color="k", ls=":", label="floor (true vs true)")
      ax.axhline(res["exact_ode"][metric], color="gray", ls="--", lw=0.8,
                 label="exact PF-ODE solution")
    ax.set_xlabel("NFE (score evaluations)")
    ax.set_ylabel(METRIC_LABELS[metric])
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
  fig.suptitle(title)
  fig.tight_layout()
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  fig.savefig(path, dpi=100)
  plt.close(fig)


def report(res: dict, nfes, run: str, plot_dir: str) -> None:
  """Prints the energy and ODE-error tables of one run; draws its figure into ``plot_dir``."""
  for metric in ("energy", "ode_rmse"):
    common.log(f"\n{METRIC_LABELS[metric]}:\n" + common.table(res, nfes, metric) + "\n")
  if plot_dir:
    path = os.path.join(plot_dir, f"samplers_{run}.png")
    plot(res, path, f"{res['sde'].upper()} SDE, exact Gaussian-mixture score, "
                    f"d={math.prod(res['data_shape'])}, n={res['num_samples']}")
    common.log(f"wrote {path}")


def _load_source(spec: Optional[str]):
  if not spec:
    return common.mixture_source
  mod, fn = spec.split(":")
  return getattr(importlib.import_module(mod), fn)


def main(argv) -> None:
  common.no_arguments(argv)
  plot_dir = FLAGS["plot-dir"].value
  if FLAGS["from-json"].value:
    with open(FLAGS["from-json"].value) as f:
      saved = json.load(f)
    for run, res in saved["runs"].items():
      common.log(f"== {run} ({res['num_samples']} samples) ==")
      report(res, saved["nfes"], run, plot_dir)
    return
  dims, nfes = common.ints(FLAGS.dims), common.ints(FLAGS.nfes)
  sdes = common.check_sde_names(FLAGS.sdes)
  counts = common.per_dim_counts(FLAGS["num-samples"].value, dims)
  unknown = [w for w in FLAGS.samplers if w not in SAMPLER_CONFIGS]
  if unknown:
    raise app.UsageError(f"Unknown sampler labels {unknown}; choose from {list(SAMPLER_CONFIGS)}.")
  configs = {w: SAMPLER_CONFIGS[w] for w in FLAGS.samplers or SAMPLER_CONFIGS}
  make_source = _load_source(FLAGS.source)
  out = {"nfes": nfes, "runs": {}, "jax": jax.__version__, "backend": jax.default_backend()}
  t_start = time.time()
  for sde_name in sdes:
    for dim in dims:
      n = counts[dim]
      common.log(f"== {sde_name.upper()} SDE, dim {dim}, {n} samples ==")
      res = benchmark(make_source(dim, FLAGS), sde_name, nfes, n, configs, FLAGS.seed,
                      log=common.log)
      out["runs"][f"{sde_name}_d{dim}"] = res
      report(res, nfes, f"{sde_name}_d{dim}", plot_dir)
      out["seconds"] = round(time.time() - t_start, 1)
      common.write_result(FLAGS.out, out, say=False)  # after every run: partial runs keep theirs


if __name__ == "__main__":
  define_flags()
  app.run(main)
