"""Benchmark: what starting a fast sampler below T (option ``t_start``) does on an exact score.

The exact Gaussian-mixture score of ``benchmark_samplers.py`` (same mixtures, reference samples,
noise floor and energy distance), so only the start-time choice differs between rows: for each SDE,
sampler, NFE and t_start the energy distance of ``--num-samples`` samples to true samples. The
prior draw x_T is the same for every row; below T it is scaled by ``start_scale`` (1 on VP).

  python experiments/benchmark_start_time.py --sdes vp,ve --dims 64 --nfes 10,20 \
      --t-starts 1,0.9,0.8 --out docs/results/start_time_exact.json
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchmark_samplers as bs  # noqa: E402

from score_sde.sampling import get_sampler  # noqa: E402
from score_sde.utils import write_json  # noqa: E402

CONFIGS = {
    "dpm_solver++2M": ("dpm_solver_pp", dict(order=2)),
    "unipc-3 bh2": ("unipc", dict(order=3, variant="bh2")),
    "dpm_solver++2M-SDE edm +denoise": ("dpm_solver_pp", dict(order=2, eta=1.0, schedule="edm",
                                                              denoise=True)),
}


def run(sde_name: str, dim: int, nfes, t_starts, num_samples: int, seed: int = 0,
        log=print) -> dict:
  """Energy distance to true samples per (config, NFE, t_start); t_start = T means the default."""
  source = bs.mixture_source(dim)
  sde = bs.make_sde(sde_name)
  shape = (num_samples,) + tuple(source.data_shape)
  k_ref, k_floor, k_sample, k_sw, k_T = jax.random.split(jax.random.PRNGKey(seed), 5)
  ref = source.sample(k_ref, num_samples)
  floor = float(np.mean([bs.distance(k_sw, source.sample(k, num_samples), ref)["energy"]
                         for k in jax.random.split(k_floor, 3)]))
  x_T = sde.prior_sampling(k_T, shape)
  score_fn = source.score_fn(sde)
  rows = []
  for label, (name, options) in CONFIGS.items():
    for nfe in nfes:
      for t_start in t_starts:
        sampler = get_sampler(name, sde, shape, nfe=nfe, t_start=min(t_start, sde.T), **options)
        t0 = time.time()
        x, used = sampler(k_sample, score_fn, x_T)
        energy = bs.distance(k_sw, jax.block_until_ready(x), ref)["energy"]
        rows.append({"sampler": label, "nfe": int(used), "t_start": float(t_start),
                     "energy": energy, "seconds": round(time.time() - t0, 2)})
        log(f"  {label:32s} nfe={used:3d} t_start={t_start:<5g} energy={energy:.4g}")
  return {"sde": sde_name, "dim": dim, "num_samples": num_samples, "floor": floor, "rows": rows}


def table(res: dict) -> str:
  t_starts = sorted({r["t_start"] for r in res["rows"]}, reverse=True)
  lines = ["| sampler | NFE | " + " | ".join(f"t_start = {t:g}" for t in t_starts) + " |",
           "|---|---:|" + "---:|" * len(t_starts)]
  cells = {(r["sampler"], r["nfe"], r["t_start"]): r["energy"] for r in res["rows"]}
  for label, nfe in dict.fromkeys((r["sampler"], r["nfe"]) for r in res["rows"]):
    lines.append(f"| {label} | {nfe} | " + " | ".join(f"{cells[label, nfe, t]:.3g}"
                                                     for t in t_starts) + " |")
  lines.append("| *floor (true vs true)* | | " + " | ".join(f"{res['floor']:.3g}"
                                                              for _ in t_starts) + " |")
  return "\n".join(lines)


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--sdes", default="vp,ve")
  p.add_argument("--dims", default="64")
  p.add_argument("--nfes", default="10,20")
  p.add_argument("--t-starts", default="1,0.9,0.8", help="start times; values >= T mean T")
  p.add_argument("--num-samples", type=int, default=2000)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default="", help="JSON output path")
  args = p.parse_args(argv)
  parse = lambda s, f: [f(v) for v in s.split(",") if v]
  out = {"runs": {}, "jax": jax.__version__}
  for sde_name in parse(args.sdes, str):
    if sde_name not in bs.SDE_NAMES:
      p.error(f"unknown SDE {sde_name!r}; choose from {sorted(bs.SDE_NAMES)}")
    for dim in parse(args.dims, int):
      print(f"== {sde_name.upper()} SDE, dim {dim}, {args.num_samples} samples ==", flush=True)
      res = run(sde_name, dim, parse(args.nfes, int), parse(args.t_starts, float),
                args.num_samples, args.seed, log=lambda m: print(m, flush=True))
      out["runs"][f"{sde_name}_d{dim}"] = res
      print("\nenergy distance to true samples:\n" + table(res) + "\n", flush=True)
      if args.out:
        write_json(args.out, out)
  return out


if __name__ == "__main__":
  main()
