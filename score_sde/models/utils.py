"""Model registry and the wrappers that turn network outputs into ``score_fn(x, t)``.

Network convention (shared with the original score_sde): a ``flax.linen`` module built as
``Model(config=config)`` and called as ``model.apply(variables, x, labels, train=train,
rngs={'dropout': key})`` with ``x [batch, *data_shape]`` and ``labels [batch]`` (float noise
labels, or integer step indices for discrete models).

Label and output conventions are the SDE's own (``sde.noise_label``, ``sde.discrete_noise_label``,
``sde.default_parametrization``; the reference's, so its checkpoints keep their meaning):
  * VP / sub-VP, continuous: labels = 999 t, output = eps = -sigma(t) * score.
  * VP, discrete (DDPM): labels = t (N - 1), output = eps = -sqrt(1 - alphabar_i) * score.
  * VE, continuous: labels = sigma(t), output = score (NCSN++ rescales by 1/sigma itself).
  * VE, discrete (SMLD): labels = round((T - t)(N - 1)), output = score.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from score_sde import sde_lib
from score_sde.parametrizations import Parametrization, get_parametrization
from score_sde.utils import data_shape

Array = jax.Array
ModelFn = Callable[[Array, Array], Array]

_MODELS: dict[str, type[nn.Module]] = {}
# Modules whose import registers networks; imported lazily by get_model.
_MODEL_MODULES = ("score_sde.models.toy", "score_sde.models.unet", "score_sde.models.ncsnpp",
                  "score_sde.models.ddpm", "score_sde.models.ncsnv2", "score_sde.models.wideresnet",
                  "score_sde.models.dit")


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
  """Imports the modules that register networks; a broken module raises (nothing is skipped)."""
  for mod in _MODEL_MODULES:
    importlib.import_module(mod)


def get_model(name: str) -> type[nn.Module]:
  if name not in _MODELS:
    _import_model_modules()
  if name not in _MODELS:
    raise ValueError(f"Unknown model {name!r} in config.model.name; registered: {sorted(_MODELS)}.")
  return _MODELS[name]


def _init_fn(config, batch_size: int = 1):
  """``(model, init(params_key, dropout_key) -> variables)`` on a dummy batch of the config's
  data shape: the one place a network is initialized (run, or traced by :func:`param_shapes`)."""
  model = get_model(config.model.name)(config=config)
  x = jnp.zeros((batch_size,) + data_shape(config), jnp.float32)
  labels = jnp.ones((batch_size,), jnp.float32)

  def init(params_key, dropout_key):
    return model.init({"params": params_key, "dropout": dropout_key}, x, labels, train=False)
  return model, init


def jit_init(init: Callable[..., Any], *args: Any) -> Any:
  """``init(*args)`` jitted with XLA's backend optimizations off (``xla_backend_optimization_level
  = 0``): for initializers, which run once.

  A network's initialization compiles one threefry kernel per random draw (145 for the 2-level
  test U-Net, 183 for DDPM++); XLA:CPU's optimizing backend spends most of the compile on them
  (tiny U-Net: 149 s optimized vs 23 s unoptimized on a loaded 2-core machine). The random bits
  are integer arithmetic, so uniform draws and constants are bitwise those of a plain ``jax.jit``;
  normal draws (erf_inv) can differ in the last bit (tests/test_networks.py checks both).
  """
  lowered = jax.jit(init).lower(*args)
  return lowered.compile({"xla_backend_optimization_level": 0})(*args)


def create_model(config, key: Array, batch_size: int = 1) -> tuple[nn.Module, Any]:
  """Builds ``config.model.name`` and initializes its variables on a dummy batch
  (:func:`jit_init`)."""
  model, init = _init_fn(config, batch_size)
  params_key, dropout_key = jax.random.split(key)
  return model, jit_init(init, params_key, dropout_key)


def param_shapes(config) -> dict:
  """The ``params`` collection of ``config.model.name`` as ``jax.ShapeDtypeStruct`` leaves
  (``jax.eval_shape`` of the initialization: nothing is computed or compiled)."""
  _, init = _init_fn(config)
  variables = jax.eval_shape(init, jax.random.PRNGKey(0), jax.random.PRNGKey(1))
  return flax.core.unfreeze(variables["params"])


def count_params(config) -> int:
  """Number of scalars in the network's ``params`` (from :func:`param_shapes`)."""
  return int(sum(np.prod(s.shape) for s in jax.tree.leaves(param_shapes(config))))


def get_model_fn(model: nn.Module, variables: Any, train: bool = False,
                 rng: Optional[Array] = None) -> ModelFn:
  """``model_fn(x, labels) -> output`` for fixed variables (dropout only when ``train``).

  With ``config.model.remat='full'`` (training only) the whole forward is one ``jax.checkpoint``:
  the backward pass recomputes it instead of storing its activations
  (:mod:`score_sde.models.remat`).
  """
  from score_sde.models import remat
  if not isinstance(variables, dict) or "params" not in variables:
    variables = {"params": variables}
  rngs = {"dropout": rng} if (train and rng is not None) else {}
  apply = lambda v, x, labels, r: model.apply(v, x, labels, train=train, rngs=r)
  if train and remat.model_remat(model) == "full":
    apply = jax.checkpoint(apply)

  def model_fn(x, labels):
    return apply(variables, x, labels, rngs)
  return model_fn


def get_network_fn(sde: sde_lib.SDE, model_fn: ModelFn, continuous: bool = True,
                   parametrization: Optional[str | Parametrization] = None):
  """``network(x [batch, ...], t [batch]) -> (F, alpha, sigma, rates)``: the network output F in
  its parametrization p (a name or an instance; None: the SDE's default) with the coefficients it
  is read with, (alpha, sigma, rates) = ``sde.network_coef(t)``.

  F = model_fn(p.network_input(x, alpha, sigma), label), label = p.network_label(alpha, sigma)
  when p preconditions, else the SDE's ``noise_label(t)`` (continuous) /
  ``discrete_noise_label(t)`` (discrete): the conventions above. ``network.parametrization`` is p.
  """
  p = get_parametrization(parametrization or sde.default_parametrization)
  if not continuous:
    sde.check_discrete()
    if p.preconditions or p.needs_rates:
      raise ValueError(f"The {p.name!r} parametrization is for continuous-time networks; set "
                       "config.training.continuous=True or choose another parametrization.")
  sde_label = sde.noise_label if continuous else sde.discrete_noise_label

  def network(x, t):
    alpha, sigma, rates = sde.network_coef(t, x.dtype, continuous, p.needs_rates)
    label = p.network_label(alpha, sigma) if p.preconditions else sde_label(t)
    return model_fn(p.network_input(x, alpha, sigma), label), alpha, sigma, rates
  network.parametrization = p
  return network


def get_score_fn(sde: sde_lib.SDE, model_fn: ModelFn, continuous: bool = True,
                 parametrization: Optional[str | Parametrization] = None):
  """Wraps a network into ``score_fn(x [batch, ...], t [batch]) -> score``:
  score = p.to_score(F, x, alpha, sigma, rates) with (F, alpha, sigma, rates) from
  :func:`get_network_fn`."""
  network = get_network_fn(sde, model_fn, continuous, parametrization)
  p = network.parametrization

  def score_fn(x, t):
    out, alpha, sigma, rates = network(x, t)
    return p.to_score(out, x, alpha, sigma, rates)
  return score_fn
