"""Data pipelines: embedded toy sets, MNIST, tfds image sets, FFHQ / CelebA-HQ TFRecords.

    it = get_dataset(config, 'train', start_step=step)     # endless, shuffled, this process's slice
    batch = next(it)      # {'image': f32 [B / R, *data_shape], 'label': i32 [B / R], 'mask': f32}
    x = shard_batch(batch, mesh)['image']                   # one global jax.Array [B, ...]
    x = get_data_scaler(config)(x)                          # [0, 1] -> model space

Determinism: batch i of the training stream is a pure function of ``(config.seed, i)`` (per-epoch
permutations drawn from the seed; flips and dequantization noise keyed per example), so a run
restarted at ``start_step`` sees exactly the batches it would have seen, and R processes
(``jax.process_index()`` of ``jax.process_count()``) each read only their b = B / R rows of every
global batch, whatever R is.

Value ranges: images are yielded in [0, 1] (k / 255, or (k + u) / 256 with uniform
dequantization, u ~ U[0, 1)); the model-space transform is ``get_data_scaler(config)``
(x -> 2x - 1 when ``config.data.centered``). Toy (vector) data are yielded in model space and
their scalers are the identity.

Eval: ``split='eval'`` is one finite pass in file order over the test split ('test' for MNIST,
CIFAR-10, SVHN, CelebA; 'validation' for LSUN, which has no test split; the training file for
FFHQ / CelebA-HQ, which have no held-out split; a fixed set of ``config.data.eval_size`` points
for toy sets). The last batch is padded (with repeats of real examples) and every batch carries
``mask`` (1 = real example, 0 = padding), so every test example is counted exactly once. All
processes see the same number of batches.

Config fields read: ``config.seed``, ``config.training.batch_size`` (global), ``config.eval.
batch_size`` (global), ``config.data.{dataset, image_size, num_channels, centered, random_flip,
uniform_dequantization, data_dir, dim}``; optional ``config.data.{category (LSUN alias),
tfrecords_path, eval_split, download, mnist_resize ('pad' | 'resize'), eval_size (toy),
num_components, gmm_radius, gmm_std, gmm_seed, gmm_weights (gmm)}``.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Optional, Union

import jax
import numpy as np

from score_sde import utils
from score_sde.datasets import images as _images
from score_sde.datasets import toy as _toy
from score_sde.datasets.pipeline import (STREAM_TOY_EVAL, STREAM_TOY_TRAIN, BatchIterator, Plan,
                                         hash_uniform)
from score_sde.datasets.toy import TOY_DATASETS, get_toy_mixture

__all__ = ["get_dataset", "get_data_scaler", "get_data_inverse_scaler", "get_toy_mixture",
           "shard_batch", "available_datasets", "canonical_name", "BatchIterator",
           "hash_uniform", "TOY_DATASETS"]

TFDS_DATASETS = ("mnist", "cifar10", "svhn_cropped", "celeb_a")
TFRECORD_DATASETS = ("ffhq", "celebahq")
# The reference's names (and obvious spellings) -> ours.
_ALIASES = {"cifar10": "cifar10", "cifar-10": "cifar10", "svhn": "svhn_cropped",
            "svhn_cropped": "svhn_cropped", "celeba": "celeb_a", "celeb_a": "celeb_a",
            "mnist": "mnist", "ffhq": "ffhq", "celebahq": "celebahq", "celeba_hq": "celebahq",
            "celeba-hq": "celebahq"}
# name -> (native image size or None, channels, eval split)
_IMAGE_SPECS = {"mnist": (28, 1, "test"), "cifar10": (32, 3, "test"),
                "svhn_cropped": (32, 3, "test"), "celeb_a": (None, 3, "test"),
                "lsun": (None, 3, "validation"), "ffhq": (None, 3, None),
                "celebahq": (None, 3, None)}
CELEBA_CROP = 140
DEFAULT_TOY_EVAL_SIZE = 10_000


def available_datasets() -> tuple[str, ...]:
  return TOY_DATASETS + TFDS_DATASETS + ("lsun/<category>",) + TFRECORD_DATASETS


def canonical_name(config) -> str:
  """``config.data.dataset`` in our spelling (accepts the reference's 'CIFAR10', 'CELEBA', ...)."""
  data = config.data
  raw = data.get("dataset", None)
  if not isinstance(raw, str) or not raw:
    raise ValueError(f"config.data.dataset must be one of {available_datasets()}, got {raw!r}.")
  name = raw.strip().lower()
  if name in TOY_DATASETS:
    return name
  if name == "lsun":
    category = data.get("category", None)
    if not category:
      raise ValueError("config.data.dataset='LSUN' needs config.data.category (e.g. "
                       "'church_outdoor'), or write config.data.dataset='lsun/church_outdoor'.")
    return f"lsun/{category}"
  if name.startswith("lsun/") and len(name) > 5:
    return name
  if name in _ALIASES:
    return _ALIASES[name]
  raise ValueError(f"Unknown dataset {raw!r} in config.data.dataset; choose one of "
                   f"{available_datasets()}.")


def _is_vector(config) -> bool:
  return canonical_name(config) in TOY_DATASETS


# ------------------------------------------------------------------------------------------------
# Scalers.
# ------------------------------------------------------------------------------------------------


def get_data_scaler(config) -> Callable[[Any], Any]:
  """Data in [0, 1] -> model space: y = 2x - 1 if ``config.data.centered`` else y = x.

  The identity for toy (vector) data, which are generated in model space. Works on numpy and
  jax arrays alike.
  """
  if _is_vector(config) or not config.data.centered:
    return lambda x: x
  return lambda x: x * 2.0 - 1.0


def get_data_inverse_scaler(config) -> Callable[[Any], Any]:
  """Inverse of :func:`get_data_scaler`: x = (y + 1) / 2 if centered, else x = y."""
  if _is_vector(config) or not config.data.centered:
    return lambda x: x
  return lambda x: (x + 1.0) / 2.0


# ------------------------------------------------------------------------------------------------
# Validation and sources.
# ------------------------------------------------------------------------------------------------


def _image_transform(name: str, image_size: int, config) -> Optional[Callable]:
  """uint8 [H, W, C] -> uint8 [image_size, image_size, C] for dataset ``name`` (or None)."""
  if name == "mnist":
    mode = config.data.get("mnist_resize", "pad") or "pad"
    if mode not in ("pad", "resize"):
      raise ValueError(f"config.data.mnist_resize must be 'pad' or 'resize', got {mode!r}.")
    if image_size == 28:
      return None
    if mode == "pad":
      if image_size < 28 or (image_size - 28) % 2:
        raise ValueError(f"MNIST is 28x28: zero-padding reaches 28 + 2p (30, 32, ...), not "
                         f"{image_size}; set config.data.image_size=28 or 32, or "
                         "config.data.mnist_resize='resize'.")
      return lambda im: _images.pad_to(im, image_size)
    return lambda im: _images.resize(im, image_size)
  if name in ("cifar10", "svhn_cropped"):
    return None if image_size == 32 else (lambda im: _images.resize(im, image_size))
  if name == "celeb_a":
    if image_size > CELEBA_CROP:
      raise ValueError(f"CelebA is center-cropped to {CELEBA_CROP}x{CELEBA_CROP} and then resized; "
                       f"config.data.image_size={image_size} would upsample. Use <= {CELEBA_CROP}.")
    return lambda im: _images.resize_small(_images.central_crop(im, CELEBA_CROP), image_size)
  if name.startswith("lsun/"):
    if image_size == 128:
      return lambda im: _images.central_crop(_images.resize_small(im, image_size), image_size)
    return lambda im: _images.crop_resize(im, image_size)
  return None


def _check_config(config, name: str) -> None:
  data = config.data
  for flag in ("random_flip", "uniform_dequantization"):
    if name in TOY_DATASETS and data.get(flag, False):
      raise ValueError(f"config.data.{flag}=True applies to images; the toy set {name!r} needs "
                       f"config.data.{flag}=False.")
  if name in TOY_DATASETS:
    dim = data.get("dim", None)
    if not isinstance(dim, (int, np.integer)) or isinstance(dim, bool) or dim <= 0:
      raise ValueError(f"The toy set {name!r} needs config.data.dim (2; any positive size for "
                       f"'gmm'), got {dim!r}.")
    return
  base = "lsun" if name.startswith("lsun/") else name
  native, channels, _ = _IMAGE_SPECS[base]
  if data.get("dim", None):
    raise ValueError(f"{name!r} is an image set: set config.data.dim=None (got {data.dim}); its "
                     "shape comes from config.data.image_size and num_channels.")
  size = data.get("image_size", None)
  if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or size <= 0:
    raise ValueError(f"config.data.image_size must be a positive integer, got {size!r}.")
  if data.get("num_channels", None) != channels:
    raise ValueError(f"{name!r} images have {channels} channel(s); set config.data.num_channels="
                     f"{channels} (got {data.get('num_channels', None)!r}).")
  if base in TFRECORD_DATASETS and (size < 4 or size > 1024 or size & (size - 1)):
    raise ValueError(f"{name!r} TFRecords come in power-of-two resolutions 4 ... 1024; "
                     f"config.data.image_size={size} is not one.")
  _image_transform(name, int(size), config)  # raises on incompatible sizes


def _batch_size(config, split: str) -> int:
  section = "training" if split == "train" else "eval"
  b = config[section].get("batch_size", None)
  if not isinstance(b, (int, np.integer)) or isinstance(b, bool) or b <= 0:
    raise ValueError(f"config.{section}.batch_size must be a positive integer, got {b!r}.")
  return int(b)


def _mnist_source(config, split: str, transform) -> Any:
  data_dir = config.data.get("data_dir", None)
  if data_dir is not None:
    data_dir = os.path.expanduser(str(data_dir))
    if not os.path.isdir(data_dir):
      raise FileNotFoundError(
          f"config.data.data_dir={data_dir!r} does not exist. Point it at a directory holding "
          f"the MNIST idx files {sum(_images.MNIST_FILES.values(), ())} (.gz or not), at a tfds "
          f"data directory containing 'mnist/', or set it to None for tfds' default.")
    if _images.has_mnist_idx(data_dir):
      return _images.mnist_idx_source(data_dir, split, transform)
    if not os.path.isdir(os.path.join(data_dir, "mnist")):
      raise FileNotFoundError(
          f"config.data.data_dir={data_dir!r} holds neither the MNIST idx files "
          f"{sum(_images.MNIST_FILES.values(), ())} (gzipped or not) nor a tfds 'mnist/' "
          f"directory; it holds {sorted(os.listdir(data_dir))[:10]}.")
  return _tfds_source(config, "mnist", split, data_dir, transform, "label")


def _tfds_source(config, name, split, data_dir, transform, label_key) -> _images.TfdsSource:
  size, chans = int(config.data.image_size), int(config.data.num_channels)
  src = _images.tfds_data_source(name, split, data_dir, bool(config.data.get("download", False)))
  return _images.TfdsSource(src, transform or (lambda im: im), (size, size, chans), label_key)


def _make_source(config, name: str, split: str, seed: int) -> Any:
  data = config.data
  if name in TOY_DATASETS:
    if split == "train":
      return _toy.toy_source(config, name, seed=seed, stream=STREAM_TOY_TRAIN, num_examples=None)
    n = int(data.get("eval_size", DEFAULT_TOY_EVAL_SIZE) or DEFAULT_TOY_EVAL_SIZE)
    return _toy.toy_source(config, name, seed=_toy.TOY_EVAL_SEED, stream=STREAM_TOY_EVAL,
                           num_examples=n)
  size, chans = int(data.image_size), int(data.num_channels)
  base = "lsun" if name.startswith("lsun/") else name
  tfds_split = "train" if split == "train" else (data.get("eval_split", None)
                                                  or _IMAGE_SPECS[base][2])
  transform = _image_transform(name, size, config)
  if name == "mnist":
    return _mnist_source(config, tfds_split, transform)
  if base in TFRECORD_DATASETS:
    path = data.get("tfrecords_path", None) or data.get("data_dir", None)
    if not path:
      raise ValueError(f"{name!r} reads TFRecord files: set config.data.tfrecords_path (a "
                       "'*-rNN.tfrecords' file or the directory holding them).")
    path = _images.find_tfrecord(os.path.expanduser(str(path)), size)
    return _images.TFRecordSource(path, (size, size, chans))
  data_dir = data.get("data_dir", None)
  data_dir = None if data_dir is None else os.path.expanduser(str(data_dir))
  label_key = "label" if name in ("cifar10", "svhn_cropped") else None
  return _tfds_source(config, name, tfds_split, data_dir, transform, label_key)


# ------------------------------------------------------------------------------------------------
# Public entry points.
# ------------------------------------------------------------------------------------------------


def get_dataset(config, split: str = "train", *, start_step: int = 0,
                shuffle: Optional[bool] = None, num_epochs: Optional[int] = None,
                process_index: Optional[int] = None, process_count: Optional[int] = None,
                seed: Optional[int] = None, drop_remainder: Optional[bool] = None,
                prefetch: int = 2, num_workers: int = 1) -> BatchIterator:
  """This process's batches of ``split`` ('train' or 'eval'; 'test' is an alias of 'eval').

  Args:
    config: the experiment ConfigDict (fields listed in the module docstring).
    split: 'train' (endless, shuffled, flipped if ``random_flip``) or 'eval' (one ordered pass).
    start_step: index of the first batch (resume a run at its checkpointed step).
    shuffle: per-epoch permutations from the seed; default True for train, False for eval.
    num_epochs: finite passes over the data; default None (endless) for train, 1 for eval.
    process_index, process_count: this process's rank r of R (default: jax's); it receives rows
      [r b, (r + 1) b) of every global batch, b = B / R.
    seed: default ``config.seed``. Vary it between bits/dim repeats for fresh dequantization noise.
    drop_remainder: drop (True) or pad-and-mask (False) a last partial batch of a finite pass;
      default True for train, False for eval.
    prefetch, num_workers: batches computed ahead, by that many background threads.

  Returns:
    A :class:`BatchIterator` of dicts {'image': float32 [b, *data_shape], 'label': int32 [b],
    'mask': float32 [b]}; ``data_shape`` is ``(dim,)`` for toy sets and ``(H, W, C)`` for images.
  """
  if split == "test":
    split = "eval"
  if split not in ("train", "eval"):
    raise ValueError(f"split must be 'train' or 'eval', got {split!r}.")
  name = canonical_name(config)
  _check_config(config, name)
  batch = _batch_size(config, split)
  pc = jax.process_count() if process_count is None else int(process_count)
  pi = jax.process_index() if process_index is None else int(process_index)
  if pc <= 0 or not 0 <= pi < pc:
    raise ValueError(f"process_index={pi} must lie in [0, process_count={pc}).")
  if batch % pc:
    section = "training" if split == "train" else "eval"
    raise ValueError(f"config.{section}.batch_size={batch} (global) is not divisible by the "
                     f"{pc} processes; use a multiple of {pc}.")
  if start_step < 0:
    raise ValueError(f"start_step must be >= 0, got {start_step}.")
  train = split == "train"
  seed = int(config.seed if seed is None else seed)
  source = _make_source(config, name, split, seed)
  expected = utils.data_shape(config)
  if tuple(source.data_shape) != tuple(expected):
    raise ValueError(f"{name!r} yields examples of shape {tuple(source.data_shape)} but the config "
                     f"describes {tuple(expected)} (config.data.dim / image_size / num_channels).")
  if num_epochs is None and not train:
    num_epochs = 1
  if num_epochs is not None:
    if source.num_examples is None:
      raise ValueError(f"The {name!r} training stream is endless fresh samples; num_epochs "
                       "applies to finite data (use split='eval' for a fixed toy test set).")
    if int(num_epochs) <= 0:
      raise ValueError(f"num_epochs must be a positive integer or None, got {num_epochs}.")
  total = None if num_epochs is None else int(num_epochs) * source.num_examples
  plan = Plan(source=source, global_batch=batch, process_index=pi, process_count=pc, seed=seed,
              shuffle=train if shuffle is None else bool(shuffle), total=total,
              drop_remainder=train if drop_remainder is None else bool(drop_remainder),
              random_flip=train and bool(config.data.get("random_flip", False)),
              uniform_dequantization=bool(config.data.get("uniform_dequantization", False)))
  if plan.num_batches == 0:
    raise ValueError(f"{name!r} {split}: {total} examples make no full batch of {batch}; lower "
                     "the batch size or set drop_remainder=False.")
  return BatchIterator(plan, start_step=start_step, prefetch=prefetch, num_workers=num_workers)


def shard_batch(batch: Any, mesh_or_sharding: Union[jax.sharding.Mesh, jax.sharding.Sharding]):
  """Process-local numpy batch -> global ``jax.Array``s sharded over their leading (batch) axis.

  With a ``Mesh`` the batch axis is split over all mesh axes (``P((axis, ...))``); with a
  ``Sharding`` that sharding is used as given. Each process passes only its own rows
  (``jax.make_array_from_process_local_data``), so no host ever holds the global batch; the
  global leading size is local size x process count.
  """
  if isinstance(mesh_or_sharding, jax.sharding.Mesh):
    mesh = mesh_or_sharding
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(tuple(mesh.axis_names)))
    n_local = len(sharding.addressable_devices)
  elif isinstance(mesh_or_sharding, jax.sharding.Sharding):
    sharding, n_local = mesh_or_sharding, None
  else:
    raise TypeError(f"shard_batch needs a jax Mesh or Sharding, got {type(mesh_or_sharding)}.")

  def put(x):
    x = np.asarray(x)
    if n_local is not None and x.shape[0] % n_local:
      raise ValueError(f"The local batch of {x.shape[0]} rows cannot be split over this "
                       f"process's {n_local} devices; make batch_size / process_count a multiple "
                       f"of {n_local}.")
    return jax.make_array_from_process_local_data(sharding, x)

  return jax.tree.map(put, batch)
