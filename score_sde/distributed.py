"""Multi-process start-up through ``jax.distributed``.

One process per host (TPU pods, most GPU clusters) or per GPU. Every process runs the same
command; they find each other through a coordinator:

* explicitly: ``--coordinator_address=host0:1234 --num_processes=N --process_id=i``
  (or the environment variables ``SCORE_SDE_COORDINATOR``, ``SCORE_SDE_NUM_PROCESSES``,
  ``SCORE_SDE_PROCESS_ID``);
* automatically under SLURM (``srun``) and on Cloud TPU pods, where ``jax.distributed.initialize()``
  reads the cluster's own environment.

On CPU (tests, debugging) cross-process collectives go through gloo.

Also the train state's shardings: replicated (plain data parallelism) or FSDP
(``config.training.param_sharding``; :func:`state_shardings`, docs/distributed.md).
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


# --- parameter sharding (config.training.param_sharding) ----------------------------------------
PARAM_SHARDINGS = ("replicated", "fsdp")


def param_sharding_of(config) -> str:
  """``config.training.param_sharding`` (absent or None: 'replicated'); ValueError if unknown."""
  mode = config.training.get("param_sharding", None) or "replicated"
  if mode not in PARAM_SHARDINGS:
    raise ValueError(f"config.training.param_sharding={mode!r} is unknown; choose one of "
                     f"{list(PARAM_SHARDINGS)}.")
  return str(mode)


def fsdp_spec(shape: tuple[int, ...], n: int, axis: str = "data"):
  """The FSDP ``PartitionSpec`` of an array of ``shape`` over ``n`` devices on mesh axis ``axis``.

  The largest dimension that ``n`` divides is sharded (ties: the later one, e.g. the output
  features of a [kh, kw, in, out] conv kernel or [in, out] dense kernel); an array with no such
  dimension (scalars, odd-sized biases, ``n = 1``) is replicated, ``P()``. Every device then holds
  ``size / n`` elements of a sharded leaf and all of a replicated one.
  """
  from jax.sharding import PartitionSpec as P
  dims = [i for i, d in enumerate(shape) if d >= n and d % n == 0]
  if n <= 1 or not dims:
    return P()
  best = max(dims, key=lambda i: (shape[i], i))
  return P(*[axis if i == best else None for i in range(len(shape))])


def state_shardings(state, mesh, mode: str = "replicated", axis: str = "data"):
  """``NamedSharding`` of every leaf of a :class:`score_sde.losses.TrainState` (same tree).

  'replicated': every leaf on every device. 'fsdp' (fully sharded data parallel, ZeRO-3 style):
  each leaf of params, optimizer state, EMA and the other parameter-shaped fields is sharded by
  :func:`fsdp_spec` over the mesh axis; ``step`` and ``key`` stay replicated. Under ``jax.jit``
  XLA (GSPMD) all-gathers a sharded weight where a layer uses it and reduce-scatters its gradient,
  so values are those of the replicated run up to float reassociation.
  """
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P
  if mode not in PARAM_SHARDINGS:
    raise ValueError(f"param_sharding={mode!r} is unknown; choose one of {list(PARAM_SHARDINGS)}.")
  replicated = NamedSharding(mesh, P())
  if mode == "replicated":
    return jax.tree.map(lambda _: replicated, state)
  n = mesh.shape[axis]
  out = jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(tuple(x.shape), n, axis)), state)
  return out.replace(step=replicated, key=replicated)


def fsdp_report(params, n: int) -> dict:
  """What FSDP over ``n`` devices does to a parameter tree: bytes per device replicated vs
  sharded, and the leaves that stay replicated (no dimension divisible by ``n``).

  Returns ``{'total_bytes', 'per_device_bytes', 'replicated_bytes', 'replicated': [(path,
  shape)], 'sharded_leaves', 'replicated_leaves'}``; per_device_bytes = sum over sharded leaves of
  bytes / n + replicated bytes (the same holds for the EMA and each Adam moment).
  """
  total = per_device = replicated_bytes = 0
  replicated, sharded = [], 0
  for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
    nbytes = int(x.size) * x.dtype.itemsize
    total += nbytes
    if all(a is None for a in fsdp_spec(tuple(x.shape), n)):
      per_device += nbytes
      replicated_bytes += nbytes
      replicated.append((jax.tree_util.keystr(path, simple=True, separator="/"), tuple(x.shape)))
    else:
      per_device += nbytes // n
      sharded += 1
  return {"total_bytes": total, "per_device_bytes": per_device,
          "replicated_bytes": replicated_bytes, "replicated": replicated,
          "sharded_leaves": sharded, "replicated_leaves": len(replicated)}
