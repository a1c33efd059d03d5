"""Training recipes side by side on MNIST (issue 15): VP-DSM, EDM and rectified flow.

The MNIST version of ``experiments.recipes_toy``, scored like ``benchmark_samplers_mnist``. Every
recipe trains the same small U-Net (width, steps, batch, learning rate and warm-up, EMA, seed,
hence data order and initialization key) with its own configs/mnist/<recipe>.py, i.e. its own
process, loss and output parametrization:

  vp_continuous    VP SDE (beta 0.1 -> 20), continuous DSM loss, eps output (the default recipe)
  edm              x_t = x_0 + t n on [0.002, 80], EDM loss and preconditioning (sigma_data 0.5)
  rectified_flow   x_t = (1 - t) x_0 + t n, flow-matching loss with logit-normal t, velocity output

then, for each recipe:

  1. score model  ``experiments.mnist_setup.get_score_model`` with the recipe's config: the
                  ordinary training loop (score_sde.train.Trainer) in
                  ``<workdir>/<recipe>/score_model_*``; a rerun resumes or reuses it. The JSON
                  records the recipe's own training loss on held-out test images (``test_loss``;
                  each recipe weights the denoising error differently, so these are not
                  comparable across recipes).
  2. quality      for every sampler of ``--samplers`` (default Euler and Heun with EDM's time
                  steps, DPM-Solver++(2M) and UniPC-3 (bh2) on log-SNR steps) at every NFE of
                  ``--nfes``: the classifier-feature Frechet distance (NOT FID) of
                  ``--num_samples`` samples to held-out test images, with the benchmark's
                  classifier, reference images and real-vs-real noise floor
                  (``mnist_setup.prepare_reference``, shared by all recipes, cached in
                  ``<workdir>``). Every sampler of every recipe starts from x_T =
                  ``sde.prior_sampling(k_T, ...)`` with the same key k_T
                  (``mnist_setup.prior_noise``): the same standard-normal draw, times the prior's
                  scale (1 for VP and rectified flow, 80 for EDM). Per NFE, ``best`` is the sampler
                  with the lowest FD; every row is kept.
  3. bits/dim     of ``--num_bpd`` test images: uniform dequantization, PF-ODE likelihood from
                  t = 1e-5 (Rademacher Hutchinson trace, rtol = atol = ``--bpd_tol``),
                  discrete-data bound (``benchmark_samplers_mnist.bits_per_dim``: the same images,
                  dequantization noise and probes for every recipe).

Prints a markdown table (best FD per recipe and NFE, bits/dim; then every sampler), writes the
JSON (``--out``) after every recipe and an FD-vs-NFE figure (``--plot``, one line per recipe: its
best sampler at each NFE). ``--from_json`` redraws both from a saved result.

The full comparison (defaults: the configs' 20000 steps at batch 128, 1000 samples, 64 bits/dim
images):

    python -m experiments.recipes_mnist --data_dir ../shared/data/mnist \
        --workdir runs/recipes_mnist --out docs/results/recipes_mnist.json \
        --plot docs/figures/recipes_mnist.png

Cost. Training dominates. Measured with ``--measure_steps 3`` (15 steps per recipe after the
compile; nf = 32, batch 128, one process on a 2-core CPU shared with other jobs, load average
3-4.5): vp_continuous 8.6 s/step, edm 8.9 s/step, rectified_flow 10.0 s/step, i.e.
48 + 50 + 55 = 153 hours for 3 x 20000 steps there (the committed samplers_mnist.json run
trained at 0.8 s/step at batch 32, which suggests about 3.3 s/step at batch 128, some 55 hours
for all three, on a quieter machine). Sampling (per recipe 4 samplers x 65 NFE x 1000 samples,
about 5-8 ms per sample and NFE) and bits/dim (about 15 minutes per recipe) add 2-3 hours on that
CPU. Not measured on an accelerator. ``--steps`` / ``--batch`` shorten the run (the same for
every recipe); add ``--measure_steps 3`` to the command to time your machine.

``--smoke``: 5 steps at batch 16 of an nf = 8 U-Net, a 20-step classifier, 16 samples, two
samplers (Heun, DPM-Solver++(2M)), 4 bits/dim images at tolerance 1e-2, in a temporary workdir,
no output files unless ``--out`` / ``--plot`` are given (flags given explicitly win). It checks the
plumbing, not the recipes. Most of its time is XLA compilation (each recipe compiles its network
initialization, training step, test loss, one program per sampler and NFE, and the likelihood):
``XLA_FLAGS=--xla_backend_optimization_level=0`` cuts that several-fold (tests/test_recipes_mnist.py
sets it).
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import os
import tempfile
import time
from typing import Callable, Sequence

import jax
import numpy as np
from absl import app, flags

from experiments import common, mnist_setup
from experiments.benchmark_samplers_mnist import bits_per_dim
from experiments.common import SAMPLER_CONFIGS
from experiments.mnist_setup import Settings
from score_sde.parametrizations import get_parametrization
from score_sde.utils import parametrization_of

FLAGS = flags.FLAGS

RECIPES = ("vp_continuous", "edm", "rectified_flow")   # configs/mnist/<name>.py
SAMPLERS = ("euler (EDM)", "heun (EDM)", "dpm_solver++2M", "unipc-3 bh2")
DEFAULTS = dict(workdir="runs/recipes_mnist", train_steps=20000, batch_size=128, num_samples=1000,
                nfes=(10, 20, 35), samplers=SAMPLERS, out="docs/results/recipes_mnist.json",
                plot="docs/figures/recipes_mnist.png")
# --smoke: flag -> value (a flag given on the command line keeps its value).
SMOKE = dict(steps=5, batch=16, nf=8, warmup=5, classifier_steps=20, num_samples=16,
             sample_batch=16, samplers=["heun (EDM)", "dpm_solver++2M"], num_bpd=4, bpd_tol=1e-2,
             train_devices=1, out="", plot="",
             workdir=os.path.join(tempfile.gettempdir(), "score_sde_recipes_mnist_smoke"))
# mnist_setup.Settings fields this script does not read (left out of its JSON).
UNUSED_SETTINGS = ("pc_nfes", "ode_tols")
# mnist_setup.Settings fields that are flags of this script under their own name.
SETTINGS_FLAGS = ("data_dir", "workdir", "train_devices", "nf", "warmup", "ema_rate",
                  "classifier_steps", "feature_dim", "num_samples", "sample_batch", "nfes",
                  "num_bpd", "bpd_tol", "seed", "out", "plot")


def define_flags(flag_values: flags.FlagValues = FLAGS) -> None:
  """Defines this script's flags on ``flag_values`` (the mnist_setup settings of SETTINGS_FLAGS
  with this script's defaults, and its own). Called when the script runs, so that importing the
  module defines no flags."""
  fv = dict(flag_values=flag_values)
  mnist_setup.define_flags(flag_values, SETTINGS_FLAGS,
                           **{k: v for k, v in DEFAULTS.items() if k in SETTINGS_FLAGS})
  flags.adopt_module_key_flags(mnist_setup, **fv)
  flags.DEFINE_integer("steps", DEFAULTS["train_steps"], "Training steps of every recipe "
                       "(multiple of 5).", **fv)
  flags.DEFINE_integer("batch", DEFAULTS["batch_size"], "Training batch of every recipe.", **fv)
  flags.DEFINE_list("recipes", list(RECIPES), "configs/mnist/<name>.py to compare.", **fv)
  flags.DEFINE_list("samplers", list(SAMPLERS), "Sampler labels of common.SAMPLER_CONFIGS; the "
                    "best of them per NFE is each recipe's.", **fv)
  flags.DEFINE_boolean("smoke", False, "Tiny sizes for a plumbing check (module docstring).", **fv)
  flags.DEFINE_integer("measure_steps", 0, "Only time N compiled calls (5 steps each) of every "
                       "recipe's training step after a warm-up call, print s/step and the "
                       "training time of --steps; nothing is trained or written.", **fv)
  flags.DEFINE_string("from_json", "", "Only print the tables and redraw --plot of a saved "
                      "result.", **fv)


# ------------------------------------------------------------------------------------------------
# One recipe
# ------------------------------------------------------------------------------------------------
def recipe_config(s: Settings, name: str):
  """configs/mnist/<name>.py with the benchmark's data, steps, batch and overrides
  (``mnist_setup.mnist_config``)."""
  return mnist_setup.mnist_config(s, importlib.import_module(f"configs.mnist.{name}"))


def check_recipe(s: Settings, name: str):
  """The recipe's config; ValueError (before any training) when it does not exist, or when its
  network output is not its process's default parametrization (the sampling and bits/dim helpers
  shared with benchmark_samplers_mnist read the network in that one)."""
  try:
    config = recipe_config(s, name)
  except ModuleNotFoundError as e:
    raise ValueError(f"Unknown recipe {name!r}: no configs/mnist/{name}.py.") from e
  from score_sde import sde_lib
  sde = sde_lib.get_sde(config)
  p, default = parametrization_of(config), get_parametrization(sde.default_parametrization)
  if p is not None and p != default:
    raise ValueError(f"Recipe {name!r}: config.model.parametrization={p!r} is not its process's "
                     f"default {default!r}; the benchmark helpers read the network in the "
                     "default one.")
  return config


def best_rows(rows: Sequence[dict], nfes: Sequence[int]) -> list[dict]:
  """Per requested NFE (row 'setting'), the row of lowest FD among those with an FD."""
  best = []
  for nfe in nfes:
    scored = [r for r in rows if r["setting"] == nfe and r.get("fd") is not None]
    if scored:
      b = min(scored, key=lambda r: r["fd"])
      best.append({k: b[k] for k in ("setting", "sampler", "nfe", "fd")})
  return best


def run_recipe(s: Settings, name: str, reference: dict, shared_info: dict,
               log: Callable[[str], None] = print) -> dict:
  """Steps 1-3 of the module docstring for one recipe; its JSON entry."""
  t0 = time.time()
  config = check_recipe(s, name)
  trainer, params, model_info = mnist_setup.get_score_model(
      s, config, config_name=f"configs/mnist/{name}.py", model_dir=os.path.join(s.workdir, name))
  model_info["test_loss"] = model_info.pop("test_dsm_loss")
  log(f"[{name}] score model ready: step {model_info['trained_steps']}, test loss "
      f"({config.training.loss}) {model_info['test_loss']:.4f} ({model_info['train_seconds']} s)")
  prep = mnist_setup.Prepared(config=config, trainer=trainer, params=params,
                              info=dict(shared_info, model=model_info), **reference)
  sde, model = trainer.sde, trainer.model
  p = parametrization_of(config) or get_parametrization(sde.default_parametrization)
  out = {"config": model_info["config"], "sde": repr(sde), "loss": config.training.loss,
         "t_sampling": config.training.get("t_sampling", None), "parametrization": repr(p),
         "model": model_info}
  batch, _ = s.batching
  x_T, k_sample, k_bpd = mnist_setup.prior_noise(s, sde)
  out["prior_std"] = float(np.std(x_T))
  shape = (batch, 28, 28, config.data.num_channels)
  n, rows = s.num_samples, []
  t_sampling = time.time()
  for label in s.samplers:
    sampler_name, options = SAMPLER_CONFIGS[label]
    for nfe in s.nfes:
      try:
        sampler = common.build_sampler(sampler_name, options, sde, shape, nfe)
      except ValueError as e:
        log(f"  [{name}] {label} @ {nfe}: skipped ({e})")
        rows.append({"sampler": label, "setting": nfe, "nfe": None, "fd": None,
                     "skipped": str(e)})
        continue
      x, used, t_compile, t_run = mnist_setup.draw_samples(sampler, sde, model, params, k_sample,
                                                           s, x_T)
      x = x[:n]
      finite = np.isfinite(x.reshape(n, -1)).all(1)
      fd = prep.fd(s, x)
      rows.append({"sampler": label, "setting": nfe, "nfe": used,
                   "fd": fd if np.isfinite(fd) else None, "finite": bool(finite.all()),
                   "nonfinite_samples": int((~finite).sum()),
                   "compile_seconds": round(t_compile, 2), "seconds": round(t_run, 2)})
      log(f"  [{name}] {label:16s} nfe={used:4d}  FD={fd:8.4g}  (compile {t_compile:.1f}s, "
          f"sample {t_run:.1f}s)")
  out["rows"] = rows
  out["best"] = best_rows(rows, s.nfes)
  out["sampling_seconds"] = round(time.time() - t_sampling, 1)
  out["bpd"] = None
  if s.num_bpd > 0:
    out["bpd"] = bits_per_dim(k_bpd, sde, model, params, prep.test_x[prep.bpd_idx], s.bpd_tol,
                              min(batch, s.num_bpd), bool(config.data.centered))
    log(f"  [{name}] bits/dim: {out['bpd']['bpd']:.3f} ({out['bpd']['nfe']:.0f} NFE, "
        f"{out['bpd']['seconds']} s)")
  out["seconds"] = round(time.time() - t0, 1)
  return out


# ------------------------------------------------------------------------------------------------
# The comparison
# ------------------------------------------------------------------------------------------------
def run(s: Settings, recipes: Sequence[str], log: Callable[[str], None] = print) -> dict:
  """The module docstring's comparison; returns the JSON-able result (also written to s.out)."""
  s.check()
  if not recipes or not s.samplers or not s.nfes:
    raise ValueError("Give at least one recipe, sampler and NFE.")
  for name in recipes:
    check_recipe(s, name)
  t_start = time.time()
  settings = {k: v for k, v in dataclasses.asdict(s).items() if k not in UNUSED_SETTINGS}
  res: dict = {"settings": dict(settings, recipes=list(recipes)),
               "nfes": list(s.nfes), "samplers": list(s.samplers), "jax": jax.__version__,
               "backend": jax.default_backend()}
  info: dict = {}
  reference = mnist_setup.prepare_reference(s, mnist_setup.mnist_config(s), info, log)
  res.update(info)
  res["recipes"] = {}
  for name in recipes:
    res["recipes"][name] = run_recipe(s, name, reference, info, log)
    res["seconds"] = round(time.time() - t_start, 1)
    common.write_result(s.out, res, say=False)  # after every recipe: a cut run keeps its numbers
  common.write_result(s.out, res)
  log("\nFrechet distance in classifier features (NOT FID) to held-out test images, best sampler "
      "per NFE:\n" + best_table(res) + "\n\nEvery sampler:\n" + full_table(res)
      + f"\n\ntotal {res['seconds']} s")
  if s.plot:
    plot(res, s.plot)
    log(f"wrote {s.plot}")
  return res


def best_table(res: dict) -> str:
  """Markdown: recipe | best FD (sampler) per NFE | bits/dim; the noise floor last."""
  nfes = res["nfes"]
  lines = ["| recipe | " + " | ".join(f"FD @ {n} NFE" for n in nfes) + " | bits/dim |",
           "|---|" + "---|" * (len(nfes) + 1)]
  for name, r in res["recipes"].items():
    by = {b["setting"]: b for b in r["best"]}
    cells = [f"{by[n]['fd']:.3g} ({by[n]['sampler']})" if n in by else "-" for n in nfes]
    b = r.get("bpd")
    bpd = "-" if not b else f"{b['bpd']:.3f}" + (f" +- {b['bpd_stderr']:.3f}"
                                                 if b.get("bpd_stderr") is not None else "")
    lines.append(f"| {name} | " + " | ".join(cells) + f" | {bpd} |")
  lines.append("| *floor (real vs real)* | " + " | ".join(f"{res['floor']['fd']:.3g}"
                                                          for _ in nfes) + " | |")
  return "\n".join(lines)


def full_table(res: dict) -> str:
  """Markdown: one row per recipe and sampler, FD per NFE ('-': skipped or not finite)."""
  nfes = res["nfes"]
  lines = ["| recipe | sampler | " + " | ".join(str(n) for n in nfes) + " |",
           "|---|---|" + "---|" * len(nfes)]
  for name, r in res["recipes"].items():
    for label in dict.fromkeys(row["sampler"] for row in r["rows"]):
      by = {row["setting"]: row for row in r["rows"] if row["sampler"] == label}
      cells = [f"{by[n]['fd']:.3g}" if by.get(n, {}).get("fd") is not None else "-"
               for n in nfes]
      lines.append(f"| {name} | {label} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def plot(res: dict, path: str) -> None:
  """FD vs NFE (log-log), one line per recipe through its best sampler at each NFE (named at the
  point), the real-vs-real noise floor dashed."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(7, 4.8))
  for i, (name, r) in enumerate(res["recipes"].items()):
    best = sorted(r["best"], key=lambda b: b["setting"])
    if not best:
      continue
    xs, ys = [b["setting"] for b in best], [b["fd"] for b in best]
    b = r.get("bpd")
    label = name + (f" ({b['bpd']:.2f} bits/dim)" if b else "")
    ax.plot(xs, ys, "-o", ms=4, lw=1.4, color=plt.cm.tab10(i), label=label)
    for b in best:
      ax.annotate(b["sampler"], (b["setting"], b["fd"]), fontsize=6, xytext=(3, 3),
                  textcoords="offset points", color=plt.cm.tab10(i))
  ax.axhline(res["floor"]["fd"], color="k", ls="--", lw=1.0, label="floor (real vs real)")
  ax.set_xscale("log")
  ax.set_yscale("log")
  ax.set_xticks(res["nfes"], [str(n) for n in res["nfes"]])
  ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
  ax.set_xlabel("NFE (score-network evaluations per sample)")
  ax.set_ylabel("Frechet distance in classifier features (not FID)")
  st, m = res["settings"], next(iter(res["recipes"].values()))["model"]
  ax.set_title(f"MNIST U-Net (nf={m['nf']}), {st['train_steps']} steps at batch "
               f"{st['batch_size']} per recipe; best of {len(res['samplers'])} samplers; "
               f"n={st['num_samples']}", fontsize=8)
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  fig.savefig(path, dpi=100)
  plt.close(fig)


# ------------------------------------------------------------------------------------------------
# Timing the training step
# ------------------------------------------------------------------------------------------------
def measure_steps(s: Settings, recipes: Sequence[str], calls: int,
                  log: Callable[[str], None] = print) -> dict:
  """Seconds per training step of every recipe at ``s.batch_size``: ``calls`` compiled calls
  (n_jitted_steps each) after one warm-up call, on random batches (the step's cost does not
  depend on the pixels), no workdir; and the training time of ``s.train_steps`` steps."""
  from jax.sharding import AxisType
  from score_sde.train import Trainer
  mesh = None
  if s.train_devices:
    mesh = jax.make_mesh((s.train_devices,), ("data",), axis_types=(AxisType.Auto,),
                         devices=jax.devices()[:s.train_devices])
  rng = np.random.default_rng(0)
  out = {}
  for name in recipes:
    config = check_recipe(s, name)
    trainer = Trainer(config, None, mesh=mesh)
    n = int(config.training.n_jitted_steps)
    local = s.batch_size // jax.process_count()
    batches = [{"image": rng.random((local, 28, 28, 1), np.float32)} for _ in range(n)]
    t0 = time.time()
    jax.block_until_ready(trainer.train_steps(batches))
    t_compile = time.time() - t0
    t0 = time.time()
    for _ in range(calls):
      jax.block_until_ready(trainer.train_steps(batches))
    per_step = (time.time() - t0) / (calls * n)
    out[name] = {"seconds_per_step": per_step, "first_call_seconds": round(t_compile, 1),
                 "train_hours": per_step * s.train_steps / 3600}
    log(f"{name}: {per_step:.3f} s/step at batch {s.batch_size} (nf={config.model.nf}; first "
        f"call {t_compile:.0f} s) -> {s.train_steps} steps in "
        f"{out[name]['train_hours']:.1f} h")
  log(f"all recipes: {sum(r['train_hours'] for r in out.values()):.1f} h of training")
  return out


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------
def settings_from_flags(flag_values: flags.FlagValues = FLAGS) -> Settings:
  """The Settings of the command line: --smoke's values for the flags not given, --steps /
  --batch as train_steps / batch_size, the NFEs as integers."""
  if flag_values.smoke:
    for name, value in SMOKE.items():
      if not flag_values[name].present:
        flag_values[name].value = value
  return Settings.from_flags(flag_values, train_steps=flag_values.steps,
                             batch_size=flag_values.batch, samplers=tuple(flag_values.samplers),
                             nfes=tuple(common.ints(flag_values.nfes)))


def main(argv: Sequence[str]) -> None:
  common.no_arguments(argv)
  if FLAGS.from_json:
    with open(FLAGS.from_json) as f:
      res = json.load(f)
    common.log(best_table(res) + "\n\n" + full_table(res))
    if FLAGS.plot:
      plot(res, FLAGS.plot)
      common.log(f"wrote {FLAGS.plot}")
    return
  s = settings_from_flags()
  try:  # settings that cannot run are usage errors, found before anything trains or compiles
    s.check()
    for name in FLAGS.recipes:
      check_recipe(s, name)
  except ValueError as e:  # Settings names its fields; this script's flags are --steps, --batch
    message = str(e).replace("--train_steps", "--steps").replace("--batch_size", "--batch")
    raise app.UsageError(message) from e
  if FLAGS.measure_steps:
    measure_steps(s, FLAGS.recipes, FLAGS.measure_steps, log=common.log)
  else:
    run(s, FLAGS.recipes, log=common.log)


if __name__ == "__main__":
  define_flags()
  app.run(main)
