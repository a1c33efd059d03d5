"""A small MNIST classifier whose features give a Frechet distance for MNIST samples (not FID).

FID's Inception-v3 was trained on ImageNet photographs; on 28x28 digits its features say little.
The MNIST sampler benchmarks (``experiments.benchmark_samplers_mnist``,
``experiments.compare_reference_samplers_mnist``) instead train this CNN on the MNIST training
split and compare samples with held-out test images by the Frechet distance of the Gaussians fitted
to its penultimate-layer (ReLU) features:

    FD = ||mu_s - mu_r||^2 + tr(S_s) + tr(S_r) - 2 tr((S_s S_r)^{1/2}),

mu / S the mean and unbiased covariance (float64) of the features of the samples (s) and of the
real images (r). It is **not FID**: its values are comparable only between runs that use the same
classifier (same key, steps, batch, learning rate and feature width).

  params = train_classifier(jax.random.PRNGKey(0), train_images, train_labels, steps=600,
                            feature_dim=64)               # uint8 [N, 28, 28, 1], int [N]
  _, feats = classifier_outputs(params, 64, to_unit(test_images))
  fd = feature_fd(sample_feats, feats)

Everything is deterministic given the key: the initialization, the host-side batch draws and the
jitted Adam updates.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from score_sde.evaluation import metrics

Array = jax.Array
IMAGE_SHAPE = (28, 28, 1)

__all__ = ["IMAGE_SHAPE", "FeatureClassifier", "init_params", "train_classifier",
           "classifier_outputs", "feature_fd", "to_unit"]


class FeatureClassifier(nn.Module):
  """Conv(32) ReLU MaxPool -> Conv(64) ReLU MaxPool -> Dense(feature_dim) ReLU -> Dense(10).

  Input: images in [0, 1], [B, 28, 28, 1]. Returns (logits [B, 10], features [B, feature_dim]);
  the features (penultimate layer, after the ReLU) define :func:`feature_fd`.
  """
  feature_dim: int = 64

  @nn.compact
  def __call__(self, x: Array) -> tuple[Array, Array]:
    h = x * 2.0 - 1.0
    h = nn.max_pool(nn.relu(nn.Conv(32, (3, 3))(h)), (2, 2), (2, 2))
    h = nn.max_pool(nn.relu(nn.Conv(64, (3, 3))(h)), (2, 2), (2, 2))
    features = nn.relu(nn.Dense(self.feature_dim)(h.reshape(h.shape[0], -1)))
    return nn.Dense(10)(features), features


def to_unit(images_uint8: np.ndarray) -> np.ndarray:
  """uint8 images [..., 28, 28, 1] -> float32 in [0, 1] (x / 255)."""
  return np.asarray(images_uint8, np.float32) / 255.0


def init_params(key: Array, feature_dim: int) -> Any:
  """Freshly initialized parameters of ``FeatureClassifier(feature_dim)`` (also the template a
  saved parameter tree is restored into)."""
  model = FeatureClassifier(feature_dim)
  return model.init(key, jnp.zeros((1,) + IMAGE_SHAPE, jnp.float32))["params"]


def train_classifier(key: Array, images: np.ndarray, labels: np.ndarray, steps: int,
                     feature_dim: int, batch: int = 128, lr: float = 1e-3) -> Any:
  """Adam on the cross-entropy for ``steps`` steps of ``batch`` random training images; params.

  ``images`` uint8 [N, 28, 28, 1], ``labels`` int [N]. ``key`` splits into the initialization key
  and the seed of a host generator that draws each step's batch indices (with replacement); the
  update is one jitted function.
  """
  model = FeatureClassifier(feature_dim)
  init_key, data_key = jax.random.split(key)
  params = init_params(init_key, feature_dim)
  tx = optax.adam(lr)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, x, y):
    def loss_fn(p):
      logits, _ = model.apply({"params": p}, x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  rng = np.random.default_rng(int(jax.random.randint(data_key, (), 0, 2**31 - 1)))
  for i in range(steps):
    idx = rng.integers(0, len(images), batch)
    params, opt_state, loss = step(params, opt_state, to_unit(images[idx]), labels[idx])
    if (i + 1) % max(1, steps // 5) == 0:
      logging.info("classifier step %d/%d | loss %.4f", i + 1, steps, float(loss))
  return params


def classifier_outputs(params: Any, feature_dim: int, images01: np.ndarray,
                       batch: int = 1000) -> tuple[np.ndarray, np.ndarray]:
  """(logits [N, 10], features [N, feature_dim]) of images in [0, 1] [N, 28, 28, 1], in jitted
  batches of ``batch`` (the last one zero-padded, so one program serves every batch)."""
  model = FeatureClassifier(feature_dim)
  fn = jax.jit(lambda p, x: model.apply({"params": p}, x))
  logits, feats = [], []
  for i in range(0, len(images01), batch):
    chunk = np.asarray(images01[i:i + batch], np.float32)
    pad = batch - len(chunk) if len(images01) > batch else 0  # one compiled shape
    lg, ft = fn(params, np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], np.float32)]))
    logits.append(np.asarray(lg)[:len(chunk)])
    feats.append(np.asarray(ft)[:len(chunk)])
  return np.concatenate(logits), np.concatenate(feats)


def feature_fd(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
  """Frechet distance of the Gaussians fitted to two feature sets [n, d] (float64 mean, unbiased
  covariance: ``metrics.InceptionStats.from_features``; ``metrics.frechet_distance``)."""
  a, b = (metrics.InceptionStats.from_features(f) for f in (feats_a, feats_b))
  return metrics.frechet_distance(a.mu, a.sigma, b.mu, b.sigma)
