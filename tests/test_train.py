"""Training loop: multi-device equals single-device, bitwise resume, bad configs fail early."""
import os

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from conftest import tiny_toy_config
from score_sde.train import Trainer


def _one_device_mesh():
  return Mesh(np.array(jax.devices()[:1]), ("data",))


def _run(trainer: Trainer, steps: int):
  from score_sde import datasets
  ds = datasets.get_dataset(trainer.config, "train", start_step=int(trainer.state.step))
  n = trainer.config.training.n_jitted_steps
  losses = []
  for _ in range(steps // n):
    m = trainer.train_steps([next(ds) for _ in range(n)])
    losses.append(np.asarray(m["loss"]))
  return np.concatenate([np.atleast_1d(l) for l in losses])


def test_eight_devices_match_one_device():
  assert jax.device_count() == 8, "conftest forces 8 host devices"
  cfg = tiny_toy_config()
  multi = Trainer(cfg)
  single = Trainer(cfg, mesh=_one_device_mesh())
  assert multi.mesh.size == 8 and single.mesh.size == 1
  l8, l1 = _run(multi, 30), _run(single, 30)
  np.testing.assert_allclose(l8, l1, rtol=1e-4, atol=1e-6)
  p8 = jax.tree.leaves(jax.device_get(multi.state.params))
  p1 = jax.tree.leaves(jax.device_get(single.state.params))
  for a, b in zip(p8, p1):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_resume_continues_the_same_trajectory_bitwise(tmp_path):
  cfg = tiny_toy_config(**{"training.n_iters": 40})
  ref = Trainer(cfg, str(tmp_path / "ref"))
  ref.train()
  # Interrupted run: stop at 20 (a checkpoint exists there), then a fresh process-like restart.
  cfg_short = tiny_toy_config(**{"training.n_iters": 20})
  first = Trainer(cfg_short, str(tmp_path / "run"))
  first.train()
  first.checkpoints.close()
  second = Trainer(cfg, str(tmp_path / "run"))
  assert second.restore() == 20
  second.train()
  for a, b in zip(jax.tree.leaves(jax.device_get(ref.state)),
                  jax.tree.leaves(jax.device_get(second.state))):
    np.testing.assert_array_equal(a, b)
  ref.checkpoints.close(); second.checkpoints.close()


def test_train_program_is_compiled_from_shapes_before_the_state_exists():
  """train() compiles first (docs/networks.md: the compiler's memory and the state's do not add up):
  compiling needs only state_spec / batch_spec, and the compiled program steps exactly as the
  jitted one; a batch of another size goes through the jitted function."""
  from score_sde import datasets
  cfg = tiny_toy_config()
  trainer, ref = Trainer(cfg, mesh=_one_device_mesh()), Trainer(cfg, mesh=_one_device_mesh())
  compiled = trainer._train_program(trainer.batch_spec())
  assert trainer._state is None  # nothing of the state was built to compile
  ds = datasets.get_dataset(cfg, "train", start_step=0)
  n = cfg.training.n_jitted_steps
  batches = [[next(ds) for _ in range(n)] for _ in range(2)]
  ref_state = ref.state
  for b in batches:
    ref_state, ref_metrics = ref._multi_step(ref_state, ref.global_batch(b))
    np.testing.assert_array_equal(trainer.train_steps(b)["loss"], ref_metrics["loss"])
  for a, b in zip(jax.tree.leaves(jax.device_get(trainer.state)),
                  jax.tree.leaves(jax.device_get(ref_state))):
    np.testing.assert_array_equal(a, b)
  half = [{"image": b["image"][: len(b["image"]) // 2]} for b in batches[0]]
  assert np.all(np.isfinite(np.asarray(trainer.train_steps(half)["loss"])))
  assert trainer._train_exe[1] is compiled


def test_training_reduces_loss_and_learns_the_score():
  """A short run on the toy mixture must beat the untrained network by a wide margin."""
  from score_sde import datasets
  cfg = tiny_toy_config(**{"model.nf": 64})
  trainer = Trainer(cfg)
  mixture = datasets.get_toy_mixture(cfg)
  x = mixture.sample(jax.random.PRNGKey(5), 512)
  t = jax.numpy.full((512,), 0.5)
  exact = mixture.score(x, t, trainer.sde)

  def rel_err():
    est = trainer.score_fn(trainer.state.params)(x, t)
    return float(np.linalg.norm(est - exact) / np.linalg.norm(exact))

  before = rel_err()
  losses = _run(trainer, 400)
  after = rel_err()
  assert losses[-20:].mean() < 0.7 * losses[:20].mean()
  assert after < 0.5 * before and after < 0.35, (before, after)


@pytest.mark.parametrize("field,value,match", [
    ("training.batch_size", 60, "not divisible by the 8 devices"),
    ("training.sde", "vpsdee", "training.sde"),
    ("training.n_iters", 45, "multiple of"),
    ("sampling.method", "nope", "sampling.method"),
    ("model.ema_rate", 1.5, "ema_rate"),
])
def test_bad_config_fails_before_compiling(field, value, match):
  with pytest.raises(ValueError, match=match):
    Trainer(tiny_toy_config(**{field: value}))


def test_mnist_unet_with_dropout_trains_on_the_default_mesh():
  """The U-Net's dropout masks must live on the data-parallel mesh of all 8 devices."""
  import importlib.util
  from conftest import REPO
  spec = importlib.util.spec_from_file_location("c", REPO / "configs/mnist/vp_continuous.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  cfg = module.get_config()
  cfg.model.nf, cfg.model.ch_mult, cfg.model.dropout = 8, (1, 2), 0.5
  cfg.training.batch_size, cfg.training.n_jitted_steps = 16, 2
  cfg.optim.warmup = 0  # full learning rate from the first step
  trainer = Trainer(cfg)
  assert trainer.mesh.size == 8
  rng = np.random.default_rng(0)
  before = jax.device_get(trainer.state.params)
  m = trainer.train_steps([{"image": rng.random((16, 28, 28, 1), dtype=np.float32)}] * 2)
  assert np.all(np.isfinite(np.asarray(m["loss"])))
  changed = jax.tree.map(lambda a, b: bool(np.any(a != b)), before,
                         jax.device_get(trainer.state.params))
  # Zero-initialised output layers let gradients reach one more layer per step; the last one moves.
  assert any(jax.tree.leaves(changed))
