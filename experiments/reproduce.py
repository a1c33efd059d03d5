"""Reproduce a row of the score-SDE paper (or of the MNIST table) end to end.

  python -m experiments.reproduce --list
  python -m experiments.reproduce --row vp_ddpmpp_cont_pc \
      --checkpoint /ckpts/vp/cifar10_ddpmpp_continuous --workdir runs/reproduce
  python -m experiments.reproduce --row mnist_vp_pc --data_dir /data/mnist --workdir runs/repro
  python -m experiments.reproduce --row vp_ddpmpp_cont_pc --smoke --workdir /tmp/smoke

A CIFAR-10 row (:mod:`experiments.reproduce_rows`): the released checkpoint (a score_sde JAX
``checkpoint_<N>`` or score_sde_pytorch ``checkpoint_<N>.pth`` file, or the folder holding them:
the row's ``checkpoint_<N>``, else the smallest / largest N as the README's rule says) is checked
against the row (its number, then its parameter tree against the row's config) and imported into
``<workdir>/<row>``; the reference statistics ``<workdir>/fid_stats/cifar10_train_32.npz`` are built
if missing and checked (feature extractor, resize, resolution) if present. All of that happens
before anything is sampled. Then ``--mode eval``'s loop runs with the row's sampler settings
(resumable: rerun the same command after an interruption; sharded over all devices), over
``num_seeds`` seed sets, and ``<workdir>/<row>/reproduce.json`` gets the measured values beside
the published ones, their difference and the standard error of the mean over the seed sets (for
bits/dim: over images x passes).

An MNIST row trains (or reuses, cached under ``<workdir>/mnist``) this framework's small U-Net
with the row's settings and measures the classifier-feature FD per seed set or the bits/dim per
pass. ``--smoke`` runs a row on tiny sizes: a random checkpoint written in the reference's own
msgpack format, a mocked 12-image CIFAR-10, random Inception weights at a 75 px resize (CIFAR
rows); a 10-step model and few samples (MNIST rows; needs ``--data_dir``).
"""
from __future__ import annotations

import copy
import importlib
import json
import math
import os
import re
import time
from typing import Any, Callable, Optional

from absl import app, flags, logging

from experiments import common
from experiments.reproduce_rows import (BPD_PROTOCOL, ROWS, Row, as_dict, get_row, markdown_table,
                                        rows_of_folder)

FLAGS = flags.FLAGS
_CKPT = re.compile(r"checkpoint_(\d+)(?:\.pth)?")


class RowMismatch(ValueError):
  """The inputs do not belong to the row (checkpoint number, parameter tree, statistics)."""


def define_flags(flag_values: flags.FlagValues = FLAGS) -> None:
  """Defines this script's flags on ``flag_values`` (called when the script runs)."""
  fv = dict(flag_values=flag_values)
  flags.DEFINE_string("row", None, "Row id (--list prints them).", **fv)
  flags.DEFINE_bool("list", False, "Print the rows as a markdown table and exit.", **fv)
  flags.DEFINE_bool("smoke", False, "Run the row end to end on tiny sizes (random checkpoint in "
                    "the reference's format, random Inception weights).", **fv)
  flags.DEFINE_string("checkpoint", None, "Released checkpoint file or folder (CIFAR-10 rows).",
                      **fv)
  flags.DEFINE_string("workdir", "runs/reproduce", "Output directory (one subdirectory per row; "
                      "reference statistics in <workdir>/fid_stats).", **fv)
  flags.DEFINE_string("data_dir", None, "Dataset directory (tfds data_dir; MNIST: idx files).",
                      **fv)
  flags.DEFINE_string("stats", None, "Reference statistics .npz (default: <workdir>/fid_stats/"
                      "cifar10_train_32.npz, built if missing).", **fv)
  flags.DEFINE_string("inception_weights", None, "Local pt_inception-2015-12-05-6726825d.pth.", **fv)
  flags.DEFINE_integer("num_samples", None, "Samples per seed set (default: the row's; fewer "
                       "makes the FID biased upwards and the JSON says so).", **fv)
  flags.DEFINE_integer("num_seeds", None, "Seed sets (default: the row's).", **fv)
  flags.DEFINE_integer("batch_size", None, "Global sampling / Inception batch (eval.batch_size).",
                       **fv)
  flags.DEFINE_string("out", None, "Also write the JSON row here (with --mnist_table: the "
                      "collected MNIST results).", **fv)
  flags.DEFINE_bool("mnist_table", False, "Collect <workdir>/<row>/reproduce.json of every MNIST "
                    "row that has one into one JSON (--out) and print the markdown table.", **fv)


# ------------------------------------------------------------------------------------------------
# Config and checkpoint of a row (nothing compiled)
# ------------------------------------------------------------------------------------------------


def row_config(row: Row, *, num_samples: Optional[int] = None, num_seeds: Optional[int] = None,
               batch_size: Optional[int] = None, data_dir: Optional[str] = None,
               stats_path: Optional[str] = None, inception_weights: Optional[str] = None):
  """The row's config: its config file with the row's sampler and eval settings."""
  config = importlib.import_module(row.config_module).get_config()
  s = dict(row.sampling)
  num_scales = s.pop("num_scales", None)
  with config.unlocked():
    for k, v in s.items():
      config.sampling[k] = v
    if num_scales is not None:
      config.model.num_scales = int(num_scales)
    ev = config.eval
    ev.enable_loss = False
    ev.enable_bpd = row.metric == "bpd"
    ev.enable_sampling = row.metric == "fid"
    ev.num_samples = int(num_samples or row.num_samples or ev.num_samples)
    ev.num_seeds = int(num_seeds or row.num_seeds)
    for k, v in row.eval.items():
      ev[k] = v
    if batch_size:
      ev.batch_size = int(batch_size)
    ev.stats_path = stats_path
    if inception_weights:
      ev.inception_weights = inception_weights
    if data_dir:
      config.data.data_dir = data_dir
  return config


def find_checkpoint(row: Row, path: str) -> tuple[str, int]:
  """The file of ``path`` (file, or folder of ``checkpoint_<N>[.pth]``) that the row uses, and N.

  Raises RowMismatch when a file's N is not the row's (naming the rows it belongs to) or the folder
  lacks the row's checkpoint; FileNotFoundError when there is nothing.
  """
  ck = row.checkpoint
  if os.path.isfile(path):
    m = _CKPT.fullmatch(os.path.basename(path))
    n = int(m.group(1)) if m else None
    if ck.index is not None and n != ck.index:
      others = [r.id for r in rows_of_folder(ck.folder)
                if r.checkpoint.index is not None and r.checkpoint.index == n]
      belongs = f" (it is the checkpoint of rows {others})" if others else ""
      raise RowMismatch(
          f"{path} is not the checkpoint of row {row.id!r}{belongs}: the row uses "
          f"{ck.folder}/checkpoint_{ck.index} ({'best-FID' if ck.pick == 'first' else 'last'} "
          f"checkpoint, {row.table}). Pass that file or its folder.")
    return path, (n if n is not None else -1)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"No checkpoint file or folder at {path!r} (row {row.id!r} needs "
                            f"{ck.name} from the released {ck.folder!r} folder).")
  found = {int(m.group(1)): os.path.join(path, f) for f in sorted(os.listdir(path))
           if (m := _CKPT.fullmatch(f)) and os.path.isfile(os.path.join(path, f))}
  if not found:
    raise FileNotFoundError(f"No checkpoint_<N> / checkpoint_<N>.pth files in {path!r} (row "
                            f"{row.id!r} needs {ck.name}).")
  if ck.index is not None:
    if ck.index not in found:
      raise RowMismatch(f"{path} holds checkpoints {sorted(found)}, not checkpoint_{ck.index} "
                        f"of row {row.id!r} ({ck.folder}); is it the {ck.folder!r} folder?")
    return found[ck.index], ck.index
  n = min(found) if ck.pick == "first" else max(found)
  logging.info("Row %s: %s checkpoint of %s is checkpoint_%d (README rule).", row.id,
               "best-FID (smallest)" if ck.pick == "first" else "last (largest)", path, n)
  return found[n], n


def load_row_checkpoint(row: Row, config, path: str):
  """The checkpoint's trees, checked against the row's config (nothing compiled or written);
  RowMismatch naming the first mismatching parameter otherwise."""
  from score_sde import checkpoint_import as ci
  try:
    return ci.load_imported_state(path, config)
  except ValueError as e:
    raise RowMismatch(f"{path} does not belong to row {row.id!r} (config {row.config}, released "
                      f"folder {row.checkpoint.folder}): {e}") from e


# ------------------------------------------------------------------------------------------------
# CIFAR-10 rows
# ------------------------------------------------------------------------------------------------


def _mean_stderr(values: list[float]) -> tuple[float, Optional[float]]:
  import numpy as np
  v = np.asarray(values, np.float64)
  return float(v.mean()), (float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else None)


def _metric_entry(published: Optional[float], values: list[float],
                  stderr: Optional[float] = None) -> dict:
  mean, se = _mean_stderr(values)
  se = stderr if stderr is not None else se
  out = {"measured": mean, "per_seed": values, "stderr": se, "published": published}
  if published is not None:
    out["difference"] = mean - published
    out["difference_in_stderr"] = (None if not se else (mean - published) / se)
  return out


def run_image_row(row: Row, checkpoint: str, workdir: str, *, num_samples=None, num_seeds=None,
                  batch_size=None, data_dir=None, stats_path=None, inception_weights=None,
                  inception_variables=None, config_hook: Optional[Callable] = None,
                  deviations: Optional[list] = None) -> dict:
  """Runs a CIFAR-10 row (see the module docstring); returns the JSON record."""
  from score_sde.config_validation import validate_config
  from score_sde.evaluation import evaluate, image_eval
  t0 = time.time()
  deviations = list(deviations or [])
  root = os.path.abspath(workdir)
  run_dir = os.path.join(root, row.id)
  config = row_config(row, num_samples=num_samples, num_seeds=num_seeds, batch_size=batch_size,
                      data_dir=data_dir, stats_path=stats_path,
                      inception_weights=inception_weights)
  if config_hook is not None:
    config_hook(config)
  if row.metric == "fid" and not config.eval.stats_path:
    config.eval.stats_path = image_eval.default_stats_path(config, root)
  if num_samples and num_samples != row.num_samples:
    deviations.append(f"num_samples {num_samples} instead of {row.num_samples} (FID is biased "
                      "upwards at fewer samples: not comparable with the published value)")
  if num_seeds and num_seeds != row.num_seeds:
    deviations.append(f"num_seeds {num_seeds} instead of {row.num_seeds}")
  validate_config(config)
  # 1. The checkpoint: its number, then its tree (before any statistics or sampling).
  path, index = find_checkpoint(row, checkpoint)
  imported = load_row_checkpoint(row, config, path)
  # 2. The reference statistics: checked (extractor, resize, resolution) or built.
  stats_info = None
  if row.metric == "fid":
    feature_fn = image_eval.load_feature_fn(config, inception_variables)
    if os.path.isfile(config.eval.stats_path):
      try:
        reference = image_eval.load_reference(config, root, feature_fn)
      except ValueError as e:
        raise RowMismatch(f"Reference statistics do not fit row {row.id!r}: {e}") from e
      built = False
    else:
      image_eval.compute_fid_stats(config, root, inception_variables)
      reference = image_eval.load_reference(config, root, feature_fn)
      built = True
    stats_info = {"path": config.eval.stats_path, "feature_extractor": reference.feature_extractor,
                  "resolution": reference.resolution, "count": reference.count,
                  "built_now": built, "split": config.eval.fid_stats_split}
  from score_sde.checkpoint_import import save_imported_state
  step = save_imported_state(config, imported, run_dir, source=path)
  with config.unlocked():
    config.eval.begin_ckpt = config.eval.end_ckpt = int(step)
  # 3. Sample / integrate (resumable) with the row's settings.
  records = evaluate.run_eval(config, run_dir, inception_variables)
  record = next(r for r in records if r["step"] == step)
  metrics = {}
  if row.metric == "fid":
    n_seeds = int(config.eval.num_seeds)
    for key in ("fid", "inception_score", "kid", "sample_nfe"):
      if key not in record:
        continue
      values = ([record[f"{key}_seed{s}"] for s in range(n_seeds)] if n_seeds > 1
                else [record[key]])
      metrics[key] = _metric_entry(row.published.get(key), [float(v) for v in values])
  else:
    metrics["bpd"] = _metric_entry(row.published["bpd"], [float(record["bpd"])],
                                   stderr=float(record["bpd_stderr"]))
    metrics["bpd"]["stderr_over"] = "images x passes"
    metrics["bpd_nfe"] = {"measured": float(record["bpd_nfe"])}
  out = _record(row, config, metrics, deviations, t0)
  out["checkpoint"] = {"path": path, "index": index, "training_step": int(step),
                       "released": row.checkpoint.name, "rule": row.checkpoint.pick,
                       "index_source": row.checkpoint.source or "README rule (smallest = best "
                       "FID, largest = last)"}
  out["reference_statistics"] = stats_info
  if row.metric == "fid":
    out["seeds"] = (f"seed set s, sample i: key fold_in(fold_in(PRNGKey({int(config.seed)} + 4), "
                    f"s), i), s < {int(config.eval.num_seeds)}")
  if row.metric == "bpd":
    out["likelihood_protocol"] = _bpd_protocol(config)
  failed = record.get("failed")
  if failed:
    out["failed"] = failed
  _write(out, run_dir)
  return out


def _bpd_protocol(config) -> dict:
  centered = bool(config.data.centered)
  return {**BPD_PROTOCOL, "repeats": int(config.eval.bpd_repeats),
          "num_images": int(config.eval.num_bpd_samples),
          "hutchinson_type": str(config.eval.hutchinson_type), "rtol": float(config.eval.rtol),
          "atol": float(config.eval.atol), "eps": 1e-5, "ode_method": "dopri5 (reference: scipy "
          "RK45)", "centered": centered, "offset_bits": 7 if centered else 8,
          "formula": "bpd = -(log p_T(z) + delta log p) / (D ln 2) + offset, offset = 7 - "
                     "inverse_scaler(-1)"}


def _record(row: Row, config, metrics: dict, deviations: list, t0: float) -> dict:
  import jax
  return {"row": row.id, "table": row.table, "model": row.model, "config": row.config,
          "published": row.published, "metrics": metrics,
          "sampling": {k: v for k, v in config.sampling.to_dict().items()
                       if k != "options"} | {"num_scales": int(config.model.num_scales)},
          "num_samples": int(config.eval.num_samples) if row.metric != "bpd" else 0,
          "num_seeds": int(config.eval.num_seeds),
          "comparable": not deviations, "deviations": deviations,
          "devices": f"{jax.device_count()} x {jax.devices()[0].platform}",
          "seconds": round(time.time() - t0, 1), "row_definition": as_dict(row)}


def _write(out: dict, run_dir: str, extra: Optional[str] = None) -> None:
  from score_sde.utils import write_json
  os.makedirs(run_dir, exist_ok=True)
  for p in filter(None, (os.path.join(run_dir, "reproduce.json"), extra)):
    os.makedirs(os.path.dirname(os.path.abspath(p)), exist_ok=True)
    write_json(p, out)
  logging.info("Wrote %s", os.path.join(run_dir, "reproduce.json"))


# ------------------------------------------------------------------------------------------------
# MNIST rows
# ------------------------------------------------------------------------------------------------


def run_mnist_row(row: Row, workdir: str, data_dir: Optional[str], *,
                  num_seeds: Optional[int] = None, overrides: Optional[dict] = None,
                  deviations: Optional[list] = None, log: Callable[[str], None] = print) -> dict:
  """Trains / reuses the row's MNIST model and measures its FD per seed set or bits/dim per pass."""
  import jax
  import numpy as np
  from experiments import mnist_setup as ms
  from score_sde import likelihood, sampling, sde_lib
  from score_sde.evaluation import mnist_features
  t0 = time.time()
  deviations = list(deviations or [])
  if not data_dir:
    raise ValueError(f"Row {row.id!r} needs MNIST: pass --data_dir (the four idx files).")
  settings = dict(row.mnist, **(overrides or {}))
  root = os.path.abspath(workdir)
  s = ms.Settings(data_dir=data_dir, workdir=os.path.join(root, "mnist"), out="", plot="",
                  **settings)
  s.check()
  n_seeds = int(num_seeds or row.num_seeds)
  if n_seeds != row.num_seeds:
    deviations.append(f"num_seeds {n_seeds} instead of {row.num_seeds}")
  module = importlib.import_module(row.config_module)
  config = ms.mnist_config(s, module)
  model_dir = os.path.join(s.workdir, f"{config.training.sde}_steps{s.train_steps}")
  info: dict = {}
  trainer, params, info["model"] = ms.get_score_model(s, config, row.config, model_dir)
  # Sampler settings go on a copy: the trained run's config (and fingerprint) stays as trained.
  scfg = copy.deepcopy(config)
  sampling_overrides = dict(row.sampling)
  with scfg.unlocked():
    if "num_scales" in sampling_overrides:
      scfg.model.num_scales = int(sampling_overrides.pop("num_scales"))
    for k, v in sampling_overrides.items():
      scfg.sampling[k] = v
  sde = sde_lib.get_sde(scfg)
  per_seed = []
  extra: dict = {}
  if row.metric == "fd":
    ref = ms.prepare_reference(s, config, info, log)
    batch, _ = s.batching
    sampler = sampling.get_sampler_from_config(scfg, sde, (batch, 28, 28, 1))
    nfe = None
    for seed in range(n_seeds):
      key = jax.random.fold_in(jax.random.PRNGKey(1000 + s.seed), seed)
      x, nfe, t_compile, t_sample = ms.draw_samples(sampler, sde, trainer.model, params, key, s,
                                                    None)
      x = x[:s.num_samples]
      images = ms.quantize(np.asarray(trainer.inverse_scaler(x)))
      feats = mnist_features.classifier_outputs(ref["clf"], s.feature_dim, images)[1]
      per_seed.append(float(mnist_features.feature_fd(feats, ref["ref_feats"])))
      log(f"{row.id} seed {seed}: FD {per_seed[-1]:.4g} ({nfe} NFE, {t_sample:.1f} s)")
    extra = {"nfe": nfe, "floor": info["floor"], "fd_uniform_noise": info["fd_uniform_noise"],
             "classifier": info["classifier"]}
  else:
    test_x, _ = ms.load_split(config, "test")
    idx = np.random.default_rng(s.seed).permutation(len(test_x))[:s.num_bpd]
    lik = likelihood.get_likelihood_fn(sde, rtol=s.bpd_tol, atol=s.bpd_tol,
                                       hutchinson_type="rademacher", eps=1e-5)
    score_fn = ms.make_score_fn(sde, trainer.model, params)
    nfes, images_bpd = [], []
    for seed in range(n_seeds):
      k = jax.random.fold_in(jax.random.PRNGKey(2000 + s.seed), seed)
      kq, kp = jax.random.split(k)
      y = likelihood.dequantize(kq, test_x[idx], centered=bool(config.data.centered))
      bpd, _, nfe = lik(kp, score_fn, y)
      bpd = np.asarray(likelihood.discrete_bpd(bpd, centered=bool(config.data.centered)))
      images_bpd.append(bpd)
      per_seed.append(float(bpd.mean()))
      nfes.append(int(nfe))
      log(f"{row.id} pass {seed}: {per_seed[-1]:.4f} bits/dim ({int(nfe)} NFE)")
    extra = {"nfe": max(nfes), "likelihood_protocol": _bpd_protocol_mnist(config, s, n_seeds),
             "stderr_images_x_passes": float(np.concatenate(images_bpd).std(ddof=1)
                                             / math.sqrt(sum(map(len, images_bpd))))}
  mean, se = _mean_stderr(per_seed)
  metric = row.metric
  out = {"row": row.id, "table": row.table, "model": row.model, "config": row.config,
         "metric": metric,
         "metrics": {metric: {"measured": mean, "per_seed": per_seed, "stderr": se,
                              "std": float(np.std(per_seed, ddof=1)) if len(per_seed) > 1
                              else None}},
         "sampling": dict(row.sampling), "num_samples": s.num_samples if metric == "fd" else 0,
         "num_seeds": n_seeds, "settings": dataclasses_asdict(s), "model_info": info["model"],
         "comparable": not deviations, "deviations": deviations,
         "devices": f"{jax.device_count()} x {jax.devices()[0].platform}",
         "seconds": round(time.time() - t0, 1), **extra}
  _write(out, os.path.join(root, row.id))
  return out


def dataclasses_asdict(s) -> dict:
  import dataclasses
  return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(s).items()}


def _bpd_protocol_mnist(config, s, passes: int) -> dict:
  centered = bool(config.data.centered)
  return {"split": "test", "dequantization": BPD_PROTOCOL["dequantization"], "repeats": passes,
          "num_images": s.num_bpd, "hutchinson_type": "rademacher", "rtol": s.bpd_tol,
          "atol": s.bpd_tol, "eps": 1e-5, "ode_method": "dopri5", "centered": centered,
          "offset_bits": 7 if centered else 8}


# ------------------------------------------------------------------------------------------------
# Smoke runs
# ------------------------------------------------------------------------------------------------

_SMOKE_MODEL = dict(nf=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), num_scales=4)
_SMOKE_EVAL = dict(inception_size=75, batch_size=8, num_samples=8, kid_num_features=8,
                   is_splits=2, num_seeds=2, num_bpd_samples=4, bpd_repeats=1, rtol=1e-3,
                   atol=1e-3, fid_stats_split="train")
_SMOKE_MNIST = dict(train_steps=10, nf=8, warmup=5, classifier_steps=20, feature_dim=16,
                    num_samples=16, sample_batch=16, num_bpd=2, bpd_tol=1e-2)


def shrink_config(config) -> None:
  """The row's config at smoke size: 8x8 images, a two-level nf=8 network, 4 noise scales."""
  with config.unlocked():
    config.data.image_size = 8
    config.data.data_dir = None
    for k, v in _SMOKE_MODEL.items():
      config.model[k] = v
    for k, v in _SMOKE_EVAL.items():
      config.eval[k] = v
    config.eval.stats_path = None
    if config.sampling.method == "ode":
      config.sampling.rtol = config.sampling.atol = 1e-3


def write_reference_checkpoint(config, path: str, step: int, seed: int = 0) -> str:
  """A checkpoint in the original score_sde's own format (flax msgpack of its ``State``) holding
  random weights, N(0, 0.05^2) per entry, of ``config``'s network (shapes from
  ``param_shapes``: nothing compiled)."""
  import jax
  import numpy as np
  from flax import serialization
  from score_sde.checkpoint_import import reference_state_dict
  from score_sde.models.utils import param_shapes
  rng = np.random.default_rng(seed)
  params = jax.tree.map(lambda a: (0.05 * rng.standard_normal(a.shape)).astype(np.float32),
                        param_shapes(config))
  state = reference_state_dict(params, step=step)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb") as f:
    f.write(serialization.msgpack_serialize(state))
  return path


def smoke(row: Row, workdir: str, data_dir: Optional[str] = None, inception_variables=None) -> dict:
  """``--smoke``: the row end to end at tiny sizes (see the module docstring)."""
  deviation = ["smoke run: tiny sizes, random weights; the numbers mean nothing"]
  if row.mnist is not None:
    return run_mnist_row(row, workdir, data_dir, num_seeds=2, overrides=_SMOKE_MNIST,
                         deviations=deviation)
  import numpy as np
  import tensorflow_datasets as tfds
  from score_sde.evaluation import inception
  config = row_config(row)
  shrink_config(config)
  ck = row.checkpoint
  folder = os.path.join(os.path.abspath(workdir), "released", ck.folder)
  indices = [ck.index] if ck.index is not None else [1, 2]   # two: the README rule picks one
  for i in indices:
    path = os.path.join(folder, f"checkpoint_{i}")
    if not os.path.exists(path):   # a rerun resumes with the same checkpoint
      write_reference_checkpoint(config, path, step=50000 * i)
  if inception_variables is None:
    inception_variables = inception.init_inception(seed=0)
  rng = np.random.default_rng(0)
  examples = {split: [{"image": rng.integers(0, 256, (32, 32, 3), dtype=np.uint8),
                       "label": i % 10, "id": str(i)} for i in range(n)]
              for split, n in (("train", 12), ("test", 8))}

  def as_data_source(self, split, decoders=None, deserialize_method=None, **kwargs):
    return examples[split]

  with tfds.testing.mock_data(as_data_source_fn=as_data_source):
    return run_image_row(row, folder, workdir, inception_variables=inception_variables,
                         config_hook=shrink_config, deviations=deviation)


def mnist_table(workdir: str, out: Optional[str] = None) -> str:
  """The MNIST rows measured under ``workdir`` as one JSON (``out``) and a markdown table."""
  from score_sde.utils import write_json
  rows, lines = {}, ["| row | metric | mean | seed-to-seed std | per seed | NFE | model | "
                     "wall s (2 shared cores) |", "|---|---|---|---|---|---|---|---|"]
  for row in ROWS.values():
    path = os.path.join(workdir, row.id, "reproduce.json")
    if row.mnist is None or not os.path.isfile(path):
      continue
    with open(path) as f:
      rec = json.load(f)
    rows[row.id] = rec
    m = rec["metrics"][row.metric]
    info = rec["model_info"]
    floor = f" (floor {rec['floor']['fd']:.3g})" if "floor" in rec else ""
    lines.append(f"| `{row.id}` | {row.metric}{floor} | {m['measured']:.4g} | "
                 f"{m['std']:.3g} | {', '.join(f'{v:.4g}' for v in m['per_seed'])} | "
                 f"{rec.get('nfe')} | nf={info['nf']}, {info['trained_steps']} steps, test DSM "
                 f"{info['test_dsm_loss']:.4f} | {rec['seconds']} |")
  if out:
    write_json(out, {"rows": rows, "note": "experiments.reproduce --row <id> --data_dir <mnist> "
                     "on 2 CPU cores shared with other jobs; see docs/reproduce.md"})
  return "\n".join(lines)


# ------------------------------------------------------------------------------------------------


def main(argv) -> None:
  common.no_arguments(argv)
  logging.set_verbosity(logging.INFO)
  if FLAGS.list:
    print(markdown_table())
    return
  if FLAGS.mnist_table:
    print(mnist_table(os.path.abspath(FLAGS.workdir), FLAGS.out))
    return
  if not FLAGS.row:
    raise app.UsageError("Pass --row <id> (or --list).")
  row = get_row(FLAGS.row)
  if FLAGS.smoke:
    out = smoke(row, FLAGS.workdir, FLAGS.data_dir)
  elif row.mnist is not None:
    out = run_mnist_row(row, FLAGS.workdir, FLAGS.data_dir, num_seeds=FLAGS.num_seeds)
  else:
    if not FLAGS.checkpoint:
      raise app.UsageError(f"Row {row.id!r} needs --checkpoint: the released "
                           f"{row.checkpoint.name} (file or folder).")
    out = run_image_row(row, FLAGS.checkpoint, FLAGS.workdir, num_samples=FLAGS.num_samples,
                        num_seeds=FLAGS.num_seeds, batch_size=FLAGS.batch_size,
                        data_dir=FLAGS.data_dir, stats_path=FLAGS.stats,
                        inception_weights=FLAGS.inception_weights)
  if FLAGS.out:
    _write(out, os.path.join(os.path.abspath(FLAGS.workdir), row.id), FLAGS.out)
  print(json.dumps({k: out[k] for k in ("row", "metrics", "comparable", "deviations")},
                   indent=1, default=str))


if __name__ == "__main__":
  define_flags()
  app.run(main)
