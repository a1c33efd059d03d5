"""Import released checkpoints into this framework: score_sde (JAX / flax msgpack
``checkpoint_<N>``) and score_sde_pytorch (``checkpoint_<N>.pth``).

``import_checkpoint(path, config)`` returns ``{'params': ..., 'step': ...}``, with ``params``
(EMA weights by default) arranged exactly like ``score_sde.models.utils.param_shapes(config)``; a
checkpoint that does not fit raises ``ValueError`` naming the first mismatching path.
:func:`import_to_workdir` writes the whole imported state (raw and EMA params, Adam moments, step)
as an orbax checkpoint of this framework, so ``experiments/main.py --mode sample / eval`` (and
fine-tuning with ``--mode train``) run from it; ``experiments/import_checkpoint.py`` is its command
line. :func:`import_classifier_checkpoint` loads the noise-conditional Wide-ResNet used for
class-conditional sampling. A file is recognized as PyTorch by its content (zip with ``data.pkl``,
or the legacy magic number), never by its name; PyTorch itself is not needed.

Modules (dependencies go one way: ``msgpack`` and ``pytorch`` import ``common``; this package
imports all three):

* :mod:`.common`: finding the newest checkpoint, telling the formats apart, :func:`fit_params`
  and its error message, :class:`~.common.ImportedState` and writing it into a workdir.
* :mod:`.msgpack`: the original ``State(step, optimizer, lr, model_state, ema_rate, params_ema,
  rng)`` msgpack files and the classifier checkpoints.
* :mod:`.pytorch`: the PyTorch port's ``{'optimizer', 'model', 'ema', 'step'}`` files (NCSN++ /
  DDPM++ and DDPM), paired module by module with the Flax tree.
"""
from __future__ import annotations

from typing import Optional

from score_sde.checkpoint_import import common, msgpack, pytorch
from score_sde.checkpoint_import.common import (ImportedState, fit_params, is_torch_checkpoint,
                                                latest_checkpoint, save_imported_state)
from score_sde.checkpoint_import.msgpack import (import_classifier_checkpoint, read_state_dict,
                                                 reference_state_dict, select_params)
from score_sde.config_validation import validate_config

__all__ = ["read_state_dict", "select_params", "fit_params", "import_checkpoint",
           "import_classifier_checkpoint", "import_to_workdir", "latest_checkpoint",
           "is_torch_checkpoint", "reference_state_dict", "load_imported_state", "ImportedState",
           "save_imported_state"]


def import_checkpoint(path: str, config, ema: bool = True) -> dict:
  """Loads a score_sde JAX checkpoint or a score_sde_pytorch ``.pth`` checkpoint for ``config``
  (a file, or a directory: its newest ``checkpoint_<N>`` / ``checkpoint_<N>.pth``).

  Returns ``{'params': params, 'step': int | None}`` with ``params`` fitting
  ``get_model(config.model.name)(config=config)``; EMA weights unless ``ema=False``.
  """
  path = latest_checkpoint(path)
  if is_torch_checkpoint(path):
    return pytorch.import_torch_checkpoint(path, config, ema=ema)
  return msgpack.import_msgpack_checkpoint(path, config, ema=ema)


def load_imported_state(path: str, config, ema: bool = True) -> ImportedState:
  """The whole train state (raw and sampling weights, Adam moments, step) of a checkpoint of
  either format (a file, or a directory's newest), every tree checked against ``config``."""
  path = latest_checkpoint(path)
  if is_torch_checkpoint(path):
    return pytorch.load_torch_state(path, config, ema=ema)
  return msgpack.load_msgpack_state(path, config, ema=ema)


def import_to_workdir(config, path: str, workdir: str, ema: bool = True,
                      step: Optional[int] = None) -> int:
  """Writes a score_sde JAX or score_sde_pytorch checkpoint into ``workdir`` as this framework's
  orbax checkpoint.

  The train state (:class:`score_sde.losses.TrainState`) gets ``params = optimizer/target``
  (PyTorch: ``model``), ``ema_params = params_ema`` (PyTorch: ``ema.shadow_params``; the weights
  sampling and evaluation use; with ``ema=False`` the raw weights instead), the Adam moments
  (PyTorch: ``exp_avg`` / ``exp_avg_sq``) and step counters when the checkpoint has them (so
  ``--mode train`` can fine-tune from it; their counters are the checkpoint's training step), and
  is saved as a kept snapshot at ``step`` (default: the checkpoint's training step). Every tree is
  checked against the config's network first (:func:`fit_params`); nothing is compiled. Returns
  the step. An existing checkpoint at that step is kept (warning), not overwritten.
  """
  validate_config(config)
  path = latest_checkpoint(path)
  imported = load_imported_state(path, config, ema=ema)
  return save_imported_state(config, imported, workdir, step=step, source=path)
