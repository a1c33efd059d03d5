"""Fault injection: signals, kill -9, corrupt checkpoints, NaN batches, unwritable dirs."""
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import tiny_toy_config
from score_sde import datasets
from score_sde.checkpointing import Checkpoints
from score_sde.train import Trainer

SCRIPT = pathlib.Path(__file__).parent / "scripts" / "toy_train.py"
N_ITERS = 200


def _start(workdir, n_iters=N_ITERS):
  return subprocess.Popen([sys.executable, "-u", str(SCRIPT), str(workdir), str(n_iters)],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for_step(proc, step, timeout=300):
  """Reads the log until a line reports ``step``; returns the text read."""
  lines, t0 = [], time.time()
  while time.time() - t0 < timeout:
    line = proc.stdout.readline()
    if not line:
      break
    lines.append(line)
    if f"step {step}/" in line:
      return "".join(lines)
  raise AssertionError("never reached step %d:\n%s" % (step, "".join(lines)[-3000:]))


def _final_params(workdir, step):
  trainer = Trainer(tiny_toy_config(**{"training.n_iters": N_ITERS}))
  ckpt = Checkpoints(str(workdir))
  state = ckpt.restore(step, trainer.state)
  ckpt.close()
  return jax.tree.leaves(jax.device_get(state))


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("reference")
  proc = _start(workdir)
  out = proc.communicate(timeout=600)[0]
  assert proc.returncode == 0, out[-3000:]
  return workdir


def test_kill_9_then_restart_equals_uninterrupted_run_bitwise(tmp_path, reference_run):
  proc = _start(tmp_path)
  _wait_for_step(proc, 90)
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL
  restart = _start(tmp_path)
  out = restart.communicate(timeout=600)[0]
  assert restart.returncode == 0 and "Restored checkpoint at step" in out, out[-3000:]
  for a, b in zip(_final_params(reference_run, N_ITERS), _final_params(tmp_path, N_ITERS)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_writes_a_checkpoint_before_exit(tmp_path, sig):
  proc = _start(tmp_path, n_iters=100000)
  _wait_for_step(proc, 30)
  proc.send_signal(sig)
  out = proc.communicate(timeout=300)[0]
  assert proc.returncode == 128 + sig, out[-3000:]
  assert f"Received {signal.Signals(sig).name}: training stopped at step" in out
  assert "checkpoint written, exiting" in out
  stopped_at = int(out.split("stopped at step ")[-1].split(":")[0])
  assert stopped_at >= 30
  assert stopped_at in Checkpoints(str(tmp_path)).all_steps()


def test_corrupt_newest_checkpoint_is_skipped(tmp_path, reference_run, caplog):
  workdir = tmp_path / "run"
  shutil.copytree(reference_run, workdir)
  ckpt = Checkpoints(str(workdir))
  steps = ckpt.all_steps()
  ckpt.close()
  assert len(steps) >= 2
  newest = workdir / "checkpoints" / str(steps[-1])
  if not newest.exists():
    newest = workdir / "checkpoints-meta" / str(steps[-1])
  for f in newest.rglob("*"):  # truncate every data file of the newest step
    if f.is_file():
      f.write_bytes(b"")
  trainer = Trainer(tiny_toy_config(**{"training.n_iters": N_ITERS}), str(workdir))
  assert trainer.restore() == steps[-2]
  assert "Skipping unreadable checkpoint" in caplog.text


def _nan_at(step_to_poison):
  real = datasets.get_dataset

  def fake(config, split="train", start_step=0, **kw):
    for i, batch in enumerate(real(config, split, start_step=start_step, **kw), start=start_step):
      if i == step_to_poison:
        batch = dict(batch, image=np.full_like(batch["image"], np.nan))
      yield batch
  return fake


def test_nan_batch_stops_with_the_step_and_no_bad_checkpoint(tmp_path, monkeypatch):
  monkeypatch.setattr(datasets, "get_dataset", _nan_at(23))
  trainer = Trainer(tiny_toy_config(**{"training.n_iters": 40}), str(tmp_path))
  with pytest.raises(FloatingPointError, match="step 24"):
    trainer.train()
  steps = trainer.checkpoints.all_steps()
  assert steps == [10, 20]
  good = Trainer(tiny_toy_config(), str(tmp_path))
  good.restore()
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(good.state.params)))


def test_nan_batch_skip_policy_drops_only_that_update(tmp_path, monkeypatch):
  monkeypatch.setattr(datasets, "get_dataset", _nan_at(13))
  cfg = tiny_toy_config(**{"training.n_iters": 20, "training.nan_policy": "skip"})
  trainer = Trainer(cfg, str(tmp_path))
  metrics = trainer.train()
  assert metrics["skipped_updates"] == 1
  assert int(trainer.state.step) == 20
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(trainer.state.params)))


def test_unwritable_workdir_and_disk_full_are_clear_errors(tmp_path, monkeypatch):
  blocker = tmp_path / "a_file"
  blocker.write_text("x")
  with pytest.raises(OSError, match="not writable"):
    Trainer(tiny_toy_config(), str(blocker / "run"))
  trainer = Trainer(tiny_toy_config(**{"training.n_iters": 40}), str(tmp_path / "run"))
  trainer.config.training.n_iters = 20
  trainer.train()
  assert trainer.checkpoints.all_steps() == [10, 20]

  def disk_full(*a, **k):
    raise OSError(28, "No space left on device")
  monkeypatch.setattr(trainer.checkpoints.preemption, "save", disk_full)
  monkeypatch.setattr(trainer.checkpoints.snapshots, "save", disk_full)
  trainer.config.training.n_iters = 40
  with pytest.raises(OSError, match="Earlier checkpoints are intact"):
    trainer.train()
  assert trainer.checkpoints.all_steps() == [10, 20]


def test_same_seed_same_result_bitwise():
  a, b = Trainer(tiny_toy_config()), Trainer(tiny_toy_config())
  for tr in (a, b):
    ds = datasets.get_dataset(tr.config, "train")
    tr.train_steps([next(ds) for _ in range(10)])
  for x, y in zip(jax.tree.leaves(jax.device_get(a.state)), jax.tree.leaves(jax.device_get(b.state))):
    np.testing.assert_array_equal(x, y)
