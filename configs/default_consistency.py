"""The ``config.consistency`` group of consistency-model configs (docs/consistency.md).

Every field defaults to None (a typed placeholder): the loss's default applies
(:func:`score_sde.consistency.settings_of`). ``add_consistency_fields(config, loss, **values)``
also sets ``training.loss``, the 'consistency' parametrization (EDM-style c_in / c_out on
sigma / alpha, so the network's own sigma scaling is off) and the one-step consistency sampler.
"""
import ml_collections
from ml_collections.config_dict import placeholder

_TYPES = {"teacher": str, "teacher_workdir": str, "solver": str, "num_scales": int,
          "target_ema": float, "metric": str, "huber_c": float, "weighting": str, "s0": int,
          "s1": int, "rho": float}


def add_consistency_fields(config: ml_collections.ConfigDict, loss: str, **values) -> None:
  config.training.loss = loss
  config.model.parametrization = "consistency"
  config.model.scale_by_sigma = False
  config.model.embedding_type = "fourier"
  config.sampling.method = "consistency"
  config.sampling.nfe = 1
  group = ml_collections.ConfigDict()
  for name, kind in _TYPES.items():
    group[name] = placeholder(kind)
  for name, value in values.items():
    group[name] = value
  config.consistency = group


def get_default_configs() -> ml_collections.ConfigDict:
  """The toy defaults with the consistency group (every field None) and consistency training."""
  from configs.default_toy_configs import get_default_configs as toy_defaults
  config = toy_defaults()
  add_consistency_fields(config, "consistency_training")
  return config
