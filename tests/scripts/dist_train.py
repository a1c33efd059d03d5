"""Runs a short toy training in one process of a (possibly multi-process) job; writes its losses.

usage: dist_train.py OUT_JSON [COORDINATOR NUM_PROCESSES PROCESS_ID]
Each process gets 8 / NUM_PROCESSES host CPU devices, so the global mesh always has 8 devices.
"""
import json
import os
import sys

nproc = int(sys.argv[3]) if len(sys.argv) > 3 else 1
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={8 // nproc}"
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from score_sde import datasets, distributed  # noqa: E402

if nproc > 1:
  distributed.initialize(sys.argv[2], nproc, int(sys.argv[4]))

from conftest import tiny_toy_config  # noqa: E402
from score_sde.train import Trainer  # noqa: E402

cfg = tiny_toy_config()
trainer = Trainer(cfg)
assert trainer.mesh.size == 8, trainer.mesh
ds = datasets.get_dataset(cfg, "train")
losses = []
for _ in range(3):
  metrics = trainer.train_steps([next(ds) for _ in range(cfg.training.n_jitted_steps)])
  losses.extend(np.atleast_1d(np.asarray(jax.device_get(metrics["loss"]))).tolist())
params = jax.tree.leaves(jax.device_get(trainer.state.params))
result = {"losses": losses, "param_sums": [float(np.sum(p)) for p in params],
          "process_count": jax.process_count()}
if jax.process_index() == 0:
  with open(sys.argv[1], "w") as f:
    json.dump(result, f)
