"""Benchmark: sample quality vs NFE of every sampler in the registry, on an exact score.

The default score source is the exact score of a Gaussian mixture (score_sde.analytic), so all
error comes from the sampler. For each dimension, NFE and sampler we draw ``--num-samples``
samples and measure the energy distance (and the sliced Wasserstein distance) to true samples;
the noise floor is the same distance between independent true sample sets.

  python experiments/benchmark_samplers.py --dims 2,64,784 --sdes vp,ve \
      --out docs/results/samplers_gmm.json --plot-dir docs/figures

Another score (e.g. a trained checkpoint) plugs in with ``--source module:function``: the
function gets ``(dim, args)`` and returns an object with ``data_shape``, ``score_fn(sde) ->
score_fn(x, t)`` and ``sample(key, n) -> [n, *data_shape]`` reference samples (the interface of
:class:`score_sde.analytic.GaussianMixture`); or call :func:`benchmark` from Python.
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import sys
import time
from typing import Any, Callable, Optional

import jax
import numpy as np

from score_sde import analytic, sde_lib
from score_sde.evaluation import metrics
from score_sde.sampling import available_samplers, get_sampler
from score_sde.utils import write_json

# label -> (registry name, options). NFE is added per run ('pc' takes it as the SDE's N; 'ode'
# is adaptive and swept over tolerances instead).
SAMPLER_CONFIGS: dict[str, tuple[str, dict]] = {
    "ddim": ("ddim", {}),
    "euler (EDM)": ("euler", {}),
    "heun (EDM)": ("heun", {}),
    "dpm_solver-1": ("dpm_solver", dict(order=1)),
    "dpm_solver-2S": ("dpm_solver", dict(order=2, method="singlestep")),
    "dpm_solver-3S": ("dpm_solver", dict(order=3, method="singlestep")),
    "dpm_solver++2M": ("dpm_solver_pp", dict(order=2)),
    "dpm_solver++3M": ("dpm_solver_pp", dict(order=3)),
    "dpm_solver++2M-SDE": ("dpm_solver_pp", dict(order=2, eta=1.0)),
    "unipc-3 bh1": ("unipc", dict(order=3, variant="bh1")),
    "unipc-3 bh2": ("unipc", dict(order=3, variant="bh2")),
    "pc (euler_maruyama)": ("pc", {}),
    "ode (adaptive)": ("ode", {}),
}
# Samplers whose output is a deterministic function of x_T: their error against the exact
# PF-ODE solution from the same x_T (``ode_rmse``) is measured too, free of sampling noise.
STOCHASTIC = ("dpm_solver++2M-SDE", "pc (euler_maruyama)")
ODE_TOLERANCES = (1e-1, 3e-2, 1e-2, 1e-3, 1e-4, 1e-5)
SDE_NAMES = {"vp": sde_lib.VPSDE, "subvp": sde_lib.subVPSDE, "ve": sde_lib.VESDE}


def make_sde(name: str, N: int = 1000) -> sde_lib.SDE:
  return SDE_NAMES[name](N=N)


def mixture_source(dim: int, args: Any = None) -> analytic.GaussianMixture:
  """The default score source: 4 components in 2-D / 64-D, 10 in 784-D shaped (28, 28, 1)."""
  if dim == 784:
    return analytic.standard_mixture(784, num_components=10, radius=4.0, std=0.3, seed=0,
                                     data_shape=(28, 28, 1))
  return analytic.standard_mixture(dim, num_components=4, radius=2.0, std=0.3, seed=0)


def distance(key, x, y) -> dict[str, float]:
  n = min(x.shape[0], y.shape[0])
  return {"energy": float(metrics.energy_distance(x, y)),
          "sliced_w": float(metrics.sliced_wasserstein(key, x[:n], y[:n]))}


def _run_one(name: str, options: dict, sde_name: str, nfe_or_tol, shape, source, key, x_T):
  """Returns (samples, nfe, seconds) or raises ValueError when the config does not apply.

  Every sampler that takes a starting point gets the same ``x_T`` (common random numbers); the
  PC sampler draws its own from ``key``.
  """
  if name == "pc":
    sde = make_sde(sde_name, N=int(nfe_or_tol))
    sampler = get_sampler("pc", sde, shape, **options)
    args = ()
  elif name == "ode":
    sde = make_sde(sde_name)
    sampler = get_sampler("ode", sde, shape, rtol=nfe_or_tol, atol=nfe_or_tol, **options)
    args = (x_T,)
  else:
    sde = make_sde(sde_name)
    sampler = get_sampler(name, sde, shape, nfe=int(nfe_or_tol), **options)
    args = (x_T,)
  score_fn = source.score_fn(sde)
  t0 = time.time()
  x, nfe = sampler(key, score_fn, *args)
  x = jax.block_until_ready(x)
  return x, int(nfe), time.time() - t0


def exact_ode_solution(source, sde_name: str, x_T, tol: float = 1e-6):
  """The PF-ODE solution from x_T to eps by the adaptive solver at a tight tolerance."""
  sde = make_sde(sde_name)
  sampler = get_sampler("ode", sde, tuple(x_T.shape), rtol=tol, atol=tol)
  x, nfe = sampler(jax.random.PRNGKey(0), source.score_fn(sde), x_T)
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
  key = jax.random.PRNGKey(seed)
  k_ref, k_floor, k_sample, k_sw, k_T = jax.random.split(key, 5)
  ref = source.sample(k_ref, num_samples)
  floors = [distance(k_sw, source.sample(k, num_samples), ref)
            for k in jax.random.split(k_floor, 3)]
  floor = {m: float(np.mean([f[m] for f in floors])) for m in floors[0]}
  log(f"  noise floor (mean of 3 true-vs-true): energy {floor['energy']:.3g}, "
      f"sliced W {floor['sliced_w']:.3g}")
  x_T = make_sde(sde_name).prior_sampling(k_T, shape)
  t0 = time.time()
  x_exact, nfe_exact = exact_ode_solution(source, sde_name, x_T)
  exact = {"nfe": nfe_exact, "seconds": round(time.time() - t0, 2), **distance(k_sw, x_exact, ref)}
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
        x, nfe, secs = _run_one(name, options, sde_name, v, shape, source, k_sample, x_T)
      except ValueError as e:  # e.g. NFE below the order
        log(f"  {label} @ {v}: skipped ({e})")
        continue
      d = distance(k_sw, x, ref)
      if label not in STOCHASTIC:
        d["ode_rmse"] = rms_error(x, x_exact)
      finite = bool(np.all(np.isfinite(np.asarray(x))))
      rows.append({"nfe": nfe, "setting": v, "seconds": round(secs, 2), "finite": finite, **d})
      log(f"  {label:22s} nfe={nfe:5d}  energy={d['energy']:.4g}  sliced_w={d['sliced_w']:.4g}"
          + (f"  ode_rmse={d['ode_rmse']:.3g}" if "ode_rmse" in d else "") + f"  ({secs:.1f}s)")
    results[label] = {"sampler": name, "options": options, "rows": rows}
  return {"floor": floor, "floors": floors, "exact_ode": exact, "num_samples": num_samples,
          "sde": sde_name, "data_shape": list(source.data_shape), "results": results}


def table(res: dict, nfes, metric: str = "energy") -> str:
  """A markdown table: rows = samplers, columns = NFE (the ODE row lists its own NFEs)."""
  head = "| sampler | " + " | ".join(str(n) for n in nfes) + " |"
  lines = [head, "|" + "---|" * (len(nfes) + 1)]
  for label, r in res["results"].items():
    rows = [row for row in r["rows"] if metric in row]
    if not rows:
      continue
    if r["sampler"] == "ode":
      cells = ", ".join(f"{row[metric]:.3g} @ {row['nfe']}" for row in rows)
      lines.append(f"| {label} | {cells} |" + " |" * (len(nfes) - 1))
      continue
    by = {row["setting"]: row for row in rows}
    cells = [f"{by[n][metric]:.3g}" if n in by else "-" for n in nfes]
    lines.append(f"| {label} | " + " | ".join(cells) + " |")
  if metric in res["floor"]:
    lines.append("| *floor (true vs true)* | " + " | ".join(
        f"{res['floor'][metric]:.3g}" for _ in nfes) + " |")
    lines.append("| *exact PF-ODE solution* | " + " | ".join(
        f"{res['exact_ode'][metric]:.3g}" for _ in nfes) + " |")
  return "\n".join(lines)


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
  fig.savefig(path, dpi=100)
  plt.close(fig)


def _load_source(spec: Optional[str]):
  if not spec:
    return mixture_source
  mod, fn = spec.split(":")
  return getattr(importlib.import_module(mod), fn)


def _per_dim(spec: str, dims: list[int]) -> dict[int, int]:
  """'4000' or '2:8000,64:4000,784:1000' -> {dim: num_samples}."""
  if ":" not in spec:
    return {d: int(spec) for d in dims}
  table_ = {int(k): int(v) for k, v in (item.split(":") for item in spec.split(","))}
  missing = [d for d in dims if d not in table_]
  if missing:
    raise SystemExit(f"--num-samples gives no count for dims {missing}")
  return table_


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--dims", default="2,64,784", help="comma-separated data dimensions "
                 "(784 = MNIST size, shaped 28x28x1)")
  p.add_argument("--nfes", default="5,10,20,35,50,100,1000")
  p.add_argument("--num-samples", default="2:4000,64:2000,784:1000",
                 help="one count, or dim:count pairs")
  p.add_argument("--sdes", default="vp,ve", help=f"comma-separated, from {sorted(SDE_NAMES)}")
  p.add_argument("--samplers", default="", help="comma-separated labels (default: all)")
  p.add_argument("--source", default="", help="module:function returning a score source")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default="", help="JSON output path (e.g. docs/results/samplers_gmm.json)")
  p.add_argument("--plot-dir", default="", help="write samplers_<sde>_d<dim>.png here "
                 "(e.g. docs/figures)")
  p.add_argument("--from-json", default="", help="only print the tables and redraw the plots of "
                 "a saved result (no sampling)")
  args = p.parse_args(argv)
  if args.from_json:
    with open(args.from_json) as f:
      saved = json.load(f)
    for run, res in saved["runs"].items():
      print(f"== {run} ({res['num_samples']} samples) ==")
      for metric in ("energy", "ode_rmse"):
        print(f"\n{METRIC_LABELS[metric]}:\n" + table(res, saved["nfes"], metric) + "\n")
      if args.plot_dir:
        path = os.path.join(args.plot_dir, f"samplers_{run}.png")
        plot(res, path, f"{res['sde'].upper()} SDE, exact Gaussian-mixture score, "
                        f"d={math.prod(res['data_shape'])}, n={res['num_samples']}")
        print(f"wrote {path}")
    return saved
  dims = [int(d) for d in args.dims.split(",") if d]
  nfes = [int(n) for n in args.nfes.split(",") if n]
  sdes = [s for s in args.sdes.split(",") if s]
  bad = [s for s in sdes if s not in SDE_NAMES]
  if bad:
    p.error(f"unknown SDEs {bad}; choose from {sorted(SDE_NAMES)}")
  counts = _per_dim(args.num_samples, dims)
  configs = SAMPLER_CONFIGS
  if args.samplers:
    wanted = [s.strip() for s in args.samplers.split(",")]
    unknown = [w for w in wanted if w not in configs]
    if unknown:
      p.error(f"unknown sampler labels {unknown}; choose from {list(configs)}")
    configs = {w: configs[w] for w in wanted}
  make_source = _load_source(args.source)
  out = {"nfes": nfes, "runs": {}, "jax": jax.__version__, "backend": jax.default_backend()}
  t_start = time.time()
  for sde_name in sdes:
    for dim in dims:
      n = counts[dim]
      print(f"== {sde_name.upper()} SDE, dim {dim}, {n} samples ==", flush=True)
      res = benchmark(make_source(dim, args), sde_name, nfes, n, configs, args.seed,
                      log=lambda s: print(s, flush=True))
      out["runs"][f"{sde_name}_d{dim}"] = res
      for metric in ("energy", "ode_rmse"):
        print(f"\n{METRIC_LABELS[metric]}:\n" + table(res, nfes, metric) + "\n", flush=True)
      if args.plot_dir:
        os.makedirs(args.plot_dir, exist_ok=True)
        path = os.path.join(args.plot_dir, f"samplers_{sde_name}_d{dim}.png")
        plot(res, path, f"{sde_name.upper()} SDE, exact Gaussian-mixture score, d={dim}, n={n}")
        print(f"wrote {path}", flush=True)
      if args.out:  # rewrite after every run so partial runs keep their numbers
        out["seconds"] = round(time.time() - t_start, 1)
        write_json(args.out, out)
  return out


if __name__ == "__main__":
  main(sys.argv[1:])
