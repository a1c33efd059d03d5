"""Denoising score matching losses, the optimizer and the train / eval step builders.

Losses (Song et al. 2021, eq. 7; SMLD; DDPM), for data x_0 [batch, *data_shape] and
x_t = alpha(t) x_0 + sigma(t) z, z ~ N(0, I):

  * continuous, unweighted:  l(x_0) = R(|| sigma(t) s_theta(x_t, t) + z ||^2),   t ~ U(eps, T)
  * continuous, likelihood weighting (Song et al. 2021b):
                             l(x_0) = R(|| s_theta(x_t, t) + z / sigma(t) ||^2) g(t)^2
  * discrete (the SDE's chain, :func:`get_discrete_loss_fn`):
      SMLD (VE):  i ~ U{0..N-1}, sigma_i = flip(discrete_sigmas)[i],
                  l = R(|| s_theta(x_0 + sigma_i z, i) + z / sigma_i ||^2) sigma_i^2
      DDPM (VP):  i ~ U{0..N-1}, l = R(|| eps_theta(sqrt(abar_i) x_0 + sqrt(1 - abar_i) z, i) - z ||^2)

Weighted denoising losses (``config.training.loss``; :func:`get_weighted_loss_fn`), one core for
any process, parametrization and weighting. The network output F is regressed onto its own target
(:meth:`score_sde.parametrizations.Parametrization.target`, the same x_t, t, z), and every such
loss is lambda(t) times the unweighted DSM loss above, per example,

  l(x_0, t, z) = lambda(t) R(|| sigma(t) s_theta(x_t, t) + z ||^2)     (eps_hat = -sigma s_theta):

  ====================  ==============================  ========================  =======================
  loss                  regression (per example)        t ~                        lambda(t)
  ====================  ==============================  ========================  =======================
  'dsm'                 (sigma s + z)^2                 U(eps, T)                  1
  'dsm', likelihood w.  (s + z / sigma)^2 g^2           U(eps, T)                  g(t)^2 / sigma^2
  'eps'                 (eps_hat - z)^2                 U(eps, T)                  1
  'x0'                  (x0_hat - x_0)^2                U(eps, T)                  sigma_e^2
  'v'                   (v_hat - v)^2                   U(eps, T)                  (alpha^2 + sigma^2)^2 / alpha^2
  'flow_matching'       (u_hat - u)^2, u = dx_t/dt      U(eps, T) or logit-normal  k^2 / alpha^2
  'edm'                 w_edm (D - x_0)^2               ln sigma_e ~ N(-1.2, 1.2)  (sigma_e^2 + s_d^2) / s_d^2
  ====================  ==============================  ========================  =======================

with sigma_e = sigma / alpha, k = alpha sigma' - alpha' sigma (rectified flow: k = 1, so lambda =
1 / (1 - t)^2), s_d = ``config.model.sigma_data`` and EDM's w_edm = (sigma_e^2 + s_d^2) /
(sigma_e s_d)^2 (Karras et al. 2022, eq. 8; with the 'edm' parametrization this is exactly
||F - F*||^2). 'dsm' is the original loss, computed as before. The time distribution is the
loss's default or ``config.training.t_sampling``: 'uniform', 'logit_normal' (SD3: t = eps +
(T - eps) sigmoid(m + s z), m, s = ``t_mean``, ``t_std``, default 0, 1) or 'lognormal'
(EDM: ln sigma_e ~ N(t_mean, t_std), default -1.2, 1.2, mapped to t by the SDE's
``t_from_log_snr(-2 ln sigma_e)`` and clipped to [eps, T]).

R reduces over the data dimensions: the mean (reduce_mean) or half the sum (as in the reference);
the loss is the mean of l over the (global) batch. Every loss function has the signature
``loss_fn(key, params, batch) -> (loss, aux)`` with ``params`` the network's 'params' collection
(or the whole variables dict) and ``aux = {'losses': [batch], 'noise': z, 't' | 'labels': [batch]}``
(unused outputs are dropped by XLA under jit). The key is split into (t or labels, z, dropout).
The losses built here are :class:`SplitLoss` objects: the random draws and the per-example losses
are separate stages, which is what makes gradient accumulation over micro-batches
(``config.training.micro_batches``) equal to the full-batch step.

Training state and steps: :class:`TrainState` is a plain pytree (step, params, opt_state,
ema_params, key) that orbax saves and ``jax.jit`` shards; :func:`get_train_step_fn` returns a pure
``step(state, batch) -> (state, metrics)`` with no device-specific code; the caller jits it and
shards the batch.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from score_sde import conditional, consistency, sde_lib
from score_sde.models.utils import get_model_fn, get_network_fn, get_score_fn
from score_sde.sde_lib import batch_mul
from score_sde.utils import data_shape, parametrization_of

Array = jax.Array
LossFn = Callable[[Array, Any, Array], tuple[Array, dict]]

__all__ = ["SplitLoss", "get_sde_loss_fn", "get_discrete_loss_fn", "get_weighted_loss_fn", "LOSSES",
           "T_SAMPLINGS", "sample_t", "get_loss_fn", "Task", "TrainState",
           "init_train_state", "get_lr_schedule", "get_optimizer", "get_train_step_fn",
           "get_multi_step_fn", "get_eval_step_fn", "micro_batches_of", "split_micro_batches",
           "accumulated_value_and_grad"]

NAN_POLICIES = ("stop", "skip")


def _reduce_op(reduce_mean: bool) -> Callable[[Array], Array]:
  """Per-example reduction over the flattened data dimensions: mean, or 0.5 * sum."""
  if reduce_mean:
    return lambda x: jnp.mean(x.reshape(x.shape[0], -1), axis=-1)
  return lambda x: 0.5 * jnp.sum(x.reshape(x.shape[0], -1), axis=-1)


@dataclasses.dataclass(frozen=True)
class SplitLoss:
  """A loss in two stages, so that a batch can be cut into micro-batches after its randomness is
  drawn (gradient accumulation, :func:`get_train_step_fn`).

  ``draw(key, batch) -> (draws, dropout_key)``: every per-example random quantity of the loss
  (t or the discrete labels, the noise z, the class labels after label dropout) as a pytree whose
  leaves have the batch's leading axis, and the network's dropout key;
  ``per_example(params, batch, draws, dropout_key) -> (losses [batch], aux)``: the per-example
  losses l_b, a pure function of its arguments, example b depending only on (batch[b], draws[b])
  (the network treats examples independently: no batch statistics).

  ``loss(key, params, batch) -> (mean_b l_b, aux)`` is the usual :data:`LossFn`, with the same
  keys and values as a one-stage loss. Hence for micro-batches M_1..M_k of equal size m = B / k,
  cut from (batch, draws) alike: mean_b l_b = (1/k) sum_i (1/m) sum_{b in M_i} l_b, and the same
  for the gradients (only float round-off differs).
  """
  draw: Callable[[Array, Any], tuple[Any, Optional[Array]]]
  per_example: Callable[[Any, Any, Any, Optional[Array]], tuple[Array, dict]]

  def __call__(self, key: Array, params: Any, batch: Any) -> tuple[Array, dict]:
    draws, dropout_key = self.draw(key, batch)
    losses, aux = self.per_example(params, batch, draws, dropout_key)
    return jnp.mean(losses), aux


# --- losses ------------------------------------------------------------------------------------
def get_sde_loss_fn(sde: sde_lib.SDE, model: nn.Module, train: bool, reduce_mean: bool = True,
                    continuous: bool = True, likelihood_weighting: bool = False,
                    eps: float = 1e-5, parametrization: Optional[str] = None) -> LossFn:
  """Continuous-time DSM loss for any SDE.

  t ~ U(eps, T), z ~ N(0, I), x_t = mean(x_0, t) + sigma(t) z, s = score_fn(x_t, t):
  unweighted  l = R((s sigma + z)^2);  likelihood weighting  l = R((s + z / sigma)^2) g(t)^2;
  loss = mean_batch(l). The score is read from the network through the SDE's conventions
  (:func:`score_sde.models.utils.get_score_fn`, ``continuous`` and ``parametrization``).
  """
  if not 0.0 <= eps < sde.T:
    raise ValueError(f"Training eps must be in [0, T={sde.T}), got {eps}.")
  reduce_op = _reduce_op(reduce_mean)

  def draw(key: Array, batch: Array):
    t_key, z_key, dropout_key = jax.random.split(key, 3)
    t = jax.random.uniform(t_key, (batch.shape[0],), minval=eps, maxval=sde.T)
    z = jax.random.normal(z_key, batch.shape, batch.dtype)
    return {"t": t, "noise": z}, dropout_key

  def per_example(params: Any, batch: Array, draws: dict, dropout_key: Array):
    t, z = draws["t"], draws["noise"]
    model_fn = get_model_fn(model, params, train=train, rng=dropout_key)
    score_fn = get_score_fn(sde, model_fn, continuous=continuous, parametrization=parametrization)
    mean, std = sde.marginal_prob(batch, t)
    x_t = mean + batch_mul(std, z)
    score = score_fn(x_t, t)
    if not likelihood_weighting:
      losses = reduce_op(jnp.square(batch_mul(std, score) + z))
    else:
      g2 = sde.sde(jnp.zeros_like(batch), t)[1] ** 2
      losses = reduce_op(jnp.square(score + batch_mul(1.0 / std, z))) * g2
    return losses, {"losses": losses, "t": t, "noise": z}

  return SplitLoss(draw, per_example)


def get_discrete_loss_fn(sde: sde_lib.SDE, model: nn.Module, train: bool,
                         reduce_mean: bool = True, parametrization: Optional[str] = None) -> LossFn:
  """Loss of a discrete-time network on the SDE's discrete chain (SMLD for VE, DDPM for VP).

  i ~ U{0..N-1} (the network's integer label), (a_i, s_i) = ``sde.discrete_kernel(i)``,
  x_i = a_i x_0 + s_i z, and with (target, w) = :func:`score_sde.sde_lib.parametrization_target`
  of the network's parametrization: l = R((out(x_i, i) - target)^2) w. So:

    * DDPM (VP, eps):   l = R((eps_theta(sqrt(abar_i) x_0 + sqrt(1 - abar_i) z, i) - z)^2)
    * SMLD (VE, score): l = R((s_theta(x_0 + sigma_i z, i) + z / sigma_i)^2) sigma_i^2,
      sigma_i = flip(discrete_sigmas)[i] (descending).
  """
  sde.check_discrete()
  p = sde_lib.get_parametrization(parametrization or sde.default_parametrization)
  if p.preconditions or p.needs_rates:
    raise ValueError(f"The {p.name!r} parametrization is for continuous-time networks; set "
                     "config.training.continuous=True or choose another parametrization.")
  reduce_op = _reduce_op(reduce_mean)

  def draw(key: Array, batch: Array):
    label_key, z_key, dropout_key = jax.random.split(key, 3)
    labels = jax.random.randint(label_key, (batch.shape[0],), 0, sde.N)
    z = jax.random.normal(z_key, batch.shape, batch.dtype)
    return {"labels": labels, "noise": z}, dropout_key

  def per_example(params: Any, batch: Array, draws: dict, dropout_key: Array):
    labels, z = draws["labels"], draws["noise"]
    model_fn = get_model_fn(model, params, train=train, rng=dropout_key)
    a, s = sde.discrete_kernel(labels, batch.dtype)
    x_i = batch_mul(a, batch) + batch_mul(s, z)
    target, weight = p.target(batch, z, a, s)
    losses = reduce_op(jnp.square(model_fn(x_i, labels) - target)) * weight
    return losses, {"losses": losses, "labels": labels, "noise": z}

  return SplitLoss(draw, per_example)


# --- weighted denoising losses ------------------------------------------------------------------
T_SAMPLINGS = ("uniform", "logit_normal", "lognormal")
_T_DEFAULTS = {"logit_normal": (0.0, 1.0), "lognormal": (-1.2, 1.2)}


def sample_t(key: Array, n: int, sde: sde_lib.SDE, eps: float, how: str = "uniform",
             mean: Optional[float] = None, std: Optional[float] = None) -> Array:
  """Training times ``[n]`` in [eps, T]: 'uniform' U(eps, T); 'logit_normal' eps + (T - eps)
  sigmoid(mean + std z); 'lognormal' ln sigma_e ~ N(mean, std), t = sde.t_from_log_snr(-2 ln
  sigma_e) clipped to [eps, T]. ``mean`` / ``std`` None: (0, 1) and (-1.2, 1.2)."""
  if how == "uniform":
    return jax.random.uniform(key, (n,), minval=eps, maxval=sde.T)
  if how not in _T_DEFAULTS:
    raise ValueError(f"Unknown config.training.t_sampling {how!r}; choose one of {T_SAMPLINGS}.")
  m0, s0 = _T_DEFAULTS[how]
  m = m0 if mean is None else float(mean)
  s = s0 if std is None else float(std)
  z = m + s * jax.random.normal(key, (n,))
  if how == "logit_normal":
    return eps + (sde.T - eps) * jax.nn.sigmoid(z)
  return jnp.clip(sde.t_from_log_snr(-2.0 * z), eps, sde.T)


def _lambda_eps(alpha, sigma, rates, sigma_data):
  return jnp.ones_like(sigma)


def _lambda_x0(alpha, sigma, rates, sigma_data):
  return (sigma / alpha) ** 2


def _lambda_v(alpha, sigma, rates, sigma_data):
  return ((alpha**2 + sigma**2) / alpha) ** 2


def _lambda_flow(alpha, sigma, rates, sigma_data):
  da, ds = rates
  return ((alpha * ds - da * sigma) / alpha) ** 2


def _lambda_edm(alpha, sigma, rates, sigma_data):
  return ((sigma / alpha) ** 2 + sigma_data**2) / sigma_data**2


# name -> (lambda(alpha, sigma, rates, sigma_data) on the DSM loss, default t sampling, needs rates)
LOSSES: dict[str, tuple[Callable, str, bool]] = {
    "eps": (_lambda_eps, "uniform", False),
    "x0": (_lambda_x0, "uniform", False),
    "v": (_lambda_v, "uniform", False),
    "flow_matching": (_lambda_flow, "uniform", True),
    "edm": (_lambda_edm, "lognormal", False),
}


def get_weighted_loss_fn(sde: sde_lib.SDE, model: nn.Module, train: bool, loss: str,
                         reduce_mean: bool = True, parametrization=None, eps: float = 1e-5,
                         t_sampling: Optional[str] = None, t_mean: Optional[float] = None,
                         t_std: Optional[float] = None, sigma_data: float = 0.5) -> LossFn:
  """The weighted denoising loss ``loss`` (a key of :data:`LOSSES`; module docstring).

  t ~ ``t_sampling`` (None: the loss's default), z ~ N(0, I), x_t = alpha x_0 + sigma z,
  (F, alpha, sigma, rates) = :func:`score_sde.models.get_network_fn` (x_t, t),
  (target, w) = p.target(x_0, z, alpha, sigma, rates):
  l = R((F - target)^2) w lambda(t), which equals lambda(t) R((sigma s_theta + z)^2).
  """
  if loss not in LOSSES:
    raise ValueError(f"Unknown config.training.loss {loss!r}; choose one of "
                     f"{['dsm'] + sorted(LOSSES)}.")
  if not 0.0 <= eps < sde.T:
    raise ValueError(f"Training eps must be in [0, T={sde.T}), got {eps}.")
  if not float(sigma_data) > 0:
    raise ValueError(f"config.model.sigma_data must be > 0, got {sigma_data}.")
  weight_fn, default_t, loss_rates = LOSSES[loss]
  how = t_sampling or default_t
  if how not in T_SAMPLINGS:
    raise ValueError(f"Unknown config.training.t_sampling {how!r}; choose one of {T_SAMPLINGS}.")
  reduce_op = _reduce_op(reduce_mean)
  p = sde_lib.get_parametrization(parametrization or sde.default_parametrization, sigma_data)

  def draw(key: Array, batch: Array):
    t_key, z_key, dropout_key = jax.random.split(key, 3)
    t = sample_t(t_key, batch.shape[0], sde, eps, how, t_mean, t_std)
    z = jax.random.normal(z_key, batch.shape, batch.dtype)
    return {"t": t, "noise": z}, dropout_key

  def per_example(params: Any, batch: Array, draws: dict, dropout_key: Array):
    t, z = draws["t"], draws["noise"]
    model_fn = get_model_fn(model, params, train=train, rng=dropout_key)
    network = get_network_fn(sde, model_fn, True, p)
    alpha, sigma = sde.marginal_coef(t)
    x_t = batch_mul(alpha, batch) + batch_mul(sigma, z)
    out, alpha, sigma, rates = network(x_t, t)
    if loss_rates and rates is None:
      rates = sde.marginal_rates(t)[1]
    target, w = p.target(batch, z, alpha, sigma, rates)
    losses = reduce_op(jnp.square(out - target)) * w * weight_fn(alpha, sigma, rates,
                                                                 float(sigma_data))
    return losses, {"losses": losses, "t": t, "noise": z}

  return SplitLoss(draw, per_example)


def get_loss_fn(config, sde: sde_lib.SDE, model: nn.Module, train: bool,
                teacher_score_fn=None) -> LossFn:
  """The loss ``config.training`` asks for; checks the batch shape against the config at trace time.

  ``training.loss``: 'dsm' (default) -> :func:`get_sde_loss_fn` when continuous (reduce_mean,
  likelihood_weighting from the config), :func:`get_discrete_loss_fn` on the SDE's chain when
  discrete (an SDE without one is an error); any other name -> :func:`get_weighted_loss_fn`
  (continuous only; t_sampling, t_mean, t_std, model.sigma_data from the config).
  A class-conditional model (``config.model.num_classes``) takes ``batch = {'image', 'label'}``.
  'consistency_distillation' / 'consistency_training' -> :func:`score_sde.consistency.
  get_consistency_loss_fn` (CD with ``teacher_score_fn``); that loss also takes the train state's
  step and target params (``loss_fn.uses_train_state``).
  """
  tc = config.training
  if consistency.is_consistency_loss(config):
    if conditional.num_classes_of(config):
      raise ValueError("Consistency models here are unconditional: set config.model.num_classes=0 "
                       "with config.training.loss in " f"{consistency.CONSISTENCY_LOSSES}.")
    return consistency.get_consistency_loss_fn(config, sde, model, train, teacher_score_fn)
  parametrization = parametrization_of(config)
  loss = str(tc.get("loss", None) or "dsm")
  if loss == "dsm" and (tc.get("t_sampling", None) or None) is not None:
    raise ValueError("config.training.t_sampling applies to the weighted losses (training.loss "
                     f"in {sorted(LOSSES)}); the 'dsm' loss draws t ~ U(eps, T): unset it.")
  if loss != "dsm":
    if loss not in LOSSES:
      raise ValueError(f"Unknown config.training.loss {loss!r}; choose one of "
                       f"{['dsm'] + sorted(LOSSES) + list(consistency.CONSISTENCY_LOSSES)}.")
    if not tc.continuous:
      raise ValueError(f"The {loss!r} loss is a continuous-time loss: set "
                       "config.training.continuous=True (or training.loss='dsm').")
    if tc.likelihood_weighting:
      raise ValueError(f"config.training.likelihood_weighting applies to the 'dsm' loss only; the "
                       f"{loss!r} loss has its own weighting: set likelihood_weighting=False.")
    make_inner = lambda m: get_weighted_loss_fn(
        sde, m, train, loss, reduce_mean=tc.reduce_mean, parametrization=parametrization,
        t_sampling=tc.get("t_sampling", None) or None, t_mean=tc.get("t_mean", None),
        t_std=tc.get("t_std", None), sigma_data=config.model.get("sigma_data", None) or 0.5)
  elif tc.continuous:
    make_inner = lambda m: get_sde_loss_fn(sde, m, train, reduce_mean=tc.reduce_mean,
                                           continuous=True,
                                           likelihood_weighting=tc.likelihood_weighting,
                                           parametrization=parametrization)
  else:
    if tc.likelihood_weighting:
      raise ValueError("Likelihood weighting needs continuous training: set "
                       "config.training.continuous=True or likelihood_weighting=False.")
    make_inner = lambda m: get_discrete_loss_fn(sde, m, train, reduce_mean=tc.reduce_mean,
                                                parametrization=parametrization)
  expected = data_shape(config)
  num_classes = conditional.num_classes_of(config)
  if num_classes:
    return _conditional_loss_fn(make_inner, model, expected, num_classes,
                                conditional.label_dropout_of(config) if train else 0.0)
  inner = make_inner(model)
  image = lambda batch: batch["image"] if isinstance(batch, dict) else batch

  def draw(key: Array, batch):
    _check_batch(image(batch), expected)
    return inner.draw(key, image(batch))

  def per_example(params: Any, batch, draws: Any, dropout_key: Array):
    return inner.per_example(params, image(batch), draws, dropout_key)

  return SplitLoss(draw, per_example)


def _conditional_loss_fn(make_inner, model, expected, num_classes: int,
                         label_dropout: float) -> LossFn:
  """The same DSM loss for a class-conditional network; ``batch = {'image', 'label'}``.

  Each label is replaced by the null label K = num_classes with probability ``label_dropout``
  (classifier-free guidance training). A plain array batch trains / evaluates the unconditional
  (null-label) score.
  """
  template = make_inner(model)  # its draws do not depend on the network
  image = lambda batch: batch["image"] if isinstance(batch, dict) else batch

  def draw(key: Array, batch):
    if isinstance(batch, dict):
      x, labels = batch["image"], batch["label"]
    else:
      x, labels = batch, None
    _check_batch(x, expected)
    drop_key, key = jax.random.split(key)
    if labels is None:
      labels = jnp.full((x.shape[0],), num_classes, jnp.int32)
    else:
      if labels.shape != x.shape[:1]:
        raise ValueError(f"Batch labels must be [batch]={x.shape[:1]}, got {labels.shape}.")
      labels = labels.astype(jnp.int32)
      if label_dropout > 0:
        drop = jax.random.uniform(drop_key, labels.shape) < label_dropout
        labels = jnp.where(drop, num_classes, labels)
    draws, dropout_key = template.draw(key, x)
    return {"class_labels": labels, "inner": draws}, dropout_key

  def per_example(params: Any, batch, draws: dict, dropout_key: Array):
    inner = make_inner(conditional.WithClassLabels(model, draws["class_labels"]))
    return inner.per_example(params, image(batch), draws["inner"], dropout_key)

  return SplitLoss(draw, per_example)


def _check_batch(batch: Array, expected: tuple[int, ...], leading: int = 1) -> None:
  shape = tuple(batch.shape)
  if len(shape) != leading + len(expected) or shape[leading:] != expected:
    lead = "[n_steps, batch, " if leading == 2 else "[batch, "
    raise ValueError(f"Batch of shape {shape} does not match the config's data shape "
                     f"{expected}: expected {lead}{', '.join(map(str, expected))}].")
  if not jnp.issubdtype(batch.dtype, jnp.floating):
    raise ValueError(f"Batch must be floating point (scaled data), got dtype {batch.dtype}.")


# --- optimizer ---------------------------------------------------------------------------------
LR_DECAYS = ("constant", "cosine")


def get_lr_schedule(config) -> optax.Schedule:
  """The learning rate of update ``step`` (the number of updates already applied).

  Linear warm-up from 0 over ``config.optim.warmup`` steps (as in the reference; none if 0), then
  ``config.optim.lr_decay``: 'constant' (the reference's, the default) keeps lr; 'cosine' decays
  it to 0 at ``config.training.n_iters``: lr (1 + cos(pi (step - warmup) / (n_iters - warmup))) / 2.
  """
  lr, warmup = float(config.optim.lr), int(config.optim.warmup)
  decay = str(config.optim.get("lr_decay", None) or "constant")
  if decay not in LR_DECAYS:
    raise ValueError(f"Unknown config.optim.lr_decay {decay!r}; choose one of {LR_DECAYS}.")
  if decay == "cosine":  # (a run shorter than its warm-up only warms up)
    decay_steps = max(int(config.training.n_iters) - warmup, 1)
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, warmup + decay_steps, 0.0)
  if warmup > 0:
    return optax.linear_schedule(0.0, lr, transition_steps=warmup)
  return optax.constant_schedule(lr)


def _decay_mask(params: Any) -> Any:
  """True for every leaf except the frozen W of Gaussian Fourier projections."""
  def keep(path, _):
    names = [getattr(p, "key", getattr(p, "name", "")) for p in path]
    names = [str(n) for n in names]
    return not (names and names[-1] == "W" and any(
        n.startswith("GaussianFourierProjection") for n in names[:-1]))
  return jax.tree_util.tree_map_with_path(keep, params)


def get_optimizer(config) -> optax.GradientTransformation:
  """Adam(b1=beta1, b2=0.999, eps) with the warm-up of :func:`get_lr_schedule`, after global-norm
  clipping at grad_clip (none if grad_clip < 0); decoupled weight decay (AdamW, lr-scaled, as
  flax.optim.Adam's weight_decay in the reference) when weight_decay > 0, not applied to the frozen
  Fourier-feature W."""
  o = config.optim
  if str(o.optimizer).lower() != "adam":
    raise ValueError(f"Unknown optimizer {o.optimizer!r} in config.optim.optimizer; "
                     "supported: 'Adam'.")
  if float(o.grad_clip) == 0:
    raise ValueError("config.optim.grad_clip=0 would zero every update; use a positive value, or "
                     "a negative one to disable clipping.")
  if float(o.weight_decay) < 0:
    raise ValueError(f"config.optim.weight_decay must be >= 0, got {o.weight_decay}.")
  schedule = get_lr_schedule(config)
  parts = []
  if float(o.grad_clip) > 0:
    parts.append(optax.clip_by_global_norm(float(o.grad_clip)))
  if float(o.weight_decay) > 0:
    parts.append(optax.adamw(schedule, b1=float(o.beta1), eps=float(o.eps),
                             weight_decay=float(o.weight_decay), mask=_decay_mask))
  else:
    parts.append(optax.adam(schedule, b1=float(o.beta1), eps=float(o.eps)))
  return optax.chain(*parts)


# --- train state and steps ---------------------------------------------------------------------
@dataclasses.dataclass
class Task:
  """What a :class:`score_sde.train.Trainer` trains: a network, its initial variables and its loss.

  The default task (``Trainer(config)``) is the score model of ``config``; a noise-conditional
  classifier (:func:`score_sde.classifier.classifier_task`) is another. ``loss_fn(key, params,
  batch) -> (loss, aux)`` with ``aux['metrics']`` logged if present; ``with_labels``: batches are
  ``{'image', 'label'}`` dicts; ``name`` names the network in the checkpoint fingerprint
  (default ``config.model.name``).
  """
  model: Any
  variables: Any
  loss_fn: Optional[Callable] = None
  with_labels: bool = False
  name: Optional[str] = None   # what the checkpoints' fingerprint calls the network



@flax.struct.dataclass
class TrainState:
  """Everything training carries: a plain pytree.

  step: int32 scalar, number of updates applied; params / ema_params: the network's 'params'
  collection and its EMA; opt_state: the optax state; key: raw uint32 PRNG key data [2];
  target_params: the consistency-distillation target network theta- (an EMA of params with rate
  ``consistency.target_ema``) when that is > 0 with ``training.loss='consistency_distillation'``,
  else None;
  power_emas: the post-hoc EMA's power-function EMAs
  (:class:`score_sde.posthoc_ema.PowerEMAs`) when ``config.training.posthoc_ema_every > 0``, else
  None. A None field has no leaves and is not written to checkpoints
  (:mod:`score_sde.checkpointing`), so a state without post-hoc EMAs has exactly the tree, and
  writes exactly the checkpoints, of the state before the field existed.
  """
  step: Array
  params: Any
  opt_state: Any
  ema_params: Any
  key: Array
  power_emas: Any = None
  target_params: Any = None


def _params_of(variables: Any) -> Any:
  if isinstance(variables, (dict, flax.core.FrozenDict)) and "params" in variables:
    others = [k for k in variables if k != "params" and jax.tree.leaves(variables[k])]
    if others:
      raise ValueError(f"Networks with mutable collections {others} are not supported: the train "
                       "state holds the 'params' collection only.")
    return variables["params"]
  return variables


def init_train_state(config, variables: Any, key: Array) -> TrainState:
  """Fresh state: step 0, params = variables['params'], EMA = params, optimizer state of
  :func:`get_optimizer`; with ``config.training.posthoc_ema_every > 0`` also one power EMA per
  ``config.training.posthoc_ema_sigma_rels`` (copies of params), else ``power_emas=None``."""
  from score_sde import posthoc_ema
  params = _params_of(variables)
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.key_data(key)
  every, sigma_rels = posthoc_ema.tracking_of(config)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=get_optimizer(config).init(params),
                    ema_params=jax.tree.map(jnp.array, params), key=jnp.asarray(key),
                    power_emas=posthoc_ema.init_power_emas(params, sigma_rels) if every else None,
                    target_params=(jax.tree.map(jnp.array, params)
                                   if consistency.target_ema_of(config) > 0 else None))


def get_train_step_fn(config, sde: sde_lib.SDE, model: nn.Module,
                      loss_fn: Optional[LossFn] = None):
  """``step(state, batch [batch, *data_shape]) -> (state, metrics)``: one optimizer update.

  key, loss_key = split(state.key); (loss, grads) = value_and_grad(loss_fn)(loss_key, params, batch);
  params <- optax update; ema <- rate ema + (1 - rate) params (rate = config.model.ema_rate);
  step <- step + 1. metrics = {'loss', 'grad_norm' (global norm before clipping), 'lr' (the
  learning rate this update used)} and the loss's own ``aux['metrics']`` if it reports any.
  ``loss_fn`` defaults to the score-model loss of :func:`get_loss_fn` (a classifier, say, passes its
  own ``loss_fn(key, params, batch) -> (loss, aux)``). The loss is the mean over the whole (global) batch, so the
  caller may shard the batch however it likes. With config.training.nan_policy == 'skip' an update
  whose loss or gradient is not finite leaves params, EMA and optimizer state unchanged (step and
  key still advance); with 'stop' (default) it is applied and the caller stops on the metrics.

  With ``config.training.micro_batches = k > 1`` the loss and gradient are accumulated over k
  micro-batches inside the step (:func:`accumulated_value_and_grad`): the same update as the
  full batch up to float round-off, with the activations of B / k examples alive at a time.

  With ``config.training.posthoc_ema_every > 0`` the state's power EMAs are updated too
  (:func:`score_sde.posthoc_ema.update_power_emas`, t = step + 1) with the params the state keeps
  after this update, so a skipped update counts as a step at the unchanged params and each EMA stays
  exactly sum_tau w_tau theta_tau over the params the state held.
  """
  from score_sde import posthoc_ema
  every, sigma_rels = posthoc_ema.tracking_of(config)
  gammas = [float(g) for g in posthoc_ema.sigma_rel_to_gamma(sigma_rels)] if every else None
  loss_fn = loss_fn or get_loss_fn(config, sde, model, train=True)
  tx = get_optimizer(config)
  schedule = get_lr_schedule(config)
  rate = float(config.model.ema_rate)
  if not 0.0 <= rate <= 1.0:
    raise ValueError(f"config.model.ema_rate must be in [0, 1], got {rate}.")
  nan_policy = str(config.training.get("nan_policy", "stop")).lower()
  if nan_policy not in NAN_POLICIES:
    raise ValueError(f"Unknown config.training.nan_policy {nan_policy!r}; choose one of "
                     f"{NAN_POLICIES}.")
  k = micro_batches_of(config)
  if k == 1:
    grad_fn = jax.value_and_grad(loss_fn, argnums=1, has_aux=True)
  else:
    grad_fn = accumulated_value_and_grad(loss_fn, k)
  target_rate = consistency.target_ema_of(config)

  def step_fn(state: TrainState, batch: Array) -> tuple[TrainState, dict]:
    key, loss_key = jax.random.split(state.key)
    if getattr(loss_fn, "uses_train_state", False):
      (loss, aux), grads = grad_fn(loss_key, state.params, batch, _state_info(state))
    else:
      (loss, aux), grads = grad_fn(loss_key, state.params, batch)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema_params = optax.incremental_update(params, state.ema_params, 1.0 - rate)
    target_params = state.target_params
    if (target_params is None) != (target_rate == 0):
      raise ValueError("config.consistency.target_ema and the train state's target_params "
                       "disagree; build the state with init_train_state of the same config.")
    if target_params is not None:   # theta- <- mu theta- + (1 - mu) theta
      target_params = optax.incremental_update(params, target_params, 1.0 - target_rate)
    if nan_policy == "skip":
      ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
      keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
      params, opt_state, ema_params, target_params = keep(
          (params, opt_state, ema_params, target_params),
          (state.params, state.opt_state, state.ema_params, state.target_params))
    power_emas = state.power_emas
    if (power_emas is None) != (gammas is None):
      raise ValueError("config.training.posthoc_ema_every is "
                       f"{'> 0' if gammas else '0'} but the train state "
                       f"{'has no' if gammas else 'has'} power EMAs; build the state with "
                       "init_train_state of the same config.")
    if gammas is not None:
      power_emas = posthoc_ema.update_power_emas(power_emas, params, state.step + 1, gammas)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                              ema_params=ema_params, key=key, power_emas=power_emas,
                              target_params=target_params)
    metrics = {"loss": loss, "grad_norm": grad_norm,
               "lr": jnp.asarray(schedule(state.step), jnp.float32), **aux.get("metrics", {})}
    return new_state, metrics

  return step_fn


def micro_batches_of(config) -> int:
  """``config.training.micro_batches`` (absent or None: 1), checked to be an integer >= 1."""
  k = config.training.get("micro_batches", None)
  k = 1 if k is None else k
  if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
    raise ValueError(f"config.training.micro_batches must be an integer >= 1 (1: no gradient "
                     f"accumulation), got {k!r}.")
  return int(k)


def split_micro_batches(tree: Any, k: int) -> Any:
  """Every leaf [B, ...] -> [k, B / k, ...], micro-batch i holding examples i, i + k, i + 2k, ...

  The strided cut keeps a batch sharded in contiguous per-device blocks evenly sharded: when k
  divides the per-device batch, each device holds B / (k D) examples of every micro-batch and no
  example moves between devices.
  """
  def cut(x):
    if x.shape[0] % k:
      raise ValueError(f"config.training.micro_batches={k} does not divide the batch of "
                       f"{x.shape[0]} examples; choose a divisor of the per-device batch.")
    return jnp.swapaxes(x.reshape((x.shape[0] // k, k) + x.shape[1:]), 0, 1)
  return jax.tree.map(cut, tree)


def accumulated_value_and_grad(loss_fn: SplitLoss, k: int):
  """``value_and_grad(key, params, batch) -> ((loss, aux), grads)`` of ``loss_fn`` accumulated over
  k micro-batches in one ``lax.scan`` (gradient accumulation: ``jax.value_and_grad(loss_fn,
  argnums=1, has_aux=True)`` with the activations of B / k examples alive at a time).

  (draws, dropout_key) = loss_fn.draw(key, batch) for the whole batch, so every example sees the
  t / z / labels it sees in the full-batch step; (batch, draws) are cut into micro-batches M_i
  (:func:`split_micro_batches`) and

    loss = (1/k) sum_i mean_{b in M_i} l_b,    grads = (1/k) sum_i grad_params mean_{b in M_i} l_b,

  equal to the full batch's mean and gradient (equal sizes m = B / k) up to float round-off. The
  network's dropout key of micro-batch i is fold_in(dropout_key, i): with dropout > 0 the masks are
  other draws than the full batch's (same distribution), so only dropout-free losses match to
  round-off. ``aux`` is ``{'metrics': mean over micro-batches of aux['metrics']}`` (per-example
  outputs such as 'losses' are not kept).
  """
  if not isinstance(loss_fn, SplitLoss):
    raise ValueError("config.training.micro_batches > 1 needs a loss built as a "
                     "score_sde.losses.SplitLoss (draw / per_example stages); this task's loss "
                     f"{getattr(loss_fn, '__name__', type(loss_fn).__name__)!r} is not one: set "
                     "micro_batches=1 or split the loss.")

  def mean_loss(params, batch, draws, dropout_key):
    losses, aux = loss_fn.per_example(params, batch, draws, dropout_key)
    return jnp.mean(losses), aux.get("metrics", {})

  grad_fn = jax.value_and_grad(mean_loss, has_aux=True)

  def value_and_grad(key: Array, params: Any, batch: Any):
    draws, dropout_key = loss_fn.draw(key, batch)
    micro = split_micro_batches((batch, draws), k)

    def body(grad_sum, inputs):
      i, (b, d) = inputs
      dk = None if dropout_key is None else jax.random.fold_in(dropout_key, i)
      (loss, metrics), grads = grad_fn(params, b, d, dk)
      return jax.tree.map(jnp.add, grad_sum, grads), (loss, metrics)

    zeros = jax.tree.map(jnp.zeros_like, params)
    grad_sum, (loss, metrics) = jax.lax.scan(body, zeros, (jnp.arange(k), micro))
    grads = jax.tree.map(lambda g: g / k, grad_sum)
    return (jnp.mean(loss), {"metrics": jax.tree.map(jnp.mean, metrics)}), grads

  return value_and_grad


def get_multi_step_fn(step_fn, n: int, unroll: bool = False):
  """``multi_step(state, batches [n, batch, ...]) -> (state, metrics)``: n updates in one lax.scan.

  Metrics are stacked, each ``[n]`` (one entry per update; average them for logging if wanted).
  ``unroll=True`` unrolls the scan (an n-times larger program to compile). It is not needed for
  speed on CPU: our networks use :mod:`score_sde.models.conv`, whose gradients XLA:CPU runs as
  fast inside a loop as outside one.
  """
  n = int(n)
  if n < 1:
    raise ValueError(f"Number of jitted steps must be >= 1, got {n}.")

  def multi_step_fn(state: TrainState, batches: Array):
    leading = {x.shape[0] for x in jax.tree.leaves(batches)}
    if leading != {n}:
      raise ValueError(f"Batches must be stacked as [n_steps={n}, batch, ...]; got leading sizes "
                       f"{sorted(leading)} (config.training.n_jitted_steps vs the data pipeline).")
    return jax.lax.scan(step_fn, state, batches, unroll=bool(unroll))

  return multi_step_fn


def _state_info(state: TrainState) -> dict:
  """What a loss with ``uses_train_state`` (the consistency losses) reads from the state."""
  return {"step": state.step, "target_params": state.target_params}


def get_eval_step_fn(config, sde: sde_lib.SDE, model: nn.Module,
                     loss_fn: Optional[LossFn] = None):
  """``eval_step(state, batch, key) -> loss``: the training loss of the EMA params (no dropout);
  ``loss_fn`` (built with ``train=False``) defaults to :func:`get_loss_fn`'s."""
  loss_fn = loss_fn or get_loss_fn(config, sde, model, train=False)

  def eval_step(state: TrainState, batch: Array, key: Array) -> Array:
    if getattr(loss_fn, "uses_train_state", False):
      return loss_fn(key, state.ema_params, batch, _state_info(state))[0]
    return loss_fn(key, state.ema_params, batch)[0]

  return eval_step
