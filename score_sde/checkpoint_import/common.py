"""What the msgpack and PyTorch checkpoint importers share.

* Finding the file: :func:`latest_checkpoint` (a file, or the newest ``checkpoint_<N>`` /
  ``checkpoint_<N>.pth`` of a directory) and telling the two formats apart by content
  (:func:`is_torch_file`, :func:`is_torch_checkpoint`).
* Checking a loaded parameter tree against the network of a config: :func:`fit_params` (the
  template comes from :func:`score_sde.models.utils.param_shapes`), with the error message both
  importers use (:func:`mismatch_error`).
* The format-independent result of an import, :class:`ImportedState` (raw weights, sampling
  weights, Adam moments, training step), and writing it into a workdir as this framework's
  :class:`score_sde.losses.TrainState` (:func:`save_imported_state`).

This module imports neither :mod:`.msgpack` nor :mod:`.pytorch`; both import it.
"""
from __future__ import annotations

import dataclasses
import os
import pickle
import re
import zipfile
from typing import Any, Mapping, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax.traverse_util import flatten_dict, unflatten_dict

from score_sde import losses, sde_lib
from score_sde.checkpointing import Checkpoints, run_fingerprint

__all__ = ["latest_checkpoint", "is_torch_file", "is_torch_checkpoint", "describe_model",
           "mismatch_error", "fit_params", "ImportedState", "save_imported_state"]

# The legacy (pre-zip) torch.save format starts with pickle protocol 2 of this magic number.
_LEGACY_TORCH_PREFIX = pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2)[:-1]
# Config fields whose mismatch with the checkpoint's makes a parameter tree not fit.
_CONFIG_FIELDS = ("model.name, nf, ch_mult, num_res_blocks, attn_resolutions, resblock_type, "
                  "embedding_type, progressive*, fir, conditional, ...")


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


def is_torch_file(path: str) -> bool:
  """Whether the file ``path`` was written by ``torch.save``: a zip holding ``*/data.pkl`` (torch
  >= 1.6) or the legacy format's pickled magic number. Decided by content, not by the extension;
  ``False`` for anything that is not a file."""
  if not os.path.isfile(path):
    return False
  if zipfile.is_zipfile(path):
    try:
      with zipfile.ZipFile(path) as zf:
        return any(n == "data.pkl" or n.endswith("/data.pkl") for n in zf.namelist())
    except zipfile.BadZipFile:
      return False
  with open(path, "rb") as f:
    return f.read(len(_LEGACY_TORCH_PREFIX)) == _LEGACY_TORCH_PREFIX


def is_torch_checkpoint(path: str) -> bool:
  """Whether ``path`` (a file, or a directory: its newest checkpoint) was written by ``torch.save``
  (score_sde_pytorch) rather than flax msgpack; decided by the file's content."""
  return is_torch_file(latest_checkpoint(path))


def describe_model(config) -> str:
  """``"model '<config.model.name>' of this config"``: how error messages name the network."""
  return f"model {config.model.name!r} of this config"


def mismatch_error(what: str, detail: str) -> ValueError:
  """The error both importers raise when a checkpoint does not fit ``what`` (e.g.
  :func:`describe_model`); ``detail`` names the first offending path or key."""
  return ValueError(f"Checkpoint does not fit the {what}: {detail}. Check that the config matches "
                    f"the checkpoint's ({_CONFIG_FIELDS}).")


def fit_params(template: Mapping[str, Any], loaded: Mapping[str, Any],
               what: str = "model") -> dict:
  """Checks ``loaded`` against ``template`` (arrays or ShapeDtypeStructs, e.g.
  :func:`score_sde.models.utils.param_shapes`) and returns ``loaded`` as jnp arrays in the
  template's dtypes, arranged like the template.

  Raises ``ValueError`` naming the first (in sorted ``'a/b/c'`` path order) missing, unexpected or
  wrongly-shaped parameter and the number of other mismatches.
  """
  want = {"/".join(k): v for k, v in flatten_dict(flax.core.unfreeze(template)).items()}
  have = {"/".join(k): v for k, v in flatten_dict(dict(loaded)).items()}
  problems = []
  for path in sorted(set(want) | set(have)):
    if path not in have:
      problems.append(f"'{path}' is missing from the checkpoint (the {what} expects shape "
                      f"{tuple(want[path].shape)})")
    elif path not in want:
      problems.append(f"'{path}' (shape {tuple(np.shape(have[path]))}) in the checkpoint is not a "
                      f"parameter of the {what}")
    elif tuple(np.shape(have[path])) != tuple(want[path].shape):
      problems.append(f"'{path}' has shape {tuple(np.shape(have[path]))} in the checkpoint but "
                      f"{tuple(want[path].shape)} in the {what}")
  if problems:
    more = f" ({len(problems) - 1} more mismatches)" if len(problems) > 1 else ""
    raise mismatch_error(what, problems[0] + more)
  out = {tuple(p.split("/")): jnp.asarray(have[p], dtype=want[p].dtype) for p in want}
  return unflatten_dict(out)


@dataclasses.dataclass
class ImportedState:
  """A checkpoint of either format as the trees of one config's network (each already checked by
  :func:`fit_params`, so every tree has the structure and shapes of ``param_shapes(config)``).

  ``params``: the raw (optimizer) weights; ``ema_params``: the weights sampling and evaluation use
  (the EMA, or the raw weights when the import asked for ``ema=False``); ``adam``: Adam's
  ``(first, second)`` moment trees, or ``None`` when the checkpoint has none; ``step``: the
  training step (0 when the checkpoint does not say).
  """
  params: dict
  ema_params: dict
  adam: Optional[tuple[dict, dict]]
  step: int


def _transplant_adam(opt_state: Any, mu: Any, nu: Any, count: int) -> Any:
  """``opt_state`` (an optax chain) with Adam's first / second moments set to ``mu`` / ``nu`` and
  every step counter (Adam bias correction, learning-rate schedule) set to ``count``."""
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


def save_imported_state(config, imported: ImportedState, workdir: str,
                        step: Optional[int] = None, source: str = "the checkpoint") -> int:
  """Writes ``imported`` into ``workdir`` as this framework's orbax checkpoint; returns the step.

  The :class:`score_sde.losses.TrainState` is ``losses.init_train_state(config, {'params':
  imported.params}, PRNGKey(config.seed))`` with ``ema_params = imported.ema_params``, Adam's
  moments set to ``imported.adam`` (zeros when ``None``) and every optimizer step counter to
  ``imported.step`` (so fine-tuning keeps the bias correction and learning-rate warm-up), saved as
  a kept snapshot at ``step`` (default: ``imported.step``) with the config's fingerprint
  (:mod:`score_sde.checkpointing`). An existing checkpoint at that step is
  kept (warning naming ``source``), not overwritten. Nothing is compiled.
  """
  step = imported.step if step is None else int(step)
  state = losses.init_train_state(config, {"params": imported.params},
                                  jax.random.PRNGKey(int(config.seed)))
  if imported.adam is not None:
    mu, nu = imported.adam
  else:
    mu = nu = jax.tree.map(jnp.zeros_like, imported.params)
  state = state.replace(step=jnp.asarray(step, state.step.dtype), ema_params=imported.ema_params,
                        opt_state=_transplant_adam(state.opt_state, mu, nu, imported.step))
  fingerprint = run_fingerprint(config, sde_lib.get_sde(config), config.model.name, state.params)
  checkpoints = Checkpoints(workdir, int(config.training.get("max_to_keep", 5)), fingerprint)
  try:
    if step in checkpoints.all_steps():
      logging.warning("%s already has a checkpoint at step %d; it is kept (not overwritten). Use "
                      "another workdir or --step to import %s again.", workdir, step, source)
    else:
      checkpoints.save(step, state, snapshot=True)
  finally:
    checkpoints.close()
  return step
