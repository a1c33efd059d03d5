"""Start-up validation of a run config: every problem is reported before anything compiles.

Each check names the field and what to change. :func:`validate_config` raises one ``ValueError``
listing every problem found, so a user fixes a config in one round.
"""
from __future__ import annotations

import jax

from score_sde import sde_lib


def _positive_int(errors, cfg, path):
  value = _get(cfg, path)
  if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
    errors.append(f"config.{path} must be a positive integer, got {value!r}.")
    return None
  return value


def _get(cfg, path):
  node = cfg
  for part in path.split("."):
    node = node.get(part, None) if hasattr(node, "get") else None
  return node


def _check_network(errors, config) -> None:
  """Constructs ``config.model.name`` (no parameters, nothing compiled): the network's own
  build-time checks (``attn_resolutions``, image size vs ``ch_mult``, ``resblock_type``,
  ``progressive*``, ``embedding_type``, ``normalization``, ``nonlinearity``, ...) run here."""
  name = _get(config, "model.name")
  if name is None:
    return
  from score_sde.models import utils as mutils
  try:
    mutils.get_model(name)(config=config)
  except ValueError as e:
    errors.append(str(e))


def validate_config(config, num_devices: int | None = None) -> None:
  """Raises ``ValueError`` naming every inconsistent or out-of-range field of ``config``."""
  errors: list[str] = []
  num_devices = num_devices or jax.device_count()
  sde_name = str(_get(config, "training.sde")).lower()
  if sde_name not in sde_lib.SDES:
    errors.append(f"config.training.sde={_get(config, 'training.sde')!r} is unknown; choose one "
                  f"of {sorted(sde_lib.SDES)}.")
  if sde_name == "subvpsde" and not _get(config, "training.continuous"):
    errors.append("config.training.continuous=False is not defined for the sub-VP SDE; set it to "
                  "True or use training.sde='vpsde'.")
  batch = _positive_int(errors, config, "training.batch_size")
  if batch and batch % num_devices:
    errors.append(f"config.training.batch_size={batch} is not divisible by the {num_devices} "
                  f"devices; use a multiple of {num_devices}.")
  if batch and batch % jax.process_count():
    errors.append(f"config.training.batch_size={batch} is not divisible by the "
                  f"{jax.process_count()} processes.")
  n = _positive_int(errors, config, "training.n_jitted_steps")
  for field in ("n_iters", "log_freq", "snapshot_freq", "snapshot_freq_for_preemption"):
    value = _positive_int(errors, config, f"training.{field}")
    if n and value and value % n:
      errors.append(f"config.training.{field}={value} must be a multiple of "
                    f"config.training.n_jitted_steps={n}.")
  for field in ("num_scales",):
    _positive_int(errors, config, f"model.{field}")
  ema = _get(config, "model.ema_rate")
  if ema is None or not 0.0 <= float(ema) < 1.0:
    errors.append(f"config.model.ema_rate={ema!r} must be in [0, 1).")
  lr = _get(config, "optim.lr")
  if lr is None or float(lr) <= 0:
    errors.append(f"config.optim.lr={lr!r} must be positive.")
  if _get(config, "data.dim") in (None, 0):
    for field in ("image_size", "num_channels"):
      _positive_int(errors, config, f"data.{field}")
  policy = _get(config, "training.nan_policy")
  if policy not in (None, "stop", "skip"):
    errors.append(f"config.training.nan_policy={policy!r} must be 'stop' or 'skip'.")
  method = _get(config, "sampling.method")
  if method is not None:
    from score_sde.sampling import available_samplers
    names = available_samplers()
    if method not in names:
      errors.append(f"config.sampling.method={method!r} is unknown; choose one of {names}.")
    elif sde_name in sde_lib.SDES:
      # Build (no compiling: host-side coefficients only) the configured sampler, so bad sampler
      # options (NFE below the order, unknown schedule, ...) fail at start-up.
      from score_sde.sampling import get_sampler_from_config
      try:
        get_sampler_from_config(config, sde_lib.get_sde(config), (1, 1))
      except (ValueError, TypeError, AttributeError) as e:
        errors.append(f"config.sampling (method={method!r}): {e}")
  _check_network(errors, config)
  if errors:
    raise ValueError("Invalid config:\n  - " + "\n  - ".join(errors))
