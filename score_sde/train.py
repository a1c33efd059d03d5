"""The training loop: data-parallel jitted steps, EMA, checkpoints, logging, snapshot sampling.

Data parallelism uses one global ``Mesh`` over every device of every process with a single axis
'data': the train state is replicated (or, with ``config.training.param_sharding='fsdp'``, each
parameter-shaped leaf is sharded over 'data': :func:`score_sde.distributed.state_shardings`), each
batch is sharded along its batch axis, and the gradient all-reduce comes from XLA (the loss is a
mean over the global batch). Batch ``i`` of the
data stream is a pure function of (seed, i), and the PRNG key lives in the train state, so a run
restarted from a checkpoint continues exactly where it stopped.
"""
from __future__ import annotations

import math
import os
import tempfile
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from score_sde import (classifier, conditional, consistency, datasets, likelihood, losses,
                       posthoc_ema, sde_lib)
from score_sde import distributed
from score_sde import sampling as sampling_lib
from score_sde.checkpointing import CheckpointMismatch, Checkpoints, run_fingerprint
from score_sde.config_validation import validate_config
from score_sde.host_memory import release_freed_memory
from score_sde.models import create_model, get_model_fn, get_score_fn
from score_sde.signals import StopSignals
from score_sde.utils import data_shape, parametrization_of


def make_mesh() -> Mesh:
  """A 1-D mesh named 'data' over all devices of all processes.

  Its axis is ``Auto`` (XLA propagates shardings from the sharded batch and replicated params):
  with ``Explicit`` axes, values created inside the step without a sharding, such as dropout
  masks, would clash with the sharded activations.
  """
  return jax.make_mesh((jax.device_count(),), ("data",), axis_types=(AxisType.Auto,))


class Trainer:
  """Builds everything a run needs from a config; :meth:`train` runs the loop.

  With a ``workdir`` its checkpoints carry the run's fingerprint and restoring one written by
  another configuration raises (:mod:`score_sde.checkpointing`) unless ``allow_config_mismatch``.
  ``teacher``: the teacher ``score_fn(x, t)`` of consistency distillation, given directly (e.g. a
  teacher trained with command-line overrides, which its config file does not carry); default
  :func:`consistency_teacher` of ``config.consistency``.

  Attributes of interest to notebooks and tests: ``sde``, ``model``, ``state`` (the
  :class:`score_sde.losses.TrainState`, built on first access; ``state_spec`` its shapes and
  shardings), ``mesh``, ``score_fn(params)``. The jitted programs
  (train steps, eval loss, sampling, likelihood) are built once per Trainer.
  """

  def __init__(self, config, workdir: Optional[str] = None, mesh: Optional[Mesh] = None,
               task: Optional[losses.Task] = None, allow_config_mismatch: bool = False,
               teacher: Optional[Callable] = None):
    self.mesh = mesh or make_mesh()
    validate_config(config, num_devices=self.mesh.size)  # the devices the batch is split over
    self.config = config
    self.workdir = workdir
    self.replicated = NamedSharding(self.mesh, P())
    self.sde = sde_lib.get_sde(config)
    self.shape = data_shape(config)
    key = jax.random.PRNGKey(config.seed)
    init_key, state_key = jax.random.split(key)
    self._eval_loss_fn = None
    if task is None:
      model, variables = create_model(config, init_key)
      train_loss = None
      if str(config.training.get("loss", None)) == "consistency_distillation":
        if teacher is None:
          teacher = consistency_teacher(config, self.sde)
        train_loss = losses.get_loss_fn(config, self.sde, model, True, teacher)
        self._eval_loss_fn = losses.get_loss_fn(config, self.sde, model, False, teacher)
      task = losses.Task(model, variables, loss_fn=train_loss,
                         with_labels=bool(conditional.num_classes_of(config)))
    self.task = task
    self.model = task.model
    # The state (params, EMA, optimizer moments: 4x the parameters) is built on first use of
    # ``self.state``; train() compiles the step before that (see _train_program).
    state = jax.eval_shape(lambda v, k: losses.init_train_state(config, v, k), task.variables,
                           state_key)
    # Replicated, or sharded over the devices with config.training.param_sharding='fsdp'.
    self.state_sharding = distributed.state_shardings(state, self.mesh,
                                                      distributed.param_sharding_of(config))
    if distributed.param_sharding_of(config) == "fsdp":
      _log_fsdp(state.params, self.mesh.shape["data"])
    self.state_spec = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s, weak_type=a.weak_type),
        state, self.state_sharding)
    self._state = None
    self._state_key = state_key
    self.batch_sharding = NamedSharding(self.mesh, P(None, "data"))  # [n_jitted_steps, batch]
    self.scaler = datasets.get_data_scaler(config)
    self.inverse_scaler = datasets.get_data_inverse_scaler(config)
    n = int(config.training.n_jitted_steps)
    step_fn = _flag_nonfinite(losses.get_train_step_fn(config, self.sde, self.model,
                                                       loss_fn=task.loss_fn))
    self._multi_step = jax.jit(
        losses.get_multi_step_fn(step_fn, n),
        in_shardings=(self.state_sharding, self.batch_sharding),
        out_shardings=(self.state_sharding, self.replicated), donate_argnums=(0,))
    self._eval_loss = None
    self._train_exe = None  # (batch shapes, self._multi_step compiled for them)
    self._sample_fns: dict[int, Callable] = {}
    self._likelihood_fns: dict[tuple, Callable] = {}
    self.checkpoints = None
    self.allow_config_mismatch = bool(allow_config_mismatch)
    if workdir:
      check_writable(workdir)
      fingerprint = run_fingerprint(config, self.sde, task.name or config.model.name, state.params)
      self.checkpoints = Checkpoints(workdir, config.training.max_to_keep, fingerprint,
                                     allow_mismatch=allow_config_mismatch)

  @property
  def state(self) -> losses.TrainState:
    """The train state (:class:`score_sde.losses.TrainState`, placed with ``state_sharding``):
    step 0 from the model's init variables, built on first access, or what restore / training set.
    """
    if self._state is None:
      self._state = jax.device_put(
          losses.init_train_state(self.config, self.task.variables, self._state_key),
          self.state_sharding)
    return self._state

  @state.setter
  def state(self, value: losses.TrainState) -> None:
    self._state = value

  # --- pieces usable on their own ---------------------------------------------------------------
  def score_fn(self, params: Any):
    """``score_fn(x, t)`` of the network with ``params`` (e.g. ``state.ema_params``)."""
    return get_score_fn(self.sde, get_model_fn(self.model, params, train=False),
                        continuous=self.config.training.continuous,
                        parametrization=parametrization_of(self.config))

  def restore(self) -> int:
    """Restores the newest checkpoint in the workdir, if any, to resume training; returns the step
    reached.

    The post-hoc EMA tracking of the checkpoint and the config must agree (both off, or the same
    ``posthoc_ema_sigma_rels``), else :class:`CheckpointMismatch` naming the fields to set. With
    ``allow_config_mismatch`` a checkpoint without tracked EMAs (an older run, an import) resumes
    with tracking starting from its params (the power EMAs then treat those params as the params
    of every earlier step), and tracked EMAs the config does not ask for are dropped.
    """
    if self.checkpoints is not None:
      step, state = self.checkpoints.restore_latest(self.state, check=self._check_tracking)
      if step is not None:
        self.state = self._resume_tracking(step, state)
        logging.info("Restored checkpoint at step %d from %s.", step, self.workdir)
    return int(jax.device_get(self.state.step))

  def _tracking_text(self) -> str:
    every, rels = posthoc_ema.tracking_of(self.config)
    return (f"config.training.posthoc_ema_every={every}" if not every else
            f"config.training.posthoc_ema_every={every}, posthoc_ema_sigma_rels={rels}")

  def _check_tracking(self, step: int, stored: set) -> None:
    """Raises CheckpointMismatch when checkpoint ``step`` and the config disagree on post-hoc EMA
    tracking (unless allowed: then :meth:`_resume_tracking` adapts the restored state)."""
    want, has = self.state.power_emas is not None, "power_emas" in stored
    where = f"The checkpoint of step {step} under {self.workdir}"
    if want and has:
      count = len(self.state.power_emas.emas)
      tree = self.checkpoints.stored_tree(step)
      stored_count = int(np.prod(tree["power_emas"]["sigma_rels"].shape))
      if stored_count != count:
        raise CheckpointMismatch(
            f"{where} tracks {stored_count} post-hoc EMAs, this config {count} "
            f"({self._tracking_text()}): resume with the run's posthoc_ema_sigma_rels.")
      return
    if want == has or self.allow_config_mismatch:
      return
    if has:
      raise CheckpointMismatch(
          f"{where} tracks post-hoc EMAs but this config does not ({self._tracking_text()}): "
          "resume with the run's --config.training.posthoc_ema_every and posthoc_ema_sigma_rels "
          "(or pass --allow_config_mismatch to drop the tracked EMAs).")
    raise CheckpointMismatch(
        f"{where} has no post-hoc EMAs but this config tracks them ({self._tracking_text()}): "
        "resume with --config.training.posthoc_ema_every=0, or start the tracked run in a fresh "
        "--workdir (or pass --allow_config_mismatch to start tracking at this step).")

  def _resume_tracking(self, step: int, state):
    """The restored state with the power EMAs the config asks for (see :meth:`restore`)."""
    every, rels = posthoc_ema.tracking_of(self.config)
    if not every:
      if "power_emas" in self.checkpoints.stored_fields(step):
        logging.warning("Dropped the post-hoc EMAs of the checkpoint of step %d "
                        "(--allow_config_mismatch; %s).", step, self._tracking_text())
      return state
    fresh = "starting"
    if state.power_emas is not None:
      stored = np.asarray(jax.device_get(state.power_emas.sigma_rels), np.float64)
      if np.allclose(stored, np.asarray(rels, np.float32), rtol=1e-6, atol=0):
        return state
      if not self.allow_config_mismatch:
        raise CheckpointMismatch(
            f"The checkpoint of step {step} under {self.workdir} tracks post-hoc EMAs of "
            f"sigma_rel {stored.round(6).tolist()}, this config {list(rels)}: resume with "
            "--config.training.posthoc_ema_sigma_rels of the run (or pass "
            "--allow_config_mismatch to restart tracking at this step).")
      fresh = "restarting"
    logging.warning("Post-hoc EMA tracking %s at step %d from the restored params "
                    "(--allow_config_mismatch): the EMAs treat them as the params of every "
                    "earlier step.", fresh, step)
    return state.replace(power_emas=jax.device_put(
        posthoc_ema.init_power_emas(state.params, rels), self.state_sharding.power_emas))

  def close(self) -> None:
    """Closes the checkpoint managers (waits for pending writes)."""
    if self.checkpoints is not None:
      self.checkpoints.close()

  def global_batch(self, local_batches: list[dict]) -> jax.Array:
    """Stacks n process-local batches into one ``[n, global_batch, ...]`` array sharded on axis 1
    (a ``{'image', 'label'}`` dict when the task trains on labels)."""
    local = np.stack([self.scaler(b["image"]) for b in local_batches]).astype(np.float32)
    sharding = self.batch_sharding
    global_shape = (local.shape[0], local.shape[1] * jax.process_count()) + local.shape[2:]
    images = jax.make_array_from_process_local_data(sharding, local, global_shape)
    if not self.task.with_labels:
      return images
    labels = np.stack([b["label"] for b in local_batches]).astype(np.int32)
    return {"image": images, "label": jax.make_array_from_process_local_data(
        sharding, labels, global_shape[:2])}

  def batch_spec(self) -> Any:
    """Shape, dtype and sharding of the global batch :meth:`global_batch` makes (a dict with
    'label' when the task trains on labels)."""
    n = int(self.config.training.n_jitted_steps)
    shape = (n, int(self.config.training.batch_size))
    images = jax.ShapeDtypeStruct(shape + tuple(self.shape), jnp.float32,
                                  sharding=self.batch_sharding)
    if not self.task.with_labels:
      return images
    return {"image": images,
            "label": jax.ShapeDtypeStruct(shape, jnp.int32, sharding=self.batch_sharding)}

  def _train_program(self, batch: Any) -> Callable:
    """The compiled train program for batches shaped like ``batch`` (arrays or
    ``jax.ShapeDtypeStruct``s): the first one is compiled ahead of time from the state's shapes,
    other shapes go through the jitted function.

    XLA's compiler takes about as much host memory as the state for a large network; compiling
    before the state is built (train() compiles first) keeps the two from adding up, and the heap
    the compiler freed is given back to the OS afterwards (docs/networks.md)."""
    shapes = jax.tree.map(lambda a: (tuple(a.shape), jnp.dtype(a.dtype)), batch)
    if self._train_exe is None:
      self._train_exe = (shapes, self._multi_step.lower(self.state_spec, batch).compile())
      release_freed_memory()
    compiled_shapes, compiled = self._train_exe
    return compiled if shapes == compiled_shapes else self._multi_step

  def train_steps(self, local_batches: list[dict]) -> dict:
    """Runs ``n_jitted_steps`` updates (one compiled call); returns the metrics (on device)."""
    batch = self.global_batch(local_batches)
    self.state, metrics = self._train_program(batch)(self.state, batch)
    return metrics

  def eval_loss(self, batch: jax.Array, key: jax.Array) -> jax.Array:
    """The training loss of the EMA params on ``batch`` (no dropout), one compiled program."""
    if self._eval_loss is None:
      self._eval_loss = jax.jit(losses.get_eval_step_fn(self.config, self.sde, self.model,
                                                        self._eval_loss_fn))
    return self._eval_loss(self.state, batch, key)

  def sample(self, key: jax.Array, num_samples: int, params: Any = None,
             signals: Optional[StopSignals] = None):
    """Samples with the configured sampler and the EMA params; returns (samples in data space, nfe).

    With ``signals``, a stop signal ends it after the batch in flight (:meth:`StopSignals.check`).
    """
    params = self.state.ema_params if params is None else params
    batch = min(int(self.config.sampling.batch_size), num_samples)
    if batch not in self._sample_fns:
      sampler = sampling_lib.get_sampler_from_config(self.config, self.sde,
                                                     (batch,) + self.shape)
      self._sample_fns[batch] = jax.jit(lambda p, k: sampler(k, self.score_fn(p)))
    fn = self._sample_fns[batch]
    out, nfe = [], 0
    for i in range(math.ceil(num_samples / batch)):
      x, nfe = fn(params, jax.random.fold_in(key, i))
      out.append(np.asarray(self.inverse_scaler(x)))
      if signals is not None:
        signals.check(f"sampling stopped after {len(out) * batch} of {num_samples} samples; "
                      "nothing was written; rerun to sample again.")
    return np.concatenate(out)[:num_samples], int(nfe)

  def likelihood_fn(self, hutchinson_type: str, rtol: float, atol: float) -> Callable:
    """``fn(params, key, x) -> (bpd, z, nfe)``: the PF-ODE likelihood of the network with
    ``params`` (:func:`score_sde.likelihood.get_likelihood_fn`), built once per setting."""
    setting = (str(hutchinson_type), float(rtol), float(atol))
    if setting not in self._likelihood_fns:
      lik = likelihood.get_likelihood_fn(self.sde, rtol=setting[1], atol=setting[2],
                                         hutchinson_type=setting[0])
      self._likelihood_fns[setting] = jax.jit(lambda p, k, x: lik(k, self.score_fn(p), x))
    return self._likelihood_fns[setting]

  # --- the loop ------------------------------------------------------------------------------
  def train(self) -> dict:
    """Trains to ``config.training.n_iters``, resuming from the workdir; returns the last metrics.

    SIGTERM / SIGINT stop the loop after the compiled call in flight, write a checkpoint and raise
    :class:`score_sde.signals.Interrupted` (:mod:`score_sde.signals`).
    Non-finite losses or gradients stop the run naming the step (``nan_policy='stop'``, before any
    checkpoint is written) or skip those updates (``'skip'``, counted in the logs).
    """
    cfg = self.config.training
    n = int(cfg.n_jitted_steps)
    if self.workdir and posthoc_ema.is_reconstruction(self.workdir):
      raise CheckpointMismatch(f"{self.workdir} holds a post-hoc EMA reconstruction "
                       f"({posthoc_ema.MARKER}): evaluate or sample it; train in the run's "
                       "own --workdir.")
    latest = self.checkpoints.all_steps()[-1:] if self.checkpoints is not None else []
    if not latest or latest[0] < cfg.n_iters:  # else nothing to train (unless it is unreadable)
      self._train_program(self.batch_spec())
    step = self.restore()
    release_freed_memory()  # what building (and replacing) the state left in the heap
    every = posthoc_ema.tracking_of(self.config)[0]
    if every and self.workdir and jax.process_index() == 0:
      # Snapshots after the restored step belong to the run's lost future: it writes them again.
      removed = posthoc_ema.remove_snapshots_after(posthoc_ema.snapshot_dir(self.workdir), step)
      if removed:
        logging.warning("Removed post-hoc EMA snapshots of steps %s (after the restored step %d); "
                        "they are rewritten as training resumes.", removed, step)
    if step >= cfg.n_iters:
      logging.info("Already trained to step %d >= n_iters=%d.", step, cfg.n_iters)
      return {}
    ds = datasets.get_dataset(self.config, "train", start_step=step)
    writer = summary_writer(self.workdir)
    sample_key = jax.random.PRNGKey(self.config.seed + 1)
    t0, step0, last, skipped = time.time(), step, {}, 0
    with StopSignals() as stop:
      while step < cfg.n_iters:
        metrics = self.train_steps([next(ds) for _ in range(n)])
        bad = np.asarray(jax.device_get(metrics["nonfinite"]))
        if bad.any():
          if str(cfg.get("nan_policy", "stop")).lower() == "stop":
            first = step + int(np.argmax(bad)) + 1
            raise FloatingPointError(
                f"Non-finite loss or gradients at step {first}; no checkpoint was written after "
                f"step {step} and earlier checkpoints are intact. Lower config.optim.lr, set "
                "config.optim.grad_clip, check the data, or set config.training.nan_policy='skip'.")
          skipped += int(bad.sum())
          logging.warning("Skipped %d non-finite update(s) up to step %d.", int(bad.sum()), step + n)
        step += n
        if step % cfg.log_freq == 0 or step == cfg.n_iters:
          last = {k: float(np.mean(v)) for k, v in jax.device_get(metrics).items()
                  if k != "nonfinite"}
          last["skipped_updates"] = skipped
          rate = (step - step0) / max(time.time() - t0, 1e-9)
          eta = (cfg.n_iters - step) / max(rate, 1e-9)
          logging.info("step %d/%d | loss %.5f | grad_norm %.3f | lr %.2e | %.1f steps/s | ETA %s",
                       step, cfg.n_iters, last["loss"], last.get("grad_norm", float("nan")),
                       last.get("lr", float("nan")), rate, _hms(eta))
          if writer:
            for k, v in last.items():
              writer.add_scalar(f"train/{k}", v, step)
            writer.add_scalar("train/steps_per_sec", rate, step)
        if every and self.checkpoints is not None and (step % every == 0
                                                       or step == cfg.n_iters):
          self._save_posthoc_snapshots(step)
        if self.checkpoints is not None:
          if step % cfg.snapshot_freq == 0 or step == cfg.n_iters:
            self.checkpoints.save(step, self.state, snapshot=True)
            if cfg.snapshot_sampling and jax.process_index() == 0:
              self._snapshot_samples(jax.random.fold_in(sample_key, step), step, writer)
          elif step % cfg.snapshot_freq_for_preemption == 0 or stop.requested:
            self.checkpoints.save(step, self.state, snapshot=False)
        if stop.requested:
          if writer:
            writer.close()
          saved = ("checkpoint written" if self.checkpoints is not None
                   else "no --workdir, nothing saved")
          stop.check(f"training stopped at step {step}: {saved}, exiting; rerun the same "
                     "command to resume.")
    if writer:
      writer.close()
    return last

  def _save_posthoc_snapshots(self, step: int) -> None:
    """One snapshot per tracked power EMA (params only) under <workdir>/posthoc_ema
    (:func:`score_sde.posthoc_ema.save_snapshot`: atomic, read back)."""
    if jax.process_index() != 0:
      return
    directory = posthoc_ema.snapshot_dir(self.workdir)
    _, rels = posthoc_ema.tracking_of(self.config)
    for rel, ema in zip(rels, self.state.power_emas.emas):
      posthoc_ema.save_snapshot(directory, step, rel, ema, self.checkpoints.fingerprint)

  def _snapshot_samples(self, key, step: int, writer) -> None:
    samples, nfe = self.sample(key, int(self.config.sampling.num_samples))
    from score_sde.plotting import save_samples  # matplotlib only when plotting
    path = save_samples(samples, os.path.join(self.workdir, "samples", f"step_{step}"),
                        title=f"step {step}, {nfe} NFE")
    logging.info("Wrote %s (%d NFE).", path, nfe)
    if writer and samples.ndim == 4:
      from score_sde.plotting import image_grid
      writer.add_image("samples", image_grid(samples[:64]), step, dataformats="HWC")


def consistency_teacher(config, sde: sde_lib.SDE) -> Callable:
  """The teacher ``score_fn(x, t)`` of consistency distillation, ``config.consistency.teacher``:
  'exact' (the exact score of the toy ``gmm`` mixture under ``sde``) or a config file whose
  trained model (EMA params of the newest checkpoint under ``consistency.teacher_workdir``) is
  the teacher. A teacher of another data shape or forward process is a ValueError naming the
  fields (:func:`score_sde.consistency.teacher_config_errors`)."""
  st = consistency.settings_of(config)
  name = st["teacher"]
  if not name:
    raise ValueError("Consistency distillation needs config.consistency.teacher: 'exact' (toy "
                     "gmm data) or the teacher's config file (with "
                     "config.consistency.teacher_workdir).")
  if name == "exact":
    from score_sde.datasets import toy
    if str(config.data.dataset).lower() != "gmm":
      raise ValueError("config.consistency.teacher='exact' is the exact score of the toy mixture: "
                       f"set config.data.dataset='gmm' (got {config.data.dataset!r}) or give a "
                       "trained teacher's config file.")
    return toy.get_toy_mixture(config).score_fn(sde)
  teacher_config = consistency.load_teacher_config(name)
  errors = consistency.teacher_config_errors(config, teacher_config)
  if errors:
    raise ValueError(" ".join(errors))
  workdir = st["teacher_workdir"]
  if not workdir or not os.path.isdir(workdir):
    raise ValueError(f"config.consistency.teacher_workdir={workdir!r} must be the directory of the "
                     f"teacher's checkpoints (trained with --config {name} --mode train).")
  teacher = Trainer(teacher_config, workdir)
  try:
    step, teacher.state = teacher.checkpoints.restore_latest(teacher.state)
  finally:
    teacher.close()
  if step is None:
    raise FileNotFoundError(f"No teacher checkpoint under config.consistency.teacher_workdir="
                            f"{workdir}; train the teacher first (--config {name} --mode train).")
  logging.info("Consistency distillation from %s, step %d (%s).", name, step, workdir)
  return teacher.score_fn(teacher.state.ema_params)


def _log_fsdp(params: Any, n: int) -> None:
  """Logs what FSDP over n devices shards (:func:`score_sde.distributed.fsdp_report`)."""
  r = distributed.fsdp_report(params, n)
  logging.info("FSDP over %d devices: params %.2f MB per device (%.2f MB replicated); %d leaves "
               "sharded, %d replicated (no dimension divisible by %d): %s", n,
               r["per_device_bytes"] / 2**20, r["total_bytes"] / 2**20, r["sharded_leaves"],
               r["replicated_leaves"], n, r["replicated"])


def _flag_nonfinite(step_fn):
  """Adds metrics['nonfinite'] (the loss or gradient norm of that update was not finite).

  What happens to such an update is the step's ``nan_policy`` (score_sde.losses); the loop stops or
  counts on this flag.
  """
  def flagged(state, batch):
    new_state, metrics = step_fn(state, batch)
    ok = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
    return new_state, dict(metrics, nonfinite=~ok)
  return flagged


def check_writable(workdir: str) -> None:
  """Creates ``workdir`` if needed; OSError naming it if files cannot be written there."""
  try:
    os.makedirs(workdir, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=workdir):
      pass
  except OSError as e:
    raise OSError(f"--workdir {workdir} is not writable ({e}); choose another directory.") from e


def summary_writer(workdir: Optional[str]):
  if workdir is None or jax.process_index() != 0:
    return None
  from tensorboardX import SummaryWriter
  return SummaryWriter(os.path.join(workdir, "tensorboard"))


def _hms(seconds: float) -> str:
  seconds = int(seconds)
  return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def train(config, workdir: str, allow_config_mismatch: bool = False) -> dict:
  """Entry point used by ``experiments/main.py --mode train``."""
  os.makedirs(workdir, exist_ok=True)
  trainer = Trainer(config, workdir, allow_config_mismatch=allow_config_mismatch)
  try:
    return trainer.train()
  finally:
    trainer.close()


def train_classifier(config, workdir: Optional[str] = None) -> tuple[Any, Any, dict]:
  """Trains the time-dependent classifier of ``config`` (``--mode train_classifier``) with the
  regular Trainer (:func:`score_sde.classifier.classifier_task`).

  Data-parallel over all devices, ``config.training.n_jitted_steps`` updates per compiled call;
  checkpoints go to ``workdir/classifier`` and a rerun resumes from them. Returns
  ``(classifier, state, metrics)`` with the state on the host; use ``state.ema_params`` with
  :func:`score_sde.classifier.get_classifier_logp_grad_fn`.
  """
  run = classifier.classifier_run_config(config)
  task = classifier.classifier_task(run, sde_lib.get_sde(run))
  trainer = Trainer(run, os.path.join(workdir, "classifier") if workdir else None, task=task)
  try:
    metrics = trainer.train()
  finally:
    trainer.close()
  return task.model, jax.device_get(trainer.state), metrics
