"""Released checkpoints of the original score_sde (JAX / Flax): flax msgpack files.

The original ``run_lib.py`` saved ``flax.training.checkpoints.save_checkpoint(dir, state)`` files
named ``checkpoint_<N>``: flax msgpack of the old ``flax.struct`` dataclass

    State(step, optimizer, lr, model_state, ema_rate, params_ema, rng)

whose state dict is ``{'step', 'optimizer': {'target': params, 'state': {'step', 'param_states'}},
'lr', 'model_state', 'ema_rate', 'params_ema', 'rng'}`` (``flax.optim`` Optimizer: ``target`` =
the parameters, ``state`` = Adam moments ``{'grad_ema', 'grad_sq_ema'}`` per parameter).
Classifier checkpoints (``create_classifier``) hold the parameter dict itself. Neither
``flax.optim`` nor that ``State`` class exist any more, so we read the raw state dict with
:func:`flax.serialization.msgpack_restore` and pick the parameter tree.

Every tree is checked against ``score_sde.models.utils.param_shapes(config)`` with
:func:`score_sde.checkpoint_import.common.fit_params`. The format-independent entry points
(:func:`score_sde.checkpoint_import.import_checkpoint`, ``import_to_workdir``) dispatch here.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from score_sde.checkpoint_import.common import (ImportedState, describe_model, fit_params,
                                                is_torch_file, latest_checkpoint)
from score_sde.models import utils as mutils
from score_sde.models.wideresnet import cifar10_classifier

__all__ = ["read_state_dict", "select_params", "reference_state_dict",
           "import_classifier_checkpoint", "import_msgpack_checkpoint", "load_msgpack_state"]


def read_state_dict(path: str) -> dict:
  """The raw nested state dict of a flax msgpack checkpoint file (or newest in a directory)."""
  path = latest_checkpoint(path)
  if is_torch_file(path):
    raise ValueError(f"{path!r} is a PyTorch (score_sde_pytorch) checkpoint, not flax msgpack: "
                     "load it with import_checkpoint / import_to_workdir, or read it with "
                     "score_sde.checkpoint_import.pytorch.read_torch_checkpoint.")
  with open(path, "rb") as f:
    data = f.read()
  try:
    state = flax.serialization.msgpack_restore(data)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"{path!r} is not a flax msgpack checkpoint ({type(e).__name__}: {e}), nor "
                     "a PyTorch (score_sde_pytorch '.pth') one.") from e
  if not isinstance(state, dict):
    raise ValueError(f"{path!r} holds a {type(state).__name__}, not a state dict.")
  return state


def select_params(state: Mapping[str, Any], ema: bool = True) -> dict:
  """The parameter tree of a reference state dict.

  ``ema=True``: ``params_ema`` (the weights the paper evaluates); ``ema=False``: the raw
  optimizer target ``optimizer/target``. A dict without ``optimizer`` / ``params_ema`` is taken
  to be a bare parameter dict (the classifier checkpoints).
  """
  is_train_state = "optimizer" in state or "params_ema" in state
  if not is_train_state:
    return dict(state.get("params", state))
  if ema:
    if "params_ema" not in state:
      raise ValueError("Checkpoint has no 'params_ema'; pass ema=False to load optimizer/target.")
    return state["params_ema"]
  opt = state.get("optimizer", {})
  if "target" not in opt:
    raise ValueError("Checkpoint has no 'optimizer/target'; pass ema=True to load params_ema.")
  return opt["target"]


def _step_of(state: Mapping[str, Any]) -> Optional[int]:
  step = state.get("step", None)
  return None if step is None else int(np.asarray(step))


def import_msgpack_checkpoint(path: str, config, ema: bool = True) -> dict:
  """``{'params': params, 'step': int | None}`` of a score_sde JAX checkpoint (a file, or the
  newest ``checkpoint_<N>`` of a directory): ``params_ema`` (``ema=False``: ``optimizer/target``)
  checked against ``config``'s network; only that tree is read."""
  state = read_state_dict(path)
  params = fit_params(mutils.param_shapes(config), select_params(state, ema=ema),
                      what=describe_model(config))
  return {"params": params, "step": _step_of(state)}


def _adam_moments(state: Mapping[str, Any]) -> Optional[tuple[dict, dict]]:
  """(grad_ema, grad_sq_ema) trees of a flax.optim.Adam ``optimizer/state/param_states``, if any."""
  param_states = state.get("optimizer", {}).get("state", {}).get("param_states", None)
  if not isinstance(param_states, dict):
    return None
  flat = flatten_dict(param_states)
  mu = {k[:-1]: v for k, v in flat.items() if k[-1] == "grad_ema"}
  nu = {k[:-1]: v for k, v in flat.items() if k[-1] == "grad_sq_ema"}
  if not mu or len(mu) + len(nu) != len(flat):
    return None
  return unflatten_dict(mu), unflatten_dict(nu)


def load_msgpack_state(path: str, config, ema: bool = True) -> ImportedState:
  """The whole train state of a score_sde JAX checkpoint for ``config``: ``params`` =
  ``optimizer/target`` (``params_ema`` if the checkpoint has no target), ``ema_params`` =
  ``params_ema`` (``ema=False``: the target), Adam ``grad_ema`` / ``grad_sq_ema`` when present,
  ``step`` (0 if absent). Every tree is checked against the config's network."""
  what = describe_model(config)
  state_dict = read_state_dict(path)
  has_target = "target" in state_dict.get("optimizer", {})
  template = mutils.param_shapes(config)
  raw = fit_params(template, select_params(state_dict, ema=not has_target), what=what)
  averaged = fit_params(template, select_params(state_dict, ema=ema), what=what)
  moments = _adam_moments(state_dict)
  if moments is not None:
    moments = (fit_params(template, moments[0], what=f"{what} (Adam grad_ema)"),
               fit_params(template, moments[1], what=f"{what} (Adam grad_sq_ema)"))
  step = _step_of(state_dict)
  return ImportedState(params=raw, ema_params=averaged, adam=moments,
                       step=0 if step is None else step)


def reference_state_dict(params: Mapping[str, Any], params_ema: Optional[Mapping[str, Any]] = None,
                         step: int = 0, lr: float = 2e-4, ema_rate: float = 0.9999,
                         rng: Optional[np.ndarray] = None) -> dict:
  """The state dict the original ``State`` serialized to (for tests and for re-export): Adam
  moments are zeros, ``params_ema`` defaults to ``params``."""
  to_np = lambda t: jax.tree_util.tree_map(np.asarray, flax.core.unfreeze(t))
  p = to_np(params)
  pe = to_np(params_ema) if params_ema is not None else p
  moments = jax.tree_util.tree_map(lambda a: {"grad_ema": np.zeros_like(a),
                                              "grad_sq_ema": np.zeros_like(a)}, p)
  return {"step": step,
          "optimizer": {"target": p, "state": {"step": step, "param_states": moments}},
          "lr": lr, "model_state": {}, "ema_rate": ema_rate, "params_ema": pe,
          "rng": np.zeros((2,), np.uint32) if rng is None else np.asarray(rng)}


def import_classifier_checkpoint(path: str) -> dict:
  """Parameters of the noise-conditional WRN-28-10 classifier (``create_classifier`` checkpoint:
  the bare parameter dict, or a state dict holding one), checked against
  :func:`score_sde.models.wideresnet.cifar10_classifier` on ``[1, 32, 32, 3]`` images."""
  classifier = cifar10_classifier()
  template = jax.eval_shape(
      lambda: classifier.init({"params": jax.random.PRNGKey(0)}, jnp.zeros((1, 32, 32, 3)),
                              jnp.ones((1,)), train=False))["params"]
  loaded = select_params(read_state_dict(path), ema=True)
  return fit_params(template, loaded, what="WRN-28-10 classifier")
