"""Faults a user meets, each rerun as described in docs/reliability.md: the right behaviour with
nothing lost, or a clear error. In-process and tiny (toy model, a few dozen steps)."""
import json
import os
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import REPO, tiny_toy_config
from score_sde import train
from score_sde.checkpointing import CheckpointMismatch, Checkpoints
from score_sde.evaluation import evaluate
from score_sde.signals import Interrupted
from score_sde.train import Trainer


def _leaves(state):
  return jax.tree.leaves(jax.device_get(state))


def _truncate_step(workdir, step):
  """Truncates every file of a step (as a crash or a disk fault would leave it)."""
  for series in ("checkpoints", "checkpoints-meta"):
    d = workdir / series / str(step)
    if d.exists():
      for f in d.rglob("*"):
        if f.is_file():
          f.write_bytes(b"")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A finished tiny VP run: snapshots at 20 and 40, preemption checkpoints every 10."""
  workdir = tmp_path_factory.mktemp("trained")
  train.train(tiny_toy_config(**{"training.snapshot_sampling": False}), str(workdir))
  return workdir


def _copy(trained, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(trained, workdir)
  return workdir


# 1. A corrupt final checkpoint is replaced by the recomputed state.
def test_corrupt_final_checkpoint_is_recomputed_and_replaced(trained, tmp_path, caplog):
  workdir = _copy(trained, tmp_path)
  cfg = tiny_toy_config(**{"training.snapshot_sampling": False})
  _truncate_step(workdir, 40)
  train.train(cfg, str(workdir))
  assert "Skipping unreadable checkpoint at step 40" in caplog.text
  assert "Replaced the existing checkpoint of step 40" in caplog.text
  fresh, ref = Trainer(cfg, str(workdir)), Trainer(cfg, str(trained))
  a = fresh.checkpoints.restore(40, fresh.state)
  b = ref.checkpoints.restore(40, ref.state)
  for x, y in zip(_leaves(a), _leaves(b)):  # the replacement is the uninterrupted run's state
    np.testing.assert_array_equal(x, y)
  assert not (workdir / "checkpoints.staging").exists()
  assert not (workdir / "checkpoints.replaced").exists()
  fresh.close()
  ref.close()


# 2. max_to_keep=0 would discard the final state: refused at start-up.
def test_max_to_keep_zero_is_refused(tmp_path):
  with pytest.raises(ValueError, match="max_to_keep must be >= 1"):
    Trainer(tiny_toy_config(**{"training.max_to_keep": 0}), str(tmp_path))


# 3. A checkpoint knows what it is: another run's config is refused, naming the fields.
def test_sampling_with_another_runs_config_is_refused(trained, tmp_path):
  workdir = _copy(trained, tmp_path)
  ve = tiny_toy_config("vesde")
  with pytest.raises(CheckpointMismatch, match="training.sde: checkpoint 'vpsde', this config "
                                               "'vesde'") as e:
    evaluate.run_sample(ve, str(workdir))
  assert "sde.sigma_max" in str(e.value) and "--allow_config_mismatch" in str(e.value)
  wider = tiny_toy_config(**{"model.nf": 64})
  with pytest.raises(CheckpointMismatch, match="params.shapes"):
    evaluate.run_sample(wider, str(workdir))
  # A deliberate transfer is allowed explicitly.
  out = evaluate.run_sample(ve, str(workdir), allow_config_mismatch=True)
  assert os.path.exists(os.path.join(out, "samples.npz"))
  # Changing only what does not change the state's meaning is fine (sampler, PC steps).
  other = tiny_toy_config(**{"sampling.method": "ddim", "model.num_scales": 100})
  evaluate.run_sample(other, str(workdir))


def test_fingerprint_is_stored_with_every_checkpoint(trained):
  ckpt = Checkpoints(str(trained))
  for step in ckpt.all_steps():
    fp = ckpt.stored_fingerprint(step)
    assert fp["training.sde"] == "vpsde" and fp["model.name"] == "toy_mlp"
    assert fp["data.shape"] == [2] and fp["params.count"] > 0
  ckpt.close()


# 4. A non-finite eval result is never cached nor published.
def test_nonfinite_eval_part_is_not_cached_and_is_recomputed(trained, tmp_path, monkeypatch):
  workdir = _copy(trained, tmp_path)
  cfg = tiny_toy_config(**{"eval.enable_bpd": False, "eval.enable_sampling": False})
  real = evaluate.test_loss
  monkeypatch.setattr(evaluate, "test_loss", lambda *a, **k: float("nan"))
  records = evaluate.run_eval(cfg, str(workdir))
  assert all(r["failed"] == {"test_loss": "not finite (nan)"} and "test_loss" not in r
             for r in records)
  for step in (20, 40):
    parts = workdir / "eval" / f"ckpt_{step}" / "parts.json"
    assert not parts.exists() or "test_loss" not in json.loads(parts.read_text())
  monkeypatch.setattr(evaluate, "test_loss", real)
  records = evaluate.run_eval(cfg, str(workdir))
  assert [r["step"] for r in records] == [20, 40]
  assert all(np.isfinite(r["test_loss"]) and "failed" not in r for r in records)


# 9. Every mode that restores falls back from an unreadable kept checkpoint.
def test_sample_and_eval_fall_back_from_a_corrupt_checkpoint(trained, tmp_path, caplog):
  workdir = _copy(trained, tmp_path)
  _truncate_step(workdir, 40)
  out = evaluate.run_sample(tiny_toy_config(), str(workdir))
  assert out.endswith("_step_30")  # the newest readable: the preemption checkpoint of step 30
  assert "unreadable; using step 30" in caplog.text
  cfg = tiny_toy_config(**{"eval.enable_bpd": False, "eval.enable_sampling": False})
  records = evaluate.run_eval(cfg, str(workdir))
  assert [r["step"] for r in records] == [20]
  assert "Skipping checkpoint 40" in caplog.text


# 7. One signal policy: eval and sample stop at a safe point with Interrupted.
def test_sigterm_during_eval_stops_it_with_progress_saved(trained, tmp_path, monkeypatch):
  workdir = _copy(trained, tmp_path)
  cfg = tiny_toy_config(**{"eval.enable_bpd": False, "eval.enable_sampling": False})
  real = evaluate.test_loss

  def loss_then_signal(*a, **k):
    value = real(*a, **k)
    os.kill(os.getpid(), signal.SIGTERM)
    return value
  monkeypatch.setattr(evaluate, "test_loss", loss_then_signal)
  with pytest.raises(Interrupted, match="Received SIGTERM: evaluation of checkpoint 20 stopped "
                                        "after its test loss") as e:
    evaluate.run_eval(cfg, str(workdir))
  assert e.value.exit_code == 128 + signal.SIGTERM
  assert "test_loss" in json.loads((workdir / "eval" / "ckpt_20" / "parts.json").read_text())


def test_sigterm_during_sampling_stops_it(trained, tmp_path, monkeypatch):
  workdir = _copy(trained, tmp_path)
  real = Trainer.sample

  def sample_with_signal(self, *a, **k):
    os.kill(os.getpid(), signal.SIGTERM)
    return real(self, *a, **k)
  monkeypatch.setattr(Trainer, "sample", sample_with_signal)
  with pytest.raises(Interrupted, match="sampling stopped after"):
    evaluate.run_sample(tiny_toy_config(), str(workdir))
  assert not (workdir / "samples").exists()


def _main(args, **kw):
  env = dict(os.environ, XLA_FLAGS=os.environ.get("XLA_FLAGS", "").replace(
      "xla_force_host_platform_device_count=8", "xla_force_host_platform_device_count=1"))
  return subprocess.Popen([sys.executable, "-m", "experiments.main", *args], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def test_sigterm_in_mode_all_skips_eval_and_sample(tmp_path):
  proc = _main(["--config=configs/toy/vp.py", f"--workdir={tmp_path}",
                "--config.training.n_iters=100000", "--config.training.log_freq=50",
                "--config.model.nf=32"])
  lines = []
  for line in proc.stdout:
    lines.append(line)
    if "step 100/" in line:
      proc.send_signal(signal.SIGTERM)
      break
  out = "".join(lines) + proc.communicate(timeout=300)[0]
  assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]
  assert "Received SIGTERM: training stopped at step" in out
  assert not (tmp_path / "eval").exists() and not (tmp_path / "samples").exists()


# 10. A rejected invocation writes nothing; environment failures are one clear line.
def test_rejected_invocation_keeps_the_workdir_untouched(tmp_path):
  (tmp_path / "config_train.txt").write_text("the run's config")
  proc = _main(["--config=configs/toy/vp.py", f"--workdir={tmp_path}", "--mode=train",
                "--config.optim.lr=-1"])
  out = proc.communicate(timeout=300)[0]
  assert proc.returncode != 0 and "config.optim.lr" in out
  assert (tmp_path / "config_train.txt").read_text() == "the run's config"
  assert sorted(p.name for p in tmp_path.iterdir()) == ["config_train.txt"]


@pytest.fixture
def mount_tmpfs(tmp_path):
  """``mount(name, options) -> path`` of a small tmpfs (needs the right to mount; the test is
  skipped elsewhere); unmounted afterwards."""
  mounted = []

  def mount(name, options):
    mnt = tmp_path / name
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mnt)],
                      capture_output=True).returncode != 0:
      pytest.skip("cannot mount a tmpfs here")
    mounted.append(mnt)
    return mnt
  yield mount
  for mnt in mounted:
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_disk_full_and_read_only_are_one_clear_line(mount_tmpfs):
  tiny_disk = mount_tmpfs("disk", "size=256k")
  cfg = tiny_toy_config(**{"training.snapshot_sampling": False, "model.nf": 256,
                           "model.num_layers": 3})
  with pytest.raises(OSError, match=r"Could not write the checkpoint of step 10 to .*: the disk "
                                    r"is full\. Earlier checkpoints are intact") as e:
    train.train(cfg, str(tiny_disk / "run"))
  assert len(str(e.value).splitlines()) == 1
  assert not list((tiny_disk / "run" / "checkpoints-meta").glob("*tmp*"))  # partial write gone
  read_only = mount_tmpfs("read_only", "ro,size=64k")
  with pytest.raises(OSError, match="is not writable"):
    Trainer(tiny_toy_config(), str(read_only / "run"))
