"""Data pipelines against independent references: closed-form toy moments, raw idx bytes,
hand-built tfds / TFRecord data, and the determinism / sharding contract of the batch stream."""
import gzip
import os
import struct

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from scipy import stats

from configs.default_mnist_configs import get_default_configs as mnist_defaults
from configs.default_toy_configs import get_default_configs as toy_defaults
from score_sde import datasets
from score_sde.datasets import images as images_lib


def _toy(name="gmm", **data):
  c = toy_defaults()
  c.data.dataset = name
  c.training.batch_size = 256
  c.eval.batch_size = 256
  for k, v in data.items():
    c.data[k] = v
  return c


def _take(it, n):
  return [next(it) for _ in range(n)]


def _cat(batches, key="image"):
  return np.concatenate([b[key] for b in batches])


def _write_idx(path, array):
  """Independent idx writer: magic 0x0000 08 ndim, big-endian u32 dims, raw bytes."""
  array = np.asarray(array, np.uint8)
  payload = bytes([0, 0, 8, array.ndim]) + struct.pack(">" + "I" * array.ndim, *array.shape)
  payload += array.tobytes()
  opener = gzip.open if str(path).endswith(".gz") else open
  with opener(path, "wb") as f:
    f.write(payload)


@pytest.fixture
def tiny_mnist(tmp_path):
  """12 train / 5 test 28x28 'digits' in idx files (train gzipped, test not); labels = ids."""
  rng = np.random.default_rng(0)
  train = rng.integers(0, 256, (12, 28, 28), dtype=np.uint8)
  test = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
  _write_idx(tmp_path / "train-images-idx3-ubyte.gz", train)
  _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.arange(12))
  _write_idx(tmp_path / "t10k-images-idx3-ubyte", test)
  _write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.arange(5))
  c = mnist_defaults()
  c.data.data_dir = str(tmp_path)
  c.data.uniform_dequantization = False
  c.training.batch_size = 4
  c.eval.batch_size = 4
  return c, train, test


# ------------------------------------------------------------------------------------------------
# Toy sets.
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["checkerboard", "swiss_roll", "rings"])
def test_toy_sets_have_unit_variance(name):
  """Shapes / dtypes, and zero mean, unit (mean) variance per coordinate by construction."""
  it = datasets.get_dataset(_toy(name), "train")
  b = next(it)
  assert b["image"].shape == (256, 2) and b["image"].dtype == np.float32
  assert b["label"].shape == (256,) and b["label"].dtype == np.int32
  x = _cat(_take(it, 80)).astype(np.float64)  # 20480 points
  np.testing.assert_allclose(x.mean(0), 0.0, atol=0.03)
  var = x.var(0)
  if name == "swiss_roll":   # one isotropic scale: the two coordinates differ, their mean is 1
    np.testing.assert_allclose(var.mean(), 1.0, atol=0.03)
  else:
    np.testing.assert_allclose(var, 1.0, atol=0.04)


def test_checkerboard_and_rings_geometry():
  b = datasets.get_dataset(_toy("checkerboard"), "eval").get_batch(0)
  cells = np.floor(b["image"] / np.sqrt(0.75) + 2).astype(int)      # board on [-2, 2]^2
  assert np.all((cells >= 0) & (cells <= 3))
  assert np.all((cells.sum(1) % 2) == 0)                              # dark cells only
  np.testing.assert_array_equal(cells[:, 0], b["label"] // 2)
  r = datasets.get_dataset(_toy("rings"), "eval").get_batch(0)
  radius = np.linalg.norm(r["image"], axis=1) * np.sqrt(3.76)
  assert np.all(np.abs(radius - (r["label"] + 1)) < 0.5)              # noise 0.1 << ring gap 1
  assert set(np.unique(r["label"])) == {0, 1, 2, 3}


def test_gmm_samples_follow_the_exact_mixture():
  """Per-component standardized samples are N(0, 1) (KS), label frequencies match the weights,
  and get_toy_mixture is the mixture the data come from (3-D, unequal weights)."""
  w = [0.5, 0.3, 0.2]
  c = _toy("gmm", dim=3, num_components=3, gmm_radius=3.0, gmm_std=0.4, gmm_weights=w,
           gmm_seed=1)
  mix = datasets.get_toy_mixture(c)
  np.testing.assert_allclose(mix.weights_np, w)
  assert mix.dim == 3 and mix.num_components == 3
  b = _take(datasets.get_dataset(c, "train"), 40)
  x, k = _cat(b).astype(np.float64), _cat(b, "label")
  assert x.shape == (10240, 3)
  counts = np.bincount(k, minlength=3)
  assert stats.chisquare(counts, np.asarray(w) * len(k)).pvalue > 1e-3
  z = (x - mix.means_np[k]) / np.sqrt(mix.covs_np[k])
  assert stats.kstest(z.ravel(), "norm").pvalue > 1e-3
  # Labels are draws from the exact posterior p(k | x): the Bayes classifier is right exactly as
  # often as its confidence says, E[1{argmax p(.|x) = k}] = E[max_j p(j | x)].
  post = np.asarray(mix.posterior(x.astype(np.float32)), np.float64)
  hit = post.argmax(1) == k
  assert abs(hit.mean() - post.max(1).mean()) < 4 * hit.std() / np.sqrt(len(k)) + 1e-3


def test_toy_stream_is_deterministic_and_resumes_exactly():
  c = _toy("rings")
  run = _take(datasets.get_dataset(c, "train"), 6)
  again = _take(datasets.get_dataset(c, "train", prefetch=0), 6)
  resumed = _take(datasets.get_dataset(c, "train", start_step=4), 2)
  for a, b in zip(run, again):
    np.testing.assert_array_equal(a["image"], b["image"])
  for a, b in zip(run[4:], resumed):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])
  c.seed = c.seed + 1
  other = next(datasets.get_dataset(c, "train"))
  assert not np.allclose(other["image"], run[0]["image"])
  assert not np.allclose(run[0]["image"], run[1]["image"])


def test_toy_eval_is_a_fixed_masked_pass_independent_of_seed():
  c = _toy("gmm", eval_size=10)
  c.eval.batch_size = 4
  ev = datasets.get_dataset(c, "eval")
  assert len(ev) == 3
  batches = list(ev)
  np.testing.assert_array_equal(batches[-1]["mask"], [1, 1, 0, 0])
  c.seed = 123
  other = list(datasets.get_dataset(c, "eval"))
  np.testing.assert_array_equal(_cat(batches), _cat(other))
  # Two processes, each half of every global batch: together every example exactly once.
  parts = [list(datasets.get_dataset(c, "eval", process_index=r, process_count=2))
           for r in range(2)]
  real = [np.concatenate([p[i]["image"][p[i]["mask"] > 0] for p in parts]) for i in range(3)]
  np.testing.assert_array_equal(np.concatenate(real), _cat(batches)[_cat(batches, "mask") > 0])
  assert sum(p[i]["mask"].sum() for p in parts for i in range(3)) == 10


def test_two_processes_cover_exactly_the_global_batch_toy():
  c = _toy("checkerboard")
  whole = datasets.get_dataset(c, "train", start_step=3).get_batch(3)
  halves = [datasets.get_dataset(c, "train", process_index=r, process_count=2).get_batch(3)
            for r in range(2)]
  assert halves[0]["image"].shape == (128, 2)
  for key in ("image", "label", "mask"):
    np.testing.assert_array_equal(np.concatenate([h[key] for h in halves]), whole[key])


# ------------------------------------------------------------------------------------------------
# MNIST idx.
# ------------------------------------------------------------------------------------------------


def _raw_idx(path, offset):
  with gzip.open(path, "rb") as f:
    return np.frombuffer(f.read(), np.uint8, offset=offset)


def test_real_mnist_matches_raw_idx_bytes(mnist_dir):
  c = mnist_defaults()
  c.data.data_dir = mnist_dir
  c.data.uniform_dequantization = False
  c.eval.batch_size = 1000
  raw_x = _raw_idx(os.path.join(mnist_dir, "t10k-images-idx3-ubyte.gz"), 16).reshape(-1, 28, 28)
  raw_y = _raw_idx(os.path.join(mnist_dir, "t10k-labels-idx1-ubyte.gz"), 8)
  ev = datasets.get_dataset(c, "eval")
  assert len(ev) == 10
  b = ev.get_batch(3)
  assert b["image"].shape == (1000, 28, 28, 1) and b["image"].dtype == np.float32
  assert b["image"].min() >= 0 and b["image"].max() <= 1 and b["image"].max() == 1
  np.testing.assert_array_equal(b["image"][..., 0],
                                raw_x[3000:4000].astype(np.float32) / np.float32(255))
  np.testing.assert_array_equal(b["label"], raw_y[3000:4000])


def test_real_mnist_train_epoch(mnist_dir):
  """One shuffled epoch holds every training image once: its label histogram and its pixel sum
  equal the raw file's; the digit frequencies are MNIST's (5421 ... 6742 per digit)."""
  c = mnist_defaults()
  c.data.data_dir = mnist_dir
  c.data.uniform_dequantization = False
  c.training.batch_size = 10000
  raw_x = _raw_idx(os.path.join(mnist_dir, "train-images-idx3-ubyte.gz"), 16)
  raw_y = _raw_idx(os.path.join(mnist_dir, "train-labels-idx1-ubyte.gz"), 8)
  it = datasets.get_dataset(c, "train", num_epochs=1)
  assert len(it) == 6
  batches = list(it)
  labels = _cat(batches, "label")
  assert not np.array_equal(labels[:1000], raw_y[:1000])                # shuffled
  np.testing.assert_array_equal(np.bincount(labels, minlength=10), np.bincount(raw_y, minlength=10))
  counts = np.bincount(raw_y, minlength=10)
  assert counts.sum() == 60000 and counts.min() == 5421 and counts.max() == 6742
  pixel_sum = sum(np.round(b["image"].astype(np.float64) * 255).sum() for b in batches)
  assert pixel_sum == raw_x.astype(np.float64).sum()


def test_mnist_pad_to_32_and_local_idx(tiny_mnist):
  c, train, test = tiny_mnist
  c.data.image_size = 32
  ev = datasets.get_dataset(c, "eval")
  assert len(ev) == 2                                           # 5 examples, batch 4, padded
  b0, b1 = list(ev)
  np.testing.assert_array_equal(b1["mask"], [1, 0, 0, 0])
  x = np.concatenate([b0["image"], b1["image"][:1]])[..., 0]
  assert x.shape == (5, 32, 32)
  np.testing.assert_array_equal(np.round(x[:, 2:30, 2:30] * 255), test)
  assert np.all(x[:, :2] == 0) and np.all(x[:, 30:] == 0) and np.all(x[:, :, :2] == 0)
  np.testing.assert_array_equal(np.concatenate([b0["label"], b1["label"][:1]]), np.arange(5))


def test_image_stream_epochs_resume_and_processes(tiny_mnist):
  """12 examples, batch 4: every epoch is a permutation (labels are ids), epochs differ, a resumed
  stream equals the continued one (flips and dequantization included), and two processes tile
  the global batch."""
  c, train, _ = tiny_mnist
  c.data.random_flip = True
  c.data.uniform_dequantization = True
  run = _take(datasets.get_dataset(c, "train"), 9)               # 3 epochs
  ids = _cat(run, "label").reshape(3, 12)
  for e in range(3):
    np.testing.assert_array_equal(np.sort(ids[e]), np.arange(12))
  assert not np.array_equal(ids[0], ids[1])
  resumed = _take(datasets.get_dataset(c, "train", start_step=5), 4)
  for a, b in zip(run[5:], resumed):
    np.testing.assert_array_equal(a["image"], b["image"])
  # Each image is its source digit, flipped or not, plus noise in [0, 1/256].
  x, y = _cat(run)[..., 0].astype(np.float64), _cat(run, "label")
  src = train[y].astype(np.float64)
  dist = np.minimum(np.abs(x * 256 - src - 0.5).max((1, 2)),
                    np.abs(x * 256 - src[:, :, ::-1] - 0.5).max((1, 2)))
  assert np.all(dist <= 0.5 + 1e-4)
  flipped = np.abs(x * 256 - src - 0.5).max((1, 2)) > 0.5 + 1e-4
  assert 0 < flipped.sum() < len(flipped)
  halves = [datasets.get_dataset(c, "train", process_index=r, process_count=2).get_batch(7)
            for r in range(2)]
  for key in ("image", "label"):
    np.testing.assert_array_equal(np.concatenate([h[key] for h in halves]), run[7][key])


def test_mnist_directory_errors(tiny_mnist, tmp_path):
  c, _, _ = tiny_mnist
  os.remove(os.path.join(c.data.data_dir, "t10k-labels-idx1-ubyte"))
  datasets.get_dataset(c, "train")                               # train files are all there
  with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte"):
    datasets.get_dataset(c, "eval")
  c.data.data_dir = str(tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError, match="does not exist"):
    datasets.get_dataset(c, "train")
  empty = tmp_path / "empty"
  empty.mkdir()
  c.data.data_dir = str(empty)
  with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
    datasets.get_dataset(c, "train")


# ------------------------------------------------------------------------------------------------
# tfds data sources (mocked; no download, no TensorFlow).
# ------------------------------------------------------------------------------------------------


def _image_config(dataset, image_size, channels=3, **data):
  c = mnist_defaults()
  c.data.dataset = dataset
  c.data.image_size = image_size
  c.data.num_channels = channels
  c.data.uniform_dequantization = False
  c.data.random_flip = False
  c.data.data_dir = None
  c.training.batch_size = 4
  c.eval.batch_size = 4
  for k, v in data.items():
    c.data[k] = v
  return c


def _mock_source(examples_by_split):
  """``mock_data(as_data_source_fn=...)`` returning our own examples, recording the split."""
  requested = []

  def as_data_source(self, split, decoders=None, deserialize_method=None, **kwargs):
    requested.append((self.name, split))
    return examples_by_split[split]
  return as_data_source, requested


def test_tfds_cifar10_values_labels_and_splits():
  rng = np.random.default_rng(1)
  ex = {s: [{"image": rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), "label": i % 10,
             "id": str(i)} for i in range(n)] for s, n in (("train", 8), ("test", 6))}
  fn, requested = _mock_source(ex)
  c = _image_config("CIFAR10", 32)                          # the reference's spelling
  with tfds.testing.mock_data(as_data_source_fn=fn):
    ev = datasets.get_dataset(c, "eval")
    tr = datasets.get_dataset(c, "train", num_epochs=1, shuffle=False)
  assert ("cifar10", "test") in requested and ("cifar10", "train") in requested
  b = next(ev)
  expected = np.stack([e["image"] for e in ex["test"][:4]]).astype(np.float32) / np.float32(255)
  np.testing.assert_array_equal(b["image"], expected)
  np.testing.assert_array_equal(b["label"], [0, 1, 2, 3])
  assert len(tr) == 2 and next(tr)["image"].shape == (4, 32, 32, 3)


def test_tfds_celeba_center_crop_140_then_resize():
  """Inside the central 140x140 window (top 39, left 19 of 218x178) the image is 200, outside 0:
  a correctly placed crop resizes to a constant 200 image, a shifted one would not."""
  img = np.zeros((218, 178, 3), np.uint8)
  img[39:179, 19:159] = 200
  fn, _ = _mock_source({"test": [{"image": img}] * 3})
  with tfds.testing.mock_data(as_data_source_fn=fn):
    b = next(datasets.get_dataset(_image_config("celeb_a", 64), "eval"))
  assert b["image"].shape == (4, 64, 64, 3)
  np.testing.assert_array_equal(b["image"] * 255, np.full((4, 64, 64, 3), 200.0, np.float32))
  np.testing.assert_array_equal(b["label"], 0)
  np.testing.assert_array_equal(b["mask"], [1, 1, 1, 0])


@pytest.mark.parametrize("size, shape, margin", [(16, (40, 60), 0), (128, (150, 200), 4)])
def test_tfds_lsun_resize_and_central_crop(size, shape, margin):
  """Central square crop then bicubic resize (the reference's crop_resize) or, at 128, resize the
  short side then crop: 100 inside the central square (widened by ``margin`` for the second,
  whose crop edge falls between source pixels), 0 outside, gives a constant image."""
  h, w = shape
  img = np.zeros((h, w, 3), np.uint8)
  s = min(h, w)
  img[(h - s) // 2:(h + s) // 2, (w - s) // 2 - margin:(w + s) // 2 + margin] = 100
  fn, requested = _mock_source({"validation": [{"image": img}] * 4})
  with tfds.testing.mock_data(as_data_source_fn=fn):
    b = next(datasets.get_dataset(_image_config("LSUN", size, category="church_outdoor"), "eval"))
  assert requested[0][1] == "validation"
  assert b["image"].shape == (4, size, size, 3)
  np.testing.assert_allclose(b["image"] * 255, 100.0, atol=1.01)


def test_tfds_mnist_when_no_data_dir_or_a_tfds_layout(tmp_path):
  ex = [{"image": np.full((28, 28, 1), i, np.uint8), "label": i} for i in range(5)]
  fn, requested = _mock_source({"test": ex, "train": ex})
  (tmp_path / "mnist" / "3.0.1").mkdir(parents=True)                  # a tfds data_dir
  with tfds.testing.mock_data(as_data_source_fn=fn):
    b = next(datasets.get_dataset(_image_config("mnist", 32, 1), "eval"))
    datasets.get_dataset(_image_config("mnist", 28, 1, data_dir=str(tmp_path)), "train")
  assert requested == [("mnist", "test"), ("mnist", "train")]
  assert b["image"].shape == (4, 32, 32, 1)
  np.testing.assert_array_equal(b["image"][:, 16, 16, 0] * 255, [0, 1, 2, 3])
  np.testing.assert_array_equal(b["image"][:, 0, 0, 0], 0)


def test_tfds_default_mock_generator_svhn():
  """tfds' own random mock examples (its __getitems__ is broken in the mock, __getitem__ works)."""
  with tfds.testing.mock_data(num_examples=6):
    src = tfds.data_source("svhn_cropped", split="test")
    plain = [src[i] for i in range(6)]
  fn, _ = _mock_source({"test": plain})
  with tfds.testing.mock_data(as_data_source_fn=fn):
    b = next(datasets.get_dataset(_image_config("svhn", 32), "eval"))
  np.testing.assert_array_equal(b["label"], [int(e["label"]) for e in plain[:4]])


def test_real_array_record_data_source(tmp_path):
  """A tiny dataset written by tfds itself in array_record format and read back (batched
  __getitems__ path of the real ArrayRecordDataSource)."""

  class ScoreSdeTinyImages(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Tensor(shape=(8, 8, 3), dtype=np.uint8),
          "label": tfds.features.ClassLabel(num_classes=10)}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples(7)}

    def _generate_examples(self, n):
      for i in range(n):
        yield i, {"image": np.full((8, 8, 3), 10 * i, np.uint8), "label": i}

  ScoreSdeTinyImages(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
  src = images_lib.tfds_data_source("score_sde_tiny_images", "train", str(tmp_path))
  source = images_lib.TfdsSource(src, lambda im: im, (8, 8, 3))
  x, y = source.read(np.arange(7))
  np.testing.assert_array_equal(x[:, 0, 0, 0], 10 * y)
  np.testing.assert_array_equal(np.sort(y), np.arange(7))


def test_tfds_missing_dataset_message(tmp_path):
  with pytest.raises(FileNotFoundError, match="array_record"):
    datasets.get_dataset(_image_config("cifar10", 32, data_dir=str(tmp_path)), "train")
  with pytest.raises(FileNotFoundError, match="does not exist"):
    datasets.get_dataset(_image_config("cifar10", 32, data_dir=str(tmp_path / "x")), "train")


# ------------------------------------------------------------------------------------------------
# FFHQ / CelebA-HQ TFRecords (written with tensorboardX's independent TFRecord writer).
# ------------------------------------------------------------------------------------------------


def _crc32c_bitwise(data: bytes) -> int:
  """CRC-32C bit by bit (reflected polynomial 0x82F63B78), independent of the table version."""
  crc = 0xFFFFFFFF
  for byte in data:
    crc ^= byte
    for _ in range(8):
      crc = (crc >> 1) ^ (0x82F63B78 & -(crc & 1))
  return crc ^ 0xFFFFFFFF


def _masked(data: bytes) -> int:
  crc = _crc32c_bitwise(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def test_crc32c_check_value():
  assert _crc32c_bitwise(b"123456789") == 0xE3069283           # the published CRC-32C check
  for data in (b"", b"123456789", bytes(range(256)) * 3):
    assert images_lib.masked_crc32c(data) == _masked(data)


def _write_ffhq(path, imgs):
  """TFRecord framing written here: u64 len, masked crc(len), payload, masked crc(payload)."""
  from tensorflow_datasets.proto import tf_example_pb2
  with open(path, "wb") as f:
    for im in imgs:
      ex = tf_example_pb2.Example()
      chw = np.ascontiguousarray(im.transpose(2, 0, 1))
      ex.features.feature["shape"].int64_list.value.extend(chw.shape)
      ex.features.feature["data"].bytes_list.value.append(chw.tobytes())
      payload = ex.SerializeToString()
      header = struct.pack("<Q", len(payload))
      f.write(header + struct.pack("<I", _masked(header)) + payload
              + struct.pack("<I", _masked(payload)))


def test_tfrecord_ffhq_reads_exact_pixels(tmp_path):
  rng = np.random.default_rng(2)
  imgs = rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
  _write_ffhq(tmp_path / "ffhq-r03.tfrecords", imgs)
  _write_ffhq(tmp_path / "ffhq-r02.tfrecords", imgs[:, ::2, ::2])
  c = _image_config("FFHQ", 8, tfrecords_path=str(tmp_path))
  b = list(datasets.get_dataset(c, "eval"))
  x = _cat(b)[_cat(b, "mask") > 0]
  np.testing.assert_array_equal(x * 255, imgs.astype(np.float32))
  with pytest.raises(FileNotFoundError, match=r"-r04\.tfrecords"):
    datasets.get_dataset(_image_config("celebahq", 16, tfrecords_path=str(tmp_path)), "train")
  with pytest.raises(ValueError, match="power-of-two"):
    datasets.get_dataset(_image_config("FFHQ", 12, tfrecords_path=str(tmp_path)), "train")
  raw = bytearray((tmp_path / "ffhq-r03.tfrecords").read_bytes())
  raw[3] ^= 1                                                    # corrupt the first length
  (tmp_path / "bad-r03.tfrecords").write_bytes(bytes(raw))
  with pytest.raises(ValueError, match="corrupt"):
    bad = _image_config("ffhq", 8, tfrecords_path=str(tmp_path / "bad-r03.tfrecords"))
    datasets.get_dataset(bad, "train")


# ------------------------------------------------------------------------------------------------
# Scalers, sharding, bad input.
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("centered", [True, False])
def test_scaler_round_trip(centered):
  c = _image_config("cifar10", 32, centered=centered)
  x = np.random.default_rng(0).uniform(size=(5, 4)).astype(np.float32)
  scaler, inverse = datasets.get_data_scaler(c), datasets.get_data_inverse_scaler(c)
  np.testing.assert_allclose(inverse(scaler(x)), x, atol=1e-7)
  lo, hi = (-1.0, 1.0) if centered else (0.0, 1.0)
  assert scaler(0.0) == lo and scaler(1.0) == hi
  toy = _toy("gmm")
  assert datasets.get_data_scaler(toy)(x) is x and datasets.get_data_inverse_scaler(toy)(x) is x


def test_shard_batch_builds_one_global_array():
  n = jax.device_count()
  c = _toy("gmm")
  c.training.batch_size = 2 * n
  batch = next(datasets.get_dataset(c, "train"))
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("data",))
  out = datasets.shard_batch(batch, mesh)
  assert out["image"].shape == (2 * n, 2)
  assert len(out["image"].addressable_shards) == n
  for shard in out["image"].addressable_shards:
    np.testing.assert_array_equal(np.asarray(shard.data), batch["image"][shard.index])
  np.testing.assert_array_equal(np.asarray(out["label"]), batch["label"])
  if n > 1:
    with pytest.raises(ValueError, match="devices"):
      datasets.shard_batch({"image": np.zeros((n + 1, 2))}, mesh)


def test_bad_inputs_fail_early_with_clear_messages():
  with pytest.raises(ValueError, match="Unknown dataset 'imagenet'"):
    datasets.get_dataset(_toy("imagenet"), "train")
  c = _toy("gmm")
  c.training.batch_size = 255
  with pytest.raises(ValueError, match="not divisible by the 2 processes"):
    datasets.get_dataset(c, "train", process_index=0, process_count=2)
  with pytest.raises(ValueError, match="process_index=2"):
    datasets.get_dataset(_toy("gmm"), "train", process_index=2, process_count=2)
  with pytest.raises(ValueError, match="split"):
    datasets.get_dataset(_toy("gmm"), "validation")
  with pytest.raises(ValueError, match="random_flip"):
    datasets.get_dataset(_toy("rings", random_flip=True), "train")
  with pytest.raises(ValueError, match="dim=2"):
    datasets.get_dataset(_toy("swiss_roll", dim=3), "train")
  with pytest.raises(ValueError, match="endless"):
    datasets.get_dataset(_toy("gmm"), "train", num_epochs=1)
  with pytest.raises(ValueError, match="zero-padding"):
    datasets.get_dataset(_image_config("mnist", 31, 1), "train")
  with pytest.raises(ValueError, match="140"):
    datasets.get_dataset(_image_config("celeb_a", 256), "train")
  with pytest.raises(ValueError, match="num_channels=3"):
    datasets.get_dataset(_image_config("cifar10", 32, 1), "train")
  with pytest.raises(ValueError, match="category"):
    datasets.get_dataset(_image_config("lsun", 64), "train")
  with pytest.raises(ValueError, match="tfrecords_path"):
    datasets.get_dataset(_image_config("ffhq", 256), "train")
  with pytest.raises(ValueError, match="gmm"):
    datasets.get_toy_mixture(_toy("rings"))
