"""Controllable generation: guidance, class-conditional score models, inpainting, colorization.

Everything here produces or consumes a plain ``score_fn(x, t) -> score`` (``x [batch, *data_shape]``,
``t [batch]``), so every sampler (PC, ODE, the fast samplers) gets guidance for free.

Guidance (score-function combinators):

  * classifier-free guidance (Ho & Salimans 2021), with guidance scale w:
        s_w(x, t, y) = s(x, t) + w (s(x, t, y) - s(x, t)),
    w = 0 is the unconditional score, w = 1 the conditional one, w > 1 sharpens.
  * classifier guidance (Song et al. 2021, Sec. 5 and app. I; Dhariwal & Nichol 2021):
        s_w(x, t, y) = s(x, t) + w grad_x log p_t(y | x),
    exact for w = 1 with the exact time-dependent classifier p_t(y | x_t).

Class-conditional networks (``toy_mlp`` / ``small_unet`` with ``config.model.num_classes = K``)
embed a class label y in {0..K-1} or the null label K (the unconditional score). Training drops
labels to K at rate ``config.training.label_dropout`` (score_sde.losses). Noise-conditional
classifiers for classifier guidance: :class:`score_sde.models.toy.ToyClassifier` (vector data) and
:class:`score_sde.models.wideresnet.WideResnet` (images), both called as
``apply(variables, x_t, sigma(t)) -> logits [batch, K]`` and trained with
``cross_entropy(logits(x_t, sigma(t)), y)``, t ~ U(eps, T), x_t = alpha(t) x_0 + sigma(t) z.

Inpainting and colorization (Song et al. 2021, app. I.2) with the "replacement" approximation
grad log p_t(x_t | y) ~ grad log p_t([x_t on the unknown part; y_t on the known part]), where the
known part y_t = alpha(t) y + sigma(t) z is a draw of p_{0t}(y_t | y). In a space rotated by an
orthogonal per-pixel matrix Q (identity for inpainting; for colorization the paper's decoupling
matrix whose first column is (1, 1, 1) / sqrt(3)), with mask m (1 = known):

  PC: after every corrector and predictor update (x, x_mean) at the time t' the update reached,
        Qx      <- (1 - m) Qx      + m (alpha(t') y + sigma(t') z),
        Qx_mean <- (1 - m) Qx_mean + m  alpha(t') y,
      x_mean keeps its own unknown part (the reference code took it from the noised x).
  ODE: the unknown part solves the probability-flow ODE with the known part pinned to
      alpha(t) y + sigma(t) z_k (one z_k per example drawn at T: a deterministic path).
  Both return the known part exactly equal to y (the last replacement uses alpha = 1, sigma = 0).

Colorization: a gray image g (the channel mean) fixes the first decoupled channel,
(Qx)_0 = sum_c x_c / sqrt(3) = sqrt(3) g; the two other decoupled channels are filled in.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from score_sde import sde_lib
from score_sde.sampling.ode import (PerExampleScore, check_ode_options, probability_flow_drift,
                                    solve_per_example, split_score_fn)
from score_sde.sampling.pc import (_check_shape, check_score_fn_shape, count_score_evals,
                                   get_corrector, get_predictor, jit_with_score_fn)
from score_sde.sde_lib import SDE, batch_mul

Array = jax.Array
ScoreFn = Callable[[Array, Array], Array]
CondScoreFn = Callable[[Array, Array, Array], Array]
LogpGradFn = Callable[[Array, Array, Array], Array]

__all__ = [
    "classifier_free_guidance", "classifier_guidance", "logp_grad_from_logits",
    "mixture_classifier", "check_labels", "num_classes_of", "label_dropout_of",
    "get_conditional_model_fn", "get_conditional_score_fn", "bind_labels",
    "get_classifier_logits_fn", "get_classifier_logp_grad_fn", "create_classifier",
    "get_classifier_loss_fn", "get_classifier_train_step_fn", "train_classifier",
    "get_inpainter", "get_colorizer", "colorization_matrix", "load_array", "load_mask",
    "load_grayscale",
]


# ------------------------------------------------------------------------------------------------
# Labels
# ------------------------------------------------------------------------------------------------
def _is_concrete(a) -> bool:
  return not isinstance(a, jax.core.Tracer)


def check_labels(labels, num_classes: int, batch: Optional[int] = None,
                 allow_null: bool = False) -> Array:
  """Validates class labels ``[batch]`` in {0..num_classes-1} (K = the null label if allowed).

  Concrete labels are checked on the host (before anything compiles); traced labels only for
  shape and dtype. Returns them as int32.
  """
  if _is_concrete(labels):
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


# ------------------------------------------------------------------------------------------------
# Guidance combinators
# ------------------------------------------------------------------------------------------------
def _check_scale(scale) -> None:
  if _is_concrete(scale):
    s = np.asarray(scale)
    if s.ndim or not np.isfinite(s):
      raise ValueError(f"Guidance scale must be a finite scalar, got {scale!r}.")


def _takes_args(fn: Callable, n: int) -> bool:
  """Whether ``fn`` can be called with n positional arguments (True if not introspectable)."""
  import inspect
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


def classifier_free_guidance(cond_score_fn: Union[ScoreFn, CondScoreFn],
                             uncond: Union[ScoreFn, int], scale: float,
                             labels: Optional[Array] = None,
                             num_classes: Optional[int] = None) -> ScoreFn:
  """Classifier-free guidance: ``score_fn(x, t) = s_u + scale (s_c - s_u)``.

  Two forms:
    * ``uncond`` a score function: ``cond_score_fn(x, t)`` and ``uncond(x, t)`` are the conditional
      (already bound to labels) and unconditional scores; two evaluations per call.
    * ``uncond`` an integer null label (K for a model with K classes): ``cond_score_fn(x, t, y)`` is
      a labelled score (:func:`get_conditional_score_fn`) and ``labels [batch]`` the classes; both
      scores come from ONE network call on the doubled batch [x; x] with labels [y; K].

  scale = 0 gives the unconditional score, 1 the conditional one. Returns ``score_fn(x, t)``.
  """
  _check_scale(scale)
  if callable(uncond):
    if not (_takes_args(cond_score_fn, 2) and _takes_args(uncond, 2)):
      raise ValueError("classifier_free_guidance: cond_score_fn and uncond must both be "
                       "score_fn(x, t) here (bind labels with bind_labels), or pass the integer "
                       "null label as `uncond` with a labelled cond_score_fn(x, t, labels).")
    if labels is not None:
      raise ValueError("classifier_free_guidance: with an unconditional score_fn, bind the labels "
                       "into cond_score_fn (bind_labels) instead of passing labels=.")
    f_c, c_c = split_score_fn(cond_score_fn)
    f_u, c_u = split_score_fn(uncond)

    def guided(x, t, cond):
      s_u = f_u(x, t, cond[1])
      return s_u + scale * (f_c(x, t, cond[0]) - s_u)
    return PerExampleScore(guided, (c_c, c_u))

  if isinstance(uncond, (bool, float)) or not isinstance(uncond, (int, np.integer)):
    raise ValueError("classifier_free_guidance: `uncond` must be an unconditional score_fn(x, t) "
                     f"or the integer null label, got {uncond!r}.")
  null = int(uncond)
  if labels is None:
    raise ValueError("classifier_free_guidance with a null label needs labels=[batch].")
  k = null if num_classes is None else int(num_classes)
  if null != k:
    raise ValueError(f"The null label must be num_classes={k}, got {null}.")
  labels = check_labels(labels, k)
  if not _takes_args(cond_score_fn, 3):
    raise ValueError("classifier_free_guidance with a null label needs a class-conditional "
                     "cond_score_fn(x, t, labels) (get_conditional_score_fn); the given function "
                     "does not take labels. An unconditional model cannot be guided: train one "
                     "with config.model.num_classes set.")

  def guided(x, t, y):
    b = x.shape[0]
    _check_batch_labels(y, b, "classifier_free_guidance")
    s = cond_score_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]),
                      jnp.concatenate([y, jnp.full_like(y, null)]))
    s_c, s_u = s[:b], s[b:]
    return s_u + scale * (s_c - s_u)
  return PerExampleScore(guided, labels)


def classifier_guidance(score_fn: ScoreFn, classifier_logp_grad_fn: LogpGradFn, labels: Array,
                        scale: float = 1.0, num_classes: Optional[int] = None) -> ScoreFn:
  """Classifier guidance: ``score_fn(x, t) + scale * grad_x log p_t(labels | x)``.

  ``classifier_logp_grad_fn(x, t, labels) -> [batch, *data_shape]`` is the gradient of the
  time-dependent classifier's log-probability (:func:`get_classifier_logp_grad_fn`,
  :func:`logp_grad_from_logits`). With scale = 1 and the exact classifier this is the exact
  conditional score grad_x log p_t(x | y); scale = 0 is the unconditional score.
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
    _check_batch_labels(cond[1], x.shape[0], "classifier_guidance")
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


# ------------------------------------------------------------------------------------------------
# Class-conditional score networks
# ------------------------------------------------------------------------------------------------
class _WithClassLabels:
  """A model whose ``apply`` passes fixed ``class_labels``: lets label-blind loss code train a
  conditional network (only ``apply`` is used by :func:`score_sde.models.get_model_fn`)."""

  def __init__(self, model, class_labels: Array):
    self.model, self.class_labels = model, class_labels

  def apply(self, variables, x, labels, **kwargs):
    return self.model.apply(variables, x, labels, class_labels=self.class_labels, **kwargs)


def get_conditional_model_fn(model, variables: Any, train: bool = False,
                             rng: Optional[Array] = None):
  """``model_fn(x, noise_labels, class_labels) -> output`` of a class-conditional network."""
  from score_sde.models import get_model_fn

  def model_fn(x, noise_labels, class_labels):
    return get_model_fn(_WithClassLabels(model, class_labels), variables, train, rng)(
        x, noise_labels)
  return model_fn


def get_conditional_score_fn(sde: SDE, model, variables: Any, config) -> CondScoreFn:
  """``score_fn(x, t, labels [batch])`` of a class-conditional network; labels == num_classes is
  the null label (the unconditional score). The noise-label / output conventions are
  :func:`score_sde.models.get_score_fn`'s.

  Raises ValueError (before compiling) if ``config.model.num_classes`` is not set: an
  unconditional model cannot be guided this way.
  """
  from score_sde.models import get_score_fn
  k = num_classes_of(config)
  if k == 0:
    raise ValueError(f"config.model.num_classes is not set: model {config.model.name!r} is "
                     "unconditional and cannot give conditional scores. Train a class-conditional "
                     "model (config.model.num_classes=K, config.training.label_dropout>0 for "
                     "classifier-free guidance) or use classifier guidance.")
  model_fn = get_conditional_model_fn(model, variables, train=False)
  continuous = bool(config.training.continuous)

  def score_fn(x, t, labels):
    return get_score_fn(sde, lambda xx, nl: model_fn(xx, nl, labels), continuous)(x, t)
  score_fn.num_classes = k
  return score_fn


def bind_labels(cond_score_fn: CondScoreFn, labels: Array,
                num_classes: Optional[int] = None) -> ScoreFn:
  """``score_fn(x, t) = cond_score_fn(x, t, labels)`` (labels checked when ``num_classes`` given;
  the null label num_classes is allowed)."""
  k = num_classes if num_classes is not None else getattr(cond_score_fn, "num_classes", None)
  labels = check_labels(labels, k, allow_null=True) if k is not None else jnp.asarray(
      labels, jnp.int32)
  def bound(x, t, y):
    _check_batch_labels(y, x.shape[0], "bind_labels")
    return cond_score_fn(x, t, y)
  return PerExampleScore(bound, labels)


def _check_batch_labels(labels, batch: int, where: str) -> None:
  if labels.shape[0] != batch:
    raise ValueError(f"{where}: {labels.shape[0]} labels for a batch of {batch}; build the "
                     "guided score_fn with one label per sample.")


# ------------------------------------------------------------------------------------------------
# Time-dependent classifiers
# ------------------------------------------------------------------------------------------------
CLASSIFIERS = ("toy_mlp", "wideresnet")


def classifier_config(config):
  """The classifier settings: ``config.classifier`` fields over these defaults.

  name ('toy_mlp' for vector data, 'wideresnet' for images), num_classes (default
  config.model.num_classes or 10), nf / num_layers (toy), blocks_per_group /
  channel_multiplier (WRN), n_iters, batch_size (default training.batch_size), lr (default
  optim.lr), log_freq, snapshot_freq (defaults from config.training).
  """
  c = dict(config.get("classifier", None) or {})
  toy = bool(config.data.get("dim", 0))
  out = dict(name="toy_mlp" if toy else "wideresnet", num_classes=num_classes_of(config) or 10,
             nf=128, num_layers=3, blocks_per_group=4, channel_multiplier=10,
             n_iters=int(config.training.n_iters), batch_size=int(config.training.batch_size),
             lr=float(config.optim.lr), log_freq=int(config.training.log_freq),
             snapshot_freq=int(config.training.snapshot_freq), eps=1e-5)
  unknown = sorted(set(c) - set(out))
  if unknown:
    raise ValueError(f"Unknown config.classifier field(s) {unknown}; known: {sorted(out)}.")
  out.update(c)
  if out["name"] not in CLASSIFIERS:
    raise ValueError(f"Unknown config.classifier.name {out['name']!r}; choose one of {CLASSIFIERS}.")
  for f in ("num_classes", "nf", "num_layers", "n_iters", "batch_size", "log_freq",
            "snapshot_freq"):
    if int(out[f]) < 1:
      raise ValueError(f"config.classifier.{f} must be a positive integer, got {out[f]!r}.")
  if not float(out["lr"]) > 0:
    raise ValueError(f"config.classifier.lr must be positive, got {out['lr']!r}.")
  return out


def create_classifier(config, key: Array):
  """Builds the time-dependent classifier of :func:`classifier_config` and its params."""
  from score_sde.utils import data_shape
  cc = classifier_config(config)
  if cc["name"] == "toy_mlp":
    from score_sde.models.toy import ToyClassifier
    model = ToyClassifier(num_classes=int(cc["num_classes"]), nf=int(cc["nf"]),
                          num_layers=int(cc["num_layers"]))
  else:
    from score_sde.models.wideresnet import WideResnet
    model = WideResnet(blocks_per_group=int(cc["blocks_per_group"]),
                       channel_multiplier=int(cc["channel_multiplier"]),
                       num_outputs=int(cc["num_classes"]))
  x = jnp.zeros((1,) + data_shape(config), jnp.float32)
  params = jax.jit(lambda k: model.init(k, x, jnp.ones((1,)), train=False)["params"])(key)
  return model, params


def get_classifier_logits_fn(sde: SDE, classifier, params: Any) -> Callable[[Array, Array], Array]:
  """``logits_fn(x_t, t) = classifier(x_t, sigma(t))`` ``[batch, num_classes]``."""
  def logits_fn(x, t):
    _, sigma = sde.marginal_coef(t)
    return classifier.apply({"params": params}, x, sigma, train=False)
  return logits_fn


def get_classifier_logp_grad_fn(sde: SDE, classifier, params: Any) -> LogpGradFn:
  """grad_x log p_t(y | x) of a trained time-dependent classifier: ``fn(x, t, labels)``."""
  return logp_grad_from_logits(get_classifier_logits_fn(sde, classifier, params))


def get_classifier_loss_fn(sde: SDE, classifier, num_classes: int, eps: float = 1e-5):
  """``loss_fn(key, params, batch={'image', 'label'}) -> (loss, accuracy)``.

  t ~ U(eps, T), z ~ N(0, I), x_t = alpha(t) x_0 + sigma(t) z,
  loss = mean_batch(-log softmax(classifier(x_t, sigma(t)))[y]).
  """
  def loss_fn(key, params, batch):
    x, y = batch["image"], batch["label"]
    t_key, z_key = jax.random.split(key)
    t = jax.random.uniform(t_key, (x.shape[0],), minval=eps, maxval=sde.T)
    z = jax.random.normal(z_key, x.shape, x.dtype)
    mean, sigma = sde.marginal_prob(x, t)
    logits = classifier.apply({"params": params}, mean + batch_mul(sigma, z), sigma, train=True)
    logp = jax.nn.log_softmax(logits, axis=-1)
    y = y.astype(jnp.int32)
    nll = -jnp.take_along_axis(logp, y[:, None], axis=-1)[:, 0]
    acc = jnp.mean(jnp.argmax(logits, -1) == y)
    return jnp.mean(nll), acc
  return loss_fn


def get_classifier_train_step_fn(config, sde: SDE, classifier):
  """``step(state, batch) -> (state, metrics)`` for a :class:`score_sde.losses.TrainState`:
  Adam (config.optim, lr = config.classifier.lr) on the cross-entropy, EMA at model.ema_rate."""
  import optax
  from score_sde import losses
  cc = classifier_config(config)
  loss_fn = get_classifier_loss_fn(sde, classifier, int(cc["num_classes"]), float(cc["eps"]))
  tx = _classifier_optimizer(config, cc)
  rate = float(config.model.ema_rate)
  grad_fn = jax.value_and_grad(loss_fn, argnums=1, has_aux=True)

  def step_fn(state: losses.TrainState, batch):
    key, loss_key = jax.random.split(state.key)
    (loss, acc), grads = grad_fn(loss_key, state.params, batch)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = optax.incremental_update(params, state.ema_params, 1.0 - rate)
    state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                          ema_params=ema, key=key)
    return state, {"loss": loss, "accuracy": acc}
  return step_fn


def _classifier_optimizer(config, cc):
  import copy
  from score_sde import losses
  cfg = copy.deepcopy(config)
  with cfg.unlocked() if hasattr(cfg, "unlocked") else _nullcontext():
    cfg.optim.lr = float(cc["lr"])
  return losses.get_optimizer(cfg)


class _nullcontext:
  def __enter__(self):
    return self

  def __exit__(self, *exc):
    return False


def init_classifier_state(config, key: Array):
  """(classifier, TrainState) with fresh params and optimizer state."""
  from score_sde import losses
  init_key, state_key = jax.random.split(key)
  model, params = create_classifier(config, init_key)
  state = losses.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                            opt_state=_classifier_optimizer(config, classifier_config(config)).init(
                                params),
                            ema_params=jax.tree.map(jnp.array, params),
                            key=jax.random.key_data(state_key))
  return model, state


def train_classifier(config, workdir: Optional[str] = None) -> tuple[Any, Any, dict]:
  """Trains the time-dependent classifier (``--mode train_classifier``).

  Data-parallel over all devices (batch sharded on a 'data' mesh axis, state replicated),
  ``config.training.n_jitted_steps`` updates per compiled call; checkpoints go to
  ``workdir/classifier`` and a rerun resumes from them. Returns ``(classifier, state, metrics)``
  with the state on the host; use ``state.ema_params`` with :func:`get_classifier_logp_grad_fn`.
  """
  from jax.sharding import NamedSharding, PartitionSpec as P
  from absl import logging
  from score_sde import datasets, losses
  cc = classifier_config(config)
  sde = sde_lib.get_sde(config)
  n = int(config.training.n_jitted_steps)
  n_iters = int(cc["n_iters"])
  if n_iters % n:
    raise ValueError(f"config.classifier.n_iters={n_iters} must be a multiple of "
                     f"config.training.n_jitted_steps={n}.")
  mesh = jax.make_mesh((jax.device_count(),), ("data",))
  if int(cc["batch_size"]) % jax.device_count():
    raise ValueError(f"config.classifier.batch_size={cc['batch_size']} is not divisible by the "
                     f"{jax.device_count()} devices.")
  model, state = init_classifier_state(config, jax.random.PRNGKey(int(config.seed) + 7))
  replicated = NamedSharding(mesh, P())
  state = jax.device_put(state, replicated)
  step_fn = get_classifier_train_step_fn(config, sde, model)
  multi = jax.jit(losses.get_multi_step_fn(step_fn, n),
                  in_shardings=(replicated, NamedSharding(mesh, P(None, "data"))),
                  out_shardings=(replicated, replicated), donate_argnums=(0,))
  ckpt = None
  if workdir:
    from score_sde.checkpointing import Checkpoints
    ckpt = Checkpoints(os.path.join(workdir, "classifier"), int(config.training.max_to_keep))
    restored_step, state = ckpt.restore_latest(state)
    if restored_step is not None:
      logging.info("Classifier: resumed from step %d.", restored_step)
  step = int(jax.device_get(state.step))
  import copy
  data_cfg = copy.deepcopy(config)
  with data_cfg.unlocked():
    data_cfg.training.batch_size = int(cc["batch_size"])
  ds = datasets.get_dataset(data_cfg, "train", start_step=step)
  scaler = datasets.get_data_scaler(config)
  last: dict = {}
  try:
    while step < n_iters:
      bs = [next(ds) for _ in range(n)]
      batch = {"image": np.stack([scaler(b["image"]) for b in bs]).astype(np.float32),
               "label": np.stack([b["label"] for b in bs]).astype(np.int32)}
      state, metrics = multi(state, batch)
      step += n
      if step % int(cc["log_freq"]) == 0 or step == n_iters:
        last = {k: float(np.mean(v)) for k, v in jax.device_get(metrics).items()}
        logging.info("classifier step %d/%d | loss %.4f | accuracy %.3f", step, n_iters,
                     last["loss"], last["accuracy"])
      if ckpt is not None and (step % int(cc["snapshot_freq"]) == 0 or step == n_iters):
        ckpt.save(step, state, snapshot=True)
  finally:
    if ckpt is not None:
      ckpt.close()
  return model, jax.device_get(state), last


# ------------------------------------------------------------------------------------------------
# Inpainting and colorization
# ------------------------------------------------------------------------------------------------
def colorization_matrix() -> np.ndarray:
  """Orthogonal 3x3 Q whose first column is (1, 1, 1) / sqrt(3): the decoupled channels of a pixel
  x [3] are x @ Q; the first is sqrt(3) times the gray value (channel mean)."""
  q = np.stack([np.ones(3) / np.sqrt(3), np.array([-2.0, 1.0, 1.0]) / np.sqrt(6),
                np.array([0.0, 1.0, -1.0]) / np.sqrt(2)], axis=1)
  return q


def _check_data(name: str, data, shape: tuple[int, ...]) -> Array:
  arr = jnp.asarray(data, jnp.float32)
  if tuple(arr.shape) != shape:
    raise ValueError(f"{name} must have the sampler's shape {shape}, got {tuple(arr.shape)}.")
  return arr


def _broadcast_mask(mask, shape: tuple[int, ...]) -> Array:
  """Mask broadcast to ``shape``; accepts [*shape], [*data_shape] and any shape that broadcasts
  (e.g. [H, W, 1] or [batch, H, W, 1] for images). Values must be 0 or 1."""
  m = np.asarray(mask) if _is_concrete(mask) else mask
  mshape = tuple(m.shape)
  try:
    ok = np.broadcast_shapes(mshape, shape) == shape
  except ValueError:
    ok = False
  if not ok:
    raise ValueError(f"Mask shape {mshape} does not match the data shape {shape}: use "
                     f"{shape}, {shape[1:]} or a shape that broadcasts to it (1 = known, 0 = "
                     "to fill in).")
  if _is_concrete(m):
    if not np.all((m == 0) | (m == 1)):
      raise ValueError("Mask values must be 0 (fill in) or 1 (known); threshold it first "
                       "(load_mask does).")
  return jnp.broadcast_to(jnp.asarray(m, jnp.float32), shape)


def _replace(x, x_mean, key, y, m, coef, rotate, unrotate):
  """Known part (m = 1) of Q x <- alpha y + sigma z and of Q x_mean <- alpha y."""
  alpha, sigma = coef
  z = jax.random.normal(key, x.shape, x.dtype)
  known_mean = batch_mul(alpha, y)
  xr, xmr = rotate(x), rotate(x_mean)
  xr = xr * (1.0 - m) + (known_mean + batch_mul(sigma, z)) * m
  xmr = xmr * (1.0 - m) + known_mean * m
  return unrotate(xr), unrotate(xmr)


def _pc_constrained(sde: SDE, shape, rotate, unrotate, predictor: str = "reverse_diffusion",
                    corrector: str = "langevin", snr: float = 0.16, n_steps: int = 1,
                    probability_flow: bool = False, denoise: bool = True,
                    eps: Optional[float] = None):
  """PC sampler with the known part replaced after every update (module docstring)."""
  predictor_fn, corrector_fn = get_predictor(predictor), get_corrector(corrector)
  if predictor == "none" and corrector == "none":
    raise ValueError("predictor='none' and corrector='none' would not sample.")
  n_steps = int(n_steps)
  if corrector != "none" and (n_steps < 1 or not snr > 0):
    raise ValueError(f"A corrector needs n_steps >= 1 and snr > 0, got {n_steps}, {snr}.")
  eps = sde.sampling_eps if eps is None else float(eps)
  if not 0 <= eps < sde.T:
    raise ValueError(f"eps must be in [0, T={sde.T}), got {eps}.")
  N = sde.N
  n_corr = n_steps if corrector != "none" else 0
  ts = np.linspace(sde.T, eps, N)
  a_np, s_np = (np.asarray(v, np.float64) for v in jax.device_get(
      sde.marginal_coef(jnp.asarray(ts, jnp.float32))))
  # Coefficients of the time each predictor step reaches: t_{i+1}, and (1, 0) after the last.
  a_next = np.append(a_np[1:], 1.0).astype(np.float32)
  s_next = np.append(s_np[1:], 0.0).astype(np.float32)

  def predict(k, x, t, sf):
    return predictor_fn(k, x, t, sde=sde, score_fn=sf, probability_flow=probability_flow)

  def correct(k, x, t, sf):
    return corrector_fn(k, x, t, sde=sde, score_fn=sf, snr=snr)

  def program(key, score_fn, y, m):
    b = shape[0]
    x_spec = jax.ShapeDtypeStruct(shape, jnp.float32)
    t_spec = jax.ShapeDtypeStruct((b,), jnp.float32)
    k_spec = jax.eval_shape(lambda: jax.random.key(0))
    check_score_fn_shape(score_fn, x_spec, "Conditional PC sampler")
    nfe_p = count_score_evals(lambda w: jax.eval_shape(
        lambda k, x, t: predict(k, x, t, w(score_fn)), k_spec, x_spec, t_spec))
    nfe_c = count_score_evals(lambda w: jax.eval_shape(
        lambda k, x, t: correct(k, x, t, w(score_fn)), k_spec, x_spec, t_spec))
    key, prior_key, known_key = jax.random.split(key, 3)
    x = sde.prior_sampling(prior_key, shape)
    coef_T = (jnp.full((b,), a_np[0], jnp.float32), jnp.full((b,), s_np[0], jnp.float32))
    x, _ = _replace(x, x, known_key, y, m, coef_T, rotate, unrotate)
    timesteps = jnp.asarray(ts, jnp.float32)
    an, sn = jnp.asarray(a_next), jnp.asarray(s_next)

    def step(i, carry):
      key, x, _ = carry
      t = jnp.full((b,), timesteps[i])
      key, ck, pk, rk = jax.random.split(key, 4)
      x_mean = x
      if n_corr:
        coef_t = sde.marginal_coef(t)

        def corr_step(j, xs):
          kj = jax.random.fold_in(ck, j)
          k1, k2 = jax.random.split(kj)
          xc, xcm = correct(k1, xs[0], t, score_fn)
          return _replace(xc, xcm, k2, y, m, coef_t, rotate, unrotate)
        x, x_mean = jax.lax.fori_loop(0, n_corr, corr_step, (x, x))
      if predictor != "none":
        x, x_mean = predict(pk, x, t, score_fn)
        coef_n = (jnp.full((b,), an[i]), jnp.full((b,), sn[i]))
        x, x_mean = _replace(x, x_mean, rk, y, m, coef_n, rotate, unrotate)
      return key, x, x_mean

    _, x, x_mean = jax.lax.fori_loop(0, N, step, (key, x, x))
    out = x_mean if denoise else x
    # The known part exactly: alpha = 1, sigma = 0.
    ones, zeros = jnp.ones((b,)), jnp.zeros((b,))
    out, _ = _replace(out, out, key, y, m, (ones, zeros), rotate, unrotate)
    return out, jnp.asarray(N * (nfe_p + n_corr * nfe_c), jnp.int32)

  return jit_with_score_fn(program)


def _ode_constrained(sde: SDE, shape, rotate, unrotate, rtol: float = 1e-5, atol: float = 1e-5,
                     method: str = "dopri5", denoise: bool = False, eps: Optional[float] = None,
                     num_steps: Optional[int] = None, max_steps: int = 4096):
  """Probability-flow ODE for the unknown part, known part pinned to alpha(t) y + sigma(t) z_k."""
  check_ode_options(method, rtol, atol, num_steps)
  eps = sde.sampling_eps if eps is None else float(eps)
  if not 0 <= eps < sde.T:
    raise ValueError(f"eps must be in [0, T={sde.T}), got {eps}.")
  from score_sde.sampling.pc import reverse_diffusion

  def program(key, score_fn, y, m):
    b = shape[0]
    check_score_fn_shape(score_fn, jax.ShapeDtypeStruct(shape, jnp.float32),
                         "Conditional ODE sampler")
    fn, cond = split_score_fn(score_fn)
    prior_key, zk_key, den_key = jax.random.split(key, 3)
    z_k = jax.random.normal(zk_key, shape, jnp.float32)
    x_T = rotate(sde.prior_sampling(prior_key, shape))  # rotated coordinates

    def pin(xr, yy, mm, zz, t):
      alpha, sigma = sde.marginal_coef(jnp.full((xr.shape[0],), t, jnp.float32))
      known = batch_mul(alpha, yy) + batch_mul(sigma, zz)
      return xr * (1.0 - mm) + known * mm

    def field(t, xr, args):
      yy, mm, zz, cc = args
      cc = jax.tree_util.tree_map(lambda c: c[None], cc)
      drift = probability_flow_drift(sde, lambda xx, tt: fn(xx, tt, cc))
      full = pin(xr[None], yy[None], mm[None], zz[None], t)
      d = rotate(drift(unrotate(full), jnp.full((1,), t, jnp.float32)))[0]
      return d * (1.0 - mm)

    xr, _, nfe = solve_per_example(field, x_T, (y, m, z_k, cond), sde.T, eps, method, rtol, atol,
                                   num_steps, max_steps)
    x = unrotate(pin(xr, y, m, z_k, eps))
    if denoise:
      _, x = reverse_diffusion(den_key, x, jnp.full((b,), eps), sde=sde, score_fn=score_fn)
      nfe = nfe + 1
    ones, zeros = jnp.ones((b,)), jnp.zeros((b,))
    x, _ = _replace(x, x, den_key, y, m, (ones, zeros), rotate, unrotate)
    return x, nfe

  return jit_with_score_fn(program)


_IDENTITY = (lambda v: v, lambda v: v)


def _constrained_sampler(sde: SDE, shape, method: str, rotate, unrotate, options: dict):
  if not isinstance(sde, SDE):
    raise ValueError(f"sde must be a score_sde.sde_lib.SDE, got {type(sde).__name__}.")
  if method == "pc":
    return _pc_constrained(sde, shape, rotate, unrotate, **options)
  if method == "ode":
    return _ode_constrained(sde, shape, rotate, unrotate, **options)
  raise ValueError(f"Inpainting / colorization support method='pc' or 'ode', got {method!r}.")


def get_inpainter(sde: SDE, shape: Sequence[int], method: str = "pc", **options):
  """Inpainting sampler: ``inpaint(key, score_fn, data [*shape], mask) -> (x [*shape], nfe)``.

  ``mask`` (1 = known, 0 = fill in) has shape ``shape``, ``shape[1:]`` or any shape broadcasting
  to it. The known part of the result equals ``data`` exactly; the rest is sampled from the
  replacement approximation of p(x_unknown | x_known = data) (module docstring). ``method``: 'pc'
  (options: predictor, corrector, snr, n_steps, probability_flow, denoise, eps; default
  reverse_diffusion + langevin as in the paper) or 'ode' (rtol, atol, method, denoise, eps,
  num_steps, max_steps; the ODE solver is ``options['method']`` — pass it as ``ode_method``).
  One jitted program per score_fn.
  """
  shape = _check_shape(shape)
  options = dict(options)
  if method == "ode" and "ode_method" in options:
    options["method"] = options.pop("ode_method")
  program = _constrained_sampler(sde, shape, method, *_IDENTITY, options)

  def inpaint(key, score_fn, data, mask):
    y = _check_data("Inpainting data", data, shape)
    m = _broadcast_mask(mask, shape)
    return program(key, score_fn, y * m, m)
  return inpaint


def get_colorizer(sde: SDE, shape: Sequence[int], method: str = "pc", **options):
  """Colorization sampler: ``colorize(key, score_fn, gray) -> (x [*shape], nfe)``.

  ``shape`` is ``[batch, H, W, 3]``; ``gray`` is the channel mean of the wanted image, shaped
  ``[batch, H, W]``, ``[batch, H, W, 1]`` or ``[batch, H, W, 3]`` (equal channels are averaged).
  The result's channel mean equals ``gray`` (up to float round-off of the orthogonal rotation).
  Options as :func:`get_inpainter`.
  """
  shape = _check_shape(shape)
  if len(shape) != 4 or shape[-1] != 3:
    raise ValueError(f"Colorization needs RGB images [batch, H, W, 3], got shape {shape}.")
  q = jnp.asarray(colorization_matrix(), jnp.float32)
  rotate = lambda v: jnp.einsum("...c,cd->...d", v, q)
  unrotate = lambda v: jnp.einsum("...d,cd->...c", v, q)
  options = dict(options)
  if method == "ode" and "ode_method" in options:
    options["method"] = options.pop("ode_method")
  program = _constrained_sampler(sde, shape, method, rotate, unrotate, options)
  m = jnp.broadcast_to(jnp.asarray([1.0, 0.0, 0.0]), shape)

  def colorize(key, score_fn, gray):
    g = jnp.asarray(gray, jnp.float32)
    if g.ndim == 3:
      g = g[..., None]
    if g.ndim != 4 or g.shape[:3] != shape[:3] or g.shape[-1] not in (1, 3):
      raise ValueError(f"Grayscale input must be [batch, H, W], [batch, H, W, 1] or "
                       f"[batch, H, W, 3] with batch, H, W = {shape[:3]}, got {tuple(g.shape)}.")
    g = jnp.mean(g, axis=-1, keepdims=True)
    y = jnp.concatenate([np.sqrt(3.0) * g, jnp.zeros_like(g), jnp.zeros_like(g)], axis=-1)
    return program(key, score_fn, y, m)
  return colorize


# ------------------------------------------------------------------------------------------------
# File loaders
# ------------------------------------------------------------------------------------------------
def load_array(path: str) -> np.ndarray:
  """float32 array from ``.npy`` (as stored) or an image file (``.png`` etc.: values / 255,
  [H, W, C]; a gray image is [H, W, 1])."""
  if not os.path.exists(path):
    raise ValueError(f"No such file: {path}.")
  ext = os.path.splitext(path)[1].lower()
  if ext == ".npy":
    return np.asarray(np.load(path), np.float32)
  try:
    from PIL import Image
  except ImportError as e:  # pragma: no cover
    raise ValueError(f"Reading {path} needs Pillow (pip install pillow), or save it as .npy.") from e
  with Image.open(path) as im:
    arr = np.asarray(im)
  arr = arr.astype(np.float32) / (65535.0 if arr.dtype == np.uint16 else 255.0)
  return arr[..., None] if arr.ndim == 2 else arr


def load_mask(path: str, threshold: float = 0.5) -> np.ndarray:
  """Binary mask (1 = known) from .npy / .png: values > threshold -> 1. A multi-channel image
  mask is reduced to [H, W, 1] by its channel mean (alpha channel dropped)."""
  arr = load_array(path)
  if arr.ndim == 3 and arr.shape[-1] in (2, 4):
    arr = arr[..., :-1]
  if arr.ndim == 3 and arr.shape[-1] == 3 and not path.lower().endswith(".npy"):
    arr = arr.mean(-1, keepdims=True)
  return (arr > threshold).astype(np.float32)


def load_grayscale(path: str) -> np.ndarray:
  """Gray values [..., H, W, 1] in [0, 1] from .npy / .png (an RGB image is averaged)."""
  arr = load_array(path)
  if arr.ndim >= 3 and arr.shape[-1] in (3, 4):
    arr = arr[..., :3].mean(-1, keepdims=True)
  elif arr.ndim == 2:
    arr = arr[..., None]
  return arr
