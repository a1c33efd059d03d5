"""Import of original score_sde (JAX) checkpoints: files written here in that exact format.

The original ``run_lib.py`` saved ``flax.training.checkpoints.save_checkpoint(dir, state)``, i.e.
``flax.serialization.to_bytes`` of a ``flax.struct`` ``State(step, optimizer, lr, model_state,
ema_rate, params_ema, rng)`` with a ``flax.optim.Optimizer(target, state=OptimizerState(step,
param_states))`` of Adam (``grad_ema`` / ``grad_sq_ema``). Those classes are gone from flax, so the
test re-declares them as struct dataclasses with the same fields and serializes through flax.
"""
import os
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.traverse_util import flatten_dict

from score_sde import checkpoint_import as ci
from score_sde.models.utils import param_shapes
from checkpoint_helpers import restore_train_state as _restore
from checkpoint_helpers import tiny_config as _config


@flax.struct.dataclass
class _AdamParamState:
  grad_ema: Any
  grad_sq_ema: Any


@flax.struct.dataclass
class _OptimizerState:
  step: Any
  param_states: Any


@flax.struct.dataclass
class _Optimizer:  # flax.optim.Optimizer: optimizer_def is static, state / target serialize
  optimizer_def: Any = flax.struct.field(pytree_node=False)
  state: Any = None
  target: Any = None


@flax.struct.dataclass
class _State:  # score_sde models/utils.py State
  step: int
  optimizer: _Optimizer
  lr: float
  model_state: Any
  ema_rate: float
  params_ema: Any
  rng: Any


def _random_tree(template, rng):
  return jax.tree.map(lambda a: rng.normal(size=a.shape).astype(np.float32), template)


def _write_reference_checkpoint(path, params, params_ema, step, adam=None):
  """Bytes exactly as flax.training.checkpoints.save_checkpoint wrote the original State."""
  frozen = flax.core.freeze
  if adam is None:
    adam = jax.tree.map(lambda a: _AdamParamState(np.zeros_like(a), np.zeros_like(a)), params)
  opt = _Optimizer(optimizer_def=None, state=_OptimizerState(step=np.asarray(step, np.int32),
                                                             param_states=frozen(adam)),
                   target=frozen(params))
  state = _State(step=np.asarray(step, np.int32), optimizer=opt, lr=2e-4,
                 model_state=frozen({}), ema_rate=0.9999, params_ema=frozen(params_ema),
                 rng=np.asarray(jax.random.PRNGKey(3)))
  with open(path, "wb") as f:
    f.write(flax.serialization.to_bytes(state))


def _assert_tree_equal(a, b):
  fa, fb = flatten_dict(a), flatten_dict(b)
  assert fa.keys() == fb.keys()
  for k in fa:
    np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg="/".join(k))


@pytest.mark.parametrize("name", ["ve.cifar10_ncsnpp_continuous", "vp.cifar10_ddpm"])
def test_round_trip_ema_selection_and_newest_file(tmp_path, name):
  cfg = _config(name, nf=32) if "ddpm" == name.split("_")[-1] else _config(name)
  template = param_shapes(cfg)
  rng = np.random.default_rng(0)
  params, ema = _random_tree(template, rng), _random_tree(template, rng)
  _write_reference_checkpoint(tmp_path / "checkpoint_3", _random_tree(template, rng),
                              _random_tree(template, rng), step=150)
  _write_reference_checkpoint(tmp_path / "checkpoint_26", params, ema, step=1300000)
  # The state dict is the original layout.
  raw = ci.read_state_dict(str(tmp_path / "checkpoint_26"))
  assert set(raw) == {"step", "optimizer", "lr", "model_state", "ema_rate", "params_ema", "rng"}
  assert set(raw["optimizer"]) == {"target", "state"}
  out = ci.import_checkpoint(str(tmp_path), cfg)  # directory: the newest checkpoint_<N>
  assert out["step"] == 1300000
  _assert_tree_equal(out["params"], ema)
  assert all(l.dtype == jnp.float32 for l in jax.tree.leaves(out["params"]))
  _assert_tree_equal(ci.import_checkpoint(str(tmp_path / "checkpoint_26"), cfg, ema=False)[
      "params"], params)
  assert ci.import_checkpoint(str(tmp_path / "checkpoint_3"), cfg)["step"] == 150
  # The imported tree is exactly what the network's init produces (names and shapes).
  assert jax.tree.structure(out["params"]) == jax.tree.structure(template)


def test_mismatch_names_first_path(tmp_path):
  cfg = _config("ve.cifar10_ncsnpp_continuous")
  template = param_shapes(cfg)
  rng = np.random.default_rng(1)
  params = _random_tree(template, rng)
  path = str(tmp_path / "checkpoint_1")
  _write_reference_checkpoint(path, params, params, step=1)
  # A config with a different width: the first differing path (sorted) and both shapes.
  wide = _config("ve.cifar10_ncsnpp_continuous", nf=16)
  with pytest.raises(ValueError, match=r"'AttnBlockpp_0/GroupNorm_0/bias' has shape \(16,\) in "
                                       r"the checkpoint but \(32,\)"):
    ci.import_checkpoint(path, wide)
  # A missing and an unexpected parameter.
  flat = flatten_dict(params)
  missing = dict(flat)
  del missing[("Dense_1", "kernel")]
  missing[("Dense_9", "kernel")] = np.zeros((2, 2), np.float32)
  missing = flax.traverse_util.unflatten_dict(missing)
  _write_reference_checkpoint(path, missing, missing, step=1)
  with pytest.raises(ValueError, match=r"'Dense_1/kernel' is missing from the checkpoint .* "
                                       r"shape \(32, 32\)\) \(1 more mismatches\)"):
    ci.import_checkpoint(path, cfg)
  extra = flax.traverse_util.unflatten_dict({**flat, ("Dense_9", "kernel"): np.zeros((2,))})
  _write_reference_checkpoint(path, extra, extra, step=1)
  with pytest.raises(ValueError, match=r"'Dense_9/kernel' \(shape \(2,\)\) in the checkpoint is "
                                       r"not a parameter"):
    ci.import_checkpoint(path, cfg)
  # A config of another network entirely.
  with pytest.raises(ValueError, match="does not fit the model 'ddpm'"):
    ci.import_checkpoint(path, _config("vp.cifar10_ddpm", nf=32))
  # Not a checkpoint, no checkpoint files.
  (tmp_path / "junk").write_bytes(b"\x00\x01 not msgpack")
  with pytest.raises(ValueError, match="not a flax msgpack checkpoint"):
    ci.read_state_dict(str(tmp_path / "junk"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="No 'checkpoint_<N>' files"):
    ci.latest_checkpoint(str(tmp_path / "empty"))
  with pytest.raises(FileNotFoundError, match="No checkpoint file or directory"):
    ci.latest_checkpoint(str(tmp_path / "missing"))


def test_import_to_workdir_then_sample(tmp_path):
  """Released checkpoint -> orbax workdir (params, EMA, Adam moments, step) -> --mode sample."""
  from score_sde.evaluation import evaluate
  cfg = _config("ve.cifar10_ncsnpp_continuous")
  cfg.sampling.method = "pc"
  cfg.sampling.predictor = "reverse_diffusion"
  cfg.sampling.corrector = "none"
  template = param_shapes(cfg)
  rng = np.random.default_rng(2)
  params = _random_tree(template, rng)
  ema = jax.tree.map(lambda a: 0.05 * a, _random_tree(template, rng))
  adam = jax.tree.map(lambda a: _AdamParamState(0.1 * a, a * a), params)
  ckpt = str(tmp_path / "checkpoint_7")
  _write_reference_checkpoint(ckpt, params, ema, step=70, adam=adam)
  workdir = str(tmp_path / "run")
  assert ci.import_to_workdir(cfg, ckpt, workdir) == 70
  state = _restore(cfg, workdir, 70)
  assert int(state.step) == 70
  _assert_tree_equal(state.ema_params, ema)
  _assert_tree_equal(state.params, params)
  is_adam = lambda s: isinstance(s, optax.ScaleByAdamState)
  adam_states = [s for s in jax.tree.leaves(state.opt_state, is_leaf=is_adam) if is_adam(s)]
  assert len(adam_states) == 1 and int(adam_states[0].count) == 70
  _assert_tree_equal(adam_states[0].mu, jax.tree.map(lambda a: 0.1 * a, params))
  _assert_tree_equal(adam_states[0].nu, jax.tree.map(lambda a: a * a, params))
  # --mode sample from the imported workdir (the Trainer restores it like its own checkpoint).
  out_dir = evaluate.run_sample(cfg, workdir)
  out = np.load(os.path.join(out_dir, "samples.npz"))
  assert out["samples"].shape == (8, 8, 8, 3) and int(out["step"]) == 70
  assert np.all(np.isfinite(out["samples"]))
  # ema=False into another workdir, at a chosen step: sampling weights are the raw target.
  workdir2 = str(tmp_path / "run_raw")
  assert ci.import_to_workdir(cfg, ckpt, workdir2, ema=False, step=5) == 5
  state = _restore(cfg, workdir2, 5)
  _assert_tree_equal(state.ema_params, params)
  assert int(state.step) == 5
  adam_states = [s for s in jax.tree.leaves(state.opt_state, is_leaf=is_adam) if is_adam(s)]
  assert int(adam_states[0].count) == 70  # Adam bias correction keeps the training step


def test_classifier_checkpoint(tmp_path):
  """create_classifier's checkpoint: the bare WRN-28-10 parameter dict."""
  from score_sde.models.wideresnet import cifar10_classifier
  template = jax.eval_shape(lambda: cifar10_classifier().init(
      {"params": jax.random.PRNGKey(0)}, jnp.zeros((1, 32, 32, 3)), jnp.ones((1,))))["params"]
  params = _random_tree(template, np.random.default_rng(3))
  path = tmp_path / "checkpoint_0"
  path.write_bytes(flax.serialization.to_bytes(flax.core.freeze(params)))
  _assert_tree_equal(ci.import_classifier_checkpoint(str(tmp_path)), params)
  del params["pre-pool-bn"]
  path.write_bytes(flax.serialization.to_bytes(flax.core.freeze(params)))
  with pytest.raises(ValueError, match="'pre-pool-bn/bias' is missing"):
    ci.import_classifier_checkpoint(str(path))
