"""Evaluation and sampling from checkpoints: test DSM loss, bits/dim, sample quality, figures.

``run_eval`` walks the checkpoints in ``[config.eval.begin_ckpt, config.eval.end_ckpt]`` and writes
one JSON record per checkpoint into ``<workdir>/eval/results.json`` (and TensorBoard scalars
``eval/<metric>``); a checkpoint already recorded there is skipped. Within a checkpoint, finished
parts (test loss, bits/dim, each seed's sample metrics) are kept in
``<workdir>/eval/ckpt_<step>/parts.json`` and the sample metrics in progress in
``<workdir>/eval/ckpt_<step>/seed_<s>.npz``, so an interrupted evaluation resumes mid-checkpoint
without recomputing finished parts.

For image data with ``config.eval.enable_sampling``, the sample metrics are FID / IS / KID of
``config.eval.num_samples`` per-seed samples against the reference statistics
(``run_fid_stats``, ``--mode fid_stats``), over ``config.eval.num_seeds`` seed sets
(:mod:`score_sde.evaluation.image_eval`, docs/evaluation.md). For vector data they are the energy
distance to held-out data.
``run_sample`` writes samples (``.npz``) and a figure for one checkpoint.
"""
from __future__ import annotations

import math
import os
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from score_sde import datasets, likelihood, posthoc_ema
from score_sde.evaluation import image_eval, metrics
from score_sde.checkpointing import CheckpointMismatch
from score_sde.signals import StopSignals
from score_sde.train import Trainer, make_mesh, summary_writer
from score_sde.utils import data_shape, read_json, write_json


def load_trainer(config, workdir: str, step: Optional[int] = None,
          allow_config_mismatch: bool = False) -> tuple[Trainer, int]:
  """A Trainer with the checkpoint ``step`` restored, or the newest readable one (falling back
  from unreadable ones, with a warning) when ``step`` is None."""
  trainer = Trainer(config, workdir, allow_config_mismatch=allow_config_mismatch)
  if not trainer.checkpoints.all_steps():
    raise FileNotFoundError(f"No checkpoints under {workdir}; train first (--mode train).")
  if step is None:
    step, trainer.state = trainer.checkpoints.restore_latest(trainer.state)
    if step is None:
      raise FileNotFoundError(f"No readable checkpoint under {workdir} (steps "
                              f"{trainer.checkpoints.all_steps()} all failed to read; see the "
                              "warnings); retrain with --mode train.")
  else:
    trainer.state = trainer.checkpoints.restore(step, trainer.state)
  return trainer, step


def _eval_batches(config, num: int, dequantize: bool = True):
  """Up to ``num`` examples of the eval split, as process-local numpy batches in data space.

  ``dequantize=False`` reads 8-bit images as k / 255 even when the config dequantizes (bits/dim
  needs the integers and draws its own dequantization noise).
  """
  if not dequantize and config.data.get("uniform_dequantization", False):
    import copy
    config = copy.deepcopy(config)
    with config.unlocked():
      config.data.uniform_dequantization = False
  seen = 0
  for batch in datasets.get_dataset(config, "test"):
    images = batch["image"]
    if "mask" in batch:
      images = images[np.asarray(batch["mask"], bool)]
    if seen >= num:
      return
    images = images[: num - seen]
    seen += len(images)
    yield images


def test_loss(trainer: Trainer, key: jax.Array, num: int) -> float:
  """Mean DSM loss of the EMA model over ``num`` test examples."""
  values = []
  for i, images in enumerate(_eval_batches(trainer.config, num)):
    x = jnp.asarray(trainer.scaler(images))
    values.append(float(trainer.eval_loss(x, jax.random.fold_in(key, i))))
  return float(np.mean(values))


def bits_per_dim(trainer: Trainer, key: jax.Array, num: int, repeats: int = 1) -> dict:
  """Test bits/dim from the probability-flow ODE (model space; 8-bit images: discrete-data bpd)."""
  cfg = trainer.config
  fn = trainer.likelihood_fn(cfg.eval.hutchinson_type, cfg.eval.rtol, cfg.eval.atol)
  is_image = len(trainer.shape) == 3
  bpds, nfes = [], []
  for r in range(repeats):
    for i, images in enumerate(_eval_batches(cfg, num, dequantize=not is_image)):
      k = jax.random.fold_in(jax.random.fold_in(key, r), i)
      if is_image:
        k, kq = jax.random.split(k)
        dequant = likelihood.dequantize(kq, np.round(images * 255.0))
        bpd, _, nfe = fn(trainer.state.ema_params, k, jnp.asarray(trainer.scaler(dequant)))
        bpd = likelihood.discrete_bpd(bpd, centered=cfg.data.centered)
      else:
        bpd, _, nfe = fn(trainer.state.ema_params, k, jnp.asarray(trainer.scaler(images)))
      bpds.append(np.asarray(bpd))
      nfes.append(int(nfe))
  bpds = np.concatenate(bpds)
  return {"bpd": float(bpds.mean()), "bpd_stderr": float(bpds.std() / np.sqrt(len(bpds))),
          "bpd_nfe": float(np.mean(nfes))}


def sample_quality(trainer: Trainer, samples: np.ndarray, key: jax.Array) -> dict:
  """Distances between samples and held-out data (vector data: energy distance and its floor)."""
  n = len(samples)
  data = np.concatenate(list(_eval_batches(trainer.config, 2 * n)))
  out = {}
  if samples.ndim == 2 and len(data) >= 2 * n:
    out["energy_distance"] = float(metrics.energy_distance(samples, data[:n]))
    out["energy_distance_floor"] = float(metrics.energy_distance(data[n:2 * n], data[:n]))
  return out


def run_fid_stats(config, workdir: str, inception_variables=None) -> str:
  """``--mode fid_stats``: writes the reference Inception statistics; returns their path.

  Path: ``config.eval.stats_path``, else ``<workdir>/fid_stats/<dataset>_<split>_<size>.npz``.
  """
  return image_eval.compute_fid_stats(config, workdir, inception_variables)


def _finite(values: dict) -> dict:
  """The entries of ``values`` that are numbers but not finite (a failed computation)."""
  return {k: v for k, v in values.items()
          if isinstance(v, (float, int)) and not math.isfinite(float(v))}


def run_eval(config, workdir: str, inception_variables=None,
             stop_after_batches: Optional[int] = None,
             allow_config_mismatch: bool = False) -> list[dict]:
  """Evaluates every checkpoint in the configured range; returns all records (old and new).

  A record is written to results.json only from finished parts; a part whose value is not finite
  is not kept: the record lists it under ``failed`` and the next eval recomputes it. An unreadable
  checkpoint is skipped with a warning. SIGTERM / SIGINT stop at the next safe point (progress
  saved) and raise :class:`score_sde.signals.Interrupted`.

  inception_variables: inject the Inception variables (tests); else config.eval.inception_*.
  stop_after_batches: test hook, stop (progress saved) after that many sample batches of this
  call and return, as a preemption would.
  """
  mesh = make_mesh()
  fid = len(data_shape(config)) == 3 and bool(config.eval.enable_sampling)
  if fid:  # everything that can fail does so before the model is built or a checkpoint read
    opts = image_eval.eval_options(config)
    feature_fn = image_eval.load_feature_fn(config, inception_variables, mesh)
    reference = image_eval.load_reference(config, workdir, feature_fn)
  trainer = Trainer(config, workdir, mesh=mesh, allow_config_mismatch=allow_config_mismatch)
  steps = trainer.checkpoints.snapshot_steps()
  begin, end = int(config.eval.begin_ckpt), int(config.eval.end_ckpt)
  steps = [s for s in steps if s >= begin and (end < 0 or s <= end)]
  if not steps:
    trainer.close()
    raise FileNotFoundError(f"No checkpoints in [{begin}, {end}] under {workdir}; train first.")
  out_dir = os.path.join(workdir, "eval")
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, "results.json")
  records = read_json(path, [])
  done = {r["step"] for r in records if not r.get("failed")}
  writer = summary_writer(os.path.join(workdir, "eval"))
  key = jax.random.PRNGKey(config.seed + 2)
  sample_fn = None
  batches = [0]
  evaluated = False

  def stop(_):
    batches[0] += 1
    return signals.requested or (stop_after_batches is not None
                                 and batches[0] >= stop_after_batches)

  with StopSignals() as signals:
    try:
      for step in steps:
        if step in done:
          logging.info("Checkpoint %d already evaluated; skipping.", step)
          continue
        signals.check(f"evaluation stopped before checkpoint {step}; finished checkpoints are "
                      f"in {path}; rerun to resume.")
        try:
          trainer.state = trainer.checkpoints.restore(step, trainer.state, snapshot_only=True)
        except CheckpointMismatch:
          raise
        except Exception as e:  # pylint: disable=broad-except
          logging.warning("Skipping checkpoint %d: it does not read (%s).", step,
                          str(e).splitlines()[0][:300])
          continue
        evaluated = True
        ckpt_dir = os.path.join(out_dir, f"ckpt_{step}")
        parts_path = os.path.join(ckpt_dir, "parts.json")
        parts, failed = read_json(parts_path, {}), {}

        def keep(values: dict):
          """Keeps finished, finite parts (saved at once: a preempted eval resumes after them)."""
          bad = _finite(values)
          if bad:
            logging.error("Checkpoint %d: %s not finite; not kept, recomputed by the next eval.",
                          step, bad)
            failed.update({k: f"not finite ({v})" for k, v in bad.items()})
            return
          parts.update(values)
          if jax.process_index() == 0:
            os.makedirs(ckpt_dir, exist_ok=True)
            write_json(parts_path, parts)

        ekey = jax.random.fold_in(key, step)
        if config.eval.enable_loss and "test_loss" not in parts:
          keep({"test_loss": test_loss(trainer, ekey, config.eval.num_bpd_samples)})
          signals.check(f"evaluation of checkpoint {step} stopped after its test loss; "
                        "progress saved, rerun to resume.")
        if config.eval.enable_bpd and "bpd" not in parts:
          keep(bits_per_dim(trainer, ekey, config.eval.num_bpd_samples, config.eval.bpd_repeats))
          reference = exact_bpd(config, config.eval.num_bpd_samples)
          if reference is not None:
            keep({"exact_bpd": reference})
          signals.check(f"evaluation of checkpoint {step} stopped after its bits/dim; progress "
                        "saved, rerun to resume.")
        if fid:
          if sample_fn is None:
            sample_fn = image_eval.per_sample_sampler(
                config, trainer.sde, trainer.shape, trainer.score_fn, trainer.inverse_scaler,
                trainer.mesh)
          per_seed = []
          for s in range(opts.num_seeds):
            name = f"seed_{s}"
            if name not in parts:
              try:
                result = image_eval.sample_metrics(
                    sample_fn, trainer.state.ema_params, feature_fn, reference,
                    image_eval.per_seed_key(config, s), opts,
                    os.path.join(ckpt_dir, f"{name}.npz"), trainer.mesh, stop=stop,
                    resolution=int(config.data.image_size))
              except image_eval.EvalInterrupted as e:
                signals.check(f"evaluation of checkpoint {step} stopped ({e}); rerun to resume.")
                logging.warning("Eval of checkpoint %d interrupted (%s); rerun to resume.", step,
                                e)
                return records
              keep({name: result})
              logging.info("checkpoint %d seed %d: %s", step, s, result)
            if name in parts:
              per_seed.append(parts[name])
          if len(per_seed) == opts.num_seeds:
            parts.update(image_eval.summarize_seeds(per_seed))
        elif config.eval.enable_sampling and "sample_nfe" not in parts:
          samples, nfe = trainer.sample(ekey, int(config.eval.num_samples))
          keep({"sample_nfe": nfe, **sample_quality(trainer, samples, ekey)})
        record = {"step": step}
        record.update({k: v for k, v in parts.items() if not k.startswith("seed_")})
        if failed:
          record["failed"] = failed
        logging.info("eval %s", record)
        records = [r for r in records if r["step"] != step] + [record]
        if jax.process_index() == 0:
          write_json(path, records)  # after each checkpoint: a preempted eval resumes here
        if writer:
          for k, v in record.items():
            if k != "step" and isinstance(v, (int, float)):
              writer.add_scalar(f"eval/{k}", v, step)
      if evaluated:
        _bpd_figure(trainer, records, out_dir)
    finally:
      if writer:
        writer.close()
      trainer.close()
  return records


def exact_bpd(config, num: int) -> Optional[float]:
  """The exact bits/dim of the data density on the ``num`` test points bits/dim is measured on,
  for data with a known density (the toy Gaussian mixture); None otherwise."""
  if config.data.get("dim", None) in (None, 0) or config.data.dataset != "gmm":
    return None
  mixture = datasets.get_toy_mixture(config)
  test = jnp.asarray(np.concatenate(list(_eval_batches(config, num))))
  return float(-np.mean(np.asarray(mixture.log_prob(test))) / (test.shape[1] * np.log(2)))


def _bpd_figure(trainer: Trainer, records: list[dict], out_dir: str) -> None:
  """bits/dim over training; for 2-D data also the model's density (the trainer's restored
  state) beside the true one."""
  from score_sde.plotting import save_bpd_figure
  records = sorted((r for r in records if "bpd" in r), key=lambda r: r["step"])
  if not records:
    return
  cfg = trainer.config
  density = true_density = extent = None
  reference = exact_bpd(cfg, cfg.eval.num_bpd_samples)
  if trainer.shape == (2,):
    lim = 1.2 * float(np.percentile(np.abs(np.concatenate(list(_eval_batches(cfg, 2000)))), 99.5))
    extent = (-lim, lim, -lim, lim)
    g = np.linspace(-lim, lim, 64, dtype=np.float32)
    grid = np.stack(np.meshgrid(g, g), -1).reshape(-1, 2)
    # A picture: a looser tolerance than the reported bits/dim keeps it cheap.
    tol = max(float(cfg.eval.rtol), 1e-3)
    bpd, _, _ = trainer.likelihood_fn("exact", tol, tol)(
        trainer.state.ema_params, jax.random.PRNGKey(0), jnp.asarray(trainer.scaler(grid)))
    density = np.exp(-np.asarray(bpd) * 2 * np.log(2)).reshape(64, 64)
    if reference is not None:
      mixture = datasets.get_toy_mixture(cfg)
      true_density = np.exp(np.asarray(mixture.log_prob(jnp.asarray(grid)))).reshape(64, 64)
  path = os.path.join(out_dir, "bpd.png")
  save_bpd_figure(path, [r["step"] for r in records], [r["bpd"] for r in records],
                  reference_bpd=reference, density=density, true_density=true_density,
                  extent=extent)
  logging.info("Wrote %s.", path)


def run_sample(config, workdir: str, step: Optional[int] = None,
               allow_config_mismatch: bool = False) -> str:
  """Samples ``config.sampling.num_samples`` from a checkpoint (the newest readable one unless
  ``step``); writes .npz and .png; returns their directory. SIGTERM / SIGINT stop after the batch
  in flight (nothing written) and raise :class:`score_sde.signals.Interrupted`."""
  with StopSignals() as signals:
    trainer, step = load_trainer(config, workdir, step, allow_config_mismatch)
    try:
      key = jax.random.PRNGKey(config.seed + 3)
      samples, nfe = trainer.sample(key, int(config.sampling.num_samples), signals=signals)
    finally:
      trainer.close()
  out_dir = os.path.join(workdir, "samples", f"{config.sampling.method}_step_{step}")
  os.makedirs(out_dir, exist_ok=True)
  np.savez(os.path.join(out_dir, "samples.npz"), samples=samples, nfe=nfe, step=step)
  reference = None
  if samples.ndim == 2:
    reference = np.concatenate(list(_eval_batches(config, len(samples))))
  from score_sde.plotting import save_samples
  path = save_samples(samples, os.path.join(out_dir, "samples"), reference,
                      title=f"{config.sampling.method}, step {step}, {nfe} NFE")
  logging.info("Wrote %d samples (%d NFE) to %s and %s.", len(samples), nfe, out_dir, path)
  return out_dir


def run_posthoc_ema(config, workdir: str, step: Optional[int] = None,
                    allow_config_mismatch: bool = False) -> str:
  """``--mode posthoc_ema``: reconstructs the EMA of ``config.eval.sigma_rel`` at ``step`` (default:
  the newest snapshot) and writes it as the kept checkpoint ``step`` of
  :func:`posthoc_ema.reconstruction_dir`; returns that directory.

  The checkpoint is a full train state of ``config`` carrying the run's fingerprint, with params
  and EMA params both the reconstruction (so every mode reading either gets it) and a fresh
  optimizer state; ``posthoc_ema.json`` beside it records the snapshots and weights used. Errors
  (before anything is built): no sigma_rel, one out of range, no snapshots.
  """
  sigma_rel = config.eval.get("sigma_rel", None)
  if sigma_rel is None:
    raise ValueError("--mode posthoc_ema needs the EMA width to posthoc_ema.reconstruct: set "
                     "--config.eval.sigma_rel (e.g. 0.07), in (0, 0.2887).")
  sigma_rel = float(sigma_rel)
  posthoc_ema.sigma_rel_to_gamma(sigma_rel)  # range check
  directory = posthoc_ema.snapshot_dir(workdir)
  if not posthoc_ema.list_snapshots(directory):
    raise posthoc_ema.NoSnapshots(posthoc_ema._no_snapshots_message(workdir))
  out = posthoc_ema.reconstruction_dir(workdir, sigma_rel)
  trainer = Trainer(config, out, allow_config_mismatch=allow_config_mismatch)
  try:
    fingerprint = trainer.checkpoints.fingerprint
    params, info = posthoc_ema.reconstruct(directory, sigma_rel, jax.device_get(trainer.state.params), step,
                               fingerprint=fingerprint, allow_mismatch=allow_config_mismatch)
    logging.info("Post-hoc EMA sigma_rel=%g (gamma %.4g) at step %d from %d snapshots; relative "
                 "L2 error of the fitted profile %.2e.", sigma_rel, info["gamma"], info["step"],
                 len(info["snapshots"]), info["fit_rel_error"])
    if jax.process_index() == 0:  # first: it marks the directory as eval / sample only
      marker = os.path.join(out, posthoc_ema.MARKER)
      write_json(marker, {**read_json(marker, {}), str(info["step"]): info})
    params = jax.device_put(params, trainer.replicated)
    state = trainer.state.replace(step=jnp.asarray(info["step"], jnp.int32), params=params,
                                  ema_params=params, power_emas=None)
    trainer.checkpoints.save(info["step"], state, snapshot=True)
  finally:
    trainer.close()
  logging.info("Wrote the reconstruction as checkpoint %d of %s; evaluate or sample it with "
               "--workdir %s --config.eval.sigma_rel=%g (or --workdir %s).", info["step"], out,
               workdir, sigma_rel, out)
  return out
