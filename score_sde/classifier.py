"""Noise-conditional (time-dependent) classifiers for classifier guidance.

:class:`score_sde.models.toy.ToyClassifier` (vector data) and
:class:`score_sde.models.wideresnet.WideResnet` (images) are called as
``apply(variables, x_t, sigma(t)) -> logits [batch, K]`` and trained with

    loss = mean_batch(-log softmax(classifier(x_t, sigma(t)))[y]),
    t ~ U(eps, T), x_t = alpha(t) x_0 + sigma(t) z,

by the regular :class:`score_sde.train.Trainer` (:func:`score_sde.train.train_classifier`,
``--mode train_classifier``; checkpoints in ``<workdir>/classifier``): :func:`classifier_task`
hands it the network and this loss.
"""
from __future__ import annotations

import copy
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from score_sde import sde_lib
from score_sde.losses import SplitLoss, Task
from score_sde.conditional import num_classes_of
from score_sde.guidance import LogpGradFn, logp_grad_from_logits
from score_sde.models.toy import ToyClassifier
from score_sde.models.wideresnet import WideResnet
from score_sde.sde_lib import SDE
from score_sde.utils import data_shape

Array = jax.Array

__all__ = ["CLASSIFIERS", "classifier_config", "create_classifier", "get_classifier_logits_fn",
           "get_classifier_logp_grad_fn", "get_classifier_loss_fn", "classifier_task",
           "classifier_run_config"]

CLASSIFIERS = ("toy_mlp", "wideresnet")


def classifier_config(config) -> dict:
  """The classifier settings: ``config.classifier`` fields over these defaults.

  name ('toy_mlp' for vector data, 'wideresnet' for images), num_classes (default
  config.model.num_classes or 10), nf / num_layers (toy), blocks_per_group /
  channel_multiplier (WRN), n_iters, batch_size (default training.batch_size), lr (default
  optim.lr), log_freq, snapshot_freq (defaults from config.training), eps.
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
  cc = classifier_config(config)
  if cc["name"] == "toy_mlp":
    model = ToyClassifier(num_classes=int(cc["num_classes"]), nf=int(cc["nf"]),
                          num_layers=int(cc["num_layers"]))
  else:
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


def get_classifier_loss_fn(sde: SDE, classifier, eps: float = 1e-5):
  """``loss_fn(key, params, batch={'image', 'label'}) -> (loss, {'metrics': {'accuracy'}})``.

  t ~ U(eps, T), z ~ N(0, I), x_t = alpha(t) x_0 + sigma(t) z,
  loss = mean_batch(-log softmax(classifier(x_t, sigma(t)))[y]).
  """
  def draw(key, batch):
    x = batch["image"]
    t_key, z_key = jax.random.split(key)
    t = jax.random.uniform(t_key, (x.shape[0],), minval=eps, maxval=sde.T)
    z = jax.random.normal(z_key, x.shape, x.dtype)
    return {"t": t, "noise": z}, None

  def per_example(params, batch, draws, _):
    x, y = batch["image"], batch["label"]
    mean, sigma = sde.marginal_prob(x, draws["t"])
    logits = classifier.apply({"params": params}, mean + sde_lib.batch_mul(sigma, draws["noise"]),
                              sigma, train=True)
    logp = jax.nn.log_softmax(logits, axis=-1)
    y = y.astype(jnp.int32)
    nll = -jnp.take_along_axis(logp, y[:, None], axis=-1)[:, 0]
    acc = jnp.mean(jnp.argmax(logits, -1) == y)
    return nll, {"metrics": {"accuracy": acc}}
  return SplitLoss(draw, per_example)  # micro-batches: accuracy is a mean over equal sizes


def classifier_run_config(config):
  """The run config of classifier training: ``config`` with the classifier's n_iters, batch size,
  learning rate, logging / snapshot frequencies (no separate preemption checkpoints), and no
  snapshot sampling."""
  cc = classifier_config(config)
  run = copy.deepcopy(config)
  with run.unlocked():
    t = run.training
    t.n_iters, t.batch_size = int(cc["n_iters"]), int(cc["batch_size"])
    t.log_freq, t.snapshot_freq = int(cc["log_freq"]), int(cc["snapshot_freq"])
    t.snapshot_freq_for_preemption = t.snapshot_freq  # kept snapshots only (and on a signal)
    t.snapshot_sampling = False
    run.optim.lr = float(cc["lr"])
  n = int(run.training.n_jitted_steps)
  if t.n_iters % n:
    raise ValueError(f"config.classifier.n_iters={t.n_iters} must be a multiple of "
                     f"config.training.n_jitted_steps={n}.")
  return run


def classifier_task(config, sde: SDE, key: Optional[Array] = None):
  """The :class:`score_sde.losses.Task` that trains the classifier of ``config`` (its parameters
  initialized from ``key``, by default from ``config.seed + 7``)."""
  cc = classifier_config(config)
  key = jax.random.PRNGKey(int(config.seed) + 7) if key is None else key
  model, params = create_classifier(config, key)
  return Task(model=model, variables={"params": params},
              loss_fn=get_classifier_loss_fn(sde, model, float(cc["eps"])), with_labels=True,
              name=f"classifier/{cc['name']}")
