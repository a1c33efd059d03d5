"""Inpainting and colorization: a hard data constraint run by the PC and ODE samplers.

Song et al. 2021, app. I.2, with the "replacement" approximation
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

The samplers themselves are the registered 'pc' and 'ode' ones: they call a :class:`Constraint`'s
``project`` (PC) or ``ode_problem`` / ``ode_solution`` (ODE) hooks, and ``finish`` at the end.

Colorization: a gray image g (the channel mean) fixes the first decoupled channel,
(Qx)_0 = sum_c x_c / sqrt(3) = sqrt(3) g; the two other decoupled channels are filled in.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from score_sde.sampling import get_sampler
from score_sde.sampling.base import check_shape
from score_sde.sde_lib import SDE, batch_mul

Array = jax.Array

__all__ = ["Constraint", "get_inpainter", "get_colorizer", "colorization_matrix", "load_array",
           "load_mask", "load_grayscale"]

METHODS = ("pc", "ode")


def colorization_matrix() -> np.ndarray:
  """Orthogonal 3x3 Q whose first column is (1, 1, 1) / sqrt(3): the decoupled channels of a pixel
  x [3] are x @ Q; the first is sqrt(3) times the gray value (channel mean)."""
  return np.stack([np.ones(3) / np.sqrt(3), np.array([-2.0, 1.0, 1.0]) / np.sqrt(6),
                   np.array([0.0, 1.0, -1.0]) / np.sqrt(2)], axis=1)


@jax.tree_util.register_pytree_node_class
class Constraint:
  """The known part of Q x pinned to ``y``: a pytree of ``y`` and ``m`` (both ``[*shape]``, in
  rotated coordinates; m = 1 known) with the rotation ('identity' or 'color') static.

  Per-example slices (``y[i]``, ``m[i]``) are constraints too, so the per-example ODE solves see
  one example's constraint.
  """

  def __init__(self, y: Array, m: Array, rotation: str = "identity"):
    if rotation not in ("identity", "color"):
      raise ValueError(f"rotation must be 'identity' or 'color', got {rotation!r}.")
    self.y, self.m, self.rotation = y, m, rotation

  def tree_flatten(self):
    return (self.y, self.m), self.rotation

  @classmethod
  def tree_unflatten(cls, rotation, children):
    return cls(*children, rotation=rotation)

  def rotate(self, v: Array) -> Array:
    if self.rotation == "identity":
      return v
    return jnp.einsum("...c,cd->...d", v, jnp.asarray(colorization_matrix(), v.dtype))

  def unrotate(self, v: Array) -> Array:
    if self.rotation == "identity":
      return v
    return jnp.einsum("...d,cd->...c", v, jnp.asarray(colorization_matrix(), v.dtype))

  def _pin(self, vr: Array, known: Array) -> Array:
    return vr * (1.0 - self.m) + known * self.m

  # --- PC hook -----------------------------------------------------------------------------
  def project(self, key: Array, x: Array, x_mean: Array, alpha: Array,
              sigma: Array) -> tuple[Array, Array]:
    """Known part of Q x <- alpha y + sigma z and of Q x_mean <- alpha y (alpha, sigma [batch])."""
    z = jax.random.normal(key, x.shape, x.dtype)
    known_mean = batch_mul(alpha, self.y)
    x = self.unrotate(self._pin(self.rotate(x), known_mean + batch_mul(sigma, z)))
    return x, self.unrotate(self._pin(self.rotate(x_mean), known_mean))

  def finish(self, x: Array) -> Array:
    """The known part exactly (alpha = 1, sigma = 0)."""
    return self.unrotate(self._pin(self.rotate(x), self.y))

  # --- ODE hooks -----------------------------------------------------------------------------
  def ode_problem(self, sde: SDE, field: Callable, x_T: Array, cond: Any,
                  key: Array) -> tuple[Array, Any, Callable]:
    """``(y0, args, constrained_field)`` of the per-example solve in rotated coordinates.

    ``field(t, x, cond)`` is the probability-flow drift of one example; the constrained field
    pins the known part to alpha(t) y + sigma(t) z_k and evolves only the unknown part.
    """
    z_k = jax.random.normal(key, x_T.shape, jnp.float32)

    def constrained(t, xr, args):
      c, zz, cc = args
      alpha, sigma = sde.marginal_coef(jnp.asarray(t, jnp.float32))
      full = c._pin(xr, alpha * c.y + sigma * zz)
      return c.rotate(field(t, c.unrotate(full), cc)) * (1.0 - c.m)

    return self.rotate(x_T), (self, z_k, cond), constrained

  def ode_solution(self, sde: SDE, xr: Array, args: Any, eps: float) -> Array:
    """The solution at eps in data coordinates, its known part pinned at eps."""
    _, z_k, _ = args
    alpha, sigma = sde.marginal_coef(jnp.full((xr.shape[0],), eps, jnp.float32))
    return self.unrotate(self._pin(xr, batch_mul(alpha, self.y) + batch_mul(sigma, z_k)))


def _check_data(name: str, data, shape: tuple[int, ...]) -> Array:
  arr = jnp.asarray(data, jnp.float32)
  if tuple(arr.shape) != shape:
    raise ValueError(f"{name} must have the sampler's shape {shape}, got {tuple(arr.shape)}.")
  return arr


def _broadcast_mask(mask, shape: tuple[int, ...]) -> Array:
  """Mask broadcast to ``shape``; accepts [*shape], [*data_shape] and any shape that broadcasts
  (e.g. [H, W, 1] or [batch, H, W, 1] for images). Values must be 0 or 1."""
  concrete = not isinstance(mask, jax.core.Tracer)
  m = np.asarray(mask) if concrete else mask
  mshape = tuple(m.shape)
  try:
    ok = np.broadcast_shapes(mshape, shape) == shape
  except ValueError:
    ok = False
  if not ok:
    raise ValueError(f"Mask shape {mshape} does not match the data shape {shape}: use "
                     f"{shape}, {shape[1:]} or a shape that broadcasts to it (1 = known, 0 = "
                     "to fill in).")
  if concrete and not np.all((m == 0) | (m == 1)):
    raise ValueError("Mask values must be 0 (fill in) or 1 (known); threshold it first "
                     "(load_mask does).")
  return jnp.broadcast_to(jnp.asarray(m, jnp.float32), shape)


def _constrained_sampler(sde: SDE, shape, method: str, options: dict):
  if not isinstance(sde, SDE):
    raise ValueError(f"sde must be a score_sde.sde_lib.SDE, got {type(sde).__name__}.")
  if method not in METHODS:
    raise ValueError(f"Inpainting / colorization support method='pc' or 'ode', got {method!r}.")
  options = dict(options)
  if method == "ode" and "ode_method" in options:
    options["method"] = options.pop("ode_method")
  if method == "pc":  # the paper's setting
    options.setdefault("predictor", "reverse_diffusion")
    options.setdefault("corrector", "langevin")
  return get_sampler(method, sde, shape, **options)


def get_inpainter(sde: SDE, shape: Sequence[int], method: str = "pc", **options):
  """Inpainting sampler: ``inpaint(key, score_fn, data [*shape], mask) -> (x [*shape], nfe)``.

  ``mask`` (1 = known, 0 = fill in) has shape ``shape``, ``shape[1:]`` or any shape broadcasting
  to it. The known part of the result equals ``data`` exactly; the rest is sampled from the
  replacement approximation of p(x_unknown | x_known = data) (module docstring). ``method``: 'pc'
  (the PC sampler's options; default reverse_diffusion + langevin as in the paper) or 'ode' (the
  ODE sampler's options; its solver is given as ``ode_method``). One jitted program per score_fn.
  """
  shape = check_shape(shape)
  sampler = _constrained_sampler(sde, shape, method, options)

  def inpaint(key, score_fn, data, mask):
    y = _check_data("Inpainting data", data, shape)
    m = _broadcast_mask(mask, shape)
    return sampler(key, score_fn, constraint=Constraint(y * m, m))
  return inpaint


def get_colorizer(sde: SDE, shape: Sequence[int], method: str = "pc", **options):
  """Colorization sampler: ``colorize(key, score_fn, gray) -> (x [*shape], nfe)``.

  ``shape`` is ``[batch, H, W, 3]``; ``gray`` is the channel mean of the wanted image, shaped
  ``[batch, H, W]``, ``[batch, H, W, 1]`` or ``[batch, H, W, 3]`` (equal channels are averaged).
  The result's channel mean equals ``gray`` (up to float round-off of the orthogonal rotation).
  Options as :func:`get_inpainter`.
  """
  shape = check_shape(shape)
  if len(shape) != 4 or shape[-1] != 3:
    raise ValueError(f"Colorization needs RGB images [batch, H, W, 3], got shape {shape}.")
  sampler = _constrained_sampler(sde, shape, method, options)
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
    return sampler(key, score_fn, constraint=Constraint(y, m, rotation="color"))
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
  from PIL import Image
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
