"""Post-hoc EMA (EDM2): power-function EMAs, snapshots, least-squares reconstruction, CLI mode."""
import json
import os
import shutil
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_toy_config
from experiments_helpers import run_experiment
from score_sde import posthoc_ema as P
from score_sde.checkpointing import CheckpointMismatch, Checkpoints
from score_sde.config_validation import validate_config
from score_sde.train import Trainer

RELS = (0.05, 0.10)


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


def _max_diff(a, b) -> float:
  return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
             for x, y in zip(_leaves(a), _leaves(b)))


def _trajectory(steps: int, seed: int = 0) -> np.ndarray:
  """theta_1..theta_T [T, 2, 3] (float64): a drift plus a random walk with shrinking steps."""
  rng = np.random.default_rng(seed)
  walk = np.cumsum(rng.normal(size=(steps, 2, 3)) / np.sqrt(np.arange(1, steps + 1))[:, None, None],
                   0)
  return 0.3 * walk + np.linspace(0.0, 1.0, steps)[:, None, None] * rng.normal(size=(2, 3))


def _tracked(theta: np.ndarray, rels, every: int, directory=None):
  """Runs update_power_emas (jitted, float32) over ``theta``; returns the EMAs at every step
  ``every`` (and writes them as snapshots to ``directory``)."""
  gammas = [float(g) for g in P.sigma_rel_to_gamma(rels)]
  params = {"w": jnp.asarray(theta[0, 0], jnp.float32), "b": jnp.asarray(theta[0, 1], jnp.float32)}
  state = P.init_power_emas(params, rels)
  update = jax.jit(lambda s, p, t: P.update_power_emas(s, p, t, gammas))
  out = {}
  for t in range(1, len(theta) + 1):
    params = {"w": jnp.asarray(theta[t - 1, 0], jnp.float32),
              "b": jnp.asarray(theta[t - 1, 1], jnp.float32)}
    state = update(state, params, jnp.int32(t))
    if t % every == 0:
      out[t] = jax.device_get(state.emas)
      if directory is not None:
        for rel, ema in zip(rels, state.emas):
          P.save_snapshot(str(directory), t, rel, ema)
  return out, params


def _closed_form(theta: np.ndarray, rel: float, t: int) -> np.ndarray:
  return np.tensordot(P.power_ema_weights(t, float(P.sigma_rel_to_gamma(rel))), theta[:t], 1)


# --- the math ----------------------------------------------------------------------------------
def test_gamma_sigma_rel_round_trip_and_the_papers_values():
  np.testing.assert_allclose(P.sigma_rel_to_gamma([0.05, 0.10]), [16.97, 6.94], atol=5e-3)
  rels = np.concatenate([np.geomspace(1e-4, 0.28, 40), [P.SIGMA_REL_MAX * (1 - 1e-9)]])
  np.testing.assert_allclose(P.gamma_to_sigma_rel(P.sigma_rel_to_gamma(rels)), rels, rtol=1e-12)
  gammas = np.geomspace(1e-3, 1e5, 40)
  np.testing.assert_allclose(P.sigma_rel_to_gamma(P.gamma_to_sigma_rel(gammas)), gammas,
                             rtol=1e-9)
  assert P.SIGMA_REL_MAX == pytest.approx(float(P.gamma_to_sigma_rel(0.0)))
  for bad in (0.0, -0.1, P.SIGMA_REL_MAX, 0.3):
    with pytest.raises(ValueError, match=r"sigma_rel must be in \(0, 0.288675\)"):
      P.sigma_rel_to_gamma(bad)
  # The discrete weights are the continuous profile integrated over (tau - 1, tau] and sum to 1.
  w = P.power_ema_weights(50, 6.94)
  assert w.sum() == pytest.approx(1.0, abs=1e-14) and np.all(np.diff(w) > 0)
  t = np.arange(1, 51, dtype=np.float64)
  np.testing.assert_allclose(P.power_ema_beta(t, 6.94), (1 - 1 / t) ** 7.94, rtol=1e-12)


def test_power_ema_update_matches_the_closed_form_average():
  theta = _trajectory(400)
  out, _ = _tracked(theta, RELS, every=100)
  for t, emas in out.items():
    for rel, ema in zip(RELS, emas):
      want = _closed_form(theta, rel, t)
      np.testing.assert_allclose(np.asarray(ema["w"]), want[0], rtol=0, atol=2e-6)
      np.testing.assert_allclose(np.asarray(ema["b"]), want[1], rtol=0, atol=2e-6)


def test_profile_inner_products_match_quadrature():
  p = lambda s, t, g: (g + 1) * s**g / t ** (g + 1)   # on [0, t]
  for (ta, ga, tb, gb) in [(100, 6.94, 300, 16.97), (300, 6.94, 100, 16.97), (200, 3.0, 200, 3.0)]:
    s = np.linspace(0, min(ta, tb), 1_000_001)
    quad = np.trapezoid(p(s, ta, ga) * p(s, tb, gb), s)
    assert P.profile_inner_products(ta, ga, tb, gb) == pytest.approx(quad, rel=1e-8)


def test_reconstruction_of_a_tracked_width_is_that_ema_and_others_are_close(tmp_path):
  theta = _trajectory(1000, seed=1)
  out, params = _tracked(theta, RELS, every=50, directory=tmp_path)
  template = jax.device_get(params)
  for i, rel in enumerate(RELS):
    rec, info = P.reconstruct(str(tmp_path), rel, template)
    assert info["step"] == 1000 and info["fit_rel_error"] < 1e-6
    weights = np.array([s["weight"] for s in info["snapshots"]])
    assert weights.sum() == pytest.approx(1.0) and np.abs(weights).max() == pytest.approx(1.0)
    assert _max_diff(rec, out[1000][i]) <= 1e-7     # float32 round-off
  # An untracked width: close to the EMA tracked directly, much closer than the nearest tracked.
  spread = np.abs(_closed_form(theta, 0.05, 1000) - _closed_form(theta, 0.25, 1000)).max()
  for rel, bound in ((0.07, 1e-3), (0.15, 1e-3)):
    rec, info = P.reconstruct(str(tmp_path), rel, template)
    want = _closed_form(theta, rel, 1000)
    err = max(np.abs(rec["w"] - want[0]).max(), np.abs(rec["b"] - want[1]).max())
    assert err < bound * spread, (rel, err / spread, info["fit_rel_error"])
  # At an earlier snapshot step, only the snapshots up to it are used.
  rec, info = P.reconstruct(str(tmp_path), 0.10, template, step=500)
  assert max(s["step"] for s in info["snapshots"]) == 500
  assert _max_diff(rec, out[500][1]) <= 1e-7
  with pytest.raises(FileNotFoundError, match="snapshot steps"):
    P.reconstruct(str(tmp_path), 0.10, template, step=510)


def test_interrupted_snapshot_write_leaves_no_snapshot(tmp_path, monkeypatch):
  params = {"w": np.ones(3, np.float32)}
  P.save_snapshot(str(tmp_path), 10, 0.05, params)

  def broken(f, **arrays):
    f.write(b"PK\x03\x04 half a zip")
    raise OSError(28, "No space left on device")
  monkeypatch.setattr(np, "savez", broken)
  with pytest.raises(OSError, match="Could not write the post-hoc EMA snapshot of step 20"):
    P.save_snapshot(str(tmp_path), 20, 0.05, params)
  monkeypatch.undo()
  # A kill -9 mid-write leaves only a .tmp file: never listed as a snapshot.
  (tmp_path / (P.snapshot_name(30, 0.05) + ".tmp")).write_bytes(b"PK\x03\x04 half")
  assert [(s.step, s.sigma_rel) for s in P.list_snapshots(str(tmp_path))] == [(10, 0.05)]
  assert sorted(os.listdir(tmp_path)) == [P.snapshot_name(10, 0.05),
                                          P.snapshot_name(30, 0.05) + ".tmp"]


# --- in the Trainer ---------------------------------------------------------------------------
def _cfg(**overrides):
  return tiny_toy_config(**{"training.n_iters": 60, "training.posthoc_ema_every": 10,
                            "training.snapshot_sampling": False, **overrides})


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
  """A tiny toy run (60 steps, 10 per call), snapshots every 10 steps: (workdir, final state)."""
  workdir = tmp_path_factory.mktemp("tracked")
  trainer = Trainer(_cfg(), str(workdir))
  try:
    trainer.train()
  finally:
    trainer.close()
  return workdir, jax.device_get(trainer.state)


def test_toy_run_snapshots_and_reconstructs_its_tracked_emas(tracked_run):
  workdir, state = tracked_run
  snaps = P.list_snapshots(str(workdir / "posthoc_ema"))
  assert [(s.step, s.sigma_rel) for s in snaps] == [(t, r) for t in range(10, 61, 10)
                                                    for r in RELS]
  np.testing.assert_array_equal(np.asarray(state.power_emas.sigma_rels),
                                np.asarray(RELS, np.float32))
  for i, rel in enumerate(RELS):
    stored = P.load_snapshot([s for s in snaps if s.step == 60][i], state.params)
    assert _max_diff(stored, state.power_emas.emas[i]) == 0.0
    rec, info = P.reconstruct(str(workdir / "posthoc_ema"), rel, state.params)
    assert _max_diff(rec, state.power_emas.emas[i]) <= 1e-6, info
  # The power EMAs differ from the raw params and from each other (they average the trajectory).
  assert _max_diff(state.power_emas.emas[0], state.params) > 1e-4
  assert _max_diff(state.power_emas.emas[0], state.power_emas.emas[1]) > 1e-5


@flax.struct.dataclass
class OldTrainState:
  """The TrainState before post-hoc EMA existed."""
  step: Any
  params: Any
  opt_state: Any
  ema_params: Any
  key: Any


def test_tracking_off_keeps_the_old_state_tree_and_restores_old_checkpoints(tmp_path):
  cfg = tiny_toy_config(**{"training.snapshot_sampling": False})
  trainer = Trainer(cfg, str(tmp_path / "new"))
  state = trainer.state
  assert state.power_emas is None
  old = OldTrainState(step=jnp.int32(30), params=state.params, opt_state=state.opt_state,
                      ema_params=jax.tree.map(lambda x: x + 1, state.ema_params), key=state.key)
  paths = lambda t: [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(t)[0]]
  assert paths(state) == paths(old)
  assert [x.shape for x in jax.tree.leaves(state)] == [x.shape for x in jax.tree.leaves(old)]
  # An old-style checkpoint (written from the old dataclass) restores into the new state.
  old_dir = tmp_path / "old"
  ckpt = Checkpoints(str(old_dir), 5, trainer.checkpoints.fingerprint)
  ckpt.save(30, old, snapshot=True)
  ckpt.close()
  trainer.checkpoints.save(30, trainer.state.replace(step=old.step, ema_params=old.ema_params),
                           snapshot=True)
  # ... and a new save without tracking writes exactly the old checkpoint's tree.
  meta = lambda d: json.loads((d / "checkpoints" / "30" / "default" / "_METADATA").read_text())
  assert meta(old_dir) == meta(tmp_path / "new")
  trainer.close()
  resumed = Trainer(cfg, str(old_dir))
  assert resumed.restore() == 30
  assert _max_diff(resumed.state.ema_params, old.ema_params) == 0.0
  assert resumed.state.power_emas is None
  resumed.close()
  # Tracking on: evaluation reads the old checkpoint; resuming training with tracking refuses.
  tracking = Trainer(_cfg(), str(old_dir))
  step, restored = tracking.checkpoints.restore_latest(tracking.state)
  assert step == 30 and restored.power_emas is None
  with pytest.raises(CheckpointMismatch, match="has no post-hoc EMAs but this config tracks"):
    tracking.restore()
  tracking.close()


def test_tracking_mismatch_on_resume_is_named_and_eval_still_reads(tracked_run, tmp_path):
  workdir, state = tracked_run
  off = Trainer(_cfg(**{"training.posthoc_ema_every": 0}), str(workdir))
  with pytest.raises(CheckpointMismatch, match="tracks post-hoc EMAs but this config does not"):
    off.restore()
  step, restored = off.checkpoints.restore_latest(off.state)   # what eval / sample do
  assert step == 60 and restored.power_emas is None
  assert _max_diff(restored.ema_params, state.ema_params) == 0.0
  off.close()
  other = Trainer(_cfg(**{"training.posthoc_ema_sigma_rels": (0.05, 0.12)}), str(workdir))
  with pytest.raises(CheckpointMismatch, match=r"sigma_rel \[0.05, 0.1\], this config"):
    other.restore()
  other.close()


def test_resume_rewrites_the_snapshots_after_the_restored_step(tracked_run, tmp_path):
  reference, _ = tracked_run
  workdir = tmp_path / "run"
  shutil.copytree(reference, workdir)
  snap_dir = workdir / "posthoc_ema"
  before = {p.name: p.read_bytes() for p in snap_dir.glob("*.npz")}
  # Lose the final checkpoint (preempted before it was written): the newest left is step 50.
  shutil.rmtree(workdir / "checkpoints" / "60")
  # ... and leave debris: a snapshot of the lost future, a stale one, a half-written one.
  (snap_dir / P.snapshot_name(60, 0.05)).write_bytes(b"junk from another trajectory")
  shutil.copy(snap_dir / P.snapshot_name(60, 0.10), snap_dir / P.snapshot_name(70, 0.10))
  (snap_dir / (P.snapshot_name(60, 0.10) + ".tmp")).write_bytes(b"PK")
  trainer = Trainer(_cfg(), str(workdir))
  try:
    trainer.train()
  finally:
    trainer.close()
  after = {p.name: p.read_bytes() for p in snap_dir.glob("*.npz")}
  assert not list(snap_dir.glob("*.tmp"))
  assert sorted(after) == sorted(before)
  for name in before:   # the resumed run continues the EMAs from step 50: identical snapshots
    a, b = np.load(snap_dir / name), np.load(reference / "posthoc_ema" / name)
    for k in b.files:
      np.testing.assert_array_equal(a[k], b[k], err_msg=f"{name}:{k}")


# --- config validation and the command line ----------------------------------------------------
@pytest.mark.parametrize("field,value,match", [
    ("training.posthoc_ema_every", 15, "posthoc_ema_every=15 must be a multiple"),
    ("training.posthoc_ema_every", -10, "posthoc_ema_every must be an integer >= 0"),
    ("training.posthoc_ema_sigma_rels", (0.05, 0.3), r"each in \(0, 0.288675\)"),
    ("training.posthoc_ema_sigma_rels", (0.05, 0.05), "distinct"),
    ("training.posthoc_ema_sigma_rels", (), "non-empty"),
    ("eval.sigma_rel", 0.29, r"eval.sigma_rel must be a finite number in \(0, 0.288675\)"),
    ("eval.sigma_rel", 0.0, r"eval.sigma_rel must be"),
])
def test_bad_posthoc_fields_are_named_at_start_up(field, value, match):
  with pytest.raises(ValueError, match=match):
    validate_config(_cfg(**{field: value}))


def test_invocations_that_cannot_work_are_named_before_anything_runs(tracked_run, tmp_path):
  workdir, _ = tracked_run
  cfg = tiny_toy_config()
  problem, _ = P.check_invocation(cfg, str(workdir), "posthoc_ema")
  assert "set --config.eval.sigma_rel" in problem
  cfg.eval.sigma_rel = 0.07
  problem, _ = P.check_invocation(cfg, str(tmp_path), "posthoc_ema")
  assert "No post-hoc EMA snapshots" in problem and "posthoc_ema_every" in problem
  problem, _ = P.check_invocation(cfg, str(workdir), "eval")
  assert "run --mode posthoc_ema --config.eval.sigma_rel=0.07" in problem
  problem, _ = P.check_invocation(cfg, str(tmp_path), "all")
  assert "posthoc_ema_every=0 stores no snapshots" in problem
  assert P.check_invocation(cfg, str(workdir), "posthoc_ema") == (
      None, str(workdir / "posthoc_ema" / "sigma_rel_0.07"))


def _main(*args, check=True):
  env = dict(os.environ, XLA_FLAGS=os.environ.get("XLA_FLAGS", "").replace(
      "xla_force_host_platform_device_count=8", "xla_force_host_platform_device_count=2"))
  return run_experiment("main", "--config", "configs/toy/vp.py", *args, check=check, env=env)


# The fixture's run as command-line overrides of configs/toy/vp.py (tiny_toy_config), with a short
# PC sampler and no bits/dim for a quick eval.
SMALL = ["--config.training.n_iters=60", "--config.training.batch_size=64",
         "--config.training.n_jitted_steps=10", "--config.training.log_freq=10",
         "--config.training.snapshot_freq=20", "--config.training.snapshot_freq_for_preemption=10",
         "--config.training.snapshot_sampling=False", "--config.model.nf=32",
         "--config.model.num_layers=2", "--config.model.num_scales=50",
         "--config.sampling.num_samples=64", "--config.sampling.batch_size=64",
         "--config.eval.num_bpd_samples=64", "--config.eval.num_samples=64",
         "--config.eval.batch_size=64", "--config.eval.enable_bpd=False"]


def test_cli_posthoc_ema_end_to_end_and_eval_reads_it(tracked_run, tmp_path):
  # A run that stored no snapshots: one line naming the field, exit 1, nothing written.
  empty = tmp_path / "empty"
  empty.mkdir()
  proc = _main("--workdir", str(empty), "--mode", "posthoc_ema", "--config.eval.sigma_rel=0.07",
               *SMALL, check=False)
  assert proc.returncode == 1 and "posthoc_ema_every" in proc.stderr, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr and not list(empty.iterdir())
  # Reconstruct sigma_rel = 0.07 from the tracked run's snapshots, then evaluate it.
  run = tmp_path / "tracked"
  shutil.copytree(tracked_run[0], run)
  _main("--workdir", str(run), "--mode", "posthoc_ema", "--config.eval.sigma_rel=0.07", *SMALL)
  out = run / "posthoc_ema" / "sigma_rel_0.07"
  info = json.loads((out / "posthoc_ema.json").read_text())["60"]
  assert info["sigma_rel"] == 0.07 and len(info["snapshots"]) == 12
  assert sum(s["weight"] for s in info["snapshots"]) == pytest.approx(1.0)
  run_ckpt, rec_ckpt = Checkpoints(str(run)), Checkpoints(str(out))
  assert rec_ckpt.snapshot_steps() == [60]
  assert rec_ckpt.stored_fingerprint(60) == run_ckpt.stored_fingerprint(60) is not None
  state = rec_ckpt.restore(60, jax.device_get(tracked_run[1]).replace(power_emas=None))
  run_ckpt.close()
  rec_ckpt.close()
  want, _ = P.reconstruct(str(run / "posthoc_ema"), 0.07, state.params)
  assert _max_diff(state.ema_params, want) == 0.0 and _max_diff(state.params, want) == 0.0
  # eval with the same sigma_rel reads the reconstruction (the tracking flag is not needed).
  _main("--workdir", str(run), "--mode", "eval", "--config.eval.sigma_rel=0.07", *SMALL)
  record = json.loads((out / "eval" / "results.json").read_text())
  assert [r["step"] for r in record] == [60] and np.isfinite(record[0]["test_loss"])
  assert np.isfinite(record[0]["energy_distance"])
  assert not (run / "eval").exists()
  # Training in the reconstruction's workdir is refused.
  refused = Trainer(_cfg(), str(out))
  with pytest.raises(CheckpointMismatch, match="holds a post-hoc EMA reconstruction"):
    refused.train()
  refused.close()
