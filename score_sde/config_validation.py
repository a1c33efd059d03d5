"""Start-up validation of a run config: every problem is reported before anything compiles.

Three layers, all run by :func:`validate_config`:

* :data:`FIELDS`, a declarative table with one :class:`Check` (type, range, choices) for every
  field of every shipped config (and the optional fields the code reads: ``model.num_classes``,
  ``model.parametrization``, ``training.label_dropout``, ``classifier.*``, ...). A field that is
  present but absent from the table is not checked; :func:`unchecked_fields` lists such fields
  (tests/test_config_validation.py fails on any in a shipped config, so a new field cannot go
  unchecked) and :func:`validate_config` logs a warning naming them.
* cross-field checks: batch sizes vs devices, frequencies vs ``n_jitted_steps``, the SDE vs
  ``continuous``, ``sigma_min < sigma_max``, the dataset name, the FID options, ...
* building (host side, nothing compiled) the SDE, the network and the configured sampler, so
  their own checks (image size vs ``ch_mult``, sampler options, ...) run at start-up too. They are
  skipped when the table already found a bad field they read (their errors would only repeat it).

Each message names the field (``config.<group>.<field>``), its value and what to change;
:func:`validate_config` raises one ``ValueError`` listing every problem, so a user fixes a config
in one round.

Fields that default to None are typed placeholders in the configs
(``ml_collections.config_dict.placeholder(str)``), so ``--config.<field>=value`` works for them on
the command line; :func:`define_config_flag` wraps ml_collections' config flag so that an unknown
``--config.<field>`` names the field and the valid ones instead of ``AttributeError: 'foo'``.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import re
import string
import sys
from collections.abc import Mapping
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
from absl import flags, logging

__all__ = ["Check", "FIELDS", "validate_config", "check_fields", "unchecked_fields",
           "config_leaf_paths", "unknown_override_message", "define_config_flag",
           "UnknownConfigFieldError"]

Choices = Union[Sequence[str], Callable[[], Sequence[str]]]


@dataclasses.dataclass(frozen=True)
class Check:
  """The rule for one config field.

  Attributes:
    kind: 'int', 'float' (ints accepted; always finite), 'bool', 'str', 'ints' / 'floats' (a
      tuple or list of them), or 'dict' (a mapping, e.g. ``sampling.options``; its entries are
      checked by whoever consumes them).
    min, max: inclusive bounds (for 'ints' / 'floats': of every element).
    gt, lt: exclusive bounds.
    choices: allowed strings, or a function returning them (registries, imported lazily).
    lower: compare ``choices`` case-insensitively.
    optional: None is allowed (an unset placeholder: the code's default applies).
    required: the field must be present (the code reads it without a default).
    nonempty: sequences must have at least one element.
    rule: an extra condition ``(predicate, what it means)`` for what bounds cannot say.
    hint: what the field means or how to fix it; appended to the message.
    describe: replaces the generated description of a valid value (for one-value fields).
  """
  kind: str
  min: Optional[float] = None
  max: Optional[float] = None
  gt: Optional[float] = None
  lt: Optional[float] = None
  choices: Optional[Choices] = None
  lower: bool = False
  optional: bool = False
  required: bool = False
  nonempty: bool = False
  rule: Optional[tuple[Callable[[Any], bool], str]] = None
  hint: str = ""
  describe: str = ""

  def choice_list(self) -> list[str]:
    choices = self.choices() if callable(self.choices) else self.choices
    return list(choices or ())

  def expectation(self) -> str:
    """What a valid value looks like, in words (used in messages)."""
    if self.describe:
      return self.describe
    if self.choices is not None:
      text = f"one of {self.choice_list()}"
    else:
      text = {"int": "an integer", "float": "a finite number", "bool": "True or False",
              "str": "a string", "ints": "a tuple of integers", "floats": "a tuple of numbers",
              "dict": "a dict"}[self.kind]
      lo = ("[", self.min) if self.min is not None else ("(", self.gt)
      hi = ("]", self.max) if self.max is not None else (")", self.lt)
      if lo[1] is not None and hi[1] is not None:
        bounds = f"in {lo[0]}{_num(lo[1])}, {_num(hi[1])}{hi[0]}"
      else:
        bounds = " and ".join(f"{op} {_num(b)}" for op, b in ((">", self.gt), (">=", self.min),
                                                              ("<", self.lt), ("<=", self.max))
                              if b is not None)
      if bounds:
        text += f" (each {bounds})" if self.kind in ("ints", "floats") else f" {bounds}"
      if self.nonempty:
        text = "a non-empty " + text[2:]
    if self.rule is not None:
      text += f", {self.rule[1]}"
    if self.optional:
      text += " (or None)"
    return text

  def passes(self, value: Any) -> bool:
    """Whether ``value`` satisfies this check."""
    if value is None:
      return self.optional
    ok = _KIND_TESTS[self.kind](value)
    if ok and self.kind in ("int", "float"):
      ok = self._in_range(value)
    elif ok and self.kind in ("ints", "floats"):
      element = _KIND_TESTS["int" if self.kind == "ints" else "float"]
      ok = (all(element(v) and self._in_range(v) for v in value)
            and (len(value) > 0 or not self.nonempty))
    elif ok and self.kind == "str" and self.nonempty:
      ok = bool(value)
    if ok and self.choices is not None:
      names = self.choice_list()
      key = value.lower() if self.lower and isinstance(value, str) else value
      ok = key in ([n.lower() for n in names] if self.lower else names)
    if ok and self.rule is not None:
      ok = bool(self.rule[0](value))
    return ok

  def message(self, path: str, value: Any) -> Optional[str]:
    """None if ``value`` passes; else the error naming ``config.<path>`` and what to change:
    ``config.<path>='x' is unknown; choose one of [...]`` for a string outside the choices,
    ``config.<path> must be <what>, got <value>`` otherwise."""
    if self.passes(value):
      return None
    hint = f" ({self.hint})" if self.hint else ""
    if self.choices is not None and isinstance(value, str) and self.rule is None:
      return (f"config.{path}={value!r} is unknown; choose one of {self.choice_list()}"
              f"{' or None' if self.optional else ''}{hint}.")
    return f"config.{path} must be {self.expectation()}{hint}, got {value!r}."

  def _in_range(self, v) -> bool:
    v = float(v)
    return ((self.min is None or v >= self.min) and (self.max is None or v <= self.max)
            and (self.gt is None or v > self.gt) and (self.lt is None or v < self.lt))


def _num(b: float) -> str:
  return str(b) if isinstance(b, int) else f"{b:g}"


def _is_int(v) -> bool:
  return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _is_float(v) -> bool:
  return ((_is_int(v) or isinstance(v, (float, np.floating)))
          and not isinstance(v, (bool, np.bool_)) and math.isfinite(float(v)))


_KIND_TESTS: dict[str, Callable[[Any], bool]] = {
    "int": _is_int,
    "float": _is_float,
    "bool": lambda v: isinstance(v, (bool, np.bool_)),
    "str": lambda v: isinstance(v, str),
    "ints": lambda v: isinstance(v, (tuple, list)),
    "floats": lambda v: isinstance(v, (tuple, list)),
    "dict": lambda v: isinstance(v, Mapping) or hasattr(v, "items"),
}


# --- shorthands for the table -------------------------------------------------------------------
def _int(min: Optional[int] = 1, **kw) -> Check:  # noqa: A002 (the Check field's name)
  return Check("int", min=min, **kw)


def _float(**kw) -> Check:
  return Check("float", **kw)


def _pos(**kw) -> Check:
  return Check("float", gt=0, **kw)


def _bool(**kw) -> Check:
  return Check("bool", **kw)


def _choice(choices: Choices, **kw) -> Check:
  return Check("str", choices=choices, **kw)


def _path(hint: str) -> Check:
  return Check("str", optional=True, hint=hint)


def _is_hex(v: str) -> bool:
  return all(c in string.hexdigits for c in v)


# --- registries (imported when a message or a check needs them) ---------------------------------
def _sdes() -> list[str]:
  from score_sde import sde_lib
  return sorted(sde_lib.SDES)


def _samplers() -> list[str]:
  from score_sde.sampling import available_samplers
  return available_samplers()


def _predictors() -> list[str]:
  from score_sde.sampling import pc
  return pc.available_predictors()


def _correctors() -> list[str]:
  from score_sde.sampling import pc
  return pc.available_correctors()


def _ode_methods() -> list[str]:
  from score_sde.sampling.ode import ODE_METHODS
  return sorted(ODE_METHODS)


def _hutchinson_types() -> list[str]:
  from score_sde.likelihood import HUTCHINSON_TYPES
  return list(HUTCHINSON_TYPES)


def _parametrizations() -> list[str]:
  from score_sde.parametrizations import PARAMETRIZATIONS
  return sorted(PARAMETRIZATIONS)


def _losses() -> list[str]:
  from score_sde.consistency import CONSISTENCY_LOSSES
  from score_sde.losses import LOSSES
  return ["dsm"] + sorted(LOSSES) + list(CONSISTENCY_LOSSES)


def _t_samplings() -> list[str]:
  from score_sde.losses import T_SAMPLINGS
  return list(T_SAMPLINGS)


def _embedding_types() -> list[str]:
  from score_sde.models.embeddings import EMBEDDING_TYPES
  return list(EMBEDDING_TYPES)


def _ncsnpp(name: str) -> Callable[[], list[str]]:
  def choices():
    from score_sde.models import ncsnpp
    return list(getattr(ncsnpp, name))
  return choices


def _classifiers() -> list[str]:
  from score_sde.classifier import CLASSIFIERS
  return list(CLASSIFIERS)


# Activations (score_sde.models.layers.get_act) and normalizations
# (score_sde.models.normalization.get_normalization); the network build checks them again.
ACTIVATIONS = ("elu", "relu", "lrelu", "swish")
NORMALIZATIONS = ("GroupNorm", "InstanceNorm", "InstanceNorm++", "VarianceNorm")

_MULTIPLE = "a multiple of config.training.n_jitted_steps"
# The widest power-function EMA, gamma = 0 (the running mean): sigma_rel = 1/sqrt(12)
# (score_sde.posthoc_ema.SIGMA_REL_MAX); post-hoc EMA widths lie below it.
_SIGMA_REL_MAX = 1.0 / math.sqrt(12.0)

# Every field of every shipped config, and the optional ones the code reads. Keys are paths
# below ``config``; see docs/configs.md for what each field means.
FIELDS: dict[str, Check] = {
    "seed": _int(min=0, max=2**32 - 1, required=True, hint="it seeds init, data order, sampling"),
    # --- training ---
    "training.sde": _choice(_sdes, lower=True, required=True),
    "training.continuous": _bool(required=True),
    "training.reduce_mean": _bool(required=True),
    "training.likelihood_weighting": _bool(required=True),
    "training.batch_size": _int(required=True, hint="the global batch over all devices"),
    "training.n_iters": _int(required=True, hint=_MULTIPLE),
    "training.n_jitted_steps": _int(required=True),
    "training.posthoc_ema_every": _int(min=0, optional=True, hint=(
        "post-hoc EMA snapshots every this many steps (docs/posthoc_ema.md); 0 or None: off; "
        "a multiple of config.training.n_jitted_steps")),
    "training.posthoc_ema_sigma_rels": Check(
        "floats", gt=0, lt=_SIGMA_REL_MAX, nonempty=True, optional=True,
        rule=(lambda v: len({f"{float(x):.6g}" for x in v}) == len(v),
              "distinct to 6 significant digits"),
        hint="widths of the tracked power-function EMAs; < 1/sqrt(12) so that gamma > 0"),
    "training.log_freq": _int(required=True, hint=_MULTIPLE),
    "training.eval_freq": _int(hint="unused: evaluation runs as --mode eval; kept from the "
                                    "reference configs"),
    "training.snapshot_freq": _int(required=True, hint=_MULTIPLE),
    "training.snapshot_freq_for_preemption": _int(required=True, hint=_MULTIPLE),
    "training.snapshot_sampling": _bool(required=True),
    "training.max_to_keep": _int(required=True,
                                 describe=">= 1 (the final state is a kept snapshot)"),
    "training.nan_policy": _choice(("stop", "skip"), optional=True),
    "training.loss": _choice(_losses, optional=True, hint="None: 'dsm'"),
    "training.t_sampling": _choice(_t_samplings, optional=True,
                                   hint="None: the loss's default (weighted losses only)"),
    "training.t_mean": _float(optional=True, hint="logit_normal / lognormal location; None: "
                                                  "0 / -1.2"),
    "training.t_std": _pos(optional=True, hint="logit_normal / lognormal scale; None: 1 / 1.2"),
    "training.label_dropout": _float(min=0, max=1, optional=True,
                                     hint="class-conditional training only"),
    "training.micro_batches": _int(optional=True, hint=(
        "gradient accumulation: the step runs the batch in this many micro-batches; it must "
        "divide the per-device batch; None: 1")),
    "training.param_sharding": _choice(("replicated", "fsdp"), optional=True, hint=(
        "fsdp: params, optimizer state and EMAs sharded over the devices; None: 'replicated'")),
    # --- sampling ---
    "sampling.method": _choice(_samplers, required=True),
    "sampling.predictor": _choice(_predictors),
    "sampling.corrector": _choice(_correctors),
    "sampling.n_steps_each": _int(min=0, hint="corrector steps per noise level; >= 1 with a "
                                              "corrector"),
    "sampling.noise_removal": _bool(),
    "sampling.probability_flow": _bool(),
    "sampling.snr": _pos(),
    "sampling.num_samples": _int(required=True),
    "sampling.batch_size": _int(required=True),
    "sampling.rtol": _pos(),
    "sampling.atol": _pos(),
    "sampling.ode_method": _choice(_ode_methods),
    "sampling.nfe": _int(hint="fast samplers: network evaluations"),
    "sampling.options": Check("dict", optional=True,
                              hint="its entries are checked against the sampler's signature"),
    # --- eval ---
    "eval.begin_ckpt": _int(min=0, required=True, hint="the first checkpoint *step* evaluated"),
    "eval.end_ckpt": _int(min=None, required=True, hint="the last checkpoint step; negative: "
                                                        "every checkpoint"),
    "eval.batch_size": _int(required=True),
    "eval.enable_sampling": _bool(required=True),
    "eval.num_samples": _int(required=True),
    "eval.enable_loss": _bool(required=True),
    "eval.enable_bpd": _bool(required=True),
    "eval.bpd_dataset": _choice(("test",), hint="bits/dim are computed on the eval split; a "
                                                "reference field, only 'test' is implemented"),
    "eval.num_bpd_samples": _int(required=True),
    "eval.bpd_repeats": _int(required=True),
    "eval.hutchinson_type": _choice(_hutchinson_types, required=True),
    "eval.rtol": _pos(required=True),
    "eval.atol": _pos(required=True),
    "eval.stats_path": _path("reference FID statistics (.npz); None: <workdir>/fid_stats/"),
    "eval.fid_stats_split": Check("str", nonempty=True, hint="'train' or a tfds split name"),
    "eval.inception_weights": _path("local Inception .pth; None: the cache, else download"),
    "eval.inception_download": _bool(),
    "eval.inception_sha256": Check("str", optional=True, rule=(_is_hex, "hexadecimal digits"),
                                   hint="a checksum prefix; '' or None skips the check"),
    "eval.inception_size": _int(min=75, hint="299 is the standard FID protocol"),
    "eval.num_seeds": _int(),
    "eval.kid_num_features": _int(),
    "eval.is_splits": _int(),
    "eval.progress_secs": _float(min=0),
    "eval.sigma_rel": _float(gt=0, lt=_SIGMA_REL_MAX, optional=True, hint=(
        "the post-hoc EMA width --mode posthoc_ema reconstructs and eval / sample read; "
        "< 1/sqrt(12) so that gamma > 0; None: the run's own checkpoints")),
    # --- data ---
    "data.dataset": Check("str", required=True, hint="see score_sde.datasets.available_datasets()"),
    "data.category": Check("str", optional=True, hint="LSUN category, e.g. 'church_outdoor'"),
    "data.dim": _int(min=0, optional=True, hint="vector (toy) data dimension; None or 0: images"),
    "data.image_size": _int(),
    "data.num_channels": _int(),
    "data.centered": _bool(required=True),
    "data.random_flip": _bool(),
    "data.uniform_dequantization": _bool(),
    "data.data_dir": _path("local data directory; None: tfds' default"),
    "data.tfrecords_path": _path("a '*-rNN.tfrecords' file or its directory (FFHQ, CelebA-HQ)"),
    "data.download": _bool(optional=True),
    "data.eval_split": Check("str", optional=True, hint="a tfds split name"),
    "data.eval_size": _int(optional=True, hint="toy sets: held-out examples"),
    "data.mnist_resize": _choice(("pad", "resize"), optional=True),
    "data.num_components": _int(hint="gmm: mixture components"),
    "data.gmm_radius": _float(min=0),
    "data.gmm_std": _pos(),
    "data.gmm_weights": Check("floats", gt=0, nonempty=True, optional=True,
                              hint="one per component, normalized; None: equal"),
    "data.gmm_seed": _int(min=0, optional=True),
    # --- model ---
    "model.name": Check("str", required=True, hint="a registered network "
                                                   "(score_sde.models.get_model)"),
    "model.ema_rate": _float(min=0, lt=1, required=True),
    "model.dropout": _float(min=0, lt=1),
    "model.dtype": _choice(("float32", "bfloat16"), lower=True),
    "model.remat": _choice(("none", "elementwise", "blocks", "full"), optional=True, hint=(
        "rematerialization: recompute activations per residual / attention block ('blocks'), only "
        "the elementwise ops between each block's convolutions / matmuls ('elementwise') or the "
        "whole network ('full') in the backward pass; None: 'none'")),
    "model.parametrization": _choice(lambda: [""] + _parametrizations(), optional=True,
                                     hint="None or '': the SDE's default"),
    "model.num_classes": _int(min=0, optional=True, hint="0 or None: unconditional"),
    "model.sigma_data": _pos(optional=True, hint="EDM preconditioning / loss; None: 0.5"),
    "model.sigma_min": _pos(),
    "model.sigma_max": _pos(),
    "model.sigma_begin": _pos(hint="unused: the VE SDE reads sigma_max; kept from the reference"),
    "model.beta_min": _float(min=0),
    "model.beta_max": _pos(),
    "model.T": _pos(optional=True, hint="end time of rectified_flow / cosine_vpsde, below 1"),
    "model.s": _pos(optional=True, hint="cosine_vpsde's offset s"),
    "model.num_scales": _int(required=True, hint="N, the SDE's discretization steps"),
    "model.nf": _int(),
    "model.ch_mult": Check("ints", min=1, nonempty=True),
    "model.num_res_blocks": _int(),
    "model.num_layers": _int(),
    "model.attn_resolutions": Check("ints", min=1),
    "model.embedding_type": _choice(_embedding_types, lower=True),
    "model.fourier_scale": _pos(),
    "model.scale_by_sigma": _bool(),
    "model.conditional": _bool(),
    "model.nonlinearity": _choice(ACTIVATIONS, lower=True),
    "model.normalization": _choice(NORMALIZATIONS),
    "model.resamp_with_conv": _bool(),
    "model.skip_rescale": _bool(),
    "model.resblock_type": _choice(_ncsnpp("RESBLOCK_TYPES"), lower=True),
    "model.progressive": _choice(_ncsnpp("PROGRESSIVE"), lower=True),
    "model.progressive_input": _choice(_ncsnpp("PROGRESSIVE_INPUT"), lower=True),
    "model.progressive_combine": _choice(_ncsnpp("PROGRESSIVE_COMBINE"), lower=True),
    "model.fir": _bool(),
    "model.fir_kernel": Check("floats", nonempty=True),
    "model.init_scale": _float(min=0),
    "model.interpolation": _choice(("bilinear", "nearest_neighbor")),
    "model.attention_type": _choice(("ddpm",), hint="the only attention implemented"),
    "model.conv_size": _int(rule=(lambda v: v == 3, ""),
                            describe="3 (the only kernel size implemented)"),
    "model.hidden_size": _int(hint="DiT: token width D (S 384, B 768, L 1024, XL 1152)"),
    "model.depth": _int(hint="DiT: number of transformer blocks"),
    "model.num_heads": _int(hint="DiT: attention heads; must divide hidden_size"),
    "model.patch_size": _int(hint="DiT: p x p patches; data.image_size divisible by it"),
    "model.mlp_ratio": _pos(hint="DiT: MLP width / hidden_size (4)"),
    "model.learn_sigma": _bool(hint="DiT: learned-variance head (output channels doubled, the "
                               "extra half unused by the samplers)"),
    # --- optim ---
    "optim.optimizer": _choice(("Adam",), lower=True, required=True,
                               hint="AdamW when weight_decay > 0"),
    "optim.lr": _pos(required=True),
    "optim.beta1": _float(min=0, lt=1, required=True),
    "optim.eps": _pos(required=True),
    "optim.weight_decay": _float(min=0, required=True),
    "optim.warmup": _int(min=0, required=True, hint="linear warm-up steps; 0: none"),
    "optim.lr_decay": _choice(("constant", "cosine"), optional=True,
                              hint="after the warm-up; cosine: to 0 at training.n_iters"),
    "optim.grad_clip": _float(required=True, rule=(lambda v: v != 0, "non-zero"),
                              hint="the global-norm threshold; negative disables clipping"),
    "optim.amsgrad": _bool(rule=(lambda v: not v, ""),
                           describe="False (AMSGrad is not implemented)"),
    # --- consistency (optional group; training.loss='consistency_*', docs/consistency.md) ---
    "consistency.teacher": Check("str", optional=True, nonempty=True, hint=(
        "CD: 'exact' (the toy gmm's exact score) or the teacher's config file; None for iCT")),
    "consistency.teacher_workdir": _path("CD: the teacher's checkpoint directory"),
    "consistency.solver": _choice(("euler", "heun"), optional=True,
                                  hint="the teacher's ODE step; None: 'heun'"),
    "consistency.num_scales": _int(min=2, optional=True, hint="CD: N discretization times; "
                                                              "None: 18"),
    "consistency.target_ema": _float(min=0, lt=1, optional=True, hint=(
        "CD: target-network EMA mu; 0: stopgrad(theta); None: 0.95")),
    "consistency.metric": _choice(("l2", "pseudo_huber"), optional=True,
                                  hint="None: 'l2' (CD), 'pseudo_huber' (iCT)"),
    "consistency.huber_c": _pos(optional=True, hint="pseudo-Huber c; None: 0.00054 sqrt(dim)"),
    "consistency.weighting": _choice(("uniform", "ict"), optional=True, hint=(
        "lambda_n: 1 or 1 / (sigma_{n+1} - sigma_n); None: 'uniform' (CD), 'ict' (iCT)")),
    "consistency.s0": _int(min=1, optional=True, hint="iCT curriculum start N - 1; None: 10"),
    "consistency.s1": _int(min=1, optional=True, hint="iCT curriculum end N - 1; None: 1280"),
    "consistency.rho": _pos(optional=True, hint="the discretization's rho; None: 7"),
    # --- classifier (optional group; --mode train_classifier, docs/controllable.md) ---
    "classifier.name": _choice(_classifiers),
    "classifier.num_classes": _int(),
    "classifier.nf": _int(),
    "classifier.num_layers": _int(),
    "classifier.blocks_per_group": _int(),
    "classifier.channel_multiplier": _int(),
    "classifier.n_iters": _int(),
    "classifier.batch_size": _int(),
    "classifier.lr": _pos(),
    "classifier.log_freq": _int(),
    "classifier.snapshot_freq": _int(),
    "classifier.eps": _pos(),
}


# --- walking a config ---------------------------------------------------------------------------
def _is_group(value) -> bool:
  return isinstance(value, Mapping) or (hasattr(value, "items") and hasattr(value, "keys"))


def _get(cfg, path: str, default: Any = None) -> Any:
  node = cfg
  for part in path.split("."):
    if not _is_group(node) or part not in node:
      return default
    node = node[part]
  return node


_MISSING = object()


def config_leaf_paths(config, prefix: str = "") -> list[str]:
  """Every field path of ``config`` (``'training.batch_size'``, ...); a group the table declares
  a 'dict' field (``sampling.options``) is one leaf."""
  out = []
  for key in config.keys():
    path = f"{prefix}{key}"
    value = config[key]
    check = FIELDS.get(path)
    if _is_group(value) and not (check is not None and check.kind == "dict"):
      out.extend(config_leaf_paths(value, path + "."))
    else:
      out.append(path)
  return out


def unchecked_fields(config) -> list[str]:
  """Fields of ``config`` that :data:`FIELDS` has no check for (a typo, or a new field whose
  check is missing)."""
  return [p for p in config_leaf_paths(config) if p not in FIELDS]


def check_fields(config) -> dict[str, str]:
  """Runs the table: ``{path: message}`` for every present field that fails its check and every
  required field that is absent."""
  errors = {}
  for path, check in FIELDS.items():
    value = _get(config, path, _MISSING)
    if value is _MISSING:
      if check.required:
        errors[path] = (f"config.{path} is missing; add it: {check.expectation()}"
                        + (f" ({check.hint})" if check.hint else "") + ".")
      continue
    message = check.message(path, value)
    if message is not None:
      errors[path] = message
  return errors


# --- cross-field checks and builds --------------------------------------------------------------
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


def _is_image(config) -> bool:
  return _get(config, "data.dim") in (None, 0)


def _check_loss(errors: list[str], config, ok) -> None:
  """The loss, the parametrization and continuous time fit together."""
  loss = _get(config, "training.loss") or "dsm"
  continuous = _get(config, "training.continuous")
  fields = ("training.loss", "training.continuous", "training.likelihood_weighting",
            "training.t_sampling", "model.parametrization", "model.scale_by_sigma")
  if not ok(*fields):
    return
  if loss != "dsm" and continuous is False:
    errors.append(f"config.training.loss={loss!r} is a continuous-time loss: set "
                  "config.training.continuous=True (or training.loss='dsm').")
  if loss != "dsm" and _get(config, "training.likelihood_weighting"):
    errors.append(f"config.training.likelihood_weighting=True applies to the 'dsm' loss only; "
                  f"the {loss!r} loss has its own weighting: set it to False.")
  if loss == "dsm" and _get(config, "training.t_sampling"):
    errors.append("config.training.t_sampling applies to the weighted losses (training.loss != "
                  "'dsm'); the 'dsm' loss draws t ~ U(eps, T): unset it or choose another loss.")
  name = _get(config, "model.parametrization")
  _check_consistency(errors, config, ok, loss, name)
  if not name:
    return
  from score_sde.parametrizations import PARAMETRIZATIONS
  cls = PARAMETRIZATIONS[name]
  if (cls.preconditions or cls.needs_rates) and continuous is False:
    errors.append(f"config.model.parametrization={name!r} is for continuous-time networks: set "
                  "config.training.continuous=True or choose another parametrization.")
  if cls.preconditions and _get(config, "model.scale_by_sigma"):
    errors.append(f"config.model.parametrization={name!r} scales the network's input and output "
                  "itself (c_in, c_out): set config.model.scale_by_sigma=False.")
  if cls.preconditions and str(_get(config, "model.embedding_type", "fourier")).lower() != (
      "fourier"):
    errors.append(f"config.model.parametrization={name!r} labels the network with the noise "
                  "level sigma / alpha, which it embeds as Fourier features of its log: set "
                  "config.model.embedding_type='fourier'.")


def _check_consistency(errors: list[str], config, ok, loss: str, name: Optional[str]) -> None:
  """Consistency losses and the 'consistency' parametrization go together; CD has a usable teacher
  (its data shape and forward process are this config's)."""
  from score_sde.consistency import CONSISTENCY_LOSSES
  is_cm = loss in CONSISTENCY_LOSSES
  if is_cm and name != "consistency":
    errors.append(f"config.training.loss={loss!r} trains a consistency model: set "
                  "config.model.parametrization='consistency'.")
  if name == "consistency" and not is_cm:
    errors.append("config.model.parametrization='consistency' is trained by a consistency loss: "
                  f"set config.training.loss to one of {list(CONSISTENCY_LOSSES)}.")
  if is_cm and (_get(config, "model.num_classes") or 0):
    errors.append("Consistency models here are unconditional: set config.model.num_classes=0.")
  s0, s1 = _get(config, "consistency.s0"), _get(config, "consistency.s1")
  if ok("consistency.s0", "consistency.s1") and None not in (s0, s1) and s0 > s1:
    errors.append(f"config.consistency.s0={s0} must not exceed config.consistency.s1={s1}.")
  if loss != "consistency_distillation" or not ok("consistency.teacher", "data.dataset"):
    return
  teacher = _get(config, "consistency.teacher")
  if not teacher:
    errors.append("config.training.loss='consistency_distillation' needs config.consistency."
                  "teacher: 'exact' (toy gmm data) or the teacher's config file.")
  elif teacher == "exact":
    if str(_get(config, "data.dataset")).lower() != "gmm":
      errors.append("config.consistency.teacher='exact' is the exact score of the toy mixture: set "
                    f"config.data.dataset='gmm' (got {_get(config, 'data.dataset')!r}) or give a "
                    "trained teacher's config file.")
  else:
    from score_sde import consistency
    try:
      errors.extend(consistency.teacher_config_errors(
          config, consistency.load_teacher_config(teacher)))
    except (ValueError, TypeError, AttributeError) as e:
      errors.append(str(e))
    if not _get(config, "consistency.teacher_workdir"):
      errors.append(f"config.consistency.teacher={teacher!r} needs config.consistency."
                    "teacher_workdir, the directory of the teacher's checkpoints.")


def _check_efficiency(errors: list[str], config, ok, num_devices: int) -> None:
  """micro_batches divides the per-device batch; remat='blocks' / 'elementwise' only for networks
  with blocks."""
  batch, k = _get(config, "training.batch_size"), _get(config, "training.micro_batches")
  if ok("training.batch_size", "training.micro_batches") and None not in (batch, k) and (
      batch % num_devices == 0 and (batch // num_devices) % k):
    per_device = batch // num_devices
    divisors = [d for d in range(1, per_device + 1) if per_device % d == 0]
    errors.append(f"config.training.micro_batches={k} does not divide the per-device batch of "
                  f"{per_device} (training.batch_size={batch} over {num_devices} devices); "
                  f"choose one of {divisors}.")
  from score_sde.models import remat
  mode = _get(config, "model.remat")
  if ok("model.remat", "model.name") and mode in remat.BLOCK_REMATS:
    name = _get(config, "model.name")
    if not remat.has_blocks(name):
      errors.append(f"config.model.remat={mode!r} is not implemented for config.model.name="
                    f"{name!r} (networks with blocks: {remat.networks_with_blocks()}); use "
                    "'full' or 'none'.")


def _cross_checks(errors: list[str], config, bad: set[str], num_devices: int) -> None:
  import jax
  ok = lambda *paths: not any(p in bad for p in paths)
  sde_name = str(_get(config, "training.sde")).lower()
  if ok("training.sde", "training.continuous") and sde_name == "subvpsde" and not _get(
      config, "training.continuous"):
    errors.append("config.training.continuous=False is not defined for the sub-VP SDE; set it to "
                  "True or use training.sde='vpsde'.")
  _check_loss(errors, config, ok)
  batch = _get(config, "training.batch_size")
  if ok("training.batch_size") and batch is not None:
    if batch % num_devices:
      errors.append(f"config.training.batch_size={batch} is not divisible by the {num_devices} "
                    f"devices; use a multiple of {num_devices}.")
    if batch % jax.process_count():
      errors.append(f"config.training.batch_size={batch} is not divisible by the "
                    f"{jax.process_count()} processes.")
  _check_efficiency(errors, config, ok, num_devices)
  n = _get(config, "training.n_jitted_steps")
  if ok("training.n_jitted_steps") and n is not None:
    for field in ("n_iters", "log_freq", "snapshot_freq", "snapshot_freq_for_preemption",
                  "posthoc_ema_every"):
      value = _get(config, f"training.{field}")
      if ok(f"training.{field}") and value is not None and value % n:
        errors.append(f"config.training.{field}={value} must be a multiple of "
                      f"config.training.n_jitted_steps={n}.")
  smin, smax = _get(config, "model.sigma_min"), _get(config, "model.sigma_max")
  if ok("model.sigma_min", "model.sigma_max") and None not in (smin, smax) and smin >= smax:
    errors.append(f"config.model.sigma_min={smin!r} must be below config.model.sigma_max="
                  f"{smax!r}.")
  begin, end = _get(config, "eval.begin_ckpt"), _get(config, "eval.end_ckpt")
  if ok("eval.begin_ckpt", "eval.end_ckpt") and None not in (begin, end) and 0 <= end < begin:
    errors.append(f"config.eval.end_ckpt={end} is below config.eval.begin_ckpt={begin}: no "
                  "checkpoint would be evaluated; raise end_ckpt or set it to -1 (every one).")
  if ok("data.dataset", "data.category") and _get(config, "data.dataset") is not None:
    from score_sde import datasets
    try:
      datasets.canonical_name(config)
    except ValueError as e:
      errors.append(str(e))
  weights, k = _get(config, "data.gmm_weights"), _get(config, "data.num_components")
  if ok("data.gmm_weights", "data.num_components") and None not in (weights, k) and len(
      weights) != k:
    errors.append(f"config.data.gmm_weights has {len(weights)} entries for "
                  f"config.data.num_components={k}; give one weight per component.")
  if ok("data.dim") and _is_image(config):
    for field in ("image_size", "num_channels"):
      if ok(f"data.{field}") and _get(config, f"data.{field}") is None:
        errors.append(f"config.data.{field} is missing; image data (config.data.dim=None) needs a "
                      "positive integer.")
  if _is_image(config) and _get(config, "eval.enable_sampling") is True:
    # The FID / IS / KID of --mode eval (score_sde.evaluation.image_eval.eval_options), checked
    # now rather than after training.
    ev = lambda f, d: _get(config, f"eval.{f}", d)
    num, splits, eb = ev("num_samples", 0), ev("is_splits", 10), ev("batch_size", 0)
    if ok("eval.num_samples", "eval.is_splits") and splits > num:
      errors.append(f"config.eval.is_splits={splits} exceeds config.eval.num_samples={num}; "
                    "lower is_splits or raise num_samples.")
    if ok("eval.num_samples") and num < 2:
      errors.append(f"config.eval.num_samples={num} must be >= 2 for FID (a covariance).")
    if ok("eval.batch_size") and eb % num_devices:
      errors.append(f"config.eval.batch_size={eb} is not divisible by the {num_devices} devices; "
                    f"use a multiple of {num_devices} (or set config.eval.enable_sampling=False).")


_SDE_FIELDS = ("training.sde", "model.num_scales", "model.sigma_min", "model.sigma_max",
               "model.beta_min", "model.beta_max", "model.T", "model.s")


def validate_config(config, num_devices: Optional[int] = None) -> None:
  """Raises ``ValueError`` naming every inconsistent or out-of-range field of ``config``.

  Args:
    config: the run's ConfigDict.
    num_devices: devices the batch is split over (default ``jax.device_count()``).
  """
  import jax
  num_devices = num_devices or jax.device_count()
  table = check_fields(config)
  errors = list(table.values())
  bad = set(table)
  _cross_checks(errors, config, bad, num_devices)
  unknown = unchecked_fields(config)
  if unknown:
    logging.warning("Config field(s) %s have no start-up check in score_sde.config_validation "
                    "(a typo, or a new field: add it to FIELDS).", unknown)
  sde_ok = not any(p in bad for p in _SDE_FIELDS)
  if sde_ok:
    from score_sde import sde_lib
    try:
      sde = sde_lib.get_sde(config)
    except (ValueError, TypeError) as e:
      errors.append(f"config.model / config.training.sde: {e}")
      sde_ok, sde = False, None
  method = _get(config, "sampling.method")
  if sde_ok and method is not None and not any(p.startswith("sampling.") for p in bad):
    # Build (no compiling: host-side coefficients only) the configured sampler, so bad sampler
    # options (NFE below the order, unknown schedule, ...) fail at start-up.
    from score_sde.sampling import get_sampler_from_config
    try:
      get_sampler_from_config(config, sde, (1, 1))
    except (ValueError, TypeError, AttributeError) as e:
      errors.append(f"config.sampling (method={method!r}): {e}")
  if not any(p.startswith(("model.", "data.")) for p in bad):
    _check_network(errors, config)
  if errors:
    raise ValueError("Invalid config:\n  - " + "\n  - ".join(errors))


# --- the command line ---------------------------------------------------------------------------
class UnknownConfigFieldError(flags.Error):
  """``--config.<path>`` names no field of the config (raised while absl parses the flags)."""


def unknown_override_message(config, path: str, flag_name: str = "config") -> Optional[str]:
  """None if ``--<flag_name>.<path>`` names a field of ``config``; else a one-line message naming
  the unknown field, the nearest valid one and every valid field of its group."""
  node, done = config, []
  for part in path.split("."):
    if "[" in part:   # ml_collections' index syntax (``ch_mult[0]``): left to it
      return None
    if not _is_group(node):
      return (f"Unknown config field {path!r} (--{flag_name}.{path}): {'.'.join(done)}="
              f"{node!r} is a value, not a group of fields.")
    if part not in node:
      group = ".".join(done)
      valid = sorted(node.keys())
      where = f"{flag_name}.{group}" if group else flag_name
      check = FIELDS.get(group)
      if check is not None and check.kind == "dict":
        return (f"Unknown config field {path!r} (--{flag_name}.{path}): {group} is a dict whose "
                f"entries are set together, e.g. '--{flag_name}.{group}={{\"{part}\": ...}}'.")
      near = difflib.get_close_matches(part, valid, n=1)
      guess = f" Did you mean {'.'.join(done + [near[0]])}?" if near else ""
      return (f"Unknown config field {path!r} (--{flag_name}.{path}).{guess} Valid fields of "
              f"{where}: {', '.join(valid) or '(none)'}.")
    node = node[part]
    done.append(part)
  return None


def _override_paths(argv: Sequence[str], name: str) -> list[str]:
  pattern = re.compile(r"^-{1,2}(?:no)?" + re.escape(name) + r"\.([^=]+)")
  return [m.group(1) for m in map(pattern.match, argv) if m]


class _CheckedConfigParser:
  """Wraps the config flag's parser: after the file is loaded, every ``--<name>.<path>`` on the
  command line must name a field, else :class:`UnknownConfigFieldError` (absl prints it on one
  line and exits with status 1) before ml_collections fails with a bare ``AttributeError``."""

  def __init__(self, parser, name: str, sys_argv: Optional[list[str]]):
    self._parser, self._name, self._sys_argv = parser, name, sys_argv

  def parse(self, argument):
    config = self._parser.parse(argument)
    argv = sys.argv if self._sys_argv is None else self._sys_argv
    argv = flags.FLAGS.read_flags_from_files(list(argv), force_gnu=False)
    for path in _override_paths(argv, self._name):
      message = unknown_override_message(config, path, self._name)
      if message:
        raise UnknownConfigFieldError(message)
    return config

  def __getattr__(self, attr):
    if attr.startswith("__") or attr == "_parser":  # copy / pickle probe a bare instance
      raise AttributeError(attr)
    return getattr(self._parser, attr)


def define_config_flag(name: str = "config", default: Optional[str] = None,
                       help_string: str = "Path to a config file (ml-collections).",
                       flag_values: flags.FlagValues = flags.FLAGS, lock_config: bool = True,
                       sys_argv: Optional[list[str]] = None) -> flags.FlagHolder:
  """``ml_collections.config_flags.DEFINE_config_file`` whose unknown ``--<name>.<field>``
  overrides fail with a one-line message naming the field and the valid ones.

  ``sys_argv``: the command line the overrides are read from (default ``sys.argv`` at parse time;
  ml_collections reads overrides from it, not from the argv given to ``flag_values``).
  """
  from ml_collections import config_flags
  holder = config_flags.DEFINE_config_file(name, default, help_string, flag_values=flag_values,
                                           lock_config=lock_config, sys_argv=sys_argv)
  flag = flag_values[name]
  flag.parser = _CheckedConfigParser(flag.parser, name, sys_argv)
  return holder
