"""Import checkpoints of the official PyTorch port (github.com/yang-song/score_sde_pytorch).

Its ``utils.save_checkpoint`` writes ``checkpoint_<N>.pth`` with ``torch.save`` of

    {'optimizer': optimizer.state_dict(),     # torch.optim.Adam
     'model': model.state_dict(),             # model wrapped in torch.nn.DataParallel
     'ema': ema.state_dict(),                 # models/ema.py ExponentialMovingAverage
     'step': step}                            # python int

* ``model``: ordered ``{'module.<name>': tensor}``. NCSN++ / DDPM++ (``ncsnpp``) and DDPM
  (``ddpm``) keep every layer in ``self.all_modules = nn.ModuleList([...])`` in the order the forward
  pass uses them, so names are ``module.all_modules.<i>.<sub>.<param>``; the only other entry is
  the ``sigmas`` buffer (``module.sigmas``, ignored: this framework computes sigmas from the config).
  Blocks name their layers like the JAX code (``GroupNorm_0``, ``Conv_0``, ``Dense_0``, ``NIN_0``,
  ``Conv2d_0``; ``Combine`` calls its 1x1 conv ``Conv``). Layouts: ``nn.Conv2d`` and the FIR
  ``Conv2d`` weight ``[out, in, kh, kw]`` (Flax ``[kh, kw, in, out]``); ``nn.Linear`` weight
  ``[out, in]`` (Flax ``Dense`` kernel ``[in, out]``); ``nn.GroupNorm`` weight / bias (Flax scale /
  bias); ``NIN`` ``W [in, out]``, ``b`` and ``GaussianFourierProjection`` ``W [nf]`` unchanged.
* ``ema``: ``{'decay', 'num_updates', 'shadow_params': [tensor, ...]}``, the averaged copies of the
  parameters with ``requires_grad`` in ``model.parameters()`` order, i.e. every parameter but the
  frozen Fourier-feature ``W``.
* ``optimizer``: ``{'state': {index: {'step', 'exp_avg', 'exp_avg_sq'}}, 'param_groups': [{'params':
  [index, ...], 'lr', 'betas', ...}]}``; the k-th entry of the concatenated ``params`` lists is the
  k-th tensor of ``model.parameters()`` (a parameter without gradient has no state).

``model.parameters()`` enumerates parameters in the same order as ``model.state_dict()`` (module
registration order, buffers left out), so the file's key order gives every parameter's index.

Mapping ``all_modules.<i>`` to the Flax tree: our networks create their top-level submodules in the
same order as the PyTorch forward pass uses ``all_modules`` (both follow the JAX reference), so the
i-th PyTorch module with parameters is the i-th Flax top-level submodule with parameters, in the
order :func:`top_level_module_order` records with ``flax.linen.intercept_methods`` while
:func:`score_sde.models.utils.param_shapes` traces ``model.init`` (parameterless modules, e.g. a
FIR ``Upsample`` without conv, have no state-dict entries in PyTorch and no parameters in Flax, so
both sides skip them). Each pair must have exactly
the expected tensor names and shapes; the first difference raises ``ValueError`` naming the PyTorch
key and the Flax path.

NCSNv2 / NCSN (``ncsnv2_*``, ``ncsn``) checkpoints of the PyTorch port are not supported (their
RefineNet modules are named differently from the Flax tree); neither are its classifier checkpoints.
Reading needs no PyTorch: :func:`score_sde.evaluation.weights.read_torch_state_dict`. Telling a
``torch.save`` file from flax msgpack is :func:`score_sde.checkpoint_import.common.is_torch_file`;
the format-independent entry points (:func:`score_sde.checkpoint_import.import_checkpoint`,
``import_to_workdir``) dispatch here.
"""
from __future__ import annotations

import dataclasses
import pickle
import re
from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from score_sde.checkpoint_import.common import (ImportedState, describe_model, fit_params,
                                                latest_checkpoint, mismatch_error)
from score_sde.evaluation.weights import read_torch_state_dict
from score_sde.models import utils as mutils

__all__ = ["SUPPORTED_MODELS", "read_torch_checkpoint", "top_level_module_order",
           "TorchParamMap", "map_state_dict", "TorchCheckpoint", "load_torch_checkpoint",
           "import_torch_checkpoint", "load_torch_state"]

SUPPORTED_MODELS = ("ncsnpp", "ddpm")
# Non-parameter entries of the PyTorch models' state dicts (buffers).
_BUFFERS = ("sigmas",)
# Flax top-level modules whose PyTorch parameters have requires_grad=False (not in the EMA).
_FROZEN_PREFIXES = ("GaussianFourierProjection_",)
# Flax leaf name -> PyTorch parameter name.
_LEAF_NAMES = {"kernel": "weight", "weight": "weight", "scale": "weight", "bias": "bias",
               "W": "W", "b": "b"}


def read_torch_checkpoint(path: str) -> dict:
  """The object ``torch.save`` wrote to ``path`` (tensors as numpy arrays), checked to be a
  score_sde_pytorch checkpoint dict (``'model'`` plus optional ``'ema'``, ``'optimizer'``,
  ``'step'``) or a bare model state dict, which is returned as ``{'model': state_dict}``."""
  try:
    obj = read_torch_state_dict(path)
  except (pickle.UnpicklingError, ValueError, KeyError, EOFError) as e:
    raise ValueError(f"{path!r} could not be read as a PyTorch checkpoint "
                     f"({type(e).__name__}: {e}).") from e
  if not isinstance(obj, Mapping):
    raise ValueError(f"{path!r} holds a {type(obj).__name__}, not a score_sde_pytorch checkpoint "
                     "dict {'model', 'ema', 'optimizer', 'step'}.")
  if "model" in obj:
    if not isinstance(obj["model"], Mapping):
      raise ValueError(f"{path!r}: 'model' is a {type(obj['model']).__name__}, not a state dict.")
    return dict(obj)
  if obj and all(isinstance(k, str) and isinstance(v, np.ndarray) for k, v in obj.items()):
    return {"model": obj}
  raise ValueError(f"{path!r} is neither a score_sde_pytorch checkpoint (a dict with 'model', "
                   f"'ema', 'optimizer', 'step'; found keys {sorted(map(str, obj))[:6]}) nor a "
                   "bare model state dict.")


def _init_trace(config) -> tuple[dict, list[str]]:
  """(:func:`score_sde.models.utils.param_shapes` of ``config``, names of the top-level
  submodules in first-call order), both from one trace of the network's init."""
  order: list[str] = []

  def record(next_fun, args, kwargs, context):
    scope = context.module.scope
    path = tuple(scope.path) if scope is not None else ()
    if len(path) == 1 and path[0] not in order:
      order.append(path[0])
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    template = mutils.param_shapes(config)
  return template, order


def top_level_module_order(config) -> list[str]:
  """Top-level Flax submodules of ``config.model.name`` that hold parameters, in the order the
  forward pass first calls them (``['GaussianFourierProjection_0', 'Dense_0', 'Dense_1',
  'Conv_0', 'ResnetBlockBigGANpp_0', ...]``); nothing is compiled."""
  template, order = _init_trace(config)
  return _param_order(template, order)


def _param_order(template: Mapping[str, Any], order: Sequence[str]) -> list[str]:
  with_params = [n for n in order if n in template]
  unseen = sorted(set(template) - set(with_params))
  if unseen:
    raise ValueError(f"Parameters {unseen} of the model are not in a top-level submodule; the "
                     "score_sde_pytorch import cannot place them.")
  return with_params


def _torch_to_flax_axes(flax_path: tuple[str, ...], ndim: int) -> Optional[tuple[int, ...]]:
  """``np.transpose`` axes taking the PyTorch tensor to the Flax parameter at ``flax_path``
  (``None``: same layout). The one place the layout rule is written."""
  leaf = flax_path[-1]
  if ndim == 4 and leaf in ("kernel", "weight"):  # [out, in, kh, kw] -> [kh, kw, in, out]
    return (2, 3, 1, 0)
  if ndim == 2 and leaf == "kernel":              # Linear [out, in] -> Dense [in, out]
    return (1, 0)
  return None


def _torch_layout_shape(flax_path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
  """Shape of the PyTorch tensor for a Flax parameter of ``shape`` at ``flax_path``."""
  axes = _torch_to_flax_axes(flax_path, len(shape))
  if axes is None:
    return tuple(shape)
  torch_shape = [0] * len(shape)
  for flax_axis, torch_axis in enumerate(axes):
    torch_shape[torch_axis] = shape[flax_axis]
  return tuple(torch_shape)


def _to_flax_layout(flax_path: tuple[str, ...], array: np.ndarray) -> np.ndarray:
  """A PyTorch tensor (numpy) in the Flax layout of the parameter at ``flax_path``."""
  axes = _torch_to_flax_axes(flax_path, array.ndim)
  return array if axes is None else np.transpose(array, axes)


def _torch_relative_name(top: str, rel: tuple[str, ...]) -> str:
  """PyTorch name, relative to ``all_modules.<i>``, of the Flax parameter ``top/rel``."""
  *mods, leaf = rel
  if leaf not in _LEAF_NAMES:
    raise ValueError(f"The model parameter '{'/'.join((top,) + tuple(rel))}' has no counterpart in "
                     "score_sde_pytorch checkpoints (this config's network differs from the "
                     "PyTorch port's, e.g. config.model.num_classes is set).")
  if top.startswith("Combine_"):   # layerspp.Combine names its 1x1 conv `Conv`
    mods = ["Conv" if m == "Conv_0" else m for m in mods]
  return ".".join(list(mods) + [_LEAF_NAMES[leaf]])


@dataclasses.dataclass
class TorchParamMap:
  """How one score_sde_pytorch model state dict maps onto the Flax parameter tree of a config.

  ``flax_path[key]``: Flax path (tuple) of the PyTorch parameter ``key`` (the state-dict key
  without DataParallel's ``module.`` prefix); ``param_keys``: PyTorch parameter keys in
  ``model.parameters()`` order (the file's order, buffers left out); ``prefix``: ``'module.'`` or
  ``''``; ``template``: the Flax parameter shapes.
  """
  flax_path: dict[str, tuple[str, ...]]
  param_keys: list[str]
  prefix: str
  template: dict

  @property
  def trainable_keys(self) -> list[str]:
    """``param_keys`` without the frozen ones (what ``ema.shadow_params`` lists, in order)."""
    return [k for k in self.param_keys if not self.flax_path[k][0].startswith(_FROZEN_PREFIXES)]

  def to_flax(self, tensors: Mapping[str, np.ndarray], what: str) -> dict:
    """``{torch key: array}`` (all of ``param_keys``, PyTorch layouts) -> Flax parameter tree."""
    flat = {self.flax_path[k]: _to_flax_layout(self.flax_path[k], np.asarray(v))
            for k, v in tensors.items()}
    return fit_params(self.template, unflatten_dict(flat), what=what)


def map_state_dict(state_dict: Mapping[str, Any], config,
                   what: Optional[str] = None) -> TorchParamMap:
  """Pairs the PyTorch ``model`` state dict with the Flax tree of ``config.model.name``.

  Checks every tensor name and shape; raises ``ValueError`` naming the first PyTorch key / Flax
  path that does not fit (and the PyTorch shape it expected), and for unsupported networks.
  """
  name = str(config.model.name)
  what = what or describe_model(config)
  if name not in SUPPORTED_MODELS:
    raise ValueError(f"score_sde_pytorch checkpoints can be imported for model.name in "
                     f"{SUPPORTED_MODELS} (NCSN++ / DDPM++ and DDPM), not {name!r}: the PyTorch "
                     "NCSN / NCSNv2 RefineNets name their layers differently from the Flax tree. "
                     "Use the JAX (flax msgpack) checkpoint of that model instead.")
  keys = [str(k) for k in state_dict]
  prefixed = [k.startswith("module.") for k in keys]
  if any(prefixed) and not all(prefixed):
    raise ValueError("The model state dict mixes 'module.'-prefixed (DataParallel) and "
                     f"unprefixed keys, e.g. {keys[prefixed.index(False)]!r}.")
  prefix = "module." if keys and all(prefixed) else ""
  groups: dict[int, dict[str, np.ndarray]] = {}
  param_keys = []
  for full in keys:
    key = full[len(prefix):]
    m = re.fullmatch(r"all_modules\.(\d+)\.(.+)", key)
    if m:
      groups.setdefault(int(m.group(1)), {})[m.group(2)] = np.asarray(state_dict[full])
      param_keys.append(key)
    elif key not in _BUFFERS:
      raise mismatch_error(what, f"'{full}' is not an entry of a score_sde_pytorch NCSN++ / DDPM "
                                 "state dict (they hold 'all_modules.<i>.*' and the 'sigmas' "
                                 "buffer only; NCSNv2 checkpoints are not supported)")
  template, order = _init_trace(config)
  flax_order = _param_order(template, order)
  indices = sorted(groups)
  flax_path: dict[str, tuple[str, ...]] = {}
  for n in range(max(len(indices), len(flax_order))):
    if n >= len(indices):
      rest = ", ".join(flax_order[n:n + 3])
      raise mismatch_error(what, f"the model's '{flax_order[n]}' has no counterpart: the "
                                 f"checkpoint has only {len(indices)} all_modules entries with "
                                 f"parameters and the model {len(flax_order)} "
                                 f"({len(flax_order) - n} left over: {rest}, ...)")
    i = indices[n]
    if n >= len(flax_order):
      raise mismatch_error(what, f"'{prefix}all_modules.{i}' (tensors {sorted(groups[i])}) has "
                                 f"no counterpart: the model has only {len(flax_order)} top-level "
                                 f"submodules with parameters and the checkpoint {len(indices)}")
    top = flax_order[n]
    want = {}
    for rel, spec in flatten_dict(template[top]).items():
      want[_torch_relative_name(top, rel)] = ((top,) + tuple(rel), tuple(spec.shape))
    have = groups[i]
    for sub in sorted(set(want) | set(have)):
      key = f"all_modules.{i}.{sub}"
      if sub not in have:
        path, shape = want[sub]
        raise mismatch_error(what, f"'{prefix}{key}' is missing from the checkpoint (the "
                                   f"model's '{'/'.join(path)}' {shape} expects it with shape "
                                   f"{_torch_layout_shape(path, shape)}; all_modules.{i} holds "
                                   f"{sorted(have)})")
      if sub not in want:
        raise mismatch_error(what, f"'{prefix}{key}' (shape {tuple(have[sub].shape)}) in the "
                                   f"checkpoint has no counterpart in the model's '{top}' "
                                   f"(parameters "
                                   f"{['/'.join(p) for p in flatten_dict(template[top])]})")
      path, shape = want[sub]
      expected = _torch_layout_shape(path, shape)
      if tuple(have[sub].shape) != expected:
        raise mismatch_error(what, f"'{prefix}{key}' has shape {tuple(have[sub].shape)} in the "
                                   f"checkpoint but the model's '{'/'.join(path)}' {shape} needs "
                                   f"{expected}")
      flax_path[key] = path
  return TorchParamMap(flax_path=flax_path, param_keys=param_keys, prefix=prefix,
                       template=template)


@dataclasses.dataclass
class TorchCheckpoint:
  """A score_sde_pytorch checkpoint converted to Flax trees of one config.

  ``params``: the raw model weights; ``ema_params``: the EMA weights (the frozen Fourier ``W`` is
  taken from the model; for a bare model state dict the same as ``params``; ``None`` for a
  checkpoint without ``'ema'``); ``adam``: ``(exp_avg, exp_avg_sq)`` trees
  (``None`` without Adam state; zeros for parameters that have none); ``step``: the training step
  (``None`` if absent); ``ema_decay``: the EMA's decay (``None`` if absent).
  """
  params: dict
  ema_params: Optional[dict]
  adam: Optional[tuple[dict, dict]]
  step: Optional[int]
  ema_decay: Optional[float]

  def weights(self, ema: bool = True) -> dict:
    """The weights to sample with: ``ema_params`` (``ema=True``; ``ValueError`` if the checkpoint
    has no ``'ema'``) or the raw ``params``."""
    if not ema:
      return self.params
    if self.ema_params is None:
      raise ValueError("Checkpoint has no 'ema'; pass ema=False (--noema) to load the raw 'model' "
                       "weights.")
    return self.ema_params


def _ema_tensors(ckpt: Mapping[str, Any], pmap: TorchParamMap,
                 model: Mapping[str, np.ndarray]) -> Optional[dict[str, np.ndarray]]:
  ema = ckpt.get("ema", None)
  if ema is None:
    return None
  shadow = ema.get("shadow_params", None) if isinstance(ema, Mapping) else None
  if not isinstance(shadow, (list, tuple)):
    raise ValueError("The checkpoint's 'ema' is not an ExponentialMovingAverage state dict "
                     "{'decay', 'num_updates', 'shadow_params': [tensors]}.")
  trainable = pmap.trainable_keys
  if len(shadow) != len(trainable):
    raise ValueError(f"ema.shadow_params holds {len(shadow)} tensors but the model state dict has "
                     f"{len(trainable)} trainable parameters; the EMA does not belong to this "
                     "model (pass ema=False / --noema to import the raw weights).")
  out = {k: model[pmap.prefix + k] for k in pmap.param_keys}
  for j, (key, tensor) in enumerate(zip(trainable, shadow)):
    tensor = np.asarray(tensor)
    if tensor.shape != model[pmap.prefix + key].shape:
      raise ValueError(f"ema.shadow_params[{j}] has shape {tensor.shape} but the {j}-th trainable "
                       f"parameter '{pmap.prefix + key}' has {model[pmap.prefix + key].shape}.")
    out[key] = tensor
  return out


def _adam_tensors(ckpt: Mapping[str, Any], pmap: TorchParamMap,
                  model: Mapping[str, np.ndarray]
                  ) -> Optional[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]:
  opt = ckpt.get("optimizer", None)
  if not isinstance(opt, Mapping) or not isinstance(opt.get("state", None), Mapping):
    return None
  groups = opt.get("param_groups", [])
  ids = [i for g in groups for i in g.get("params", [])]
  if len(ids) != len(pmap.param_keys):
    raise ValueError(f"The optimizer's param_groups list {len(ids)} parameters but the model state "
                     f"dict has {len(pmap.param_keys)}; the optimizer state does not belong to "
                     "this model.")
  state = opt["state"]
  if not any(isinstance(s, Mapping) and "exp_avg" in s for s in state.values()):
    return None  # never stepped, or not Adam
  mu, nu = {}, {}
  for key, i in zip(pmap.param_keys, ids):
    ref = model[pmap.prefix + key]
    s = state.get(i, None)
    if isinstance(s, Mapping) and "exp_avg" in s and "exp_avg_sq" in s:
      for name, dst in (("exp_avg", mu), ("exp_avg_sq", nu)):
        t = np.asarray(s[name])
        if t.shape != ref.shape:
          raise ValueError(f"optimizer state[{i}][{name!r}] has shape {t.shape} but its parameter "
                           f"'{pmap.prefix + key}' has {ref.shape}.")
        dst[key] = t
    else:
      mu[key] = nu[key] = np.zeros(ref.shape, np.float32)
  return mu, nu


def load_torch_checkpoint(path: str, config) -> TorchCheckpoint:
  """Reads a score_sde_pytorch ``.pth`` checkpoint and converts it for ``config`` (see module
  docstring). Raises ``ValueError`` if any tensor does not fit ``config.model.name``."""
  ckpt = read_torch_checkpoint(path)
  model = ckpt["model"]
  what = describe_model(config)
  pmap = map_state_dict(model, config, what=what)
  params = pmap.to_flax({k: model[pmap.prefix + k] for k in pmap.param_keys}, what)
  ema = _ema_tensors(ckpt, pmap, model)
  if ema is not None:
    ema_params = pmap.to_flax(ema, f"{what} (ema.shadow_params)")
  elif set(ckpt) == {"model"}:  # bare weights (e.g. EMA weights exported with ema.copy_to)
    ema_params = params
  else:
    ema_params = None
  adam = _adam_tensors(ckpt, pmap, model)
  if adam is not None:
    adam = (pmap.to_flax(adam[0], f"{what} (Adam exp_avg)"),
            pmap.to_flax(adam[1], f"{what} (Adam exp_avg_sq)"))
  step = ckpt.get("step", None)
  decay = ckpt.get("ema", {}).get("decay", None) if isinstance(ckpt.get("ema"), Mapping) else None
  return TorchCheckpoint(params=params, ema_params=ema_params, adam=adam,
                         step=None if step is None else int(np.asarray(step)),
                         ema_decay=None if decay is None else float(decay))


def import_torch_checkpoint(path: str, config, ema: bool = True) -> dict:
  """``{'params': params, 'step': int | None}`` of a score_sde_pytorch checkpoint (a file, or the
  newest ``checkpoint_<N>.pth`` / ``checkpoint_<N>`` of a directory) for ``config``: the EMA
  weights, or with ``ema=False`` the raw ``model`` weights."""
  ckpt = load_torch_checkpoint(latest_checkpoint(path), config)
  return {"params": ckpt.weights(ema), "step": ckpt.step}


def load_torch_state(path: str, config, ema: bool = True) -> ImportedState:
  """The whole train state of a score_sde_pytorch checkpoint for ``config``: ``params`` = ``model``,
  ``ema_params`` = ``ema.shadow_params`` (``ema=False``: ``model``), Adam ``exp_avg`` /
  ``exp_avg_sq`` when present, ``step`` (0 if absent)."""
  ckpt = load_torch_checkpoint(latest_checkpoint(path), config)
  return ImportedState(params=ckpt.params, ema_params=ckpt.weights(ema), adam=ckpt.adam,
                       step=0 if ckpt.step is None else ckpt.step)
