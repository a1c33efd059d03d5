"""Consistency models on MNIST (issue 16): distillation (CD) from the MNIST score model and improved
consistency training (iCT), next to the teacher's own few-step solvers.

Scored like ``experiments.recipes_mnist`` (same ``--workdir``: the same classifier, reference test
images and noise floor; classifier-feature Frechet distance, NOT FID):

  teacher  configs/mnist/vp_continuous.py, the VP-DSM recipe of ``recipes_mnist``, trained for
           ``--teacher_steps`` in ``<workdir>/vp_continuous/`` (with the same --nf, --batch,
           --teacher_steps, --warmup, --ema_rate, --seed that recipes_mnist ran with, its checkpoint
           is reused, not retrained). Scored with the solvers of ``--teacher_samplers`` at every
           NFE of ``--teacher_nfes``.
  cd_vp    configs/mnist/cd_vp.py: distilled from that teacher (Heun steps between adjacent times
           of N = 18, target EMA 0.95, l2) for ``--steps`` steps in ``<workdir>/cd_vp/``.
  ict      configs/mnist/ict.py: trained from data alone (iCT curriculum, lognormal times,
           pseudo-Huber) for ``--steps`` steps in ``<workdir>/ict/``.

Both students are the teacher's U-Net (same width) with the 'consistency' parametrization, same
batch, learning-rate warm-up and seed. Each is sampled with the ``consistency`` sampler at every
step count of ``--steps_grid`` (default 1, 2, 4), twice for 2+ steps: at the default intermediate
times (interior points of EDM's rho = 7 schedule) and at times chosen greedily (as Song et al. 2023
choose theirs): with the first k - 1 times fixed, the k-th is the candidate of a 24-point rho = 7
grid below the previous one whose k-step samples have the lowest FD to *training* images (the
selection set; the reported FD is against the held-out test references, from another prior draw).
Every model starts from the same standard-normal draw (times the prior's scale).

    python -m experiments.consistency_mnist --data_dir ../shared/data/mnist \\
        --workdir runs/recipes_mnist --nf 16 --batch 32 --teacher_steps 5000 --steps 3000 \\
        --out docs/results/consistency_mnist.json

(the setting of docs/consistency.md; run ``experiments.recipes_mnist`` with the same
--workdir / --nf / --batch / --steps 5000 first, or this script trains the teacher itself).
``--smoke``: tiny sizes in a temporary workdir (plumbing only; tests/test_consistency_mnist.py).
"""
from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from typing import Callable, Sequence

import jax
import numpy as np
from absl import app, flags

from experiments import common, mnist_setup
from experiments.common import SAMPLER_CONFIGS
from experiments.mnist_setup import Settings

FLAGS = flags.FLAGS

TEACHER = "vp_continuous"
STUDENTS = ("cd_vp", "ict")
# --students entry that trains nothing: the teacher's own denoiser (x + sigma^2 score) / alpha read
# by the consistency sampler, the control for what consistency training adds.
TEACHER_DENOISER = "teacher_denoiser"
DEFAULTS = dict(workdir="runs/recipes_mnist", nf=16, batch_size=32, num_samples=512,
                out="docs/results/consistency_mnist.json")
SMOKE = dict(steps=5, teacher_steps=5, batch=16, nf=8, warmup=5, classifier_steps=20,
             num_samples=16, sample_batch=16, teacher_nfes=["2", "10"],
             teacher_samplers=["dpm_solver++2M"], steps_grid=["1", "2"], candidates=4, out="",
             workdir=os.path.join(tempfile.gettempdir(), "score_sde_consistency_mnist_smoke"))
SETTINGS_FLAGS = ("data_dir", "workdir", "nf", "warmup", "ema_rate", "classifier_steps",
                  "feature_dim", "num_samples", "sample_batch", "seed", "out")


def define_flags(flag_values: flags.FlagValues = FLAGS) -> None:
  fv = dict(flag_values=flag_values)
  mnist_setup.define_flags(flag_values, SETTINGS_FLAGS,
                           **{k: v for k, v in DEFAULTS.items() if k in SETTINGS_FLAGS})
  flags.DEFINE_integer("steps", 3000, "Training steps of each consistency model (multiple of 5).",
                       **fv)
  flags.DEFINE_integer("teacher_steps", 5000, "Training steps of the teacher (recipes_mnist's "
                       "--steps).", **fv)
  flags.DEFINE_integer("batch", DEFAULTS["batch_size"], "Training batch of every model.", **fv)
  flags.DEFINE_list("students", list(STUDENTS), "configs/mnist/<name>.py consistency configs, "
                    f"or '{TEACHER_DENOISER}' (the teacher's denoiser, no training).",
                    **fv)
  flags.DEFINE_list("steps_grid", ["1", "2", "4"], "Consistency sampling step counts.", **fv)
  flags.DEFINE_list("teacher_nfes", ["1", "2", "4", "10"], "NFEs of the teacher's solvers.", **fv)
  flags.DEFINE_list("teacher_samplers", ["dpm_solver++2M", "unipc-3 bh2", "heun (EDM)"],
                    "Labels of common.SAMPLER_CONFIGS for the teacher.", **fv)
  flags.DEFINE_integer("candidates", 24, "Size of the greedy time-selection grid.", **fv)
  flags.DEFINE_boolean("smoke", False, "Tiny sizes for a plumbing check.", **fv)


@dataclasses.dataclass
class Scorer:
  """FD of model-space samples to the test references (``ref``) or to training images
  (``select``, for choosing sampling times)."""
  s: Settings
  prep: mnist_setup.Prepared
  select_feats: np.ndarray

  def fd(self, x: np.ndarray, against: str = "test") -> float:
    if against == "test":
      return float(self.prep.fd(self.s, x))
    from score_sde.evaluation import mnist_features
    images = mnist_setup.quantize(np.asarray(self.prep.trainer.inverse_scaler(x)))
    feats = mnist_features.classifier_outputs(self.prep.clf, self.s.feature_dim, images)[1]
    return float(mnist_features.feature_fd(feats, self.select_feats))


def sample(sampler, score_fn_of: Callable, params, key, s: Settings,
           x_T: np.ndarray) -> tuple[np.ndarray, int, float]:
  """``s.num_samples`` samples of ``sampler`` over the ``s.batching`` batches (one compile);
  (samples, nfe, seconds)."""
  batch, num_calls = s.batching
  fn = jax.jit(lambda p, k, z: sampler(k, score_fn_of(p), z))
  t0 = time.time()
  out, nfe = [], 0
  for i in range(num_calls):
    x, n = fn(params, jax.random.fold_in(key, i), x_T[i * batch:(i + 1) * batch])
    out.append(np.asarray(x))
    nfe = max(nfe, int(n))
  return np.concatenate(out)[:s.num_samples], nfe, time.time() - t0


def greedy_times(trainer, params, scorer: Scorer, s: Settings, x_T: np.ndarray, k_max: int,
                 candidates: int) -> dict[int, list[float]]:
  """{k: [t_1, ..., t_{k-1}]} for k = 2 .. k_max, chosen greedily on training-image FD (module
  docstring). ``x_T`` is a prior draw other than the reported one."""
  from score_sde.sampling import get_sampler
  from score_sde.sampling.consistency import greedy_consistency_times
  batch, _ = s.batching
  shape = (batch,) + trainer.shape
  x0, _, _ = sample(get_sampler("consistency", trainer.sde, shape, nfe=1), trainer.score_fn,
                    params, jax.random.PRNGKey(1000 + s.seed), s, x_T)
  return greedy_consistency_times(
      trainer.sde, trainer.score_fn(params), x0, k_max,
      lambda x: scorer.fd(x, against="train"), lambda k: jax.random.PRNGKey(2000 + k),
      candidates=candidates, batch=batch)


def train(s: Settings, name: str, steps: int, teacher=None):
  """(trainer, EMA params, info) of configs/mnist/<name>.py trained for ``steps`` steps in
  ``<workdir>/<name>/`` (reused when there)."""
  import importlib
  st = dataclasses.replace(s, train_steps=steps)
  config = mnist_setup.mnist_config(st, importlib.import_module(f"configs.mnist.{name}"))
  return mnist_setup.get_score_model(st, config, config_name=f"configs/mnist/{name}.py",
                                     model_dir=os.path.join(s.workdir, name), teacher=teacher)


def run(s: Settings, steps: int, teacher_steps: int, students: Sequence[str],
        steps_grid: Sequence[int], teacher_nfes: Sequence[int], teacher_samplers: Sequence[str],
        candidates: int, log: Callable[[str], None] = print) -> dict:
  """The module docstring's comparison; the JSON-able result (also written to ``s.out``)."""
  from score_sde.sampling import get_sampler
  t_start = time.time()
  res: dict = {"settings": dict(dataclasses.asdict(s), steps=steps, teacher_steps=teacher_steps,
                                students=list(students), steps_grid=list(steps_grid),
                                teacher_nfes=list(teacher_nfes),
                                teacher_samplers=list(teacher_samplers), candidates=candidates),
               "jax": jax.__version__, "backend": jax.default_backend()}
  info: dict = {}
  reference = mnist_setup.prepare_reference(s, mnist_setup.mnist_config(s), info, log)
  res.update(info)
  trainer, params, res["teacher_model"] = train(s, TEACHER, teacher_steps)
  prep = mnist_setup.Prepared(config=trainer.config, trainer=trainer, params=params, info=info,
                              **reference)
  from score_sde.evaluation import mnist_features
  train_x, _ = mnist_setup.load_split(trainer.config, "train")
  pick = np.random.default_rng(s.seed + 1).permutation(len(train_x))[:s.num_samples]
  select_feats = mnist_features.classifier_outputs(
      prep.clf, s.feature_dim, mnist_features.to_unit(train_x[pick]))[1]
  scorer = Scorer(s, prep, select_feats)
  batch, num_calls = s.batching
  key = jax.random.PRNGKey(s.seed)
  k_T, k_sample, k_select = jax.random.split(key, 3)

  def prior(sde, k):  # the same standard-normal draw for every model, at its prior's scale
    return np.asarray(sde.prior_sampling(k, (num_calls * batch, 28, 28, 1)))

  shape = (batch, 28, 28, 1)
  res["teacher"] = []
  for label in teacher_samplers:
    name, options = SAMPLER_CONFIGS[label]
    for nfe in teacher_nfes:
      try:
        sampler = common.build_sampler(name, options, trainer.sde, shape, nfe)
      except ValueError as e:
        res["teacher"].append({"sampler": label, "setting": nfe, "skipped": str(e)})
        continue
      x, used, secs = sample(sampler, trainer.score_fn, params, k_sample, s,
                             prior(trainer.sde, k_T))
      res["teacher"].append({"sampler": label, "setting": nfe, "nfe": used, "fd": scorer.fd(x),
                             "seconds": round(secs, 1)})
      log(f"[teacher] {label:16s} nfe={used:3d}  FD={res['teacher'][-1]['fd']:8.4g}")
  teacher_fn = trainer.score_fn(params)
  res["students"] = {}
  for student in students:
    t0 = time.time()
    if student == TEACHER_DENOISER:
      tr, p, model_info = trainer, params, res["teacher_model"]
    else:
      tr, p, model_info = train(s, student, steps,
                                teacher=teacher_fn if student.startswith("cd") else None)
    out = {"config": f"configs/mnist/{TEACHER if student == TEACHER_DENOISER else student}.py",
           "sde": repr(tr.sde),
           "loss": tr.config.training.loss, "model": model_info, "rows": []}
    chosen = greedy_times(tr, p, scorer, s, prior(tr.sde, k_select), max(steps_grid), candidates)
    out["greedy_times"] = {str(k): v for k, v in chosen.items()}
    for n in steps_grid:
      for how, times in (("edm_rho", None), ("greedy", chosen.get(n))):
        if n == 1 and how == "greedy":
          continue
        sampler = get_sampler("consistency", tr.sde, shape, nfe=n, times=times)
        x, used, secs = sample(sampler, tr.score_fn, p, k_sample, s, prior(tr.sde, k_T))
        out["rows"].append({"steps": n, "times_from": how, "nfe": used,
                            "times": [float(t) for t in sampler.times], "fd": scorer.fd(x),
                            "seconds": round(secs, 1)})
        log(f"[{student}] {n} step(s), {how:7s} times  FD={out['rows'][-1]['fd']:8.4g}")
    out["seconds"] = round(time.time() - t0, 1)
    res["students"][student] = out
    res["seconds"] = round(time.time() - t_start, 1)
    common.write_result(s.out, res, say=False)
  common.write_result(s.out, res)
  log("\n" + table(res))
  return res


def table(res: dict) -> str:
  """Markdown: FD per model and number of network evaluations (best over samplers / times)."""
  grid = sorted({r["steps"] for st in res["students"].values() for r in st["rows"]}
                | {r["setting"] for r in res["teacher"] if "fd" in r})
  lines = ["| model | " + " | ".join(f"FD @ {n} NFE" for n in grid) + " |",
           "|---|" + "---|" * len(grid)]

  def cell(rows, key):
    scored = [r for r in rows if r.get("fd") is not None]
    out = []
    for n in grid:
      rs = [r for r in scored if r[key] == n]
      if not rs:
        out.append("")
        continue
      b = min(rs, key=lambda r: r["fd"])
      what = b.get("sampler") or f"{b['times_from']} times"
      out.append(f"{b['fd']:.1f} ({what})")
    return out

  lines.append("| teacher (VP-DSM) | " + " | ".join(cell(res["teacher"], "setting")) + " |")
  for name, st in res["students"].items():
    lines.append(f"| {name} | " + " | ".join(cell(st["rows"], "steps")) + " |")
  lines.append(f"\nnoise floor (real vs real): FD {res['floor']['fd']:.2f}")
  return "\n".join(lines)


def main(argv: Sequence[str]) -> None:
  common.no_arguments(argv)
  if FLAGS.smoke:
    for name, value in SMOKE.items():
      if not FLAGS[name].present:
        FLAGS[name].value = value
  s = Settings.from_flags(FLAGS, train_steps=FLAGS.teacher_steps, batch_size=FLAGS.batch)
  unknown = [l for l in FLAGS.teacher_samplers if l not in SAMPLER_CONFIGS]
  try:
    s.check()
    if FLAGS.steps < 5 or FLAGS.steps % 5:
      raise ValueError(f"--steps must be a positive multiple of 5, got {FLAGS.steps}.")
    if unknown:
      raise ValueError(f"Unknown --teacher_samplers {unknown}; choose from "
                       f"{list(SAMPLER_CONFIGS)}.")
  except ValueError as e:
    raise app.UsageError(str(e).replace("--train_steps", "--teacher_steps")
                         .replace("--batch_size", "--batch")) from e
  run(s, FLAGS.steps, FLAGS.teacher_steps, FLAGS.students, common.ints(FLAGS.steps_grid),
      common.ints(FLAGS.teacher_nfes), FLAGS.teacher_samplers, FLAGS.candidates, log=common.log)


if __name__ == "__main__":
  define_flags()
  app.run(main)
