"""Benchmark: sample quality vs NFE of the samplers on a *trained* MNIST model, plus its bits/dim.

The companion of ``experiments.benchmark_samplers`` (exact Gaussian-mixture scores): same sampler
configurations (``common.SAMPLER_CONFIGS``), same table, but the score is a network.

  python -m experiments.benchmark_samplers_mnist --data_dir /path/to/mnist \
      --workdir /tmp/mnist_bench --train_steps 2000 --num_samples 512 \
      --out docs/results/samplers_mnist.json --plot docs/figures/samplers_mnist.png

What it does, in order (each step cached in ``--workdir``, so a rerun only samples again; steps 1
and 2 and the prior noise are ``experiments.mnist_setup``'s, shared with
``compare_reference_samplers_mnist``):

  1. score model  trains the small U-Net of configs/mnist/vp_continuous.py (VP SDE, continuous
                  DSM loss) for ``--train_steps`` steps at batch ``--batch_size`` with the ordinary
                  training loop (score_sde.train.Trainer), or resumes / reuses the checkpoint in
                  ``<workdir>/score_model_*``. ``--nf`` overrides the width (for tests),
                  ``--warmup`` / ``--ema_rate`` the learning-rate warm-up and the EMA decay (the
                  config's 1000 / 0.999 suit 20k+ steps, not a short CPU run). The training loss is
                  logged; the last logged training loss and the DSM loss of the EMA model on
                  ``--num_samples`` held-out test images go into the JSON.
  2. classifier   trains a small CNN MNIST classifier (score_sde.evaluation.mnist_features; two
                  conv layers, a ``--feature_dim`` ReLU layer, a linear read-out) with Adam for
                  ``--classifier_steps`` steps on the training split, reports its accuracy on the
                  whole test split, and caches its parameters in the workdir.
  3. quality      for every sampler configuration and NFE: ``--num_samples`` samples in batches of
                  ``--sample_batch`` (one jitted program per configuration, compiled once, reused
                  for every batch); every sampler starts from the same prior noise x_T except PC,
                  which draws its own from the sampling key, as in the published results
                  (``common.OWN_PRIOR_DRAW``). Samples are mapped to [0, 1], clipped and rounded
                  to 8 bits like real images, and compared with ``--num_samples`` held-out test
                  images by the Frechet distance of their classifier features:

                    FD = ||mu_s - mu_r||^2 + tr(S_s) + tr(S_r) - 2 tr((S_s S_r)^{1/2}),

                  mu / S the mean and covariance (float64) of the penultimate-layer (ReLU)
                  features. **This is not FID**: FID uses Inception-v3 features of ImageNet
                  images; this is a Frechet distance in the features of a classifier the
                  benchmark trains itself, comparable only between runs of this script with the
                  same classifier settings. The noise floor is the same distance between two
                  disjoint sets of real test images of the same size (the value a perfect
                  sampler would get, up to noise), and ``fd_uniform_noise`` the distance of
                  uniform-noise images (a ceiling).
  4. bits/dim     of ``--num_bpd`` test images under the model: uniform dequantization
                  y = 2 (x + u) / 256 - 1, the probability-flow-ODE likelihood
                  (score_sde.likelihood, Rademacher Hutchinson trace, rtol = atol = ``--bpd_tol``),
                  and the discrete-data bound bpd = model-space bpd + 7
                  (``likelihood.discrete_bpd``); mean and standard error over the images.

The NFE grid ``--nfes`` applies to every fast sampler and to the PC sampler (Euler-Maruyama
predictor, no corrector, N = NFE steps), ``--pc_nfes`` adds PC-only reference points (1000 by
default, the paper's setting), and the adaptive probability-flow ODE (dopri5) runs once per
tolerance in ``--ode_tols``, its NFE being what it spent. Configurations that cannot run at an NFE
(e.g. order 3 with too few evaluations) are skipped with their message. Prints a markdown table
and writes the JSON (``--out``) and an FD-vs-NFE plot (``--plot``); ``--from_json`` redraws both
from a saved result without sampling, and ``--merge a.json,b.json`` joins the rows of runs with the
same model, classifier and x_T (same flags and ``--workdir``, other NFE grids) into one result.

From Python, call :func:`run` with a ``mnist_setup.Settings`` (the flags' names and defaults).
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import json
import math
import os
import time
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import numpy as np
from absl import app, flags

from experiments import common, mnist_setup
from experiments.common import SAMPLER_CONFIGS, STOCHASTIC
from experiments.mnist_setup import Settings
from score_sde import likelihood, sde_lib
from score_sde.sampling import available_samplers

Array = jax.Array
FLAGS = flags.FLAGS


def define_flags(flag_values: flags.FlagValues = FLAGS) -> None:
  """Defines on ``flag_values`` the settings shared with compare_reference_samplers_mnist
  (``mnist_setup.SHARED_FLAGS``), this script's other settings and its own flags. Called when the
  script runs, so that importing the module defines no flags."""
  fv = dict(flag_values=flag_values)
  mnist_setup.define_flags(flag_values, mnist_setup.SHARED_FLAGS + (
      "pc_nfes", "ode_tols", "samplers", "num_bpd", "bpd_tol", "plot"))
  flags.adopt_module_key_flags(mnist_setup, **fv)  # listed by --help with this script's own
  flags.DEFINE_string("from_json", "", "Only print the table and redraw the plot of a saved "
                      "result.", **fv)
  flags.DEFINE_list("merge", [], "Saved results of runs with the same model, classifier and x_T "
                    "(same flags and --workdir, other --nfes / --pc_nfes / --ode_tols): write one "
                    "result with all their rows to --out, redraw --plot; no sampling.", **fv)


# ------------------------------------------------------------------------------------------------
# Sampling
# ------------------------------------------------------------------------------------------------
def sampler_grid(s: Settings) -> list[tuple[str, str, dict, list]]:
  """[(label, registry name, options, settings)] in SAMPLER_CONFIGS order."""
  registered = set(available_samplers())
  grid = []
  for label, (name, options) in SAMPLER_CONFIGS.items():
    if (s.samplers and label not in s.samplers) or name not in registered:
      continue
    if name == "ode":
      settings = list(s.ode_tols)
    elif name == "pc":
      settings = sorted(set(s.nfes) | set(s.pc_nfes))
    else:
      settings = list(s.nfes)
    if settings:
      grid.append((label, name, dict(options), settings))
  return grid


# ------------------------------------------------------------------------------------------------
# bits/dim
# ------------------------------------------------------------------------------------------------
def bits_per_dim(key: Array, sde: sde_lib.SDE, model: nn.Module, params: Any,
                 images_uint8: np.ndarray, tol: float, batch: int, centered: bool) -> dict:
  """Discrete-data bits/dim of 8-bit images (uniform dequantization, PF-ODE likelihood).

  bpd = likelihood.discrete_bpd(model-space bpd of y = dequantize(x)), i.e. model-space bpd + 7
  for centered data; mean and standard error over the images (one dequantization and one
  Hutchinson probe per image).
  """
  lik = likelihood.get_likelihood_fn(sde, rtol=tol, atol=tol, hutchinson_type="rademacher")
  fn = jax.jit(lambda p, k, x: lik(k, mnist_setup.make_score_fn(sde, model, p), x))
  bpds, nfes, t0 = [], [], time.time()
  for i in range(0, len(images_uint8), batch):
    k_q, k_h = jax.random.split(jax.random.fold_in(key, i))
    y = likelihood.dequantize(k_q, images_uint8[i:i + batch], centered=centered)
    bpd, _, nfe = fn(params, k_h, y)
    bpds.append(np.asarray(likelihood.discrete_bpd(bpd, centered=centered)))
    nfes.append(int(nfe))
  bpds = np.concatenate(bpds)
  return {"bpd": float(bpds.mean()), "bpd_stderr": float(bpds.std(ddof=1) / np.sqrt(len(bpds)))
          if len(bpds) > 1 else None, "nfe": float(np.mean(nfes)), "num_images": int(len(bpds)),
          "tol": tol, "seconds": round(time.time() - t0, 1)}


# ------------------------------------------------------------------------------------------------
# Output
# ------------------------------------------------------------------------------------------------
def columns(res: dict) -> list[int]:
  return sorted(set(res["nfes"]) | set(res.get("pc_nfes", [])))


def fd_table(res: dict) -> str:
  """Markdown table of the classifier-feature FD (rows: samplers, columns: NFE), floor last."""
  cols = columns(res)
  results = {label: dict(r, rows=[row for row in r["rows"] if row.get("fd") is not None])
             for label, r in res["results"].items()}
  lines = common.table({"results": results, "floor": {}}, cols, "fd").split("\n")
  lines.append("| *floor (real vs real)* | " + " | ".join(f"{res['floor']['fd']:.3g}"
                                                          for _ in cols) + " |")
  return "\n".join(lines)


def plot(res: dict, path: str) -> None:
  """FD vs NFE (log-log), one line per sampler, the real-vs-real noise floor dashed."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(8, 5.5))
  markers = "osv^D<>ph*Xd"
  colors = [plt.cm.tab10(k) for k in range(10)] + ["darkgoldenrod", "magenta", "lime"]
  reference_colors = {"pc": "black", "ode": "dimgray"}
  for i, (label, r) in enumerate(res["results"].items()):
    rows = sorted([row for row in r["rows"] if row.get("fd") is not None], key=lambda x: x["nfe"])
    if rows:
      ls = ":" if r["sampler"] in ("pc", "ode") else "-"
      ax.plot([row["nfe"] for row in rows], [row["fd"] for row in rows], ls,
              marker=markers[i % len(markers)], ms=4, lw=1.2, label=label,
              color=reference_colors.get(r["sampler"], colors[i % len(colors)]))
  ax.axhline(res["floor"]["fd"], color="k", ls="--", lw=1.0, label="floor (real vs real)")
  ax.set_xscale("log")
  ax.set_yscale("log")
  ax.set_xlabel("NFE (score-network evaluations per sample)")
  ax.set_ylabel("Frechet distance in classifier features (not FID)")
  m, c = res["model"], res["classifier"]
  ax.set_title(f"MNIST U-Net (nf={m['nf']}, {m['trained_steps']} steps, batch {m['batch_size']}), "
               f"VP SDE; n={res['settings']['num_samples']}; classifier acc "
               f"{100 * c['test_accuracy']:.1f}%", fontsize=9)
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(fontsize=7, ncol=2)
  fig.tight_layout()
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  fig.savefig(path, dpi=100)
  plt.close(fig)


def summary(res: dict) -> str:
  m, c, b = res["model"], res["classifier"], res.get("bpd")
  lines = [f"score model: {mnist_setup.CONFIG_NAME}, nf={m['nf']}, {m['num_params']} params, "
           f"{m['trained_steps']} steps at batch {m['batch_size']}, last train loss "
           + ("-" if m["train_loss"] is None else f"{m['train_loss']:.4f}")
           + f", test DSM loss {m['test_dsm_loss']:.4f}",
           f"feature classifier: {c['steps']} Adam steps, test accuracy "
           f"{100 * c['test_accuracy']:.2f}%, feature dim {c['feature_dim']}",
           f"noise floor (real vs real, n={res['settings']['num_samples']}): FD "
           f"{res['floor']['fd']:.4g}; uniform noise vs real: FD {res['fd_uniform_noise']:.4g}"]
  if b:
    err = f" +- {b['bpd_stderr']:.3f}" if b["bpd_stderr"] is not None else ""
    lines.append(f"bits/dim ({b['num_images']} test images, uniform dequantization): "
                 f"{b['bpd']:.3f}{err} ({b['nfe']:.0f} NFE)")
  return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# Merging runs
# ------------------------------------------------------------------------------------------------
# Settings that fix the score model, the classifier, the reference images and x_T: runs that agree
# on them drew their samples from the same model and noise, so their rows can share one table.
SHARED_SETTINGS = ("train_steps", "batch_size", "nf", "warmup", "ema_rate", "classifier_steps",
                   "feature_dim", "num_samples", "sample_batch", "seed")


def _run_entries(res: dict) -> list[dict]:
  """The runs a result is made of: its own ``runs``, or the result itself as one run."""
  if "runs" in res:
    return copy.deepcopy(res["runs"])
  return [{"settings": res["settings"], "seconds": res.get("seconds"),
           "phase_seconds": res.get("phase_seconds")}]


def merge_results(results: Sequence[dict], rtol: float = 1e-3) -> dict:
  """One result from several runs of the same model, classifier, references and x_T.

  Rows of a sampler are joined by setting (NFE, or ODE tolerance); a setting present in more than
  one run must have the same FD within ``rtol`` (it is the same computation) and is kept once,
  from the first run. bits/dim comes from the first run that has it; ``runs`` lists every run's
  settings and seconds. Raises ValueError when the runs differ in a setting of SHARED_SETTINGS,
  in the model's test loss, the classifier's accuracy or the noise floor (then their samples are
  not comparable), or when a repeated setting gives another FD.
  """
  if not results:
    raise ValueError("Nothing to merge: give at least one result.")
  first = results[0]
  close = functools.partial(math.isclose, rel_tol=rtol)
  for i, res in enumerate(results[1:], 1):
    diff = [k for k in SHARED_SETTINGS
            if res["settings"].get(k) != first["settings"].get(k)]
    if diff:
      raise ValueError(f"Result {i} differs from result 0 in settings {diff}: its samples come "
                       "from another model, classifier or x_T; rerun it with the first run's "
                       "flags and --workdir.")
    checks = {"model test DSM loss": (res["model"]["test_dsm_loss"],
                                      first["model"]["test_dsm_loss"]),
              "classifier test accuracy": (res["classifier"]["test_accuracy"],
                                           first["classifier"]["test_accuracy"]),
              "noise floor FD": (res["floor"]["fd"], first["floor"]["fd"])}
    off = [f"{name} {a:.6g} vs {b:.6g}" for name, (a, b) in checks.items() if not close(a, b)]
    if off:
      raise ValueError(f"Result {i} has the same settings as result 0 but {'; '.join(off)}: "
                       "not the same cached model / classifier (another --workdir?).")

  merged = copy.deepcopy({k: v for k, v in first.items()
                          if k not in ("results", "runs", "phase_seconds")})
  merged["runs"] = [run for res in results for run in _run_entries(res)]
  merged["seconds"] = round(sum(run.get("seconds") or 0.0 for run in merged["runs"]), 1)
  for key, cast in (("nfes", int), ("pc_nfes", int), ("ode_tols", float)):
    merged[key] = sorted({cast(v) for res in results for v in res.get(key, [])})
  if merged.get("bpd") is None:
    merged["bpd"] = next((res["bpd"] for res in results if res.get("bpd")), None)

  labels = list(dict.fromkeys(label for res in results for label in res["results"]))
  order = {label: i for i, label in enumerate(SAMPLER_CONFIGS)}
  labels.sort(key=lambda label: order.get(label, len(order)))
  merged["results"] = {}
  for label in labels:
    entries = [res["results"][label] for res in results if label in res["results"]]
    rows: dict = {}
    for entry in entries:
      for row in entry["rows"]:
        kept = rows.setdefault(row["setting"], row)
        if kept is not row and None not in (kept["fd"], row["fd"]) and not close(kept["fd"],
                                                                                  row["fd"]):
          raise ValueError(f"{label} at setting {row['setting']}: FD {kept['fd']:.6g} in one run "
                           f"and {row['fd']:.6g} in another; the runs do not share model and x_T.")
    merged["results"][label] = dict(copy.deepcopy(entries[0]),
                                    rows=[copy.deepcopy(rows[k]) for k in sorted(rows)])
  return merged



# ------------------------------------------------------------------------------------------------
# The benchmark
# ------------------------------------------------------------------------------------------------
def run(s: Settings, log: Callable[[str], None] = print) -> dict:
  """Runs steps 1-4 of the module docstring; returns the JSON-able result (also written)."""
  t_start = time.time()
  prep = mnist_setup.prepare(s, log)
  config, params, model = prep.config, prep.params, prep.model
  res: dict = {"settings": dataclasses.asdict(s), "nfes": list(s.nfes), "pc_nfes": list(s.pc_nfes),
               "ode_tols": list(s.ode_tols), "jax": jax.__version__,
               "backend": jax.default_backend(), "results": {}, "phase_seconds": {}, **prep.info}
  res["phase_seconds"]["score_model_and_classifier"] = round(time.time() - t_start, 1)
  phase = res["phase_seconds"]
  n = s.num_samples
  test_x, bpd_idx = prep.test_x, prep.bpd_idx

  # 3. samplers
  batch, _ = s.batching
  sde = sde_lib.get_sde(config)
  x_T, k_sample, k_bpd = mnist_setup.prior_noise(s, sde)
  shape = (batch, 28, 28, config.data.num_channels)
  for label, name, options, settings in sampler_grid(s):
    rows = []
    for v in settings:
      try:
        sampler = common.build_sampler(name, options, sde, shape, v)
      except ValueError as e:
        log(f"  {label} @ {v}: skipped ({e})")
        continue
      x, nfe, t_compile, t_run = mnist_setup.draw_samples(sampler, sde, model, params, k_sample, s,
                                                          common.start_point(label, x_T))
      x = x[:n]
      finite = np.isfinite(x.reshape(n, -1)).all(1)
      fd = prep.fd(s, x)
      rows.append({"setting": v, "nfe": nfe, "fd": fd if np.isfinite(fd) else None,
                   "finite": bool(finite.all()), "nonfinite_samples": int((~finite).sum()),
                   "compile_seconds": round(t_compile, 2), "seconds": round(t_run, 2)})
      log(f"  {label:22s} nfe={nfe:5d}  FD={fd:8.4g}  (compile {t_compile:.1f}s, "
          f"sample {t_run:.1f}s)")
    res["results"][label] = {"sampler": name, "options": options, "rows": rows,
                             "stochastic": label in STOCHASTIC or name == "pc"}
    res["seconds"] = round(time.time() - t_start, 1)
    common.write_result(s.out, res, say=False)  # after every sampler: a cut run keeps its numbers

  phase["sampling"] = round(time.time() - t_start - sum(phase.values()), 1)

  # 4. bits/dim
  if s.num_bpd > 0:
    res["bpd"] = bits_per_dim(k_bpd, sde, model, params, test_x[bpd_idx], s.bpd_tol,
                              min(batch, s.num_bpd), bool(config.data.centered))
    log(f"bits/dim: {res['bpd']['bpd']:.3f} ({res['bpd']['nfe']:.0f} NFE, "
        f"{res['bpd']['seconds']} s)")
  phase["bpd"] = round(time.time() - t_start - sum(phase.values()), 1)
  res["seconds"] = round(time.time() - t_start, 1)
  common.write_result(s.out, res)
  log("\nFrechet distance in classifier features (NOT FID) to held-out test images:\n"
      + fd_table(res) + "\n\n" + summary(res) + f"\n\ntotal {res['seconds']} s")
  if s.plot:
    plot(res, s.plot)
    log(f"wrote {s.plot}")
  return res


def main(argv: Sequence[str]) -> None:
  common.no_arguments(argv)
  if FLAGS.from_json and FLAGS.merge:
    raise app.UsageError("Give --from_json or --merge, not both.")
  if not (FLAGS.merge or FLAGS.from_json):
    run(Settings.from_flags(), log=common.log)
    return
  loaded = []
  for path in FLAGS.merge or [FLAGS.from_json]:
    with open(path) as f:
      loaded.append(json.load(f))
  res = loaded[0]
  if FLAGS.merge:
    res = merge_results(loaded)
    common.write_result(FLAGS.out, res)
  common.log(fd_table(res) + "\n\n" + summary(res))
  if FLAGS.plot:
    plot(res, FLAGS.plot)
    common.log(f"wrote {FLAGS.plot}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
