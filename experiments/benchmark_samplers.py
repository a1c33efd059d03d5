"""Benchmark: sample quality vs NFE of every sampler in the registry, on an exact score.

The default score source is the exact score of a Gaussian mixture (score_sde.analytic), so all
error comes from the sampler. For each dimension, NFE and sampler we draw ``--num-samples``
samples and measure the energy distance (and the sliced Wasserstein distance) to true samples;
the noise floor is the same distance between independent true sample sets.

  python experiments/benchmark_samplers.py --dims 2,64 --nfes 10,20,50 --num-samples 2000 \
      --out docs/sampler_benchmark.json --plot-dir docs

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

from score_sde import analytic, metrics, sde_lib
from score_sde.sampling import available_samplers, get_sampler

# label -> (registry name, options). NFE is added per run ('pc' takes it as the SDE's N; 'ode'
# is adaptive and swept over tolerances instead).
SAMPLER_CONFIGS: dict[str, tuple[str, dict]] = {
    "ddim": ("ddim", {}),
    "euler (EDM)": ("euler", {}),
    "heun (EDM)": ("heun", {}),
    "dpm_solver-3S": ("dpm_solver", dict(order=3, method="singlestep")),
    "dpm_solver-2M": ("dpm_solver", dict(order=2, method="multistep")),
    "dpm_solver++2M": ("dpm_solver_pp", dict(order=2)),
    "dpm_solver++3M": ("dpm_solver_pp", dict(order=3)),
    "dpm_solver++2M-SDE": ("dpm_solver_pp", dict(order=2, eta=1.0)),
    "unipc-3 bh2": ("unipc", dict(order=3, variant="bh2")),
    "unipc-2 bh1": ("unipc", dict(order=2, variant="bh1")),
    "pc (euler_maruyama)": ("pc", {}),
    "ode (adaptive)": ("ode", {}),
}
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


def _run_one(name: str, options: dict, sde_name: str, nfe_or_tol, shape, source, key):
  """Returns (samples, nfe, seconds) or raises ValueError when the config does not apply."""
  if name == "pc":
    sde = make_sde(sde_name, N=int(nfe_or_tol))
    sampler = get_sampler("pc", sde, shape, **options)
  elif name == "ode":
    sde = make_sde(sde_name)
    sampler = get_sampler("ode", sde, shape, rtol=nfe_or_tol, atol=nfe_or_tol, **options)
  else:
    sde = make_sde(sde_name)
    sampler = get_sampler(name, sde, shape, nfe=int(nfe_or_tol), **options)
  score_fn = source.score_fn(sde)
  t0 = time.time()
  x, nfe = sampler(key, score_fn)
  x = jax.block_until_ready(x)
  return x, int(nfe), time.time() - t0


def benchmark(source, sde_name: str, nfes, num_samples: int, configs: dict,
              seed: int = 0, log: Callable[[str], None] = print) -> dict:
  """Runs every config at every NFE for one score source; returns a JSON-able dict."""
  shape = (num_samples,) + tuple(source.data_shape)
  key = jax.random.PRNGKey(seed)
  k_ref, k_floor, k_sample, k_sw = jax.random.split(key, 4)
  ref = source.sample(k_ref, num_samples)
  floors = [distance(k_sw, source.sample(k, num_samples), ref)
            for k in jax.random.split(k_floor, 3)]
  floor = {m: float(np.mean([f[m] for f in floors])) for m in floors[0]}
  log(f"  noise floor (mean of 3 true-vs-true): energy {floor['energy']:.3g}, "
      f"sliced W {floor['sliced_w']:.3g}")
  registered = set(available_samplers())
  results = {}
  for label, (name, options) in configs.items():
    if name not in registered:
      log(f"  {label}: sampler {name!r} not registered, skipped")
      continue
    rows = []
    grid = ODE_TOLERANCES if name == "ode" else nfes
    for v in grid:
      if name == "ode" and num_samples * math.prod(source.data_shape) > 4e6:
        break  # per-example adaptive solves are slow on CPU at this size
      try:
        # Common random numbers: every sampler starts from the same key.
        x, nfe, secs = _run_one(name, options, sde_name, v, shape, source, k_sample)
      except ValueError as e:  # e.g. NFE below the order
        log(f"  {label} @ {v}: skipped ({e})")
        continue
      d = distance(k_sw, x, ref)
      finite = bool(np.all(np.isfinite(np.asarray(x))))
      rows.append({"nfe": nfe, "setting": v, "seconds": round(secs, 2), "finite": finite, **d})
      log(f"  {label:22s} nfe={nfe:5d}  energy={d['energy']:.4g}  sliced_w={d['sliced_w']:.4g}"
          f"  ({secs:.1f}s)")
    results[label] = {"sampler": name, "options": options, "rows": rows}
  return {"floor": floor, "floors": floors, "num_samples": num_samples, "sde": sde_name,
          "data_shape": list(source.data_shape), "results": results}


def table(res: dict, nfes, metric: str = "energy") -> str:
  """A markdown table: rows = samplers, columns = NFE (the ODE row lists its own NFEs)."""
  head = "| sampler | " + " | ".join(str(n) for n in nfes) + " |"
  lines = [head, "|" + "---|" * (len(nfes) + 1)]
  for label, r in res["results"].items():
    if r["sampler"] == "ode":
      cells = ", ".join(f"{row[metric]:.3g} @ {row['nfe']}" for row in r["rows"])
      lines.append(f"| {label} | {cells} |" + " |" * (len(nfes) - 1))
      continue
    by = {row["setting"]: row for row in r["rows"]}
    cells = [f"{by[n][metric]:.3g}" if n in by else "-" for n in nfes]
    best = [n for n in nfes if n in by]
    lines.append(f"| {label} | " + " | ".join(cells) + " |")
  lines.append(f"| *floor (true vs true)* | " + " | ".join(
      f"{res['floor'][metric]:.3g}" for _ in nfes) + " |")
  return "\n".join(lines)


def plot(res: dict, path: str, title: str, metric: str = "energy") -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(7.5, 5))
  styles = ["-o", "-s", "-^", "-v", "-D", "-<", "->", "-p", "-h", "-*", "--o", "--s"]
  for i, (label, r) in enumerate(res["results"].items()):
    rows = sorted(r["rows"], key=lambda row: row["nfe"])
    if rows:
      ax.loglog([row["nfe"] for row in rows], [max(row[metric], 1e-7) for row in rows],
                styles[i % len(styles)], label=label, ms=4)
  ax.axhline(res["floor"][metric], color="k", ls=":", label="floor (true vs true)")
  ax.set_xlabel("NFE (score evaluations)")
  ax.set_ylabel({"energy": "energy distance to true samples",
                 "sliced_w": "sliced Wasserstein to true samples"}[metric])
  ax.set_title(title)
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(fontsize=7, ncol=2)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def _load_source(spec: Optional[str]):
  if not spec:
    return mixture_source
  mod, fn = spec.split(":")
  return getattr(importlib.import_module(mod), fn)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--dims", default="2,64", help="comma-separated data dimensions (784 = MNIST size)")
  p.add_argument("--nfes", default="5,10,20,35,50,100,1000")
  p.add_argument("--num-samples", type=int, default=4000)
  p.add_argument("--sde", default="vp", choices=sorted(SDE_NAMES))
  p.add_argument("--samplers", default="", help="comma-separated labels (default: all)")
  p.add_argument("--source", default="", help="module:function returning a score source")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default="", help="JSON output path")
  p.add_argument("--plot-dir", default="", help="write sampler_benchmark_<sde>_d<dim>.png here")
  args = p.parse_args(argv)
  dims = [int(d) for d in args.dims.split(",") if d]
  nfes = [int(n) for n in args.nfes.split(",") if n]
  configs = SAMPLER_CONFIGS
  if args.samplers:
    wanted = [s.strip() for s in args.samplers.split(",")]
    unknown = [w for w in wanted if w not in configs]
    if unknown:
      p.error(f"unknown sampler labels {unknown}; choose from {list(configs)}")
    configs = {w: configs[w] for w in wanted}
  make_source = _load_source(args.source)
  out = {"nfes": nfes, "sde": args.sde, "dims": {}}
  for dim in dims:
    print(f"== {args.sde.upper()} SDE, dim {dim}, {args.num_samples} samples ==", flush=True)
    res = benchmark(make_source(dim, args), args.sde, nfes, args.num_samples, configs, args.seed,
                    log=lambda s: print(s, flush=True))
    out["dims"][str(dim)] = res
    print(table(res, nfes), flush=True)
    if args.plot_dir:
      os.makedirs(args.plot_dir, exist_ok=True)
      path = os.path.join(args.plot_dir, f"sampler_benchmark_{args.sde}_d{dim}.png")
      plot(res, path, f"{args.sde.upper()} SDE, Gaussian mixture, d={dim}, "
                      f"n={args.num_samples}")
      print(f"wrote {path}")
    if args.out:  # rewrite after every dimension so partial runs keep their numbers
      with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
  return out


if __name__ == "__main__":
  main(sys.argv[1:])
