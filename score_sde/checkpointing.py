"""Orbax checkpoints of the train state: kept snapshots plus a rolling preemption checkpoint.

Layout under ``workdir`` (the reference's):
  checkpoints/<step>        every ``snapshot_freq`` steps, the last ``max_to_keep`` kept
  checkpoints-meta/<step>   every ``snapshot_freq_for_preemption`` steps, only the newest kept

What every checkpoint guarantees:

* **It knows what it is.** Each step stores the run's *fingerprint* (:func:`run_fingerprint`: the
  SDE and its parameters, the network and its parameter shapes, the output parametrization, the
  data shape and scaler) in its orbax step metadata. Restoring compares it with the current run's
  and refuses a mismatch with :class:`CheckpointMismatch`, naming the fields, unless the run
  allows it (``allow_mismatch``, ``--allow_config_mismatch``: a deliberate transfer). Checkpoints
  without a fingerprint (older versions) restore with a warning.
* **Saves are verified.** After a save the step's metadata is read back and compared with the
  state; a save over an existing step (say, one that was found corrupt and recomputed) writes the
  new one aside and swaps it in with two renames. A failed write (disk full, read-only) raises one
  :class:`OSError` naming the directory and what to do; earlier steps stay intact.
* **Restores fall back.** :meth:`Checkpoints.restore_latest` restores the newest readable step,
  saying which unreadable ones it skipped; a partial or corrupt directory never blocks a restart.
* **Optional fields stay optional.** A dataclass state is written as the dict of its fields that
  are not None, so a field declared ``= None`` (``TrainState.power_emas``) and left None changes
  nothing on disk: the checkpoint is exactly the one written before the field existed, and such
  checkpoints restore. Restoring returns the fields both sides have; a field with a None default
  that only the checkpoint has is dropped, one only the target has comes back None (a caller
  that needs it, like the Trainer resuming training, checks with :meth:`Checkpoints.stored_fields`
  or the ``check`` hook of :meth:`Checkpoints.restore`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging as py_logging
import os
import shutil
from typing import Any, Callable, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from score_sde.parametrizations import get_parametrization
from score_sde.utils import data_shape, parametrization_of

__all__ = ["Checkpoints", "CheckpointMismatch", "run_fingerprint"]


class CheckpointMismatch(ValueError):
  """A checkpoint was written by a run whose fingerprint differs from the current one."""


def _param_digest(params: Any) -> tuple[int, str]:
  """(number of scalars, sha1 of the sorted (path, shape, dtype) list) of a parameter tree."""
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  rows = sorted(f"{jax.tree_util.keystr(p)}:{tuple(v.shape)}:{np.dtype(v.dtype).name}"
                for p, v in leaves)
  count = int(sum(int(np.prod(v.shape)) for _, v in leaves))
  return count, hashlib.sha1("\n".join(rows).encode()).hexdigest()[:16]


def run_fingerprint(config, sde, model_name: str, params: Any) -> dict[str, Any]:
  """What fixes the meaning of a train state: a flat, JSON-friendly dict.

  SDE name and constructor parameters (its step count N only for discrete-time training, where
  the network's labels depend on it), continuous or discrete training, the network's name, number
  of parameters and a digest of their shapes, the output parametrization, the number of classes,
  the data shape and whether data are centered (the scaler).
  """
  continuous = bool(config.training.continuous)
  count, digest = _param_digest(params)
  out: dict[str, Any] = {"training.sde": str(config.training.sde).lower(),
                         "training.continuous": continuous}
  for k, v in sde.params().items():
    if k != "N" or not continuous:
      out[f"sde.{k}"] = float(v) if isinstance(v, (float, np.floating)) else v
  out.update({"model.name": str(model_name),
              "model.parametrization": (parametrization_of(config) or get_parametrization(
                  sde.default_parametrization)).describe(),
              "model.num_classes": int(config.model.get("num_classes", None) or 0),
              "params.count": count, "params.shapes": digest,
              "data.shape": list(data_shape(config)),
              "data.centered": bool(config.data.get("centered", False))})
  return out


def describe_mismatch(stored: dict, current: dict) -> list[str]:
  """One line per field whose value differs between two fingerprints."""
  lines = []
  for k in sorted(set(stored) | set(current)):
    a, b = stored.get(k, "<absent>"), current.get(k, "<absent>")
    if a != b:
      hint = " (the network's parameter shapes: model sizes differ)" if k == "params.shapes" else ""
      lines.append(f"{k}: checkpoint {a!r}, this config {b!r}{hint}")
  return lines


def _classify(e: BaseException) -> Optional[str]:
  """'disk full' / 'not writable' for an environment failure of a write, None otherwise."""
  text = f"{e}"
  errno = getattr(e, "errno", None)
  if errno == 28 or "No space left" in text or "os_error_code='28'" in text:
    return "the disk is full"
  if (errno in (13, 30) or "Permission denied" in text or "Read-only file system" in text
      or "os_error_code='13'" in text or "os_error_code='30'" in text):
    return "the directory is not writable"
  return None


def _saved_tree(state: Any) -> Any:
  """What is written for ``state``: a dataclass as the dict of its fields that are not None (the
  tree orbax writes for a dataclass, minus the None fields); anything else as it is."""
  if dataclasses.is_dataclass(state) and not isinstance(state, type):
    return {f.name: getattr(state, f.name) for f in dataclasses.fields(state)
            if getattr(state, f.name) is not None}
  return state


def _optional_fields(state: Any) -> set[str]:
  """The fields of a dataclass state whose default is None."""
  if dataclasses.is_dataclass(state) and not isinstance(state, type):
    return {f.name for f in dataclasses.fields(state) if f.default is None}
  return set()


def _item_tree(manager, step: int) -> Any:
  """The metadata tree of ``step`` of ``manager`` (shapes and dtypes; no array is read)."""
  with _quiet_orbax():
    meta = manager.item_metadata(step)
    if meta is None:  # a manager that has not saved or restored this item does not know its handler
      meta = ocp.StandardCheckpointHandler().metadata(
          epath.Path(str(manager.directory)) / str(step) / "default")
  return getattr(meta, "tree", meta)


class _QuietOrbax(py_logging.Filter):
  def filter(self, record):
    return "/orbax/" not in record.pathname


@contextlib.contextmanager
def _quiet_orbax():
  """Drops orbax's own log records (its background threads log every failure with tracebacks);
  failures reach the caller as exceptions, reported once."""
  logger = py_logging.getLogger("absl")
  f = _QuietOrbax()
  logger.addFilter(f)
  try:
    yield
  finally:
    logger.removeFilter(f)


class Checkpoints:
  """The two checkpoint series of a run.

  Args:
    workdir: the run directory.
    max_to_keep: kept snapshots (>= 1).
    fingerprint: the run's :func:`run_fingerprint`, stored with every save and checked on every
      restore (None: nothing stored or checked).
    allow_mismatch: restore checkpoints whose fingerprint differs (warn instead of raising).
  """

  def __init__(self, workdir: str, max_to_keep: int = 5, fingerprint: Optional[dict] = None,
               allow_mismatch: bool = False):
    if max_to_keep is None or int(max_to_keep) < 1:
      raise ValueError(f"config.training.max_to_keep must be >= 1 (the final state is a kept "
                       f"snapshot), got {max_to_keep!r}.")
    self.workdir = os.path.abspath(workdir)
    self.fingerprint = fingerprint
    self.allow_mismatch = bool(allow_mismatch)
    self._managers = {}
    for name, keep in (("checkpoints", int(max_to_keep)), ("checkpoints-meta", 1)):
      directory = os.path.join(self.workdir, name)
      for leftover in (directory + ".staging", directory + ".replaced"):
        shutil.rmtree(leftover, ignore_errors=True)  # an interrupted replacement
      self._managers[name] = ocp.CheckpointManager(
          directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))
    self.snapshots = self._managers["checkpoints"]
    self.preemption = self._managers["checkpoints-meta"]

  # --- saving ------------------------------------------------------------------------------------
  def save(self, step: int, state: Any, snapshot: bool = False) -> None:
    """Saves ``state`` at ``step`` in the preemption series, or the kept series if ``snapshot``;
    replaces an existing step; raises OSError (one line) if the write fails or does not verify."""
    manager = self.snapshots if snapshot else self.preemption
    directory = str(manager.directory)
    custom = {"fingerprint": self.fingerprint} if self.fingerprint is not None else None
    state = _saved_tree(state)
    try:
      with _quiet_orbax():
        if step in manager.all_steps():
          self._replace(manager, step, state, custom)
        else:
          manager.save(step, args=ocp.args.StandardSave(state), custom_metadata=custom,
                       force=True)
          manager.wait_until_finished()
        self._verify(manager, step, state)
    except Exception as e:  # pylint: disable=broad-except
      reason = _classify(e)
      if reason is None and not isinstance(e, OSError):
        raise
      shutil.rmtree(os.path.join(directory, f"{step}.orbax-checkpoint-tmp"), ignore_errors=True)
      raise OSError(getattr(e, "errno", None) or 0, (
          f"Could not write the checkpoint of step {step} to {directory}: "
          f"{reason or e}. Earlier checkpoints are intact; free disk space or choose a writable "
          f"--workdir, then rerun to resume.")) from None

  def _replace(self, manager, step: int, state: Any, custom: Optional[dict]) -> None:
    """Writes ``step`` aside, verifies it, then swaps it in for the existing one."""
    directory = str(manager.directory)
    staging_dir = directory + ".staging"
    staging = ocp.CheckpointManager(staging_dir, options=ocp.CheckpointManagerOptions(create=True))
    try:
      staging.save(step, args=ocp.args.StandardSave(state), custom_metadata=custom, force=True)
      staging.wait_until_finished()
      self._verify(staging, step, state)
    finally:
      staging.close()
    old, trash = os.path.join(directory, str(step)), directory + ".replaced"
    os.replace(old, trash)
    os.replace(os.path.join(staging_dir, str(step)), old)
    shutil.rmtree(trash, ignore_errors=True)
    shutil.rmtree(staging_dir, ignore_errors=True)
    manager.reload()
    logging.warning("Replaced the existing checkpoint of step %d in %s.", step, directory)

  @staticmethod
  def _verify(manager, step: int, state: Any) -> None:
    """The saved step's metadata reads back and lists the state's array shapes."""
    try:
      tree = _item_tree(manager, step)
      stored = sorted(tuple(m.shape) for m in jax.tree.leaves(tree, is_leaf=lambda m: hasattr(
          m, "shape")))
    except Exception as e:  # pylint: disable=broad-except
      raise OSError(f"the saved step {step} does not read back ({type(e).__name__}: {e})") from e
    wanted = sorted(tuple(np.shape(x)) for x in jax.tree.leaves(state))
    if stored != wanted:
      raise OSError(f"the saved step {step} reads back with other array shapes than were "
                    "written")

  # --- what is there ------------------------------------------------------------------------------
  def snapshot_steps(self) -> list[int]:
    """Steps of the kept snapshots (what evaluation walks)."""
    return sorted(self.snapshots.all_steps())

  def all_steps(self) -> list[int]:
    return sorted(set(self.snapshots.all_steps()) | set(self.preemption.all_steps()))

  def stored_fingerprint(self, step: int, snapshot_only: bool = False) -> Optional[dict]:
    """The fingerprint stored with ``step`` (None for checkpoints written without one)."""
    manager = self._manager_of(step, snapshot_only)
    custom = manager.metadata(step).custom_metadata or {}
    return custom.get("fingerprint")

  def _manager_of(self, step: int, snapshot_only: bool):
    managers = [self.snapshots] if snapshot_only else [self.preemption, self.snapshots]
    for manager in managers:
      if step in manager.all_steps():
        return manager
    raise FileNotFoundError(f"No checkpoint at step {step} under {self.workdir}; present: "
                            f"{self.all_steps()}.")

  def check_fingerprint(self, step: int, snapshot_only: bool = False) -> None:
    """Raises :class:`CheckpointMismatch` if ``step`` was written by a run with another
    fingerprint (see the module docstring); warns instead when ``allow_mismatch``."""
    if self.fingerprint is None:
      return
    stored = self.stored_fingerprint(step, snapshot_only)
    if stored is None:
      logging.warning("Checkpoint of step %d under %s has no fingerprint (written by an older "
                      "version or an import): cannot check that it matches this config.", step,
                      self.workdir)
      return
    diff = describe_mismatch(stored, self.fingerprint)
    if not diff:
      return
    text = (f"The checkpoint of step {step} under {self.workdir} was written by a run with "
            "another configuration:\n  " + "\n  ".join(diff))
    if self.allow_mismatch:
      logging.warning("%s\nRestoring it anyway (--allow_config_mismatch).", text)
      return
    raise CheckpointMismatch(text + "\nUse the config this run was trained with, another "
                             "--workdir, or pass --allow_config_mismatch to restore it anyway "
                             "(a deliberate transfer).")

  # --- restoring ---------------------------------------------------------------------------------
  def stored_tree(self, step: int, snapshot_only: bool = False) -> Any:
    """The metadata tree (shapes and dtypes, nothing read) of the state stored at ``step``."""
    return _item_tree(self._manager_of(step, snapshot_only), step)

  def stored_fields(self, step: int, snapshot_only: bool = False) -> set[str]:
    """The top-level fields (keys) of the state stored at ``step``."""
    tree = self.stored_tree(step, snapshot_only)
    return set(tree.keys()) if hasattr(tree, "keys") else set()

  def restore(self, step: int, target: Any, snapshot_only: bool = False,
              check: Optional[Callable[[int, set], None]] = None) -> Any:
    """Restores ``step`` into the structure, shapes and shardings of ``target`` (after checking
    its fingerprint, and calling ``check(step, stored_fields)``, which may raise
    :class:`CheckpointMismatch`). Optional fields (module docstring) present on one side only are
    not returned: one only the checkpoint has is read and dropped, one only the target has comes
    back None."""
    manager = self._manager_of(step, snapshot_only)
    self.check_fingerprint(step, snapshot_only)
    saved = _saved_tree(target)
    optional = _optional_fields(target)
    keep = None
    if optional or check is not None:
      stored = self.stored_fields(step, snapshot_only)
      if check is not None:
        check(step, stored)
      if optional and isinstance(saved, dict) and set(saved) != stored:
        keep = {k for k in saved if k in stored}
        saved = {k: v for k, v in saved.items() if k in stored or k not in optional}
        extra = (stored - set(saved)) & optional
        if extra:   # the restore item must match the stored tree: read those too, then drop them
          tree = self.stored_tree(step, snapshot_only)
          sharding = getattr(jax.tree.leaves(target)[0], "sharding", None)
          for k in extra:
            saved[k] = jax.tree.map(
                lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding), tree[k],
                is_leaf=lambda m: hasattr(m, "shape") and hasattr(m, "dtype"))
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, saved)
    with _quiet_orbax():
      restored = manager.restore(step, args=ocp.args.StandardRestore(abstract))
    if dataclasses.is_dataclass(target):
      keep = set(restored) if keep is None else keep
      return dataclasses.replace(target, **{f.name: restored[f.name] if f.name in keep else None
                                            for f in dataclasses.fields(target)})
    return restored

  def restore_latest(self, target: Any, snapshot_only: bool = False,
                     check: Optional[Callable[[int, set], None]] = None
                     ) -> tuple[Optional[int], Any]:
    """(step, state) of the newest readable checkpoint, or (None, target) when there is none.

    Unreadable steps are skipped with a warning naming the step used instead; a fingerprint
    mismatch (or a :class:`CheckpointMismatch` from ``check``, see :meth:`restore`) is not
    "unreadable": it raises.
    """
    steps = self.snapshot_steps() if snapshot_only else self.all_steps()
    skipped = []
    for step in reversed(steps):
      try:
        state = self.restore(step, target, snapshot_only, check)
      except CheckpointMismatch:
        raise
      except Exception as e:  # pylint: disable=broad-except
        logging.warning("Skipping unreadable checkpoint at step %d: %s", step,
                        str(e).splitlines()[0][:300])
        skipped.append(step)
        continue
      if skipped:
        logging.warning("Checkpoint(s) at step(s) %s under %s are unreadable; using step %d.",
                        skipped, self.workdir, step)
      return step, state
    return None, target

  def close(self) -> None:
    for manager in self._managers.values():
      manager.close()
