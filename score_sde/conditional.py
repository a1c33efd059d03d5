"""Class-conditional score models: labels, the config fields that declare them, and wrappers.

A class-conditional network (``toy_mlp`` / ``small_unet`` with ``config.model.num_classes = K``)
embeds a class label y in {0..K-1}, or the null label K for the unconditional score, and is called
as ``model.apply(variables, x, noise_labels, class_labels=y, ...)``. Training replaces labels by K
at rate ``config.training.label_dropout`` (classifier-free guidance; :mod:`score_sde.losses`).

    score = get_conditional_score_fn(sde, model, params, config)   # score(x, t, labels)
    s = bind_labels(score, labels)                                  # a plain score_fn(x, t)

This module depends on the config and the models only, so the losses can use it.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from score_sde.models.utils import get_model_fn, get_score_fn
from score_sde.sampling.base import PerExampleScore
from score_sde.sde_lib import SDE
from score_sde.utils import parametrization_of

Array = jax.Array
CondScoreFn = Callable[[Array, Array, Array], Array]

__all__ = ["check_labels", "check_batch_labels", "num_classes_of", "label_dropout_of",
           "WithClassLabels", "get_conditional_model_fn", "get_conditional_score_fn",
           "bind_labels", "is_concrete"]


def is_concrete(a) -> bool:
  """Whether ``a`` is a concrete value (checkable on the host), not a tracer."""
  return not isinstance(a, jax.core.Tracer)


def check_labels(labels, num_classes: int, batch: Optional[int] = None,
                 allow_null: bool = False) -> Array:
  """Validates class labels ``[batch]`` in {0..num_classes-1} (K = the null label if allowed).

  Concrete labels are checked on the host (before anything compiles); traced labels only for
  shape and dtype. Returns them as int32.
  """
  if is_concrete(labels):
    arr = np.asarray(labels)
    if arr.ndim != 1 or (batch is not None and arr.shape[0] != batch):
      want = f"[{batch}]" if batch is not None else "[batch]"
      raise ValueError(f"labels must be a 1-D integer array {want}, got shape {arr.shape}.")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
      if not np.all(arr == np.round(arr)):
        raise ValueError(f"labels must be integers, got {arr.dtype} values {arr[:4]}.")
    top = num_classes + 1 if allow_null else num_classes
    if arr.size and (arr.min() < 0 or arr.max() >= top):
      bad = arr[(arr < 0) | (arr >= top)]
      hint = f" (or the null label {num_classes})" if allow_null else ""
      raise ValueError(f"Class label(s) {sorted(set(bad.tolist()))[:8]} out of range: labels must "
                       f"lie in 0..{num_classes - 1}{hint} for a model with "
                       f"num_classes={num_classes}.")
    return jnp.asarray(arr, jnp.int32)
  if labels.ndim != 1 or (batch is not None and labels.shape[0] != batch):
    raise ValueError(f"labels must be [batch], got shape {labels.shape}.")
  return labels.astype(jnp.int32)


def check_batch_labels(labels: Array, batch: int, where: str) -> None:
  """ValueError unless there is one label per example of the batch."""
  if labels.shape[0] != batch:
    raise ValueError(f"{where}: {labels.shape[0]} labels for a batch of {batch}; build the "
                     "guided score_fn with one label per sample.")


def num_classes_of(config) -> int:
  """``config.model.num_classes`` (0 / None / absent: an unconditional model)."""
  k = config.model.get("num_classes", None)
  if k in (None, 0):
    return 0
  if not isinstance(k, int) or isinstance(k, bool) or k < 1:
    raise ValueError(f"config.model.num_classes must be a positive integer (or 0 / None for an "
                     f"unconditional model), got {k!r}.")
  return k


def label_dropout_of(config) -> float:
  """``config.training.label_dropout`` (default 0.1), checked to lie in [0, 1]."""
  p = config.training.get("label_dropout", 0.1)
  p = 0.1 if p is None else float(p)
  if not 0.0 <= p <= 1.0:
    raise ValueError(f"config.training.label_dropout must be in [0, 1], got {p}.")
  return p


class WithClassLabels:
  """A model whose ``apply`` passes fixed ``class_labels``: lets label-blind code (the losses, the
  score wrappers) use a conditional network; only ``apply`` is provided."""

  def __init__(self, model, class_labels: Array):
    self.model, self.class_labels = model, class_labels

  def apply(self, variables, x, labels, **kwargs):
    return self.model.apply(variables, x, labels, class_labels=self.class_labels, **kwargs)


def get_conditional_model_fn(model, variables: Any, train: bool = False,
                             rng: Optional[Array] = None):
  """``model_fn(x, noise_labels, class_labels) -> output`` of a class-conditional network."""
  def model_fn(x, noise_labels, class_labels):
    return get_model_fn(WithClassLabels(model, class_labels), variables, train, rng)(
        x, noise_labels)
  return model_fn


def get_conditional_score_fn(sde: SDE, model, variables: Any, config) -> CondScoreFn:
  """``score_fn(x, t, labels [batch])`` of a class-conditional network; labels == num_classes is
  the null label (the unconditional score). Noise labels and the output map are the SDE's
  (:func:`score_sde.models.get_score_fn`).

  Raises ValueError (before compiling) if ``config.model.num_classes`` is not set: an
  unconditional model cannot be guided this way.
  """
  k = num_classes_of(config)
  if k == 0:
    raise ValueError(f"config.model.num_classes is not set: model {config.model.name!r} is "
                     "unconditional and cannot give conditional scores. Train a class-conditional "
                     "model (config.model.num_classes=K, config.training.label_dropout>0 for "
                     "classifier-free guidance) or use classifier guidance.")
  model_fn = get_conditional_model_fn(model, variables, train=False)
  continuous = bool(config.training.continuous)
  parametrization = parametrization_of(config)

  def score_fn(x, t, labels):
    return get_score_fn(sde, lambda xx, nl: model_fn(xx, nl, labels), continuous,
                        parametrization)(x, t)
  score_fn.num_classes = k
  return score_fn


def bind_labels(cond_score_fn: CondScoreFn, labels: Array,
                num_classes: Optional[int] = None) -> PerExampleScore:
  """``score_fn(x, t) = cond_score_fn(x, t, labels)`` (labels checked when ``num_classes`` given;
  the null label num_classes is allowed)."""
  k = num_classes if num_classes is not None else getattr(cond_score_fn, "num_classes", None)
  labels = check_labels(labels, k, allow_null=True) if k is not None else jnp.asarray(
      labels, jnp.int32)

  def bound(x, t, y):
    check_batch_labels(y, x.shape[0], "bind_labels")
    return cond_score_fn(x, t, y)
  return PerExampleScore(bound, labels)
