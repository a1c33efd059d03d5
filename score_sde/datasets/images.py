"""Image sources: MNIST idx files, tfds ``data_source`` (array_record), FFHQ / CelebA-HQ TFRecords.

Every source returns 8-bit images ``uint8 [n, image_size, image_size, C]`` already cropped and
resized; the float conversion, flips and dequantization happen in the pipeline. Resizing runs in
PIL (antialiased bilinear / bicubic, like the reference's ``tf.image.resize(antialias=True)``,
not bit-identical to it) and rounds back to 8 bits, so the data stay exactly 8-bit and uniform
dequantization / bits/dim keep their meaning.

No TensorFlow anywhere: TFRecord framing is read directly (length header checked with the masked
CRC-32C) and records are parsed with the ``tf.train.Example`` proto that tfds ships.
"""
from __future__ import annotations

import functools
import gzip
import os
import struct
import sys
import threading
from typing import Callable, Optional, Sequence

import numpy as np
from PIL import Image

# ------------------------------------------------------------------------------------------------
# Resize / crop ops on one uint8 image [H, W, C] (the reference's definitions).
# ------------------------------------------------------------------------------------------------


def _pil_resize(image: np.ndarray, height: int, width: int, method) -> np.ndarray:
  if image.shape[:2] == (height, width):
    return image
  chans = image.shape[2]
  if chans == 1:
    out = np.asarray(Image.fromarray(image[..., 0]).resize((width, height), method))[..., None]
  else:
    out = np.asarray(Image.fromarray(image).resize((width, height), method))
  return out.astype(np.uint8)


def central_crop(image: np.ndarray, size: int) -> np.ndarray:
  """The size x size window with top = (H - size) // 2, left = (W - size) // 2."""
  h, w = image.shape[:2]
  if h < size or w < size:
    raise ValueError(f"Cannot crop {size}x{size} from an image of {h}x{w}.")
  top, left = (h - size) // 2, (w - size) // 2
  return image[top:top + size, left:left + size]


def resize_small(image: np.ndarray, resolution: int) -> np.ndarray:
  """Resize so the shorter side is ``resolution`` (aspect kept, round half to even), bilinear."""
  h, w = image.shape[:2]
  ratio = resolution / min(h, w)
  return _pil_resize(image, int(np.round(h * ratio)), int(np.round(w * ratio)), Image.BILINEAR)


def crop_resize(image: np.ndarray, resolution: int) -> np.ndarray:
  """Central square crop of side min(H, W), then bicubic resize to resolution x resolution."""
  h, w = image.shape[:2]
  crop = min(h, w)
  image = image[(h - crop) // 2:(h + crop) // 2, (w - crop) // 2:(w + crop) // 2]
  return _pil_resize(image, resolution, resolution, Image.BICUBIC)


def resize(image: np.ndarray, resolution: int) -> np.ndarray:
  return _pil_resize(image, resolution, resolution, Image.BILINEAR)


def pad_to(image: np.ndarray, resolution: int) -> np.ndarray:
  """Zero-pads a square image evenly on all sides to resolution x resolution."""
  p = (resolution - image.shape[0]) // 2
  return np.pad(image, ((p, p), (p, p), (0, 0)))


# ------------------------------------------------------------------------------------------------
# In-memory arrays (MNIST idx).
# ------------------------------------------------------------------------------------------------


class ArraySource:
  """All images in memory: ``images uint8 [N, H, W, C]`` (already final size), ``labels [N]``."""
  is_image = True

  def __init__(self, images: np.ndarray, labels: np.ndarray):
    self.images, self.labels = images, np.asarray(labels, np.int32)
    self.num_examples = len(images)
    self.data_shape = tuple(images.shape[1:])

  def read(self, indices: np.ndarray):
    return self.images[indices], self.labels[indices]


MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def find_idx_file(directory: str, name: str) -> Optional[str]:
  for candidate in (name, name + ".gz"):
    path = os.path.join(directory, candidate)
    if os.path.isfile(path):
      return path
  return None


def has_mnist_idx(directory: str) -> bool:
  return any(find_idx_file(directory, f) for files in MNIST_FILES.values() for f in files)


@functools.lru_cache(maxsize=4)
def read_idx(path: str) -> np.ndarray:
  """An idx file (optionally gzipped): big-endian magic (0x08 = uint8, ndim), dims, data."""
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rb") as f:
    raw = f.read()
  if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
    raise ValueError(f"{path} is not an idx file of unsigned bytes (bad magic {raw[:4]!r}).")
  ndim = raw[3]
  dims = struct.unpack(">" + "I" * ndim, raw[4:4 + 4 * ndim])
  data = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
  if data.size != int(np.prod(dims)):
    raise ValueError(f"{path}: header says {dims} but holds {data.size} bytes of data.")
  arr = data.reshape(dims)
  arr.flags.writeable = False
  return arr


def mnist_idx_source(directory: str, split: str, transform: Callable) -> ArraySource:
  """MNIST from the standard idx files in ``directory`` (``split`` 'train' or 'test')."""
  names = MNIST_FILES[split]
  paths = [find_idx_file(directory, n) for n in names]
  missing = [n for n, p in zip(names, paths) if p is None]
  if missing:
    raise FileNotFoundError(
        f"MNIST {split} split: {directory} lacks {', '.join(m + '[.gz]' for m in missing)}. "
        f"Expected the four standard idx files {sum(MNIST_FILES.values(), ())} (gzipped or not).")
  images, labels = read_idx(paths[0]), read_idx(paths[1])
  if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
    raise ValueError(f"MNIST idx files disagree: images {images.shape}, labels {labels.shape}.")
  out = images[..., None]
  if transform is not None:
    out = np.stack([transform(im) for im in out])
  return ArraySource(np.ascontiguousarray(out), labels.astype(np.int32))


# ------------------------------------------------------------------------------------------------
# tfds data_source (array_record), no TensorFlow.
# ------------------------------------------------------------------------------------------------


class TfdsSource:
  """A tfds random-access data source, each example cropped / resized by ``transform``."""
  is_image = True

  def __init__(self, source: Sequence, transform: Callable, data_shape: tuple[int, ...],
               label_key: Optional[str] = "label"):
    self.source, self.transform, self.label_key = source, transform, label_key
    self.num_examples = len(source)
    self.data_shape = tuple(data_shape)

  def _get(self, indices: np.ndarray) -> list:
    keys = [int(i) for i in indices]
    getitems = getattr(self.source, "__getitems__", None)
    if getitems is not None and not isinstance(self.source, (list, tuple)):
      return list(getitems(keys))
    return [self.source[k] for k in keys]

  def read(self, indices: np.ndarray):
    examples = self._get(indices)
    images = np.stack([self.transform(np.asarray(ex["image"], np.uint8)) for ex in examples])
    if images.shape[1:] != self.data_shape:
      raise ValueError(f"Preprocessed images have shape {images.shape[1:]}, expected "
                       f"{self.data_shape}: check config.data.image_size / num_channels.")
    if self.label_key is None:
      labels = np.zeros(len(examples), np.int32)
    else:
      labels = np.asarray([int(ex.get(self.label_key, 0)) for ex in examples], np.int32)
    return images, labels


def tfds_data_source(name: str, split: str, data_dir: Optional[str], download: bool = False):
  """``tfds.data_source(name, split=split, data_dir=data_dir)`` with a clear message when the
  dataset is not prepared in a random-access format."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  if data_dir is not None and not os.path.isdir(data_dir):
    raise FileNotFoundError(f"config.data.data_dir={data_dir!r} does not exist (tfds data "
                            f"directory for {name!r}; None means tfds' default).")
  try:
    return tfds.data_source(name, split=split, data_dir=data_dir, download=download)
  except (NotImplementedError, AssertionError, FileNotFoundError) as e:
    where = data_dir or "the tfds default data_dir (~/tensorflow_datasets or $TFDS_DATA_DIR)"
    raise FileNotFoundError(
        f"tfds dataset {name!r} (split {split!r}) is not available in array_record format under "
        f"{where}. Prepare it once with `tfds build {name} --file_format=array_record "
        f"--data_dir=...` (preparing needs TensorFlow), convert an existing TFRecord copy with "
        f"`tfds convert_format --root_data_dir=... --out_file_format=array_record`, or set "
        f"config.data.download=True. tfds said: {e}") from e


# ------------------------------------------------------------------------------------------------
# TFRecord files of serialized tf.train.Example {'shape': int64 [3] (C, H, W), 'data': bytes}
# (the progressive-GAN dataset_tool layout used for FFHQ and CelebA-HQ).
# ------------------------------------------------------------------------------------------------


def _crc32c_table() -> np.ndarray:
  poly = 0x82F63B78
  table = np.zeros(256, np.uint32)
  for i in range(256):
    c = i
    for _ in range(8):
      c = (c >> 1) ^ poly if c & 1 else c >> 1
    table[i] = c
  return table


_CRC_TABLE = _crc32c_table()


def masked_crc32c(data: bytes) -> int:
  """TFRecord's checksum: CRC-32C (Castagnoli), rotated right by 15 plus 0xa282ead8 (mod 2^32)."""
  crc = 0xFFFFFFFF
  for b in data:
    crc = int(_CRC_TABLE[(crc ^ b) & 0xFF]) ^ (crc >> 8)
  crc ^= 0xFFFFFFFF
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


@functools.lru_cache(maxsize=8)
def tfrecord_index(path: str) -> np.ndarray:
  """(offset, length) of each record's payload, ``int64 [N, 2]``: record = u64 length,
  u32 masked_crc32c(length), payload, u32 masked_crc32c(payload)."""
  out = []
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    offset = 0
    while offset < size:
      f.seek(offset)
      header = f.read(12)
      if len(header) < 12:
        raise ValueError(f"{path}: truncated TFRecord header at byte {offset}.")
      (length,), (crc,) = struct.unpack("<Q", header[:8]), struct.unpack("<I", header[8:])
      if masked_crc32c(header[:8]) != crc:
        raise ValueError(f"{path}: corrupt TFRecord length header at byte {offset}.")
      out.append((offset + 12, length))
      offset += 12 + length + 4
  if offset != size:
    raise ValueError(f"{path}: truncated last TFRecord.")
  return np.asarray(out, np.int64).reshape(-1, 2)


def parse_image_example(record: bytes) -> np.ndarray:
  """Serialized tf.train.Example {'shape': [C, H, W], 'data': raw uint8 CHW} -> uint8 [H, W, C]."""
  from tensorflow_datasets.proto import tf_example_pb2  # pylint: disable=g-import-not-at-top
  features = tf_example_pb2.Example.FromString(record).features.feature
  if "shape" not in features or "data" not in features:
    raise ValueError(f"TFRecord example lacks 'shape' / 'data' features (has {list(features)}).")
  shape = tuple(features["shape"].int64_list.value)
  data = np.frombuffer(features["data"].bytes_list.value[0], np.uint8)
  return data.reshape(shape).transpose(1, 2, 0)


class TFRecordSource:
  """Random access into one TFRecord file of image examples via its record index."""
  is_image = True

  def __init__(self, path: str, data_shape: tuple[int, ...]):
    self.path = path
    self.index = tfrecord_index(path)
    self.num_examples = len(self.index)
    self.data_shape = tuple(data_shape)
    self._fd: Optional[int] = None
    self._lock = threading.Lock()
    if self.num_examples == 0:
      raise ValueError(f"{path} holds no records.")
    first = self._image(0)
    if first.shape != self.data_shape:
      raise ValueError(f"{path} holds {first.shape} images, expected {self.data_shape}: check "
                       "config.data.image_size / num_channels against the file's resolution.")

  def _image(self, i: int) -> np.ndarray:
    with self._lock:
      if self._fd is None:
        self._fd = os.open(self.path, os.O_RDONLY)
    offset, length = self.index[i]
    return parse_image_example(os.pread(self._fd, int(length), int(offset)))

  def read(self, indices: np.ndarray):
    images = np.stack([self._image(int(i)) for i in indices])
    return images, np.zeros(len(indices), np.int32)

  def __del__(self):
    if getattr(self, "_fd", None) is not None and not sys.is_finalizing():
      os.close(self._fd)


def find_tfrecord(path: str, image_size: int) -> str:
  """``path`` itself if a file, else the ``*-rNN.tfrecords`` file of resolution 2^NN in it."""
  if os.path.isfile(path):
    return path
  if not os.path.isdir(path):
    raise FileNotFoundError(f"TFRecord path {path!r} does not exist (config.data.tfrecords_path "
                            "or config.data.data_dir).")
  log2 = int(np.log2(image_size))
  suffix = f"-r{log2:02d}.tfrecords"
  matches = sorted(f for f in os.listdir(path) if f.endswith(suffix))
  if len(matches) != 1:
    raise FileNotFoundError(
        f"Expected exactly one file named '*{suffix}' (resolution {image_size}) in {path}, found "
        f"{matches or 'none'}; the directory holds {sorted(os.listdir(path))[:10]}.")
  return os.path.join(path, matches[0])
