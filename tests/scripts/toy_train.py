"""Trains the tiny toy config into WORKDIR to N_ITERS steps (used by fault-injection tests)."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from absl import logging  # noqa: E402

from conftest import tiny_toy_config  # noqa: E402
from score_sde import train  # noqa: E402
from score_sde.signals import Interrupted  # noqa: E402

logging.set_verbosity(logging.INFO)
logging.set_stderrthreshold(logging.INFO)
workdir, n_iters = sys.argv[1], int(sys.argv[2])
cfg = tiny_toy_config(**{"training.n_iters": n_iters, "training.log_freq": 10,
                         "training.snapshot_freq": 1000 if n_iters % 1000 == 0 else n_iters,
                         "training.snapshot_freq_for_preemption": 20,
                         "training.snapshot_sampling": False})
try:
  train.train(cfg, workdir)
except Interrupted as e:  # the command line's policy: message, status 128 + signal number
  print(e, flush=True)
  sys.exit(e.exit_code)
print("DONE", flush=True)
