"""Guidance: score-function combinators, so every sampler (PC, ODE, the fast ones) is guided.

Each takes and returns a plain ``score_fn(x [batch, *data_shape], t [batch]) -> score``:

  * classifier-free guidance (Ho & Salimans 2021), with guidance scale w:
        s_w(x, t, y) = s(x, t, K) + w (s(x, t, y) - s(x, t, K)),
    K the null label (the unconditional score); w = 0 is the unconditional score, w = 1 the
    conditional one, w > 1 sharpens.
  * classifier guidance (Song et al. 2021, Sec. 5 and app. I; Dhariwal & Nichol 2021):
        s_w(x, t, y) = s(x, t) + w grad_x log p_t(y | x),
    exact for w = 1 with the exact time-dependent classifier p_t(y | x_t).

Guided scores are :class:`~score_sde.sampling.base.PerExampleScore` objects carrying their labels,
so the per-example ODE solves give each example its own label.
"""
from __future__ import annotations

import inspect
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from score_sde.conditional import CondScoreFn, check_batch_labels, check_labels, is_concrete
from score_sde.sampling.base import PerExampleScore, ScoreFn, split_score_fn
from score_sde.sde_lib import SDE

Array = jax.Array
LogpGradFn = Callable[[Array, Array, Array], Array]

__all__ = ["classifier_free_guidance", "classifier_guidance", "logp_grad_from_logits",
           "mixture_classifier"]


def _check_scale(scale) -> None:
  if is_concrete(scale):
    s = np.asarray(scale)
    if s.ndim or not np.isfinite(s):
      raise ValueError(f"Guidance scale must be a finite scalar, got {scale!r}.")


def _takes_args(fn: Callable, n: int) -> bool:
  """Whether ``fn`` can be called with n positional arguments (True if not introspectable)."""
  if not callable(fn):
    return False
  try:
    sig = inspect.signature(fn)
  except (TypeError, ValueError):
    return True
  try:
    sig.bind(*range(n))
  except TypeError:
    return False
  return True


def classifier_free_guidance(cond_score_fn: CondScoreFn, labels: Array, scale: float,
                             num_classes: Optional[int] = None) -> PerExampleScore:
  """Classifier-free guidance: ``score_fn(x, t) = s_u + scale (s_c - s_u)``.

  ``cond_score_fn(x, t, y)`` is a labelled score (:func:`score_sde.conditional.
  get_conditional_score_fn`, or an exact one) in which the null label ``num_classes`` = K gives
  the unconditional score; ``labels [batch]`` are the classes. Both scores come from ONE call on
  the doubled batch [x; x] with labels [y; K]. ``num_classes`` defaults to
  ``cond_score_fn.num_classes`` (set by get_conditional_score_fn).
  """
  _check_scale(scale)
  k = num_classes if num_classes is not None else getattr(cond_score_fn, "num_classes", None)
  if k is None:
    raise ValueError("classifier_free_guidance needs num_classes (the null label K) for a "
                     "cond_score_fn that does not carry it.")
  if not _takes_args(cond_score_fn, 3):
    raise ValueError("classifier_free_guidance needs a class-conditional cond_score_fn(x, t, "
                     "labels) (score_sde.conditional.get_conditional_score_fn); the given function "
                     "does not take labels. An unconditional model cannot be guided: train one "
                     "with config.model.num_classes set.")
  labels = check_labels(labels, int(k))
  null = int(k)

  def guided(x, t, y):
    b = x.shape[0]
    check_batch_labels(y, b, "classifier_free_guidance")
    s = cond_score_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]),
                      jnp.concatenate([y, jnp.full_like(y, null)]))
    s_c, s_u = s[:b], s[b:]
    return s_u + scale * (s_c - s_u)
  return PerExampleScore(guided, labels)


def classifier_guidance(score_fn: ScoreFn, classifier_logp_grad_fn: LogpGradFn, labels: Array,
                        scale: float = 1.0, num_classes: Optional[int] = None) -> PerExampleScore:
  """Classifier guidance: ``score_fn(x, t) + scale * grad_x log p_t(labels | x)``.

  ``classifier_logp_grad_fn(x, t, labels) -> [batch, *data_shape]`` is the gradient of the
  time-dependent classifier's log-probability (:func:`score_sde.classifier.
  get_classifier_logp_grad_fn`, :func:`logp_grad_from_logits`). With scale = 1 and the exact
  classifier this is the exact conditional score grad_x log p_t(x | y); scale = 0 is the
  unconditional score.
  """
  _check_scale(scale)
  if not _takes_args(score_fn, 2):
    raise ValueError("classifier_guidance: score_fn must be an unconditional score_fn(x, t).")
  if not _takes_args(classifier_logp_grad_fn, 3):
    raise ValueError("classifier_guidance needs classifier_logp_grad_fn(x, t, labels); build one "
                     "with get_classifier_logp_grad_fn or logp_grad_from_logits.")
  labels = check_labels(labels, num_classes) if num_classes is not None else jnp.asarray(
      labels, jnp.int32)
  f, c = split_score_fn(score_fn)

  def guided(x, t, cond):
    check_batch_labels(cond[1], x.shape[0], "classifier_guidance")
    return f(x, t, cond[0]) + scale * classifier_logp_grad_fn(x, t, cond[1])
  return PerExampleScore(guided, (c, labels))


def logp_grad_from_logits(logits_fn: Callable[[Array, Array], Array]) -> LogpGradFn:
  """grad_x log softmax(logits_fn(x, t))[y], per example: ``fn(x, t, labels) -> like x``.

  Examples are independent, so the gradient of the batch sum is the per-example gradient.
  """
  def logp_grad(x, t, labels):
    def total(x):
      logp = jax.nn.log_softmax(logits_fn(x, t).astype(jnp.float32), axis=-1)
      return jnp.sum(jnp.take_along_axis(logp, labels[:, None].astype(jnp.int32), axis=-1))
    return jax.grad(total)(x)
  return logp_grad


def mixture_classifier(mixture, sde: SDE) -> Callable[[Array, Array], Array]:
  """Exact time-dependent classifier of a labelled mixture: ``logits(x, t) = log p_t(k | x)``."""
  return lambda x, t: mixture.log_posterior(x, t, sde)
