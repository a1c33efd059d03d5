"""Exact scores and log-densities of Gaussian mixtures perturbed by any of our SDEs.

If x_0 ~ sum_k w_k N(mu_k, Sigma_k) and x_t = alpha(t) x_0 + sigma(t) z, then

    p_t(x) = sum_k w_k N(x; alpha mu_k, alpha^2 Sigma_k + sigma^2 I),

so the score grad_x log p_t(x) and log p_t(x) are closed-form for every t. With
Sigma_k = U_k diag(lam_k) U_k^T the perturbed covariance is U_k diag(alpha^2 lam_k + sigma^2) U_k^T,
so one eigendecomposition at construction serves every t. Plug :meth:`GaussianMixture.score_fn`
into any sampler or the likelihood to test it against the truth.

Data may have any shape ``[batch, *data_shape]``; the mixture lives on the flattened vector of size
D = prod(data_shape).
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from score_sde.sde_lib import SDE

Array = jax.Array


class GaussianMixture:
  """sum_k w_k N(mu_k, Sigma_k) on data of shape ``data_shape``.

  Args:
    means: ``[K, D]`` component means.
    covs: ``[K, D]`` diagonal variances, or ``[K, D, D]`` full covariances.
    weights: ``[K]`` mixture weights (normalized here); uniform if omitted.
    data_shape: shape of one example; defaults to ``(D,)``.
  """

  def __init__(self, means, covs, weights=None, data_shape: Optional[tuple[int, ...]] = None):
    means = np.asarray(means, np.float64)
    covs = np.asarray(covs, np.float64)
    if means.ndim != 2:
      raise ValueError(f"means must be [K, D], got shape {means.shape}.")
    K, D = means.shape
    if covs.shape == (K, D):
      self.eigvecs = None
      eigvals = covs
    elif covs.shape == (K, D, D):
      eigvals, vecs = np.linalg.eigh(covs)
      self.eigvecs = jnp.asarray(vecs, jnp.float32)
    else:
      raise ValueError(f"covs must be [K, D] or [K, D, D] for means {means.shape}, got {covs.shape}.")
    if np.any(eigvals <= 0):
      raise ValueError("Mixture covariances must be positive definite.")
    weights = np.full(K, 1.0 / K) if weights is None else np.asarray(weights, np.float64)
    if weights.shape != (K,) or np.any(weights <= 0):
      raise ValueError(f"weights must be {K} positive numbers, got {weights}.")
    self.data_shape = tuple(data_shape) if data_shape is not None else (D,)
    if int(np.prod(self.data_shape)) != D:
      raise ValueError(f"data_shape {self.data_shape} does not hold D={D} values.")
    self.num_components, self.dim = K, D
    self.weights_np = weights / weights.sum()
    self.means_np, self.covs_np = means, covs
    self.means = jnp.asarray(means, jnp.float32)
    self.eigvals = jnp.asarray(eigvals, jnp.float32)
    self.log_weights = jnp.asarray(np.log(self.weights_np), jnp.float32)

  # --- helpers --------------------------------------------------------------------------------
  def _rotate(self, v: Array) -> Array:
    """v [B, K, D] in data coordinates -> eigen coordinates of each component."""
    if self.eigvecs is None:
      return v
    return jnp.einsum("bkd,kde->bke", v, self.eigvecs)

  def _unrotate(self, v: Array) -> Array:
    if self.eigvecs is None:
      return v
    return jnp.einsum("bke,kde->bkd", v, self.eigvecs)

  def _component_terms(self, x: Array, alpha: Array, sigma: Array):
    """Per-component log N(x) [B, K] and the per-component scores [B, K, D]."""
    xf = x.reshape(x.shape[0], -1).astype(jnp.float32)
    a = alpha.reshape(-1, 1, 1)
    var = a**2 * self.eigvals[None] + sigma.reshape(-1, 1, 1) ** 2  # [B, K, D] eigen coords
    diff = self._rotate(xf[:, None, :] - a * self.means[None])
    log_n = -0.5 * jnp.sum(diff**2 / var + jnp.log(2 * jnp.pi * var), axis=-1)
    scores = self._unrotate(-diff / var)
    return log_n, scores

  def _perturbed(self, x: Array, t: Optional[Array], sde: Optional[SDE]):
    b = x.shape[0]
    if sde is None or t is None:
      return jnp.ones((b,)), jnp.zeros((b,))
    alpha, sigma = sde.marginal_coef(jnp.broadcast_to(t, (b,)))
    return alpha, sigma

  # --- public API ---------------------------------------------------------------------------
  def log_prob(self, x: Array, t: Optional[Array] = None, sde: Optional[SDE] = None) -> Array:
    """log p_t(x) per example ``[batch]`` (p_0, the data density, when ``t`` is None)."""
    log_n, _ = self._component_terms(x, *self._perturbed(x, t, sde))
    return jax.nn.logsumexp(self.log_weights[None] + log_n, axis=-1)

  def posterior(self, x: Array, t: Optional[Array] = None, sde: Optional[SDE] = None) -> Array:
    """p(component k | x_t = x) ``[batch, K]``."""
    return jnp.exp(self.log_posterior(x, t, sde))

  def log_posterior(self, x: Array, t: Optional[Array] = None,
                    sde: Optional[SDE] = None) -> Array:
    """log p(component k | x_t = x) ``[batch, K]``: the exact time-dependent classifier."""
    log_n, _ = self._component_terms(x, *self._perturbed(x, t, sde))
    return jax.nn.log_softmax(self.log_weights[None] + log_n, axis=-1)

  def score(self, x: Array, t: Optional[Array] = None, sde: Optional[SDE] = None,
            labels: Optional[Array] = None) -> Array:
    """grad_x log p_t(x), shaped like ``x``; with ``labels [batch]`` the score of component y."""
    log_n, scores = self._component_terms(x, *self._perturbed(x, t, sde))
    if labels is None:
      resp = jax.nn.softmax(self.log_weights[None] + log_n, axis=-1)
    else:
      resp = jax.nn.one_hot(labels, self.num_components, dtype=scores.dtype)
    return jnp.einsum("bk,bkd->bd", resp, scores).reshape(x.shape).astype(x.dtype)

  def score_fn(self, sde: SDE):
    """The exact ``score_fn(x, t) -> score`` of the mixture perturbed by ``sde``."""
    return lambda x, t: self.score(x, t, sde)

  def conditional_score_fn(self, sde: SDE, labels: Array):
    """Exact score of component ``labels [batch]``: grad_x log p_t(x | y)."""
    return lambda x, t: self.score(x, t, sde, labels=labels)

  def sample(self, key: Array, n: int, return_labels: bool = False):
    """Draws n samples ``[n, *data_shape]`` (and their component labels ``[n]``)."""
    k1, k2 = jax.random.split(key)
    labels = jax.random.categorical(k1, self.log_weights, shape=(n,))
    z = jax.random.normal(k2, (n, self.dim)) * jnp.sqrt(self.eigvals[labels])
    if self.eigvecs is not None:
      z = jnp.einsum("nkd,nd->nk", self.eigvecs[labels], z)
    x = (self.means[labels] + z).reshape((n,) + self.data_shape)
    return (x, labels) if return_labels else x


def standard_mixture(dim: int = 2, num_components: int = 4, radius: float = 2.0,
                     std: float = 0.3, seed: int = 0, weights=None,
                     data_shape: Optional[tuple[int, ...]] = None) -> GaussianMixture:
  """A reproducible test mixture: K isotropic components spread on a sphere of ``radius``.

  In 2-D the means sit evenly on a circle; in higher dimensions they are random unit directions
  (fixed by ``seed``) times ``radius``.
  """
  rng = np.random.default_rng(seed)
  if dim == 2:
    angles = 2 * np.pi * np.arange(num_components) / num_components
    means = radius * np.stack([np.cos(angles), np.sin(angles)], axis=-1)
  else:
    dirs = rng.normal(size=(num_components, dim))
    means = radius * dirs / np.linalg.norm(dirs, axis=-1, keepdims=True)
  covs = np.full((num_components, dim), std**2)
  return GaussianMixture(means, covs, weights=weights, data_shape=data_shape)
