"""Training recipes side by side on the embedded toy mixture (issue 15): VP-DSM (the default), EDM
and rectified flow, same network, steps, batch and learning-rate schedule.

For each recipe: train its toy config (``configs/toy/<name>.py``; resumable, one workdir per
recipe), then measure test bits/dim (ODE likelihood, exact trace) against the exact data entropy,
and the energy distance of 2000 samples to held-out data against its noise floor, for the
recipe's own sampler setting and for Heun / DPM-Solver++(2M) at 10 / 20 / 35 NFE.

    python -m experiments.recipes_toy --workdir runs/recipes_toy \
        --out docs/results/recipes_toy.json

About 15 minutes on 2 CPU cores (three 8000-step runs). ``--steps`` shortens the runs (tests).
"""
from __future__ import annotations

import importlib
import os
import time

import jax
import numpy as np
from absl import app, flags, logging

from experiments import common
from score_sde.evaluation import evaluate
from score_sde.sampling import get_sampler
from score_sde.train import train

FLAGS = flags.FLAGS


def define_flags(flag_values: flags.FlagValues = FLAGS) -> None:
  """Defines this script's flags (called when it runs: importing it defines none)."""
  fv = dict(flag_values=flag_values)
  flags.DEFINE_string("workdir", "runs/recipes_toy", "One subdirectory per recipe (resumable).",
                      **fv)
  flags.DEFINE_list("recipes", ["vp", "edm", "rectified_flow"],
                    "configs/toy/<name>.py to compare.", **fv)
  flags.DEFINE_integer("steps", 8000, "Training steps of every recipe.", **fv)
  flags.DEFINE_list("nfes", ["10", "20", "35"], "NFE grid of the sampler sweep.", **fv)
  flags.DEFINE_integer("num_samples", 2000, "Samples per energy distance (and held-out points).",
                       **fv)
  flags.DEFINE_integer("num_bpd", 2000, "Test points for bits/dim.", **fv)
  flags.DEFINE_string("out", None, "Write the JSON result here.", **fv)


SWEEP = {"heun": {}, "dpm_solver_pp": {"order": 2, "method": "multistep"}}


def recipe_config(name: str, steps: int):
  config = importlib.import_module(f"configs.toy.{name}").get_config()
  t = config.training
  t.n_iters = steps
  t.snapshot_freq = steps
  t.snapshot_freq_for_preemption = min(t.snapshot_freq_for_preemption, steps)
  t.snapshot_sampling = False
  t.log_freq = min(t.log_freq, steps)
  return config


def train_and_load(config, workdir: str):
  """Trains ``config`` in ``workdir`` (resuming what is there) and returns (Trainer with the
  final checkpoint, its step, training wall seconds)."""
  start = time.time()
  train(config, workdir)
  train_s = time.time() - start
  trainer, step = evaluate.load_trainer(config, workdir)
  return trainer, step, train_s


def run_recipe(name: str, workdir: str, steps: int, nfes: list[int], num: int,
               num_bpd: int) -> dict:
  config = recipe_config(name, steps)
  trainer, step, train_s = train_and_load(config, workdir)
  score_fn = trainer.score_fn(trainer.state.ema_params)
  key = jax.random.PRNGKey(0)
  out = {"config": f"configs/toy/{name}.py", "sde": repr(trainer.sde),
         "loss": config.training.loss,
         "parametrization": (config.model.parametrization or trainer.sde.default_parametrization),
         "steps": step, "train_seconds": round(train_s, 1)}
  out.update(evaluate.bits_per_dim(trainer, key, num_bpd))
  out["exact_bpd"] = evaluate.exact_bpd(config, num_bpd)
  rows = {}
  own = (config.sampling.method, int(config.sampling.nfe))
  settings = [(n, k) for n in SWEEP for k in nfes] + [own]
  for method, nfe in dict.fromkeys(settings):
    if method == "pc":
      sampler = get_sampler("pc", trainer.sde, (num,) + trainer.shape)
    else:
      sampler = get_sampler(method, trainer.sde, (num,) + trainer.shape, nfe=nfe,
                            **SWEEP.get(method, {}))
    x, used = sampler(jax.random.PRNGKey(1), score_fn)
    q = evaluate.sample_quality(trainer, np.asarray(x), key)
    rows[f"{method}@{int(used)}"] = {"method": method, "nfe": int(used), **q}
    logging.info("%s %s@%d: energy %.4f (floor %.4f)", name, method, int(used),
                 q["energy_distance"], q["energy_distance_floor"])
  trainer.close()
  out["samples"] = rows
  return out


def main(argv):
  common.no_arguments(argv)
  nfes = common.ints(FLAGS.nfes)
  result = {"steps": FLAGS.steps, "num_samples": FLAGS.num_samples, "recipes": {}}
  for name in FLAGS.recipes:
    result["recipes"][name] = run_recipe(name, os.path.join(FLAGS.workdir, name), FLAGS.steps,
                                         nfes, FLAGS.num_samples, FLAGS.num_bpd)
  for name, r in result["recipes"].items():
    best = min(r["samples"].values(), key=lambda s: s["energy_distance"])
    print(f"{name:16s} bpd {r['bpd']:.3f} (exact {r['exact_bpd']:.3f})  best energy "
          f"{best['energy_distance']:.4f} ({best['method']}@{best['nfe']}, floor "
          f"{best['energy_distance_floor']:.4f})")
  common.write_result(FLAGS.out, result)


if __name__ == "__main__":
  define_flags()
  app.run(main)
