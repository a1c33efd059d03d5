"""Model registry and the wrappers that turn network outputs into ``score_fn(x, t)``.

Network convention (shared with the original score_sde): a ``flax.linen`` module built as
``Model(config=config)`` and called as ``model.apply(variables, x, labels, train=train,
rngs={'dropout': key})`` with ``x [batch, *data_shape]`` and ``labels [batch]`` (float noise
labels, or integer step indices for discrete models).

Label and output conventions (the reference's, so its checkpoints keep their meaning):
  * VP / sub-VP, continuous: labels = 999 t, output = -sigma(t) * score.
  * VP, discrete (DDPM): labels = t (N - 1), output = -sqrt(1 - alphabar_i) * score = -eps.
  * VE, continuous: labels = sigma(t), output = score (NCSN++ rescales by 1/sigma itself).
  * VE, discrete (SMLD): labels = round((T - t)(N - 1)), output = score.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from score_sde import sde_lib
from score_sde.utils import data_shape

Array = jax.Array
ModelFn = Callable[[Array, Array], Array]

_MODELS: dict[str, type[nn.Module]] = {}
# Modules whose import registers networks; imported lazily by get_model.
_MODEL_MODULES = ("score_sde.models.toy", "score_sde.models.unet", "score_sde.models.ncsnpp",
                  "score_sde.models.ddpm", "score_sde.models.ncsnv2", "score_sde.models.wideresnet")


def register_model(cls=None, *, name: Optional[str] = None):
  """Class decorator: registers a network under ``name`` (default: the class name)."""
  def _register(c):
    key = name or c.__name__
    if key in _MODELS and _MODELS[key] is not c:
      raise ValueError(f"A model named {key!r} is already registered.")
    _MODELS[key] = c
    return c
  return _register if cls is None else _register(cls)


def _import_model_modules() -> None:
  for mod in _MODEL_MODULES:
    try:
      importlib.import_module(mod)
    except ModuleNotFoundError as e:  # a module not written yet is simply absent
      if e.name != mod:
        raise


def get_model(name: str) -> type[nn.Module]:
  if name not in _MODELS:
    _import_model_modules()
  if name not in _MODELS:
    raise ValueError(f"Unknown model {name!r} in config.model.name; registered: {sorted(_MODELS)}.")
  return _MODELS[name]


def create_model(config, key: Array, batch_size: int = 1) -> tuple[nn.Module, Any]:
  """Builds ``config.model.name`` and initializes its variables on a dummy batch."""
  model = get_model(config.model.name)(config=config)
  x = jnp.zeros((batch_size,) + data_shape(config), jnp.float32)
  labels = jnp.ones((batch_size,), jnp.float32)
  params_key, dropout_key = jax.random.split(key)
  variables = jax.jit(lambda k1, k2: model.init({"params": k1, "dropout": k2}, x, labels,
                                                train=False))(params_key, dropout_key)
  return model, variables


def get_model_fn(model: nn.Module, variables: Any, train: bool = False,
                 rng: Optional[Array] = None) -> ModelFn:
  """``model_fn(x, labels) -> output`` for fixed variables (dropout only when ``train``)."""
  if not isinstance(variables, dict) or "params" not in variables:
    variables = {"params": variables}

  def model_fn(x, labels):
    rngs = {"dropout": rng} if (train and rng is not None) else {}
    return model.apply(variables, x, labels, train=train, rngs=rngs)
  return model_fn


def get_score_fn(sde: sde_lib.SDE, model_fn: ModelFn, continuous: bool = True):
  """Wraps a network into ``score_fn(x [batch, ...], t [batch]) -> score`` (conventions above)."""
  if isinstance(sde, sde_lib.subVPSDE) and not continuous:
    raise ValueError("sub-VP SDE models are continuous only: set config.training.continuous=True.")
  if isinstance(sde, (sde_lib.VPSDE, sde_lib.subVPSDE)):
    if continuous:
      def score_fn(x, t):
        _, std = sde.marginal_coef(t)
        return -sde_lib.batch_mul(1.0 / std, model_fn(x, t * 999.0))
    else:
      sde.check_ddpm_chain()

      def score_fn(x, t):
        labels = t * (sde.N - 1)
        std = jnp.asarray(sde.sqrt_1m_alphas_cumprod, x.dtype)[labels.astype(jnp.int32)]
        return -sde_lib.batch_mul(1.0 / std, model_fn(x, labels))
  elif isinstance(sde, sde_lib.VESDE):
    if continuous:
      def score_fn(x, t):
        return model_fn(x, sde.marginal_coef(t)[1])
    else:
      def score_fn(x, t):
        labels = jnp.round((sde.T - t) * (sde.N - 1)).astype(jnp.int32)
        return model_fn(x, labels)
  else:
    raise NotImplementedError(f"No score wrapper for SDE class {type(sde).__name__}.")
  return score_fn
