"""Benchmark: what starting a fast sampler below T (option ``t_start``) does on an exact score.

The exact Gaussian-mixture score of ``benchmark_samplers`` (``common.mixture_source``: same
mixtures, reference samples, noise floor and energy distance), so only the start-time choice
differs between rows: for each SDE, sampler, NFE and t_start the energy distance of
``--num-samples`` samples to true samples. The prior draw x_T is the same for every row; below T it
is scaled by ``start_scale`` (1 on VP).

  python -m experiments.benchmark_start_time --sdes vp,ve --dims 64 --nfes 10,20 \
      --t-starts 1,0.9,0.8 --out docs/results/start_time_exact.json
"""
from __future__ import annotations

import time

import jax
from absl import app, flags

from experiments import common
from score_sde.sampling import get_sampler

FLAGS = flags.FLAGS
CONFIGS = {
    "dpm_solver++2M": ("dpm_solver_pp", dict(order=2)),
    "unipc-3 bh2": ("unipc", dict(order=3, variant="bh2")),
    "dpm_solver++2M-SDE edm +denoise": ("dpm_solver_pp", dict(order=2, eta=1.0, schedule="edm",
                                                              denoise=True)),
}


def define_flags(flag_values: flags.FlagValues = FLAGS) -> None:
  """Defines this script's flags on ``flag_values``. Called when the script runs, so that importing
  the module defines no flags."""
  fv = dict(flag_values=flag_values)
  flags.DEFINE_list("sdes", ["vp", "ve"], f"SDEs, from {sorted(common.SDE_NAMES)}.", **fv)
  flags.DEFINE_list("dims", ["64"], "Data dimensions.", **fv)
  flags.DEFINE_list("nfes", ["10", "20"], "NFE grid.", **fv)
  flags.DEFINE_list("t-starts", ["1", "0.9", "0.8"], "Start times; values >= T mean T.", **fv)
  flags.DEFINE_integer("num-samples", 2000, "Samples per row.", **fv)
  flags.DEFINE_integer("seed", 0, "Seed of the reference samples, x_T and the sampler noise.", **fv)
  flags.DEFINE_string("out", "", "JSON output path.", **fv)


def run(sde_name: str, dim: int, nfes, t_starts, num_samples: int, seed: int = 0,
        log=print) -> dict:
  """Energy distance to true samples per (config, NFE, t_start); t_start = T means the default."""
  source = common.mixture_source(dim)
  sde = common.make_sde(sde_name)
  shape = (num_samples,) + tuple(source.data_shape)
  k_ref, k_floor, k_sample, k_sw, k_T = jax.random.split(jax.random.PRNGKey(seed), 5)
  ref, floor, _ = common.reference_and_floor(source, num_samples, k_ref, k_floor, k_sw)
  x_T = sde.prior_sampling(k_T, shape)
  score_fn = source.score_fn(sde)
  rows = []
  for label, (name, options) in CONFIGS.items():
    for nfe in nfes:
      for t_start in t_starts:
        sampler = get_sampler(name, sde, shape, nfe=nfe, t_start=min(t_start, sde.T), **options)
        t0 = time.time()
        x, used = sampler(k_sample, score_fn, x_T)
        energy = common.distances(k_sw, jax.block_until_ready(x), ref)["energy"]
        rows.append({"sampler": label, "nfe": int(used), "t_start": float(t_start),
                     "energy": energy, "seconds": round(time.time() - t0, 2)})
        log(f"  {label:32s} nfe={used:3d} t_start={t_start:<5g} energy={energy:.4g}")
  return {"sde": sde_name, "dim": dim, "num_samples": num_samples, "floor": floor["energy"],
          "rows": rows}


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


def main(argv) -> None:
  common.no_arguments(argv)
  sdes = common.check_sde_names(FLAGS.sdes)
  n = FLAGS["num-samples"].value
  out = {"runs": {}, "jax": jax.__version__}
  for sde_name in sdes:
    for dim in common.ints(FLAGS.dims):
      common.log(f"== {sde_name.upper()} SDE, dim {dim}, {n} samples ==")
      res = run(sde_name, dim, common.ints(FLAGS.nfes), common.floats(FLAGS["t-starts"].value), n,
                FLAGS.seed, log=common.log)
      out["runs"][f"{sde_name}_d{dim}"] = res
      common.log("\nenergy distance to true samples:\n" + table(res) + "\n")
      common.write_result(FLAGS.out, out, say=False)


if __name__ == "__main__":
  define_flags()
  app.run(main)
