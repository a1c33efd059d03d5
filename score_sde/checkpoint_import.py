"""Import released checkpoints of the original score_sde (JAX / Flax) into this framework.

The original ``run_lib.py`` saved ``flax.training.checkpoints.save_checkpoint(dir, state)`` files
named ``checkpoint_<N>``: flax msgpack of the old ``flax.struct`` dataclass

    State(step, optimizer, lr, model_state, ema_rate, params_ema, rng)

whose state dict is ``{'step', 'optimizer': {'target': params, 'state': {'step', 'param_states'}},
'lr', 'model_state', 'ema_rate', 'params_ema', 'rng'}`` (``flax.optim`` Optimizer: ``target`` =
the parameters, ``state`` = Adam moments). Classifier checkpoints (``create_classifier``) hold the
parameter dict itself. Neither ``flax.optim`` nor that ``State`` class exist any more, so we read
the raw state dict with :func:`flax.serialization.msgpack_restore` and pick the parameter tree.

``import_checkpoint(path, config)`` returns ``{'params': ..., 'step': ...}``, with ``params``
(EMA weights by default) arranged exactly like ``model.init(...)['params']`` of
``config.model.name``; a checkpoint that does not fit raises ``ValueError`` naming the first
mismatching path. :func:`import_to_workdir` writes the whole imported state (raw and EMA params,
Adam moments, step) as an orbax checkpoint of this framework, so ``experiments/main.py --mode
sample / eval`` (and fine-tuning with ``--mode train``) run from it;
``experiments/import_checkpoint.py`` is its command line. :func:`import_classifier_checkpoint`
loads the noise-conditional Wide-ResNet used for class-conditional sampling.

Checkpoints of the official PyTorch port (score_sde_pytorch ``checkpoint_<N>.pth``, ``torch.save``
of ``{'optimizer', 'model', 'ema', 'step'}``) go through the same three functions: a file is
recognized as PyTorch by its content (zip with ``data.pkl``, or the legacy magic number) and
converted by :mod:`score_sde.checkpoint_import_torch` (NCSN++ / DDPM++ and DDPM; no PyTorch needed).
"""
from __future__ import annotations

import os
import re
from typing import Any, Mapping, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

__all__ = ["read_state_dict", "select_params", "fit_params", "model_param_shapes",
           "import_checkpoint", "import_classifier_checkpoint", "import_to_workdir",
           "latest_checkpoint", "is_torch_checkpoint", "reference_state_dict"]


def latest_checkpoint(path: str) -> str:
  """``path`` itself if a file, else the ``checkpoint_<N>`` (JAX) or ``checkpoint_<N>.pth``
  (score_sde_pytorch) file with the largest ``N`` in ``path``."""
  if os.path.isfile(path):
    return path
  if not os.path.isdir(path):
    raise FileNotFoundError(f"No checkpoint file or directory at {path!r}.")
  found = [(int(m.group(1)), f) for f in os.listdir(path)
           if (m := re.fullmatch(r"checkpoint_(\d+)(?:\.pth)?", f))
           and os.path.isfile(os.path.join(path, f))]
  if not found:
    raise FileNotFoundError(f"No 'checkpoint_<N>' files (nor 'checkpoint_<N>.pth') in {path!r}.")
  return os.path.join(path, max(found)[1])


def is_torch_checkpoint(path: str) -> bool:
  """Whether ``path`` (a file, or a directory: its newest checkpoint) was written by ``torch.save``
  (score_sde_pytorch) rather than flax msgpack; decided by the file's content."""
  from score_sde.checkpoint_import_torch import is_torch_checkpoint as is_torch
  return is_torch(latest_checkpoint(path))


def read_state_dict(path: str) -> dict:
  """The raw nested state dict of a flax msgpack checkpoint file (or newest in a directory)."""
  path = latest_checkpoint(path)
  if is_torch_checkpoint(path):
    raise ValueError(f"{path!r} is a PyTorch (score_sde_pytorch) checkpoint, not flax msgpack: "
                     "load it with import_checkpoint / import_to_workdir, or read it with "
                     "score_sde.checkpoint_import_torch.read_torch_checkpoint.")
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


def model_param_shapes(config, batch_size: int = 1) -> dict:
  """``model.init`` parameter shapes of ``config.model.name`` via ``jax.eval_shape`` (no compile)."""
  from score_sde.models import utils as mutils
  from score_sde.utils import data_shape
  model = mutils.get_model(config.model.name)(config=config)
  x = jnp.zeros((batch_size,) + data_shape(config), jnp.float32)
  labels = jnp.ones((batch_size,), jnp.float32)
  variables = jax.eval_shape(
      lambda: model.init({"params": jax.random.PRNGKey(0), "dropout": jax.random.PRNGKey(1)},
                         x, labels, train=False))
  return flax.core.unfreeze(variables["params"])


def fit_params(template: Mapping[str, Any], loaded: Mapping[str, Any],
               what: str = "model") -> dict:
  """Checks ``loaded`` against ``template`` (arrays or ShapeDtypeStructs) and returns ``loaded``
  as jnp arrays in the template's dtypes.

  Raises ``ValueError`` naming the first (in sorted path order) missing, unexpected or
  wrongly-shaped parameter.
  """
  want = {"/".join(k): v for k, v in flatten_dict(flax.core.unfreeze(template)).items()}
  have = {"/".join(k): v for k, v in flatten_dict(dict(loaded)).items()}
  problems = []
  for path in sorted(set(want) | set(have)):
    if path not in have:
      problems.append((path, f"'{path}' is missing from the checkpoint (the {what} expects shape "
                             f"{tuple(want[path].shape)})"))
    elif path not in want:
      problems.append((path, f"'{path}' (shape {tuple(np.shape(have[path]))}) in the checkpoint "
                             f"is not a parameter of the {what}"))
    elif tuple(np.shape(have[path])) != tuple(want[path].shape):
      problems.append((path, f"'{path}' has shape {tuple(np.shape(have[path]))} in the "
                             f"checkpoint but {tuple(want[path].shape)} in the {what}"))
  if problems:
    raise ValueError(f"Checkpoint does not fit the {what}: {problems[0][1]}"
                     + (f" ({len(problems) - 1} more mismatches)." if len(problems) > 1 else ".")
                     + " Check that the config matches the checkpoint's (model.name, nf, ch_mult,"
                       " num_res_blocks, embedding_type, progressive*, fir, ...).")
  out = {tuple(p.split("/")): jnp.asarray(have[p], dtype=want[p].dtype) for p in want}
  return unflatten_dict(out)


def import_checkpoint(path: str, config, ema: bool = True) -> dict:
  """Loads a score_sde JAX checkpoint or a score_sde_pytorch ``.pth`` checkpoint for ``config``
  (a file, or a directory: its newest ``checkpoint_<N>`` / ``checkpoint_<N>.pth``).

  Returns ``{'params': params, 'step': int | None}`` with ``params`` fitting
  ``get_model(config.model.name)(config=config)``; EMA weights unless ``ema=False``.
  """
  path = latest_checkpoint(path)
  if is_torch_checkpoint(path):
    from score_sde.checkpoint_import_torch import load_torch_checkpoint
    ckpt = load_torch_checkpoint(path, config)
    return {"params": _torch_select(ckpt, ema), "step": ckpt.step}
  state = read_state_dict(path)
  loaded = select_params(state, ema=ema)
  params = fit_params(model_param_shapes(config), loaded,
                      what=f"model {config.model.name!r} of this config")
  step = state.get("step", None)
  return {"params": params, "step": None if step is None else int(np.asarray(step))}


def reference_state_dict(params: Mapping[str, Any], params_ema: Optional[Mapping[str, Any]] = None,
                         step: int = 0, lr: float = 2e-4, ema_rate: float = 0.9999,
                         rng: Optional[np.ndarray] = None) -> dict:
  """The state dict the original ``State`` serialized to (for tests and for re-export)."""
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
  :func:`score_sde.models.wideresnet.cifar10_classifier`."""
  from score_sde.models.wideresnet import cifar10_classifier
  classifier = cifar10_classifier()
  template = jax.eval_shape(
      lambda: classifier.init({"params": jax.random.PRNGKey(0)}, jnp.zeros((1, 32, 32, 3)),
                              jnp.ones((1,)), train=False))["params"]
  loaded = select_params(read_state_dict(path), ema=True)
  return fit_params(template, loaded, what="WRN-28-10 classifier")


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


def _torch_select(ckpt, ema: bool) -> dict:
  """EMA or raw parameters of a :class:`score_sde.checkpoint_import_torch.TorchCheckpoint`."""
  if not ema:
    return ckpt.params
  if ckpt.ema_params is None:
    raise ValueError("Checkpoint has no 'ema'; pass ema=False (--noema) to load the raw 'model' "
                     "weights.")
  return ckpt.ema_params


def _checkpoint_parts(config, path: str, ema: bool) -> tuple[dict, dict, Optional[tuple], int]:
  """(raw params, params for sampling, Adam (mu, nu) or None, training step) of a JAX or
  PyTorch checkpoint, each tree checked against the config's network."""
  what = f"model {config.model.name!r} of this config"
  path = latest_checkpoint(path)
  if is_torch_checkpoint(path):
    from score_sde.checkpoint_import_torch import load_torch_checkpoint
    ckpt = load_torch_checkpoint(path, config)
    return (ckpt.params, _torch_select(ckpt, ema), ckpt.adam,
            0 if ckpt.step is None else ckpt.step)
  state_dict = read_state_dict(path)
  has_target = "target" in state_dict.get("optimizer", {})
  template = model_param_shapes(config)
  raw = fit_params(template, select_params(state_dict, ema=not has_target), what=what)
  averaged = fit_params(template, select_params(state_dict, ema=ema), what=what)
  trained = int(np.asarray(state_dict["step"])) if "step" in state_dict else 0
  moments = _adam_moments(state_dict)
  if moments is not None:
    moments = (fit_params(template, moments[0], what=f"{what} (Adam grad_ema)"),
               fit_params(template, moments[1], what=f"{what} (Adam grad_sq_ema)"))
  return raw, averaged, moments, trained


def _transplant_adam(opt_state: Any, mu: Any, nu: Any, count: int) -> Any:
  """``opt_state`` (an optax chain) with Adam's first / second moments set to ``mu`` / ``nu`` and
  every step counter (Adam bias correction, learning-rate schedule) set to ``count``."""
  import optax

  def fix(s):
    if isinstance(s, optax.ScaleByAdamState):
      if jax.tree.structure(s.mu) != jax.tree.structure(mu):  # e.g. masked (AdamW) moments
        return s._replace(count=jnp.asarray(count, s.count.dtype))
      return s._replace(count=jnp.asarray(count, s.count.dtype), mu=mu, nu=nu)
    if isinstance(s, optax.ScaleByScheduleState):
      return s._replace(count=jnp.asarray(count, s.count.dtype))
    if isinstance(s, tuple) and not hasattr(s, "_fields"):
      return tuple(fix(x) for x in s)
    if isinstance(s, tuple):  # other NamedTuple states (e.g. MaskedState) hold inner states
      return type(s)(*(fix(x) for x in s))
    return s
  return fix(opt_state)


def import_to_workdir(config, path: str, workdir: str, ema: bool = True,
                      step: Optional[int] = None) -> int:
  """Writes a score_sde JAX or score_sde_pytorch checkpoint into ``workdir`` as this framework's
  orbax checkpoint.

  The train state (:class:`score_sde.losses.TrainState`) gets ``params = optimizer/target`` (PyTorch:
  ``model``), ``ema_params = params_ema`` (PyTorch: ``ema.shadow_params``; the weights sampling and
  evaluation use; with ``ema=False`` the raw weights instead), the Adam moments (PyTorch:
  ``exp_avg`` / ``exp_avg_sq``) and step counters when the checkpoint has them (so ``--mode
  train`` can fine-tune from it; their counters are the checkpoint's training step), and is saved
  as a kept snapshot at ``step`` (default: the checkpoint's training step). Every tree is checked
  against the config's network first (:func:`fit_params`); nothing is compiled. Returns the step.
  An existing checkpoint at that step is kept (warning), not overwritten.
  """
  from absl import logging
  from score_sde import losses
  from score_sde.checkpointing import Checkpoints
  from score_sde.config_validation import validate_config
  from score_sde.models import utils as mutils
  validate_config(config)
  raw, averaged, moments, trained = _checkpoint_parts(config, path, ema)
  step = trained if step is None else int(step)
  model = mutils.get_model(config.model.name)(config=config)
  state = losses.init_train_state(config, {"params": raw},
                                  jax.random.PRNGKey(int(config.seed)))
  if moments is not None:
    mu, nu = moments
  else:
    mu = nu = jax.tree.map(jnp.zeros_like, raw)
  state = state.replace(step=jnp.asarray(step, state.step.dtype), ema_params=averaged,
                        opt_state=_transplant_adam(state.opt_state, mu, nu, trained))
  checkpoints = Checkpoints(workdir, int(config.training.get("max_to_keep", 5)))
  try:
    if step in checkpoints.all_steps():
      logging.warning("%s already has a checkpoint at step %d; it is kept (not overwritten). Use "
                      "another workdir or --step to import %s again.", workdir, step, path)
    else:
      checkpoints.save(step, state, snapshot=True)
  finally:
    checkpoints.close()
  return step
