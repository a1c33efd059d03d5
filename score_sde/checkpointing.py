"""Orbax checkpoints of the train state: kept snapshots plus a rolling preemption checkpoint.

Layout under ``workdir`` (the reference's):
  checkpoints/<step>        every ``snapshot_freq`` steps, the last ``max_to_keep`` kept
  checkpoints-meta/<step>   every ``snapshot_freq_for_preemption`` steps, only the newest kept

:meth:`Checkpoints.restore_latest` restores the newest complete step found in either, skipping
(with a warning) any that fails to read, so a partial or corrupt directory never blocks a restart.
Orbax writes each step to a temporary directory and renames it when complete, so a step directory
that exists is whole unless something damaged it afterwards.
"""
from __future__ import annotations

import os
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp
from absl import logging


class Checkpoints:
  """The two checkpoint series of a run."""

  def __init__(self, workdir: str, max_to_keep: int = 5):
    workdir = os.path.abspath(workdir)
    self.snapshots = ocp.CheckpointManager(
        os.path.join(workdir, "checkpoints"),
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))
    self.preemption = ocp.CheckpointManager(
        os.path.join(workdir, "checkpoints-meta"),
        options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True))

  def save(self, step: int, state: Any, snapshot: bool = False) -> None:
    """Saves ``state`` at ``step`` in the preemption series, or the kept series if ``snapshot``."""
    manager = self.snapshots if snapshot else self.preemption
    if step in manager.all_steps():
      return
    manager.save(step, args=ocp.args.StandardSave(state))
    manager.wait_until_finished()

  def snapshot_steps(self) -> list[int]:
    """Steps of the kept snapshots (what evaluation walks)."""
    return sorted(self.snapshots.all_steps())

  def all_steps(self) -> list[int]:
    return sorted(set(self.snapshots.all_steps()) | set(self.preemption.all_steps()))

  def restore(self, step: int, target: Any, snapshot_only: bool = False) -> Any:
    """Restores ``step`` into the structure, shapes and shardings of ``target``."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    managers = [self.snapshots] if snapshot_only else [self.preemption, self.snapshots]
    for manager in managers:
      if step in manager.all_steps():
        return manager.restore(step, args=ocp.args.StandardRestore(abstract))
    raise FileNotFoundError(f"No checkpoint at step {step}; present: {self.all_steps()}.")

  def restore_latest(self, target: Any) -> tuple[Optional[int], Any]:
    """(step, state) of the newest readable checkpoint, or (None, target) when there is none."""
    for step in reversed(self.all_steps()):
      try:
        return step, self.restore(step, target)
      except Exception as e:  # pylint: disable=broad-except
        logging.warning("Skipping unreadable checkpoint at step %d: %s", step, e)
    return None, target

  def close(self) -> None:
    self.snapshots.close()
    self.preemption.close()
