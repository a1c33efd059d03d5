"""Samplers. Each is built as ``get_sampler(name, sde, shape, **options)`` and returns
``sampler(key, score_fn, x_T=None) -> (samples [*shape], nfe int32)``, one jitted program
(the contract: :mod:`score_sde.sampling.base`).

Sampler families register a builder ``builder(sde, shape, **options)`` under a name with
:func:`register_sampler`; the PC, ODE, fast and consistency samplers all share this convention.
A new sampler is one decorated builder in a module listed in ``_SAMPLER_MODULES``.
"""
from __future__ import annotations

import functools
import importlib
import inspect
from typing import Callable

_SAMPLERS: dict[str, Callable] = {}
_SAMPLER_MODULES = ("score_sde.sampling.pc", "score_sde.sampling.ode", "score_sde.sampling.fast",
                    "score_sde.sampling.consistency")


def register_sampler(name: str):
  """Registers ``builder(sde, shape, **options)`` under ``name``.

  Returns the builder wrapped so that an option it does not take raises a ValueError naming its
  options (the same message whether it is called directly or through :func:`get_sampler`). A
  ``functools.partial`` of a more general builder registers it with those keywords fixed (they are
  not options of this name).
  """
  def _register(builder):
    known = _SAMPLERS.get(name)
    if known is not None and getattr(known, "__wrapped__", known) is not builder:
      raise ValueError(f"A sampler named {name!r} is already registered.")
    params = inspect.signature(builder).parameters
    fixed = set(getattr(builder, "keywords", {}) or {}) | {"sde", "shape"}
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    valid = [p for p, v in params.items() if p not in fixed
             and v.kind in (v.POSITIONAL_OR_KEYWORD, v.KEYWORD_ONLY)]

    @functools.wraps(builder)
    def checked(sde, shape, *args, **options):
      unknown = sorted(set(options) - set(valid))
      if unknown and not takes_any:
        raise ValueError(f"Sampler {name!r} has no option(s) {unknown}; its options are {valid}.")
      return builder(sde, shape, *args, **options)

    if isinstance(builder, functools.partial):  # the general builder's docstring
      checked.__doc__ = builder.func.__doc__
    _SAMPLERS[name] = checked
    return checked
  return _register


def _import_sampler_modules() -> None:
  """Imports the modules that register samplers; a broken module raises (nothing is skipped)."""
  for mod in _SAMPLER_MODULES:
    importlib.import_module(mod)


def available_samplers() -> list[str]:
  _import_sampler_modules()
  return sorted(_SAMPLERS)


def get_sampler(name: str, sde, shape, **options):
  """Builds the sampler ``name`` (see :func:`available_samplers`) for ``sde`` and ``shape``."""
  _import_sampler_modules()
  if name not in _SAMPLERS:
    raise ValueError(f"Unknown sampler {name!r}; choose one of {sorted(_SAMPLERS)}.")
  return _SAMPLERS[name](sde, shape, **options)


def sampler_options_from_config(config, sde) -> tuple[str, dict]:
  """The sampler name and keyword options ``config.sampling`` selects.

  'pc' reads predictor / corrector / snr / n_steps_each / probability_flow / noise_removal (its
  step count is ``config.model.num_scales``, the SDE's N, unless ``options.num_steps``); 'ode'
  reads rtol / atol / ode_method / noise_removal; every other (fast, consistency) sampler reads
  ``nfe``. Extra
  options for any sampler go in ``config.sampling.options``.
  """
  s = config.sampling
  name = s.method
  eps = sde.sampling_eps
  if name == "pc":
    options = dict(predictor=s.predictor, corrector=s.corrector, snr=s.snr,
                   n_steps=s.n_steps_each, probability_flow=s.probability_flow,
                   denoise=s.noise_removal, eps=eps)
  elif name == "ode":
    options = dict(rtol=s.rtol, atol=s.atol, method=s.ode_method, denoise=s.noise_removal, eps=eps)
  else:
    options = dict(nfe=s.nfe)
  options.update(dict(s.get("options", {}) or {}))
  return name, options


def get_sampler_from_config(config, sde, shape):
  """``sampler(key, score_fn, x_T=None) -> (samples, nfe)`` as configured by ``config.sampling``."""
  name, options = sampler_options_from_config(config, sde)
  return get_sampler(name, sde, shape, **options)
