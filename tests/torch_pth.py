"""Test helper: write `torch.save` files without PyTorch.

A pickler that emits torch's global names and persistent ids exactly as `torch.save` does:

* a tensor pickles as `torch._utils._rebuild_tensor_v2(storage, storage_offset, size, stride,
  requires_grad, backward_hooks)` (a Parameter wrapped in `torch._utils._rebuild_parameter`);
* a storage pickles as the persistent id `('storage', torch.<Dtype>Storage, key, 'cpu', numel)`
  (legacy format: one more element, the view metadata `None`);
* zip format (torch >= 1.6): `<root>/data.pkl`, `<root>/byteorder`, `<root>/data/<key>` (raw
  little-endian bytes), `<root>/version`; legacy format: pickles of the magic number, protocol
  version 1001 and sys info, then the object, the sorted storage keys, and per storage an int64
  element count followed by its bytes.

`save(path, obj)` turns every numpy array inside nested dicts / lists / tuples into a tensor with
its own storage; `Storage` / `Tensor` build shared, strided or offset tensors by hand.
"""
import collections
import io
import pickle
import struct
import zipfile
from typing import Any

import ml_dtypes
import numpy as np


class G:
  """A global reference `module.name`, pickled as a GLOBAL opcode (no torch import needed)."""
  def __init__(self, module, name):
    self.module, self.name = module, name

  def __call__(self, *args):
    raise NotImplementedError


class Storage:
  def __init__(self, key, array):
    self.key, self.array = key, np.ascontiguousarray(array).ravel()

  @property
  def type_name(self):
    if self.array.dtype == ml_dtypes.bfloat16:
      return "BFloat16Storage"
    return {np.float32: "FloatStorage", np.float64: "DoubleStorage", np.float16: "HalfStorage",
            np.int64: "LongStorage", np.int32: "IntStorage", np.uint8: "ByteStorage",
            np.bool_: "BoolStorage"}[self.array.dtype.type]


class Tensor:
  def __init__(self, storage, offset, size, stride, as_parameter=False):
    self.storage, self.offset, self.size, self.stride = storage, offset, size, stride
    self.as_parameter = as_parameter

  def expected(self):
    """Element-by-element strided read, independent of the reader's as_strided."""
    out = np.empty(self.size, self.storage.array.dtype)
    for idx in np.ndindex(*self.size):
      out[idx] = self.storage.array[self.offset + sum(i * s for i, s in zip(idx, self.stride))]
    return out

  def __reduce__(self):
    args = (self.storage, self.offset, tuple(self.size), tuple(self.stride), False,
            collections.OrderedDict())
    rebuilt = Rebuild(G("torch._utils", "_rebuild_tensor_v2"), args)
    if self.as_parameter:
      return (G("torch._utils", "_rebuild_parameter"), (rebuilt, True, collections.OrderedDict()))
    return rebuilt.__reduce__()


class Rebuild:
  def __init__(self, func, args):
    self.func, self.args = func, args

  def __reduce__(self):
    return (self.func, self.args)


class TorchPickler(pickle._Pickler):
  def __init__(self, file, legacy):
    super().__init__(file, protocol=2)
    self.legacy, self.storages = legacy, {}

  def persistent_id(self, obj):
    if isinstance(obj, Storage):
      self.storages[obj.key] = obj
      pid = ("storage", G("torch", obj.type_name), obj.key, "cpu", obj.array.size)
      return pid + (None,) if self.legacy else pid
    return None

  def save(self, obj, save_persistent_id=True):
    if isinstance(obj, G):
      self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
      return
    super().save(obj, save_persistent_id)


def write_pth(path, obj, legacy=False, root="archive"):
  """Writes `obj` (holding `Tensor`s) like `torch.save(obj, path)`; `root` is the zip's folder."""
  buf = io.BytesIO()
  pickler = TorchPickler(buf, legacy)
  pickler.dump(obj)
  if legacy:
    with open(path, "wb") as f:
      for header in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}):
        pickle.dump(header, f, protocol=2)
      f.write(buf.getvalue())
      keys = sorted(pickler.storages)
      pickle.dump(keys, f, protocol=2)
      for key in keys:
        arr = pickler.storages[key].array
        f.write(struct.pack("<q", arr.size) + arr.tobytes())
    return
  with zipfile.ZipFile(path, "w") as zf:
    zf.writestr(f"{root}/data.pkl", buf.getvalue())
    zf.writestr(f"{root}/byteorder", "little")
    for key, st in pickler.storages.items():
      zf.writestr(f"{root}/data/{key}", st.array.tobytes())
    zf.writestr(f"{root}/version", "3\n")


def as_tensors(obj: Any, counter=None) -> Any:
  """`obj` with every numpy array (0-d included) replaced by a contiguous `Tensor` on a storage
  of its own (keys "0", "1", ... in visiting order). Dict classes (OrderedDict) and their
  attributes (a state dict's `_metadata`) are kept."""
  counter = counter if counter is not None else [0]
  if isinstance(obj, np.ndarray):
    key = str(counter[0])
    counter[0] += 1
    strides = tuple(int(np.prod(obj.shape[j + 1:])) for j in range(obj.ndim))
    return Tensor(Storage(key, obj), 0, obj.shape, strides)
  if isinstance(obj, dict):
    out = obj.__class__()
    for k, v in obj.items():
      out[k] = as_tensors(v, counter)
    if hasattr(obj, "__dict__"):
      out.__dict__.update(obj.__dict__)
    return out
  if isinstance(obj, (list, tuple)):
    return obj.__class__(as_tensors(v, counter) for v in obj)
  return obj


def save(path, obj: Any, legacy: bool = False, root: str = "archive") -> None:
  """`torch.save(obj, path)` for an object whose tensors are numpy arrays."""
  write_pth(path, as_tensors(obj), legacy=legacy, root=root)
