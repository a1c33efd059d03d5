"""Our fast samplers vs the widely used implementations in Hugging Face ``diffusers``, same score.

Both sides sample the *same* continuous VP SDE (beta_min = 0.1, beta_max = 20) with the *exact*
score of a Gaussian mixture (:mod:`score_sde.analytic`), from the *same* standard-normal x_T, and
each sample set is scored by its energy distance (and sliced Wasserstein distance) to fresh true
samples; the noise floor is the distance between two true sample sets.

How diffusers is driven (``experiments.diffusers_reference``). Its schedulers are built with the
DDPM betas that discretize our VP (``beta_schedule='linear'``, beta_start = 0.1 / 1000,
beta_end = 20 / 1000, 1000 train steps). Its "network" is the exact noise prediction at the noise
level the scheduler is integrating at: at EDM noise level s (``scheduler.sigmas[step_index]``, or
sqrt((1 - abar_t) / abar_t) for DDIM) the VP state has alpha = 1 / sqrt(1 + s^2), sigma = s alpha,
log-SNR = -2 log s, so

    eps(x, s) = -sigma * score(x, t(s)),  t(s) = sde.t_from_log_snr(-2 log s),

the exact epsilon-prediction for the state x the scheduler hands over (after
``scale_model_input``). The PF-ODE in log-SNR is the same for both sides; only the solvers, their
time steps and end points differ (diffusers goes to sigma = 0 with its last step; ours stop at
t = 1e-3 unless ``denoise``). NFE = the number of score calls, counted by wrapping the model
(Heun spends 2 steps - 1; our samplers report their own count and are checked against it).

For each NFE the best configuration of each side is compared (a grid of each side's options:
solver orders / variants, time-step spacings, Karras sigmas, ...), and matching pairs are listed.

  python -m experiments.compare_reference_samplers --dims 2,64 --nfes 10,20 \
      --out docs/results/samplers_vs_diffusers.json

Needs ``torch`` and ``diffusers`` (benchmark-only, not dependencies of score_sde); without them
the script prints a message and exits 0.
"""
from __future__ import annotations

import time
from typing import Sequence

import jax
import numpy as np
from absl import app, flags

from experiments import common, diffusers_reference as dref
from score_sde import sde_lib
from score_sde.sampling import get_sampler

FLAGS = flags.FLAGS


def define_flags(flag_values: flags.FlagValues = FLAGS) -> None:
  """Defines this script's flags on ``flag_values``. Called when the script runs, so that importing
  the module defines no flags."""
  fv = dict(flag_values=flag_values)
  flags.DEFINE_list("dims", ["2", "64"], "Data dimensions.", **fv)
  flags.DEFINE_list("nfes", ["10", "20"], "NFE grid.", **fv)
  flags.DEFINE_string("num-samples", "2:8000,64:3000", "One count, or dim:count pairs.", **fv)
  flags.DEFINE_integer("seed", 0, "Seed of the reference samples, x_T and the sampler noise.", **fv)
  flags.DEFINE_string("out", "", "JSON output path.", **fv)
  flags.DEFINE_list("only", [], "Run only the labels (ours and theirs) containing one of these "
                    "substrings.", **fv)


def compare(dim: int, nfes, num_samples: int, seed: int, diffusers, torch, only: Sequence[str] = (),
            log=print) -> dict:
  """Both sides at every NFE on the exact score of ``common.mixture_source(dim)``; JSON-able."""
  source = common.mixture_source(dim)
  sde = sde_lib.VPSDE()
  shape = (num_samples,) + tuple(source.data_shape)
  k_ref, k_floor, k_T, k_sw, k_run = jax.random.split(jax.random.PRNGKey(seed), 5)
  ref, floor, _ = common.reference_and_floor(source, num_samples, k_ref, k_floor, k_sw)
  log(f"== d={dim}, n={num_samples}: floor energy {floor['energy']:.3g}, "
      f"sliced W {floor['sliced_w']:.3g}")
  x_T = sde.prior_sampling(k_T, shape)
  score_fn = source.score_fn(sde)
  model = dref.EpsModel(score_fn, sde, torch)
  res = {"floor": floor, "num_samples": num_samples, "data_shape": list(source.data_shape),
         "ours": {}, "diffusers": {}}
  for nfe in nfes:
    ours, theirs = {}, {}
    for label, (name, options) in dref.selected(dref.OURS, only).items():
      try:
        sampler = get_sampler(name, sde, shape, nfe=nfe, **options)
      except ValueError as e:
        log(f"  ours {label} @ {nfe}: skipped ({e})")
        continue
      t0 = time.time()
      x, used = sampler(k_run, score_fn, x_T)
      x = jax.block_until_ready(x)
      ours[label] = {"nfe": int(used), "seconds": round(time.time() - t0, 2),
                     **common.distances(k_sw, x, ref)}
    for label, (cls_name, kwargs) in dref.selected(dref.reference_configs(), only).items():
      t0 = time.time()
      try:
        x, used = dref.run_reference(diffusers, torch, cls_name, kwargs, nfe, model,
                                     np.asarray(x_T), sde)
      except Exception as e:  # pylint: disable=broad-except  # a config that cannot run here
        log(f"  diffusers {label} @ {nfe}: failed ({type(e).__name__}: {e})")
        continue
      if used > nfe:
        raise AssertionError(f"{label} spent {used} > {nfe} model calls")
      if not np.all(np.isfinite(x)):
        log(f"  diffusers {label} @ {nfe}: non-finite samples")
        continue
      theirs[label] = {"nfe": int(used), "seconds": round(time.time() - t0, 2),
                       **common.distances(k_sw, x, ref)}
    res["ours"][str(nfe)], res["diffusers"][str(nfe)] = ours, theirs
    for side, rows in (("ours", ours), ("diffusers", theirs)):
      log(f"  -- {side} @ NFE {nfe} (energy, sliced W):")
      for label, r in sorted(rows.items(), key=lambda kv: kv[1]["energy"]):
        log(f"     {label:38s} nfe={r['nfe']:3d}  {r['energy']:.4g}  {r['sliced_w']:.4g}")
  return res


def main(argv) -> None:
  common.no_arguments(argv)
  reference = dref.import_reference("compare_reference_samplers")
  if reference is None:
    return
  diffusers, torch = reference
  dims, nfes = common.ints(FLAGS.dims), common.ints(FLAGS.nfes)
  counts = common.per_dim_counts(FLAGS["num-samples"].value, dims)
  out = {"diffusers": diffusers.__version__, "torch": torch.__version__, "jax": jax.__version__,
         "nfes": nfes, "dims": {}}
  for dim in dims:
    res = compare(dim, nfes, counts[dim], FLAGS.seed, diffusers, torch, only=FLAGS.only,
                  log=common.log)
    res["summary"] = dref.summary(res["ours"], res["diffusers"], res["floor"]["energy"],
                                  ("energy", "sliced_w"))
    out["dims"][str(dim)] = res
    common.log("\n| d | NFE | our best | energy | diffusers best | energy | floor "
               "| ours <= theirs |\n|---|---|---|---|---|---|---|---|")
    for r in res["summary"]:
      common.log(f"| {dim} | {r['nfe']} | {r['ours_best']} | {r['ours_energy']:.3g} | "
                 f"{r['diffusers_best']} | {r['diffusers_energy']:.3g} | "
                 f"{r['floor_energy']:.3g} | {'yes' if r['ours_at_least_as_accurate'] else 'NO'} |")
    common.write_result(FLAGS.out, out, say=False)


if __name__ == "__main__":
  define_flags()
  app.run(main)
