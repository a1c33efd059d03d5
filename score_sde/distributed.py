"""Multi-process start-up through ``jax.distributed``.

One process per host (TPU pods, most GPU clusters) or per GPU. Every process runs the same
command; they find each other through a coordinator:

* explicitly: ``--coordinator_address=host0:1234 --num_processes=N --process_id=i``
  (or the environment variables ``SCORE_SDE_COORDINATOR``, ``SCORE_SDE_NUM_PROCESSES``,
  ``SCORE_SDE_PROCESS_ID``);
* automatically under SLURM (``srun``) and on Cloud TPU pods, where ``jax.distributed.initialize()``
  reads the cluster's own environment.

On CPU (tests, debugging) cross-process collectives go through gloo.
"""
from __future__ import annotations

import os
from typing import Optional

import jax
from absl import logging


def initialize(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None, local_device_ids=None) -> bool:
  """Initializes ``jax.distributed`` when a multi-process run is requested; returns whether it did.

  Arguments default to the SCORE_SDE_* environment variables; with none given, a run under SLURM
  or on a TPU pod is detected by JAX itself, and anything else stays single-process.
  """
  coordinator_address = coordinator_address or os.environ.get("SCORE_SDE_COORDINATOR")
  if num_processes is None and os.environ.get("SCORE_SDE_NUM_PROCESSES"):
    num_processes = int(os.environ["SCORE_SDE_NUM_PROCESSES"])
  if process_id is None and os.environ.get("SCORE_SDE_PROCESS_ID"):
    process_id = int(os.environ["SCORE_SDE_PROCESS_ID"])
  auto_cluster = any(k in os.environ for k in ("SLURM_NTASKS", "TPU_WORKER_HOSTNAMES",
                                               "MEGASCALE_COORDINATOR_ADDRESS"))
  if coordinator_address is None and not auto_cluster:
    return False
  if coordinator_address is not None and (num_processes is None or process_id is None):
    raise ValueError("A coordinator address needs --num_processes and --process_id too "
                     "(or SCORE_SDE_NUM_PROCESSES / SCORE_SDE_PROCESS_ID).")
  if jax.config.jax_platforms in (None, "", "cpu") or os.environ.get("JAX_PLATFORMS") == "cpu":
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                             process_id=process_id, local_device_ids=local_device_ids)
  logging.info("Process %d of %d: %d local / %d global devices.", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  return True
