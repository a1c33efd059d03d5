"""python -m experiments.main end to end: train a few hundred steps on a toy set, eval, sample."""
import json
import os

import numpy as np
import pytest

from experiments_helpers import run_experiment

SMALL = ["--config.training.n_iters=200", "--config.training.batch_size=128",
         "--config.training.n_jitted_steps=50", "--config.training.log_freq=50",
         "--config.training.snapshot_freq=100", "--config.training.snapshot_freq_for_preemption=50",
         "--config.model.nf=32", "--config.sampling.num_samples=256",
         "--config.eval.num_bpd_samples=128", "--config.eval.num_samples=256"]


def _main(*args, check=True):
  # Two devices, not the suite's eight: still data-parallel, and a quarter of the forced-device
  # overhead on a 2-core machine (the eval's density figure solves one ODE per device shard).
  env = dict(os.environ, XLA_FLAGS=os.environ.get("XLA_FLAGS", "").replace(
      "xla_force_host_platform_device_count=8", "xla_force_host_platform_device_count=2"))
  return run_experiment("main", *args, check=check, env=env)


def test_train_eval_sample_end_to_end(tmp_path):
  workdir = tmp_path / "run"
  proc = _main("--config", "configs/toy/vp.py", "--workdir", str(workdir), "--mode", "all", *SMALL)
  log = proc.stderr
  assert "steps/s" in log and "ETA" in log and "2 device(s)" in log
  assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()) == [100, 200]
  assert list((workdir / "tensorboard").glob("events.out.tfevents*"))
  assert (workdir / "samples" / "step_200.png").exists()
  records = json.loads((workdir / "eval" / "results.json").read_text())
  assert [r["step"] for r in records] == [100, 200]
  for r in records:
    assert np.isfinite(r["bpd"]) and np.isfinite(r["test_loss"])
  assert (workdir / "eval" / "bpd.png").exists()
  out = np.load(workdir / "samples" / "pc_step_200" / "samples.npz")
  assert out["samples"].shape == (256, 2) and int(out["nfe"]) == 1000
  assert (workdir / "samples" / "pc_step_200" / "samples.png").exists()
  # Eval is resumable: a second run finds both checkpoints done and recomputes nothing.
  proc = _main("--config", "configs/toy/vp.py", "--workdir", str(workdir), "--mode", "eval", *SMALL)
  assert proc.stderr.count("already evaluated") == 2
  # A different sampler from the command line.
  _main("--config", "configs/toy/vp.py", "--workdir", str(workdir), "--mode", "sample",
        "--config.sampling.method=ode", *SMALL)
  ode = np.load(workdir / "samples" / "ode_step_200" / "samples.npz")
  assert ode["samples"].shape == (256, 2) and int(ode["nfe"]) > 10


def test_unknown_override_and_bad_values_are_rejected(tmp_path):
  proc = _main("--config", "configs/toy/vp.py", "--workdir", str(tmp_path),
               "--config.training.n_iterz=5", check=False)
  assert proc.returncode != 0 and "n_iterz" in proc.stderr
  proc = _main("--config", "configs/toy/vp.py", "--workdir", str(tmp_path), "--mode", "train",
               "--config.training.batch_size=99", check=False)
  assert proc.returncode != 0 and "not divisible" in proc.stderr
  assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())


def test_sample_without_checkpoint_says_train_first(tmp_path):
  proc = _main("--config", "configs/toy/vp.py", "--workdir", str(tmp_path), "--mode", "sample",
               check=False)
  assert proc.returncode != 0 and "train first" in proc.stderr
