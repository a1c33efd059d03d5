"""FID Inception weights: download, cache, checksum, and a torch-free `.pth` reader / converter.

Getting the weights
-------------------
The weights are pytorch-fid's port of the 2015-12-05 TensorFlow Inception graph,
`pt_inception-2015-12-05-6726825d.pth` (about 91 MiB) from

  https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth

* Online: `load_inception_variables()` downloads it once into the cache directory
  (`$SCORE_SDE_CACHE`, default `~/.cache/score_sde`) and verifies that the first 8 hex digits of
  its SHA-256 are `6726825d` (the suffix of the file name); a bad download is deleted, nothing
  half-written is ever left under the final name.
* Offline: fetch the file on a machine with internet (e.g. `curl -L -O <URL above>`) and either
  put it in the cache directory under that exact name, or pass its path:
  `load_inception_variables("/path/to/pt_inception-2015-12-05-6726825d.pth")`.

PyTorch is NOT needed: `read_torch_state_dict` reads both PyTorch serialisation formats with
`zipfile` + `pickle` and returns numpy arrays:

* zip format (torch >= 1.6): `<root>/data.pkl` pickles the object; each tensor storage is
  `<root>/data/<key>`, raw little-endian bytes (`<root>/byteorder` says otherwise if present);
* legacy format: pickles of magic number, protocol version, sys info, then the object, then the
  list of storage keys, then per storage an int64 element count and its raw bytes.

In both, a tensor is pickled as `torch._utils._rebuild_tensor_v2(storage, storage_offset, size,
stride, requires_grad, backward_hooks)` and storages as persistent ids `('storage',
torch.<Dtype>Storage, key, location, numel[, view_metadata])`. The unpickler only resolves that
short allow-list of globals (no arbitrary code runs), and rebuilds each tensor as a strided numpy
view of its storage, copied out.
"""
from __future__ import annotations

import collections
import hashlib
import os
import pickle
import struct
import sys
import tempfile
import urllib.request
import zipfile
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
               "pt_inception-2015-12-05-6726825d.pth")
WEIGHTS_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_SHA256_PREFIX = "6726825d"

PathLike = Union[str, os.PathLike]


def cache_dir() -> Path:
  """`$SCORE_SDE_CACHE` if set, else `~/.cache/score_sde`."""
  return Path(os.environ.get("SCORE_SDE_CACHE", Path.home() / ".cache" / "score_sde")).expanduser()


def sha256_file(path: PathLike, chunk: int = 1 << 20) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    while block := f.read(chunk):
      h.update(block)
  return h.hexdigest()


def _check_hash(path: Path, sha256_prefix: Optional[str]) -> None:
  if sha256_prefix is None:
    return
  digest = sha256_file(path)
  if not digest.startswith(sha256_prefix.lower()):
    raise ValueError(f"Checksum mismatch for {path}: SHA-256 {digest[:16]}... does not start with "
                     f"{sha256_prefix}. The file is corrupt or not the FID Inception weights; "
                     f"delete it and download {WEIGHTS_URL} again.")


def fetch_weights(path: Optional[PathLike] = None, *, download: bool = True,
                  url: str = WEIGHTS_URL, filename: str = WEIGHTS_FILENAME,
                  sha256_prefix: Optional[str] = WEIGHTS_SHA256_PREFIX) -> Path:
  """Local path of the weights file, verified; downloads into `cache_dir()` when missing.

  path: an explicit file (used as is, checksum verified; never downloaded over).
  download=False: never touch the network (offline); a missing file raises FileNotFoundError
  saying where to put it. The download goes to a temporary file in the cache directory that is
  renamed into place only after the checksum passes, so a failed or corrupt download leaves nothing.
  """
  if path is not None:
    path = Path(path).expanduser()
    if not path.is_file():
      raise FileNotFoundError(f"Inception weights file {path} does not exist. Download {url} "
                              f"there, or put it in {cache_dir()} and pass no path.")
    _check_hash(path, sha256_prefix)
    return path
  target = cache_dir() / filename
  if target.is_file():
    _check_hash(target, sha256_prefix)
    return target
  if not download:
    raise FileNotFoundError(
        f"Inception weights not found at {target} and downloading is disabled. Download {url} "
        f"(e.g. `curl -L -o {target} {url}`) on a machine with internet and copy it there, set "
        f"SCORE_SDE_CACHE to the folder holding {filename}, or pass its path explicitly.")
  target.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=filename + ".", suffix=".part", dir=target.parent)
  try:
    with os.fdopen(fd, "wb") as f, urllib.request.urlopen(url, timeout=60) as response:
      while block := response.read(1 << 20):
        f.write(block)
    _check_hash(Path(tmp), sha256_prefix)
    os.replace(tmp, target)
  except OSError as e:
    raise FileNotFoundError(
        f"Could not download the Inception weights from {url} ({e}). Offline? Download the file "
        f"elsewhere and put it at {target} (or set SCORE_SDE_CACHE, or pass its path).") from e
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return target


# ------------------------------------------------------------------ torch-free .pth reader

_STORAGE_DTYPES = {
    "DoubleStorage": np.float64, "FloatStorage": np.float32, "HalfStorage": np.float16,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
    "UntypedStorage": np.uint8,
}


def _bfloat16():
  import ml_dtypes  # shipped with jax
  return ml_dtypes.bfloat16


class _StorageType:
  def __init__(self, name: str):
    self.name = name

  @property
  def dtype(self) -> np.dtype:
    return np.dtype(_bfloat16() if self.name == "BFloat16Storage" else _STORAGE_DTYPES[self.name])


class _StorageRef:
  """A storage named by key; its bytes are fetched once all of the pickle has been read."""
  def __init__(self, key: str, dtype: np.dtype, numel: int, offset: int = 0):
    self.key, self.dtype, self.numel, self.offset = key, dtype, numel, offset


class _LazyTensor:
  def __init__(self, storage: _StorageRef, storage_offset: int, size, stride):
    self.storage, self.storage_offset = storage, storage_offset
    self.size, self.stride = tuple(size), tuple(stride)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
  return _LazyTensor(storage, storage_offset, size, stride)


def _rebuild_tensor(storage, storage_offset, size, stride):
  return _LazyTensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
  return data


def _rebuild_from_type_v2(func, new_type, args, state):
  return func(*args)


class _Placeholder:
  """Stands for torch classes that only tag a rebuilt tensor (e.g. nn.Parameter)."""


_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch.nn.parameter", "Parameter"): _Placeholder,
    ("torch", "Tensor"): _Placeholder,
}


class _TorchUnpickler(pickle.Unpickler):
  def __init__(self, file):
    super().__init__(file)
    self.storages: dict[str, _StorageRef] = {}

  def find_class(self, module: str, name: str):
    if module == "torch" and (name in _STORAGE_DTYPES or name == "BFloat16Storage"):
      return _StorageType(name)
    try:
      return _ALLOWED_GLOBALS[(module, name)]
    except KeyError:
      raise pickle.UnpicklingError(
          f"Refusing to load {module}.{name}: only plain tensor state dicts are supported.") from None

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
      raise pickle.UnpicklingError(f"Unknown persistent id {pid!r}.")
    storage_type, key, _location, numel = pid[1:5]
    dtype = storage_type.dtype if isinstance(storage_type, _StorageType) else np.dtype(np.uint8)
    key = str(key)
    root = self.storages.setdefault(key, _StorageRef(key, dtype, int(numel)))
    view = pid[5] if len(pid) > 5 else None
    if view is not None:  # legacy storage views: (view_key, offset, view_size)
      _, view_offset, view_size = view
      return _StorageRef(key, dtype, int(view_size), int(view_offset))
    return root


def _materialize(obj: Any, buffers: dict[str, np.ndarray]) -> Any:
  if isinstance(obj, _LazyTensor):
    ref = obj.storage
    flat = buffers[ref.key]
    base = flat[ref.offset + obj.storage_offset:]
    if 0 in obj.size:
      return np.zeros(obj.size, ref.dtype)
    if not obj.size:
      return np.array(base[0])
    span = 1 + sum((n - 1) * s for n, s in zip(obj.size, obj.stride))
    if span > base.size:
      raise ValueError(f"Corrupt tensor: size {obj.size} stride {obj.stride} overruns its storage.")
    strides = tuple(s * base.itemsize for s in obj.stride)
    return np.array(np.lib.stride_tricks.as_strided(base, obj.size, strides))
  if isinstance(obj, dict):
    out = obj.__class__()
    for k, v in obj.items():
      out[k] = _materialize(v, buffers)
    return out
  if isinstance(obj, (list, tuple)):
    return obj.__class__(_materialize(v, buffers) for v in obj)
  return obj


def _from_bytes(raw: bytes, dtype: np.dtype, byteorder: str) -> np.ndarray:
  """Raw storage bytes written in `byteorder` -> native-order numpy array."""
  arr = np.frombuffer(raw, dtype)
  if byteorder != sys.byteorder and dtype.itemsize > 1:
    arr = arr.byteswap()
  return arr


def _read_zip(path: Path) -> Any:
  with zipfile.ZipFile(path) as zf:
    names = zf.namelist()
    pkls = [n for n in names if n.endswith("data.pkl")]
    if len(pkls) != 1:
      raise ValueError(f"{path}: not a PyTorch zip checkpoint (expected one */data.pkl, "
                       f"found {pkls}).")
    root = pkls[0][:-len("data.pkl")]
    byteorder = "little"
    if root + "byteorder" in names:
      byteorder = zf.read(root + "byteorder").decode().strip()
    with zf.open(pkls[0]) as f:
      unpickler = _TorchUnpickler(f)
      obj = unpickler.load()
    buffers = {key: _from_bytes(zf.read(f"{root}data/{key}"), ref.dtype, byteorder)
               for key, ref in unpickler.storages.items()}
  return _materialize(obj, buffers)


_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


def _read_legacy(path: Path) -> Any:
  with open(path, "rb") as f:
    try:
      magic = pickle.load(f)
    except Exception as e:  # noqa: BLE001 -- any failure means "not this format"
      raise ValueError(f"{path}: not a PyTorch checkpoint (neither zip nor legacy format).") from e
    if magic != _LEGACY_MAGIC:
      raise ValueError(f"{path}: not a PyTorch checkpoint (bad magic number).")
    protocol = pickle.load(f)
    if protocol != 1001:
      raise ValueError(f"{path}: unsupported legacy PyTorch protocol {protocol}.")
    pickle.load(f)  # sys_info
    unpickler = _TorchUnpickler(f)
    obj = unpickler.load()
    keys = pickle.load(f)
    buffers = {}
    for key in keys:
      (numel,) = struct.unpack("<q", f.read(8))
      ref = unpickler.storages[str(key)]
      buffers[str(key)] = _from_bytes(f.read(numel * ref.dtype.itemsize), ref.dtype, "little")
  return _materialize(obj, buffers)


def read_torch_state_dict(path: PathLike) -> dict[str, np.ndarray]:
  """Read a `torch.save`d object of tensors (state dict) without PyTorch: tensors -> numpy.

  Handles both the zip (torch >= 1.6) and the legacy serialisation format, any storage dtype
  (bfloat16 via ml_dtypes), non-contiguous strides and storage offsets, shared storages.
  """
  path = Path(path)
  if zipfile.is_zipfile(path):
    return _read_zip(path)
  return _read_legacy(path)


# ------------------------------------------------------------------ conversion to Flax


def convert_state_dict(state_dict: dict[str, np.ndarray]) -> dict[str, Any]:
  """pytorch-fid FID-Inception state dict -> Flax variables {"params", "batch_stats"}.

  `X.conv.weight` [O, I, kh, kw] -> params X/conv/kernel [kh, kw, I, O];
  `X.bn.weight / bias` -> params X/bn/scale / bias; `X.bn.running_mean / running_var` ->
  batch_stats X/bn/mean / var; `fc.weight` [1008, 2048] -> params fc/kernel [2048, 1008] (transposed),
  `fc.bias` -> fc/bias. `num_batches_tracked` and torchvision's `AuxLogits.*` are ignored.
  Every variable of `InceptionV3` must be found with the right shape, else ValueError.
  """
  from score_sde.evaluation import inception  # local import keeps the reader jax-free
  import flax

  expected = flax.traverse_util.flatten_dict(
      {col: flax.core.unfreeze(v) for col, v in inception.variable_shapes().items()})
  out = {}
  used = set()
  for flat_key, spec in expected.items():
    col, *mods, leaf = flat_key
    prefix = ".".join(mods)
    if mods[-1] == "conv":
      name, fn = f"{prefix}.weight", lambda w: np.transpose(w, (2, 3, 1, 0))
    elif mods[-1] == "bn":
      name = prefix + "." + {"scale": "weight", "bias": "bias", "mean": "running_mean",
                             "var": "running_var"}[leaf]
      fn = lambda w: w
    elif mods == ["fc"]:
      name = f"fc.{'weight' if leaf == 'kernel' else 'bias'}"
      fn = (lambda w: w.T) if leaf == "kernel" else (lambda w: w)
    else:
      raise AssertionError(flat_key)
    if name not in state_dict:
      raise ValueError(f"State dict lacks {name!r} (needed for {'/'.join(flat_key)}); is this the "
                       f"FID Inception ({WEIGHTS_FILENAME})?")
    value = np.asarray(fn(np.asarray(state_dict[name])), np.float32)
    if value.shape != tuple(spec.shape):
      raise ValueError(f"{name}: shape {np.shape(state_dict[name])} does not fit "
                       f"{'/'.join(flat_key)} {tuple(spec.shape)} (after conversion {value.shape}).")
    out[flat_key] = value
    used.add(name)
  extra = [k for k in state_dict if k not in used and not k.endswith("num_batches_tracked")
           and not k.startswith("AuxLogits.")]
  if extra:
    raise ValueError(f"State dict has entries the FID Inception does not use: {extra[:5]}"
                     f"{'...' if len(extra) > 5 else ''}")
  return flax.traverse_util.unflatten_dict(out)


def load_inception_variables(path: Optional[PathLike] = None, *, download: bool = True,
                             sha256_prefix: Optional[str] = WEIGHTS_SHA256_PREFIX
                             ) -> dict[str, Any]:
  """The FID Inception variables {"params", "batch_stats"} (numpy float32), ready for
  `inception.get_inception_fn`. See the module docstring for where the file comes from.
  sha256_prefix=None skips the checksum (only for other ports of the same network)."""
  path = fetch_weights(path, download=download, sha256_prefix=sha256_prefix)
  return convert_state_dict(read_torch_state_dict(path))
