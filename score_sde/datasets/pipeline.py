"""Deterministic, resumable, per-process-sharded batching over random-access sources.

The training stream is an infinite sequence of *positions* p = 0, 1, 2, ...; batch i holds the
global positions ``[i B, (i + 1) B)`` (B = global batch) and process r of R reads only
``[i B + r b, i B + (r + 1) b)`` with b = B / R. Position p of a finite source of N examples is
example ``perm_e[p mod N]`` with e = p // N and ``perm_e`` a permutation drawn from
``(seed, e)`` (identity without shuffling), so every epoch visits every example exactly once and
batch i is a pure function of ``(seed, i)``: a restart at ``start_step`` continues the stream
exactly, and the examples never depend on the number of processes.

Per-example randomness (random flips, dequantization noise, toy samples) is keyed by
``(seed, stream, p)`` through a counter-based hash, again independent of batch size and process
count.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import sys
import threading
from typing import Any, Iterator, Optional, Protocol

import numpy as np

# Stream ids of the counter-based generator (one per purpose, so draws never collide).
STREAM_TOY_TRAIN = 1
STREAM_TOY_EVAL = 2
STREAM_FLIP = 3
STREAM_DEQUANT = 4
_PERMUTATION_SALT = 0x5EED

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def _mix64(z: np.ndarray) -> np.ndarray:
  """The splitmix64 finalizer, a bijection of uint64 with good avalanche (wraps mod 2^64)."""
  z = (z ^ (z >> np.uint64(30))) * _M1
  z = (z ^ (z >> np.uint64(27))) * _M2
  return z ^ (z >> np.uint64(31))


def example_keys(seed: int, stream: int, counters: np.ndarray) -> np.ndarray:
  """One uint64 key per counter: ``mix(mix(seed, stream) ^ mix(counter))``, shape ``[n]``."""
  with np.errstate(over="ignore"):
    base = _mix64(np.asarray([seed % 2**64], np.uint64) + _GOLDEN * np.uint64(stream + 1))
    c = np.asarray(counters, np.int64).astype(np.uint64)
    return _mix64(base ^ _mix64(c + _GOLDEN))


def hash_uniform(seed: int, stream: int, counters: np.ndarray, num: int) -> np.ndarray:
  """``num`` uniforms in [0, 1) per counter, ``[n, num]`` float64: a pure function of its inputs.

  u[i, j] = (mix(key_i + (j + 1) phi) >> 11) 2^-53 with key_i = example_keys(seed, stream, c_i).
  """
  keys = example_keys(seed, stream, counters)
  with np.errstate(over="ignore"):
    h = _mix64(keys[:, None] + _GOLDEN * np.arange(1, num + 1, dtype=np.uint64)[None, :])
  return (h >> np.uint64(11)).astype(np.float64) * 2.0**-53


def box_muller(u1: np.ndarray, u2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Two independent N(0, 1) arrays from two U[0, 1) arrays: r = sqrt(-2 log(1 - u1))."""
  r = np.sqrt(-2.0 * np.log1p(-u1))
  return r * np.cos(2 * np.pi * u2), r * np.sin(2 * np.pi * u2)


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
  """The order of epoch ``epoch`` of a shuffled source of ``n`` examples (a pure function)."""
  rng = np.random.default_rng([seed % 2**63, epoch, _PERMUTATION_SALT])
  return rng.permutation(n)


class Source(Protocol):
  """Random-access examples.

  ``num_examples`` is None for an endless generated source (toy training data). ``read(indices)``
  returns ``(x, labels)``: uint8 images ``[n, H, W, C]`` when ``is_image``, else float32
  vectors in model space ``[n, *data_shape]``; labels int32 ``[n]``.
  """
  num_examples: Optional[int]
  is_image: bool
  data_shape: tuple[int, ...]

  def read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


@dataclasses.dataclass
class Plan:
  """Everything that defines the batch stream; ``make_batch(i)`` is a pure function of it."""
  source: Any
  global_batch: int
  process_index: int
  process_count: int
  seed: int
  shuffle: bool
  total: Optional[int]          # positions in a finite stream (num_epochs N), None = endless
  drop_remainder: bool
  random_flip: bool = False
  uniform_dequantization: bool = False

  def __post_init__(self):
    self.local_batch = self.global_batch // self.process_count
    self._perms: collections.OrderedDict[int, np.ndarray] = collections.OrderedDict()
    self._lock = threading.Lock()

  @property
  def num_batches(self) -> Optional[int]:
    if self.total is None:
      return None
    if self.drop_remainder:
      return self.total // self.global_batch
    return -(-self.total // self.global_batch)

  def _permutation(self, epoch: int) -> np.ndarray:
    with self._lock:
      if epoch not in self._perms:
        self._perms[epoch] = epoch_permutation(self.seed, epoch, self.source.num_examples)
        while len(self._perms) > 2:
          self._perms.popitem(last=False)
      return self._perms[epoch]

  def positions(self, step: int) -> np.ndarray:
    """Global stream positions held by this process in batch ``step``, ``[local_batch]``."""
    start = step * self.global_batch + self.process_index * self.local_batch
    return np.arange(start, start + self.local_batch, dtype=np.int64)

  def indices(self, positions: np.ndarray) -> np.ndarray:
    """Source example index of each stream position."""
    n = self.source.num_examples
    if n is None:
      return positions
    if not self.shuffle:
      return positions % n
    epochs, offsets = np.divmod(positions, n)
    out = np.empty_like(positions)
    for e in np.unique(epochs):
      sel = epochs == e
      out[sel] = self._permutation(int(e))[offsets[sel]]
    return out

  def make_batch(self, step: int) -> dict[str, np.ndarray]:
    """Batch ``step``: {'image' float32 [b, *data_shape], 'label' int32 [b], 'mask' float32 [b]}.

    Images come out in [0, 1]: x = k / 255 for the 8-bit value k, or (k + u) / 256 with
    u ~ U[0, 1) under uniform dequantization. Apply ``get_data_scaler`` in the model step.
    ``mask`` is 0 for the padding that fills the last batch of a finite pass, else 1.
    """
    pos = self.positions(step)
    if self.total is not None:
      mask = (pos < self.total).astype(np.float32)
      pos = pos % self.total   # padding repeats real examples; their mask is 0
    else:
      mask = np.ones(pos.shape, np.float32)
    x, labels = self.source.read(self.indices(pos))
    if self.source.is_image:
      x = self._to_float(x, pos)
    return {"image": x, "label": np.asarray(labels, np.int32), "mask": mask}

  def _to_float(self, x: np.ndarray, pos: np.ndarray) -> np.ndarray:
    if self.random_flip:
      flip = hash_uniform(self.seed, STREAM_FLIP, pos, 1)[:, 0] < 0.5
      x = np.where(flip[:, None, None, None], x[:, :, ::-1], x)
    if not self.uniform_dequantization:
      return x.astype(np.float32) / np.float32(255.0)
    out = np.empty(x.shape, np.float32)
    for j, key in enumerate(example_keys(self.seed, STREAM_DEQUANT, pos)):
      rng = np.random.Generator(np.random.Philox(key=np.asarray([key, STREAM_DEQUANT], np.uint64)))
      out[j] = rng.random(x.shape[1:], dtype=np.float32)
    out += x
    out /= np.float32(256.0)
    return out


class BatchIterator(Iterator[dict]):
  """Iterates ``plan.make_batch(i)`` for i = start_step, start_step + 1, ... (background threads).

  Attributes: ``step`` (index of the next batch), ``num_batches`` (None when endless),
  ``global_batch_size``, ``local_batch_size``, ``data_shape``. ``get_batch(i)`` gives any batch
  directly. Batches are computed up to ``prefetch`` ahead by ``num_workers`` background threads
  (0: synchronous); ``close()`` stops them.
  """

  def __init__(self, plan: Plan, start_step: int = 0, prefetch: int = 2, num_workers: int = 1):
    self.plan = plan
    self.step = int(start_step)
    self.num_batches = plan.num_batches
    self.global_batch_size = plan.global_batch
    self.local_batch_size = plan.local_batch
    self.data_shape = tuple(plan.source.data_shape)
    self._prefetch = int(prefetch)
    self._num_workers = max(int(num_workers), 1)
    self._pool: Optional[concurrent.futures.ThreadPoolExecutor] = None
    self._pending: collections.deque = collections.deque()
    self._next_submit = self.step

  def get_batch(self, step: int) -> dict[str, np.ndarray]:
    return self.plan.make_batch(step)

  def __len__(self) -> int:
    if self.num_batches is None:
      raise TypeError("An endless training stream has no length; pass num_epochs for a finite one.")
    return max(self.num_batches - self.step, 0)

  def _in_range(self, step: int) -> bool:
    return self.num_batches is None or step < self.num_batches

  def __next__(self) -> dict[str, np.ndarray]:
    if not self._in_range(self.step):
      self.close()
      raise StopIteration
    if self._prefetch <= 0:
      batch = self.plan.make_batch(self.step)
    else:
      if self._pool is None:
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=self._num_workers, thread_name_prefix="score_sde_data")
      while len(self._pending) <= self._prefetch and self._in_range(self._next_submit):
        self._pending.append(self._pool.submit(self.plan.make_batch, self._next_submit))
        self._next_submit += 1
      batch = self._pending.popleft().result()
    self.step += 1
    return batch

  def close(self) -> None:
    if self._pool is not None:
      self._pool.shutdown(wait=False, cancel_futures=True)
      self._pool = None
    self._pending.clear()
    self._next_submit = self.step

  def __del__(self):
    if not sys.is_finalizing():
      self.close()

