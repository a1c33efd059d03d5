"""Small helpers shared across the library."""
from __future__ import annotations

import json
import os
from typing import Any, Optional

from score_sde.parametrizations import ConsistencyOutput, Parametrization, get_parametrization


def data_shape(config) -> tuple[int, ...]:
  """Shape of one example: ``(dim,)`` for vector (toy) data, ``(H, W, C)`` for images.

  Vector data sets ``config.data.dim``; image data sets ``config.data.image_size`` and
  ``config.data.num_channels``.
  """
  data = config.data
  if data.get("dim", None):
    return (int(data.dim),)
  return (int(data.image_size), int(data.image_size), int(data.num_channels))


def parametrization_of(config) -> Optional[Parametrization]:
  """The :class:`score_sde.parametrizations.Parametrization` of ``config.model.parametrization``
  (with ``config.model.sigma_data`` for 'edm' and 'consistency', whose boundary sigma_min is that
  of the config's SDE at its ``sampling_eps``), or None (absent, None or '': the SDE's default)."""
  name = config.model.get("parametrization", None) or None
  if name is None:
    return None
  if name == ConsistencyOutput.name:   # its boundary is the SDE's sampling_eps
    from score_sde import sde_lib
    return ConsistencyOutput.for_sde(sde_lib.get_sde(config), config.model.get("sigma_data", None))
  return get_parametrization(name, config.model.get("sigma_data", None))


def read_json(path: str, default: Any = None) -> Any:
  """The JSON value stored at ``path``, or ``default`` when there is no such file."""
  if not os.path.exists(path):
    return default
  with open(path) as f:
    return json.load(f)


def write_json(path: str, obj: Any) -> None:
  """Write ``obj`` as JSON to ``path`` atomically (temp file + rename), creating its directory:
  a reader, or a run killed mid-write, sees the old file or the new one, never half of one."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1)
  os.replace(tmp, path)
