"""Post-hoc EMA sweep on the toy mixture: one training run, the EMA of every width after the fact.

Trains ``configs/toy/vp.py`` with ``training.posthoc_ema_every`` (snapshots of the power-function
EMAs of sigma_rel 0.05 and 0.10; docs/posthoc_ema.md), reconstructs the EMA of each sigma_rel of
``--sigma_rels`` at the last step from those snapshots (score_sde.posthoc_ema, the EDM2 least
squares), and evaluates each one, next to the raw params and the classic EMA
(``model.ema_rate``): the test DSM loss (the same test points, times and noise for every row) and
the energy distance of ``--num_samples`` samples (``--sampler``, default Heun at 35 NFE; the same
noise for every row) to held-out data, against its noise floor. Also reported: the relative L2
error of each fitted EMA profile, and how far the reconstructions of the two tracked widths are
from the tracked EMAs.

  python -m experiments.posthoc_ema_sweep --workdir runs/posthoc_ema_sweep \
      --out docs/results/posthoc_ema_toy.json --figure docs/figures/posthoc_ema_toy.png

Training is resumable (the workdir keeps checkpoints and snapshots); ``--steps`` shortens it.
"""
from __future__ import annotations

import importlib
import time

import jax
import numpy as np
from absl import app, flags, logging

from experiments import common
from score_sde import posthoc_ema
from score_sde.evaluation import evaluate
from score_sde.train import train

FLAGS = flags.FLAGS
GRID = ["0.02", "0.03", "0.05", "0.07", "0.10", "0.13", "0.17", "0.21", "0.25"]


def define_flags(flag_values: flags.FlagValues = FLAGS) -> None:
  """Defines this script's flags on ``flag_values`` (called when the script runs)."""
  fv = dict(flag_values=flag_values)
  flags.DEFINE_string("workdir", "runs/posthoc_ema_sweep", "Run directory (resumable).", **fv)
  flags.DEFINE_integer("steps", 4000, "Training steps (a multiple of 50; the toy default is 8000).",
                       **fv)
  flags.DEFINE_integer("every", 100, "Snapshot interval, training.posthoc_ema_every (a multiple "
                       "of 50).", **fv)
  flags.DEFINE_list("sigma_rels", GRID, "EMA widths to reconstruct, each in (0, 0.2887).", **fv)
  flags.DEFINE_string("sampler", "heun", "Sampler of the energy distances (a registered name; "
                      "'pc' is the toy default, 1000 steps).", **fv)
  flags.DEFINE_integer("nfe", 35, "Its NFE (fast samplers).", **fv)
  flags.DEFINE_integer("num_samples", 2000, "Samples per energy distance (and held-out points).",
                       **fv)
  flags.DEFINE_integer("num_test", 10000, "Test points of the test loss.", **fv)
  flags.DEFINE_integer("test_repeats", 4, "Draws of (t, noise) per test point.", **fv)
  flags.DEFINE_string("out", "", "JSON output path.", **fv)
  flags.DEFINE_string("figure", "", "PNG output path.", **fv)


def sweep_config(steps: int, every: int, sampler: str = "heun", nfe: int = 35):
  """configs/toy/vp.py, ``steps`` long (its cosine decay ends there), snapshots every ``every``,
  sampling with ``sampler`` at ``nfe``."""
  config = importlib.import_module("configs.toy.vp").get_config()
  config.sampling.method = sampler
  config.sampling.nfe = nfe
  t = config.training
  t.n_iters = steps
  t.snapshot_freq = steps
  t.snapshot_freq_for_preemption = min(t.snapshot_freq_for_preemption, steps)
  t.snapshot_sampling = False
  t.posthoc_ema_every = every
  return config


def _max_abs(a, b) -> float:
  return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def run(workdir: str, steps: int, every: int, sigma_rels: list[float], num_samples: int,
        num_test: int, test_repeats: int, sampler: str = "heun", nfe: int = 35,
        log=common.log) -> dict:
  config = sweep_config(steps, every, sampler, nfe)
  t0 = time.time()
  train(config, workdir)
  train_s = time.time() - t0
  trainer, step = evaluate.load_trainer(config, workdir)
  state = jax.device_get(trainer.state)
  snap_dir = posthoc_ema.snapshot_dir(workdir)
  tracked = posthoc_ema.tracking_of(config)[1]
  loss_key, sample_key = jax.random.PRNGKey(10), jax.random.PRNGKey(11)

  def evaluate_params(params) -> dict:
    trainer.state = trainer.state.replace(ema_params=jax.device_put(params, trainer.replicated))
    losses = [evaluate.test_loss(trainer, jax.random.fold_in(loss_key, r), num_test)
              for r in range(test_repeats)]
    samples, used = trainer.sample(sample_key, num_samples, params=trainer.state.ema_params)
    q = evaluate.sample_quality(trainer, samples, sample_key)
    nfe_used[0] = used
    return {"test_loss": float(np.mean(losses)), **q}

  nfe_used = [None]

  rows = {}
  t1 = time.time()
  for name, params in (("raw params", state.params),
                       (f"classic EMA (ema_rate {config.model.ema_rate:g})", state.ema_params)):
    rows[name] = evaluate_params(params)
    log(f"  {name:32s} test loss {rows[name]['test_loss']:.5f}  energy "
        f"{rows[name]['energy_distance']:.5f}")
  for rel, ema in zip(tracked, state.power_emas.emas):
    name = f"tracked power EMA {rel:g}"
    rows[name] = {"sigma_rel": rel, **evaluate_params(ema)}
    log(f"  {name:32s} test loss {rows[name]['test_loss']:.5f}  energy "
        f"{rows[name]['energy_distance']:.5f}")
  # The noise level of the energy distance: the raw params with other sampler noise.
  energies = [rows["raw params"]["energy_distance"]]
  for i in range(1, 4):
    samples, _ = trainer.sample(jax.random.fold_in(sample_key, i), num_samples,
                                params=jax.device_put(state.params, trainer.replicated))
    energies.append(evaluate.sample_quality(trainer, samples, sample_key)["energy_distance"])
  noise = {"energy_distance_values": energies, "energy_distance_std": float(np.std(energies,
                                                                                    ddof=1))}
  log(f"  energy distance of the raw params over 4 sampler seeds: {np.round(energies, 5)}")
  recon = []
  for rel in sigma_rels:
    params, info = posthoc_ema.reconstruct(snap_dir, rel, state.params)
    row = {"sigma_rel": rel, "gamma": info["gamma"], "fit_rel_error": info["fit_rel_error"],
           "max_abs_weight": max(abs(s["weight"]) for s in info["snapshots"]),
           **evaluate_params(params)}
    for t_rel, ema in zip(tracked, state.power_emas.emas):
      if abs(t_rel - rel) < 1e-12:
        row["max_abs_diff_to_tracked"] = _max_abs(params, ema)
    recon.append(row)
    log(f"  sigma_rel {rel:<5g} gamma {info['gamma']:8.3f}  fit error {info['fit_rel_error']:.1e}"
        f"  test loss {row['test_loss']:.5f}  energy {row['energy_distance']:.5f}")
  trainer.close()
  snaps = posthoc_ema.list_snapshots(snap_dir)
  return {"config": "configs/toy/vp.py", "steps": step, "posthoc_ema_every": every,
          "tracked_sigma_rels": list(tracked), "snapshots": len(snaps),
          "snapshot_steps": len({s.step for s in snaps}), "num_samples": num_samples,
          "num_test": num_test, "test_repeats": test_repeats,
          "sampler": config.sampling.method, "sampler_nfe": nfe_used[0],
          "train_seconds": round(train_s, 1), "eval_seconds": round(time.time() - t1, 1),
          "references": rows, "raw_params_sampler_noise": noise, "reconstructions": recon,
          "jax": jax.__version__}


def plot(result: dict, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  rec = result["reconstructions"]
  x = [r["sigma_rel"] for r in rec]
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
  for ax, metric, label in ((axes[0], "test_loss", "test DSM loss"),
                            (axes[1], "energy_distance", "energy distance to held-out data")):
    ax.plot(x, [r[metric] for r in rec], "o-", color="C0", label="post-hoc EMA (reconstructed)")
    refs = result["references"]
    tracked = [r for r in refs.values() if "sigma_rel" in r]
    ax.plot([r["sigma_rel"] for r in tracked], [r[metric] for r in tracked], "s", mfc="none",
            ms=11, color="C3", label="tracked power EMAs")
    for i, (name, r) in enumerate((n, r) for n, r in refs.items() if "sigma_rel" not in r):
      ax.axhline(r[metric], ls="--", color=f"C{i + 1}", lw=1, label=name)
    if metric == "energy_distance":
      floor = np.mean([r["energy_distance_floor"] for r in rec])
      ax.axhline(floor, ls=":", color="gray", lw=1, label="noise floor (data vs data)")
      raw, std = refs["raw params"]["energy_distance"], result["raw_params_sampler_noise"][
          "energy_distance_std"]
      ax.axhspan(raw - std, raw + std, color="C1", alpha=0.12, lw=0,
                 label="raw params +- std over sampler seeds")
    ax.set_xlabel("sigma_rel")
    ax.set_ylabel(label)
    ax.set_xscale("log")
    ax.set_xticks(x)
    ax.set_xticklabels([f"{v:g}" for v in x], fontsize=7)
    ax.minorticks_off()
    ax.grid(alpha=0.3)
  axes[1].legend(fontsize=7)
  fig.suptitle(f"Post-hoc EMA on the toy mixture (configs/toy/vp.py, {result['steps']} steps, "
               f"snapshots every {result['posthoc_ema_every']})", fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)
  common.log(f"wrote {path}")


def main(argv) -> None:
  common.no_arguments(argv)
  logging.get_absl_logger().addFilter(  # orbax logs every checkpoint operation at INFO
      lambda r: r.levelno >= 30 or "/orbax/" not in r.pathname)
  rels = common.floats(FLAGS.sigma_rels)
  bad = [r for r in rels if not 0 < r < posthoc_ema.SIGMA_REL_MAX]
  if bad:
    raise app.UsageError(f"--sigma_rels {bad} outside (0, {posthoc_ema.SIGMA_REL_MAX:.4f}).")
  result = run(FLAGS.workdir, FLAGS.steps, FLAGS.every, rels, FLAGS.num_samples, FLAGS.num_test,
               FLAGS.test_repeats, FLAGS.sampler, FLAGS.nfe)
  common.write_result(FLAGS.out, result)
  if FLAGS.figure:
    plot(result, FLAGS.figure)


if __name__ == "__main__":
  define_flags()
  app.run(main)
