"""Inception-v3 of the 2015-12-05 TensorFlow graph, the FID / IS feature extractor, in Flax.

This is the network that FID and IS numbers in the score-SDE, EDM and pytorch-fid papers were
computed with (`inception-2015-12-05.tgz`, ported to PyTorch by pytorch-fid as
`pt_inception-2015-12-05-6726825d.pth`). It is torchvision's Inception-v3 layout (NHWC here) with
the FID-specific differences of that graph:

* `Mixed_5b..5d` (A), `Mixed_6b..6e` (C) and `Mixed_7b` (E_1) average-pool their pool branch
  with TensorFlow's SAME padding, i.e. the padded zeros are NOT counted (count_include_pad=False);
* `Mixed_7c` (E_2) max-pools its pool branch instead of average-pooling it;
* the classifier `fc` has 1008 outputs (the 2015 graph's softmax layer), used for IS.

Every conv is `BasicConv2d`: conv (no bias) -> BatchNorm (inference statistics, eps = 1e-3)
-> ReLU. Parameter names follow the PyTorch state dict (`Mixed_5b/branch1x1/conv/kernel`,
`.../bn/{scale,bias}` in `params`, `.../bn/{mean,var}` in `batch_stats`), so converting the
pytorch-fid weights is a rename plus a transpose (`score_sde.evaluation.weights`).

Input pipeline (`preprocess`, used by `get_inception_fn`):
  1. images `[B, H, W, C]`: integer dtypes are read as [0, 255], floating dtypes as [0, 1];
     C = 1 (grayscale) is repeated to 3 channels.
  2. resize to 299 x 299 (`resize_method`):
     - "bilinear" (default): half-pixel-centre bilinear, src = (dst + 1/2) H/299 - 1/2 clamped
       to [0, H - 1], no antialiasing. This is exactly PyTorch's
       `F.interpolate(mode='bilinear', align_corners=False)` used by pytorch-fid (and equals
       `jax.image.resize(method='linear', antialias=False)`); agreement is float32 round-off.
     - "tf1_bilinear": legacy TF1 `tf.compat.v1.image.resize_bilinear` (align_corners=False,
       half_pixel_centers=False): src = dst H/299, used by tf-gan's `preprocess_image` and hence
       by TF-based FID code; it shifts the image by about half an input pixel relative to
       "bilinear" and changes FID slightly (compare numbers only within one choice).
     Both are separable and applied as two small interpolation matrices (exact, MXU/TensorCore
     friendly). Upsampling is the common case (32 / 64 / 256 -> 299); for large downsampling
     neither method antialiases, like the references.
  3. scale to [-1, 1] (`normalization`):
     - "pytorch_fid" (default): x_01 * 2 - 1, i.e. x_255 / 127.5 - 1 (pytorch-fid, score_sde's
       tf-hub path);
     - "tf_graph": (x_255 - 128) / 128 (the 2015 graph's own Sub/Mul nodes and tf-gan).

Outputs: `pool_3` `[B, 2048]` (global average pool of Mixed_7c, the FID / KID features) and
`logits` `[B, 1008]` = pool_3 @ W + b (IS). The original IS code (improved-GAN, StyleGAN's
`no_output_bias=True`) drops the bias b: `get_inception_fn(..., logits_bias=False)`.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

INCEPTION_SIZE = 299
POOL3_DIM = 2048
NUM_LOGITS = 1008
FEATURE_EXTRACTOR = "inception-2015-12-05"
RESIZE_METHODS = ("bilinear", "tf1_bilinear")
NORMALIZATIONS = ("pytorch_fid", "tf_graph")


class BasicConv2d(nn.Module):
  """conv (no bias, explicit symmetric padding) -> BatchNorm (running stats, eps 1e-3) -> ReLU."""
  features: int
  kernel_size: tuple[int, int]
  strides: tuple[int, int] = (1, 1)
  padding: tuple[int, int] = (0, 0)
  precision: Any = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    ph, pw = self.padding
    x = nn.Conv(self.features, self.kernel_size, self.strides, padding=((ph, ph), (pw, pw)),
                use_bias=False, precision=self.precision, name="conv")(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name="bn")(x)
    return nn.relu(x)


def _avg_pool_same(x: Array) -> Array:
  """3x3 stride-1 average pool, padding 1, padded zeros not counted (TF SAME pooling)."""
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)),
                     count_include_pad=False)


def _max_pool(x: Array, stride: int, pad: int) -> Array:
  return nn.max_pool(x, (3, 3), strides=(stride, stride), padding=((pad, pad), (pad, pad)))


class InceptionA(nn.Module):
  """35x35 block (Mixed_5b..5d): 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool(no pad count)-1x1."""
  pool_features: int
  precision: Any = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    conv = functools.partial(BasicConv2d, precision=self.precision)
    b1 = conv(64, (1, 1), name="branch1x1")(x)
    b5 = conv(48, (1, 1), name="branch5x5_1")(x)
    b5 = conv(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
    b3 = conv(64, (1, 1), name="branch3x3dbl_1")(x)
    b3 = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
    b3 = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
    bp = conv(self.pool_features, (1, 1), name="branch_pool")(_avg_pool_same(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  """Grid reduction 35 -> 17 (Mixed_6a): 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2."""
  precision: Any = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    conv = functools.partial(BasicConv2d, precision=self.precision)
    b3 = conv(384, (3, 3), strides=(2, 2), name="branch3x3")(x)
    bd = conv(64, (1, 1), name="branch3x3dbl_1")(x)
    bd = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = conv(96, (3, 3), strides=(2, 2), name="branch3x3dbl_3")(bd)
    return jnp.concatenate([b3, bd, _max_pool(x, 2, 0)], axis=-1)


class InceptionC(nn.Module):
  """17x17 block (Mixed_6b..6e) with factorized 7x7 convs of width `channels_7x7`."""
  channels_7x7: int
  precision: Any = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    conv = functools.partial(BasicConv2d, precision=self.precision)
    c7 = self.channels_7x7
    b1 = conv(192, (1, 1), name="branch1x1")(x)
    b7 = conv(c7, (1, 1), name="branch7x7_1")(x)
    b7 = conv(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
    b7 = conv(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
    bd = conv(c7, (1, 1), name="branch7x7dbl_1")(x)
    bd = conv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
    bd = conv(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
    bd = conv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
    bd = conv(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
    bp = conv(192, (1, 1), name="branch_pool")(_avg_pool_same(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  """Grid reduction 17 -> 8 (Mixed_7a): 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2."""
  precision: Any = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    conv = functools.partial(BasicConv2d, precision=self.precision)
    b3 = conv(192, (1, 1), name="branch3x3_1")(x)
    b3 = conv(320, (3, 3), strides=(2, 2), name="branch3x3_2")(b3)
    b7 = conv(192, (1, 1), name="branch7x7x3_1")(x)
    b7 = conv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
    b7 = conv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
    b7 = conv(192, (3, 3), strides=(2, 2), name="branch7x7x3_4")(b7)
    return jnp.concatenate([b3, b7, _max_pool(x, 2, 0)], axis=-1)


class InceptionE(nn.Module):
  """8x8 block (Mixed_7b / 7c). `pool`: "avg" (E_1, no pad count) or "max" (E_2, the FID graph)."""
  pool: str = "avg"
  precision: Any = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    conv = functools.partial(BasicConv2d, precision=self.precision)
    b1 = conv(320, (1, 1), name="branch1x1")(x)
    b3 = conv(384, (1, 1), name="branch3x3_1")(x)
    b3 = jnp.concatenate([conv(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
                          conv(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3)], axis=-1)
    bd = conv(448, (1, 1), name="branch3x3dbl_1")(x)
    bd = conv(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = jnp.concatenate([conv(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
                          conv(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd)], axis=-1)
    pooled = _avg_pool_same(x) if self.pool == "avg" else _max_pool(x, 1, 1)
    bp = conv(192, (1, 1), name="branch_pool")(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class InceptionV3(nn.Module):
  """FID Inception-v3: x `[B, H, W, 3]` in [-1, 1] (H, W >= 75; 299 for the standard metrics)
  -> {"pool_3": [B, 2048], "logits": [B, 1008]}.

  `precision` is passed to every conv (None = backend default, which may use TF32 / bf16 passes on
  GPU / TPU; "highest" = full float32, what the reference numbers were computed with).
  """
  num_classes: int = NUM_LOGITS
  precision: Any = None

  @nn.compact
  def __call__(self, x: Array) -> dict[str, Array]:
    if x.ndim != 4 or x.shape[-1] != 3:
      raise ValueError(f"InceptionV3 expects [B, H, W, 3] images in [-1, 1], got {x.shape}.")
    if min(x.shape[1:3]) < 75:
      raise ValueError(f"InceptionV3 needs H, W >= 75 (got {x.shape[1:3]}); resize first "
                       "(get_inception_fn resizes to 299 by default).")
    p = self.precision
    conv = functools.partial(BasicConv2d, precision=p)
    x = conv(32, (3, 3), strides=(2, 2), name="Conv2d_1a_3x3")(x)
    x = conv(32, (3, 3), name="Conv2d_2a_3x3")(x)
    x = conv(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
    x = _max_pool(x, 2, 0)
    x = conv(80, (1, 1), name="Conv2d_3b_1x1")(x)
    x = conv(192, (3, 3), name="Conv2d_4a_3x3")(x)
    x = _max_pool(x, 2, 0)
    x = InceptionA(32, p, name="Mixed_5b")(x)
    x = InceptionA(64, p, name="Mixed_5c")(x)
    x = InceptionA(64, p, name="Mixed_5d")(x)
    x = InceptionB(p, name="Mixed_6a")(x)
    x = InceptionC(128, p, name="Mixed_6b")(x)
    x = InceptionC(160, p, name="Mixed_6c")(x)
    x = InceptionC(160, p, name="Mixed_6d")(x)
    x = InceptionC(192, p, name="Mixed_6e")(x)
    x = InceptionD(p, name="Mixed_7a")(x)
    x = InceptionE("avg", p, name="Mixed_7b")(x)
    x = InceptionE("max", p, name="Mixed_7c")(x)
    pool_3 = jnp.mean(x, axis=(1, 2))
    logits = nn.Dense(self.num_classes, precision=p, name="fc")(pool_3)
    return {"pool_3": pool_3, "logits": logits}


def init_inception(seed: int = 0, image_size: int = INCEPTION_SIZE) -> dict[str, Any]:
  """Random variables {"params", "batch_stats"} (numpy float32) for tests and benchmarks only.

  FID / IS need the real weights (`weights.load_inception_variables`). Filled with numpy instead
  of `InceptionV3().init` (whose compilation takes over a minute on CPU): conv kernels
  N(0, 2 / fan_in), BN scale / var ~ U(0.5, 1.5), BN bias / mean ~ N(0, 0.1^2), fc kernel N(0, 2/2048),
  so activations stay O(1) through the depth and every BN statistic matters.
  """
  import flax
  rng = np.random.default_rng(seed)
  flat = flax.traverse_util.flatten_dict(
      {col: flax.core.unfreeze(v) for col, v in variable_shapes(image_size).items()})
  out = {}
  for key, spec in flat.items():
    shape, leaf = tuple(spec.shape), key[-1]
    if leaf == "kernel":
      value = rng.normal(0.0, np.sqrt(2.0 / np.prod(shape[:-1])), shape)
    elif leaf in ("scale", "var"):
      value = rng.uniform(0.5, 1.5, shape)
    else:  # BN bias / mean, fc bias
      value = rng.normal(0.0, 0.1, shape)
    out[key] = value.astype(np.float32)
  return flax.traverse_util.unflatten_dict(out)


@functools.lru_cache(maxsize=4)
def variable_shapes(image_size: int = INCEPTION_SIZE) -> dict[str, Any]:
  """Shapes / dtypes of the variables, without allocating them (jax.ShapeDtypeStruct pytree)."""
  return jax.eval_shape(InceptionV3().init, jax.random.key(0),
                        jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32))


def interpolation_matrix(n_in: int, n_out: int, method: str = "bilinear") -> np.ndarray:
  """Linear-interpolation matrix R `[n_out, n_in]` (float64) with resized = R @ signal.

  "bilinear": src = max((dst + 1/2) n_in / n_out - 1/2, 0) (PyTorch align_corners=False);
  "tf1_bilinear": src = dst n_in / n_out (TF1 resize_bilinear, half_pixel_centers=False).
  Then i0 = floor(src), i1 = min(i0 + 1, n_in - 1), weights (1 - l, l) with l = src - i0.
  """
  if method not in RESIZE_METHODS:
    raise ValueError(f"Unknown resize_method {method!r}; use one of {RESIZE_METHODS}.")
  scale = n_in / n_out
  dst = np.arange(n_out, dtype=np.float64)
  if method == "bilinear":
    src = np.maximum((dst + 0.5) * scale - 0.5, 0.0)
  else:
    src = dst * scale
  i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
  i1 = np.minimum(i0 + 1, n_in - 1)
  lam = src - i0
  r = np.zeros((n_out, n_in), np.float64)
  np.add.at(r, (np.arange(n_out), i0), 1.0 - lam)
  np.add.at(r, (np.arange(n_out), i1), lam)
  return r


def resize(images: Array, size: int = INCEPTION_SIZE, method: str = "bilinear",
           precision: Any = jax.lax.Precision.HIGHEST) -> Array:
  """Separable bilinear resize of float images `[B, H, W, C]` -> `[B, size, size, C]`."""
  _, h, w, _ = images.shape
  rh = jnp.asarray(interpolation_matrix(h, size, method), jnp.float32)
  rw = jnp.asarray(interpolation_matrix(w, size, method), jnp.float32)
  x = jnp.einsum("oh,bhwc->bowc", rh, images, precision=precision)
  return jnp.einsum("pw,bowc->bopc", rw, x, precision=precision)


def preprocess(images: Array, resize_to: Optional[int] = INCEPTION_SIZE,
               resize_method: str = "bilinear", normalization: str = "pytorch_fid") -> Array:
  """uint8 [0, 255] or float [0, 1] images `[B, H, W, 1 | 3]` -> float32 `[B, S, S, 3]` in [-1, 1].

  Scaling happens on the [0, 255] scale after resizing (resizing is linear, so the order does not
  matter up to round-off). See the module docstring for the methods.
  """
  if normalization not in NORMALIZATIONS:
    raise ValueError(f"Unknown normalization {normalization!r}; use one of {NORMALIZATIONS}.")
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f"Images must be [B, H, W, 1 or 3] (NHWC), got shape {images.shape}.")
  x = images.astype(jnp.float32)
  if jnp.issubdtype(images.dtype, jnp.floating):
    x = x * 255.0
  if x.shape[-1] == 1:
    x = jnp.repeat(x, 3, axis=-1)
  if resize_to is not None and x.shape[1:3] != (resize_to, resize_to):
    x = resize(x, resize_to, resize_method)
  if normalization == "pytorch_fid":
    return x / 127.5 - 1.0
  return (x - 128.0) / 128.0


def feature_extractor_name(resize_method: str = "bilinear",
                           normalization: str = "pytorch_fid") -> str:
  """Name stored in statistics files: features are only comparable under the same name."""
  return f"{FEATURE_EXTRACTOR}/pool_3/{resize_method}/{normalization}"


@functools.partial(jax.jit, static_argnames=("size", "resize_method", "normalization",
                                             "precision", "logits_bias"))
def _features(variables, images, *, size, resize_method, normalization, precision, logits_bias):
  """preprocess -> InceptionV3 -> {"pool_3", "logits"}; one module-level jit, so every feature
  function with the same static options shares its compilations."""
  x = preprocess(images, size, resize_method, normalization)
  out = InceptionV3(precision=precision).apply(variables, x)
  if not logits_bias:
    kernel = variables["params"]["fc"]["kernel"]
    out = dict(out, logits=jnp.dot(out["pool_3"], kernel, precision=precision))
  return out


def get_inception_fn(variables: dict[str, Any], resize: Union[bool, int] = True,
                     resize_method: str = "bilinear", normalization: str = "pytorch_fid",
                     precision: Any = "highest", logits_bias: bool = True
                     ) -> Callable[[Array], dict[str, Array]]:
  """A jitted feature function images -> {"pool_3": [B, 2048] f32, "logits": [B, 1008] f32}.

  variables: {"params", "batch_stats"} from `weights.load_inception_variables` (or
  `init_inception` for random weights). images: `[B, H, W, 1 | 3]`, uint8 in [0, 255] or float in
  [0, 1]. resize=True resizes to 299 (the standard protocol); resize=False feeds the images at
  their own size (H, W >= 75); an integer S >= 75 resizes to S x S (tests / smoke runs only: the
  feature-extractor name then carries "/S", so its statistics never mix with 299 ones).
  precision: conv / matmul precision ("highest" = true float32; None = backend default, faster on GPU/TPU through TF32 / bf16 passes, slightly different FID).
  logits_bias=False returns pool_3 @ W without the fc bias (the original IS code).
  One compilation per input shape / dtype / sharding, shared by all feature functions.
  """
  if resize_method not in RESIZE_METHODS:
    raise ValueError(f"Unknown resize_method {resize_method!r}; use one of {RESIZE_METHODS}.")
  if normalization not in NORMALIZATIONS:
    raise ValueError(f"Unknown normalization {normalization!r}; use one of {NORMALIZATIONS}.")
  missing = {"params", "batch_stats"} - set(variables)
  if missing:
    raise ValueError(f"variables must hold 'params' and 'batch_stats'; missing {sorted(missing)}.")
  size = None
  if resize is True:
    size = INCEPTION_SIZE
  elif resize is not False:
    size = int(resize)
    if size < 75:
      raise ValueError(f"The Inception input size must be >= 75, got resize={resize}.")
  features = functools.partial(_features, size=size, resize_method=resize_method,
                               normalization=normalization, precision=precision,
                               logits_bias=logits_bias)

  def inception_fn(images) -> dict[str, Array]:
    images = jnp.asarray(images)
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
      raise ValueError(f"Images must be [B, H, W, 1 or 3] (NHWC), got shape {images.shape}.")
    if not resize and min(images.shape[1:3]) < 75:
      raise ValueError(f"resize=False needs H, W >= 75, got {images.shape[1:3]}.")
    return features(variables, images)

  inception_fn.feature_extractor = feature_extractor_name(resize_method, normalization)
  if size not in (None, INCEPTION_SIZE):
    inception_fn.feature_extractor += f"/{size}"
  return inception_fn
