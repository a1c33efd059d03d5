"""Benchmark: sample quality vs NFE of the samplers on a *trained* MNIST model, plus its bits/dim.

The companion of ``experiments/benchmark_samplers.py`` (exact Gaussian-mixture scores): same
sampler configurations (its ``SAMPLER_CONFIGS``), same table, but the score is a network.

  python experiments/benchmark_samplers_mnist.py --data_dir /path/to/mnist \
      --workdir /tmp/mnist_bench --train_steps 2000 --num_samples 512 \
      --out docs/results/samplers_mnist.json --plot docs/figures/samplers_mnist.png

What it does, in order (each step cached in ``--workdir``, so a rerun only samples again):

  1. score model  trains the small U-Net of configs/mnist/vp_continuous.py (VP SDE, continuous
                  DSM loss) for ``--train_steps`` steps at batch ``--batch_size`` with the ordinary
                  training loop (score_sde.train.Trainer), or resumes / reuses the checkpoint in
                  ``<workdir>/score_model_*``. ``--nf`` overrides the width (for tests),
                  ``--warmup`` / ``--ema_rate`` the learning-rate warm-up and the EMA decay (the
                  config's 1000 / 0.999 suit 20k+ steps, not a short CPU run). The training loss is
                  logged; the last logged training loss and the DSM loss of the EMA model on
                  ``--num_samples`` held-out test images go into the JSON.
  2. classifier   trains a small CNN MNIST classifier (flax; two conv layers, a ``--feature_dim``
                  ReLU layer, a linear read-out) with Adam for ``--classifier_steps`` steps on the
                  training split, reports its accuracy on the whole test split, and caches its
                  parameters in the workdir.
  3. quality      for every sampler configuration and NFE: ``--num_samples`` samples in batches of
                  ``--sample_batch`` (one jitted program per configuration, compiled once, reused
                  for every batch); every sampler that takes a starting point gets the same prior
                  noise x_T (the PC sampler draws its own). Samples are mapped to [0, 1], clipped
                  and rounded to 8 bits like real images, and compared with ``--num_samples``
                  held-out test images by the Frechet distance of their classifier features:

                    FD = ||mu_s - mu_r||^2 + tr(S_s) + tr(S_r) - 2 tr((S_s S_r)^{1/2}),

                  mu / S the mean and covariance (float64) of the penultimate-layer (ReLU)
                  features. **This is not FID**: FID uses Inception-v3 features of ImageNet
                  images; this is a Frechet distance in the features of a classifier the
                  benchmark trains itself, comparable only between runs of this script with the
                  same classifier settings. The noise floor is the same distance between two
                  disjoint sets of real test images of the same size (the value a perfect
                  sampler would get, up to noise), and ``fd_uniform_noise`` the distance of
                  uniform-noise images (a ceiling).
  4. bits/dim     of ``--num_bpd`` test images under the model: uniform dequantization
                  y = 2 (x + u) / 256 - 1, the probability-flow-ODE likelihood
                  (score_sde.likelihood, Rademacher Hutchinson trace, rtol = atol = ``--bpd_tol``),
                  and the discrete-data bound bpd = model-space bpd + 7
                  (``likelihood.discrete_bpd``); mean and standard error over the images.

The NFE grid ``--nfes`` applies to every fast sampler and to the PC sampler (Euler-Maruyama
predictor, no corrector, N = NFE steps), ``--pc_nfes`` adds PC-only reference points (1000 by
default, the paper's setting), and the adaptive probability-flow ODE (dopri5) runs once per
tolerance in ``--ode_tols``, its NFE being what it spent. Configurations that cannot run at an NFE
(e.g. order 3 with too few evaluations) are skipped with their message. Prints a markdown table
and writes the JSON (``--out``) and an FD-vs-NFE plot (``--plot``); ``--from_json`` redraws both
from a saved result without sampling, and ``--merge a.json,b.json`` joins the rows of runs with the
same model, classifier and x_T (same flags and ``--workdir``, other NFE grids) into one result.

Run it from Python as ``main(['prog', '--flag=value', ...])`` (the flags given are parsed; the
others take their defaults) or call :func:`run` with a :class:`Settings`.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import json
import math
import os
import sys
import time
from typing import Any, Callable, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from flax import serialization  # noqa: E402
from jax.sharding import AxisType  # noqa: E402

from configs.mnist import vp_continuous  # noqa: E402
from experiments.benchmark_samplers import SAMPLER_CONFIGS, STOCHASTIC, table  # noqa: E402
from score_sde import datasets, likelihood, sde_lib  # noqa: E402
from score_sde.evaluation.metrics import frechet_distance  # noqa: E402
from score_sde.models import get_model_fn, get_score_fn  # noqa: E402
from score_sde.sampling import available_samplers, get_sampler  # noqa: E402
from score_sde.utils import write_json  # noqa: E402

Array = jax.Array
CONFIG_NAME = "configs/mnist/vp_continuous.py"

FLAGS = flags.FLAGS
flags.DEFINE_string("data_dir", None, "Directory with the four MNIST idx files (.gz or not), or a "
                    "tfds data directory; None: tfds' default location.")
flags.DEFINE_string("workdir", "/tmp/score_sde_mnist_bench", "Cache of the score-model checkpoint "
                    "and the classifier parameters (reruns reuse them).")
flags.DEFINE_integer("train_steps", 2000, "Training steps of the score model (multiple of 5).")
flags.DEFINE_integer("batch_size", 32, "Training batch of the score model.")
flags.DEFINE_integer("train_devices", 0, "Train data-parallel on the first N devices (0: all).")
flags.DEFINE_integer("nf", None, "U-Net width config.model.nf (default: the config's, 32).")
flags.DEFINE_integer("warmup", None, "Learning-rate warmup steps (default: the config's, 1000).")
flags.DEFINE_float("ema_rate", None, "EMA decay of the sampled parameters (default: the config's, "
                   "0.999; a run of a few thousand steps wants less, e.g. 0.99).")
flags.DEFINE_integer("classifier_steps", 600, "Adam steps of the feature classifier (batch 128).")
flags.DEFINE_integer("feature_dim", 64, "Width of the classifier's penultimate (feature) layer.")
flags.DEFINE_integer("num_samples", 512, "Samples per sampler and NFE; also the size of the real "
                     "reference set and of each noise-floor set.")
flags.DEFINE_integer("sample_batch", 256, "Samples per jitted sampler call.")
flags.DEFINE_list("nfes", ["5", "10", "20", "35", "50", "100"], "NFE grid (fast samplers and PC).")
flags.DEFINE_list("pc_nfes", ["1000"], "Extra NFEs for the PC reference only.")
flags.DEFINE_list("ode_tols", ["1e-3"], "rtol = atol of the adaptive PF-ODE reference runs.")
flags.DEFINE_list("samplers", [], "Sampler labels of benchmark_samplers.SAMPLER_CONFIGS (default: "
                  "all).")
flags.DEFINE_integer("num_bpd", 64, "Test images for bits/dim (0: skip).")
flags.DEFINE_float("bpd_tol", 1e-5, "rtol = atol of the likelihood ODE.")
flags.DEFINE_integer("seed", 0, "Seed of the classifier, the prior noise and the data subsets.")
flags.DEFINE_string("out", "docs/results/samplers_mnist.json", "JSON output ('' : none).")
flags.DEFINE_string("plot", "docs/figures/samplers_mnist.png", "PNG output ('' : none).")
flags.DEFINE_string("from_json", "", "Only print the table and redraw the plot of a saved result.")
flags.DEFINE_list("merge", [], "Saved results of runs with the same model, classifier and x_T "
                  "(same flags and --workdir, other --nfes / --pc_nfes / --ode_tols): write one "
                  "result with all their rows to --out, redraw --plot; no sampling.")


@dataclasses.dataclass(frozen=True)
class Settings:
  """Everything one run depends on (the flags above, same names and defaults)."""
  data_dir: Optional[str] = None
  workdir: str = "/tmp/score_sde_mnist_bench"
  train_steps: int = 2000
  batch_size: int = 32
  train_devices: int = 0
  nf: Optional[int] = None
  warmup: Optional[int] = None
  ema_rate: Optional[float] = None
  classifier_steps: int = 600
  feature_dim: int = 64
  num_samples: int = 512
  sample_batch: int = 256
  nfes: tuple[int, ...] = (5, 10, 20, 35, 50, 100)
  pc_nfes: tuple[int, ...] = (1000,)
  ode_tols: tuple[float, ...] = (1e-3,)
  samplers: tuple[str, ...] = ()
  num_bpd: int = 64
  bpd_tol: float = 1e-5
  seed: int = 0
  out: str = "docs/results/samplers_mnist.json"
  plot: str = "docs/figures/samplers_mnist.png"

  @classmethod
  def from_flags(cls) -> "Settings":
    values = {f.name: FLAGS[f.name].value for f in dataclasses.fields(cls)}
    values.update(nfes=tuple(int(n) for n in values["nfes"]),
                  pc_nfes=tuple(int(n) for n in values["pc_nfes"]),
                  ode_tols=tuple(float(t) for t in values["ode_tols"]),
                  samplers=tuple(values["samplers"]))
    return cls(**values)

  def check(self) -> None:
    """Raises ValueError on settings that cannot run (before any training or compiling)."""
    if self.train_steps < 5 or self.train_steps % 5:
      raise ValueError(f"--train_steps must be a positive multiple of 5 (the config's "
                       f"n_jitted_steps), got {self.train_steps}.")
    if not 0 <= self.train_devices <= jax.device_count():
      raise ValueError(f"--train_devices={self.train_devices} must lie in [0, "
                       f"{jax.device_count()}] (0: all devices).")
    if self.num_samples < 2 or self.sample_batch < 1:
      raise ValueError("--num_samples must be >= 2 and --sample_batch >= 1.")
    if 2 * self.num_samples > 10000:
      raise ValueError(f"--num_samples={self.num_samples}: the reference and the noise-floor sets "
                       "are disjoint subsets of the 10000 test images, so at most 5000.")
    if any(n < 1 for n in self.nfes + self.pc_nfes) or any(t <= 0 for t in self.ode_tols):
      raise ValueError("NFEs must be >= 1 and ODE tolerances positive.")
    unknown = [s for s in self.samplers if s not in SAMPLER_CONFIGS]
    if unknown:
      raise ValueError(f"Unknown sampler labels {unknown}; choose from {list(SAMPLER_CONFIGS)}.")


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------
def mnist_config(s: Settings):
  """configs/mnist/vp_continuous.py with the benchmark's data, batch, length and overrides."""
  config = vp_continuous.get_config()
  t = config.training
  n = int(t.n_jitted_steps)
  config.data.data_dir = s.data_dir
  config.seed = 42 + s.seed
  t.batch_size = s.batch_size
  t.n_iters = s.train_steps
  t.log_freq = max(n, (s.train_steps // 20) // n * n)
  t.snapshot_freq = s.train_steps
  t.snapshot_freq_for_preemption = min(s.train_steps, 500)  # multiples of n: checked in Settings
  t.snapshot_sampling = False
  t.max_to_keep = 1
  if s.nf is not None:
    config.model.nf = int(s.nf)
  if s.warmup is not None:
    config.optim.warmup = int(s.warmup)
  if s.ema_rate is not None:
    config.model.ema_rate = float(s.ema_rate)
  return config


def load_split(config, split: str) -> tuple[np.ndarray, np.ndarray]:
  """All images of ``split`` ('train' / 'test') as uint8 [N, 28, 28, 1] and labels int32 [N].

  Read through score_sde.datasets (idx files or tfds, per ``config.data.data_dir``), without
  dequantization, in file order.
  """
  cfg = copy.deepcopy(config)
  cfg.data.uniform_dequantization = False
  cfg.training.batch_size = cfg.eval.batch_size = 1000
  images, labels = [], []
  for batch in datasets.get_dataset(cfg, split, shuffle=False, num_epochs=1, drop_remainder=False,
                                    process_index=0, process_count=1):
    keep = np.asarray(batch.get("mask", np.ones(len(batch["image"]))), bool)
    images.append(np.asarray(batch["image"])[keep])
    labels.append(np.asarray(batch["label"])[keep])
  x = np.round(np.concatenate(images) * 255.0).astype(np.uint8)
  return x, np.concatenate(labels).astype(np.int32)


def to_unit(images_uint8: np.ndarray) -> np.ndarray:
  return np.asarray(images_uint8, np.float32) / 255.0


def quantize(x: np.ndarray) -> np.ndarray:
  """Samples in [0, 1] (data space) -> the 8-bit grid real images live on: round(255 clip(x)) / 255.
  Non-finite values become 0 (they are counted separately)."""
  x = np.nan_to_num(np.asarray(x, np.float32), nan=0.0, posinf=1.0, neginf=0.0)
  return np.round(np.clip(x, 0.0, 1.0) * 255.0) / 255.0


# ------------------------------------------------------------------------------------------------
# Feature classifier and the Frechet distance in its features
# ------------------------------------------------------------------------------------------------
class FeatureClassifier(nn.Module):
  """Conv(32) ReLU MaxPool -> Conv(64) ReLU MaxPool -> Dense(feature_dim) ReLU -> Dense(10).

  Input: images in [0, 1], [B, 28, 28, 1]. Returns (logits [B, 10], features [B, feature_dim]);
  the features (penultimate layer, after the ReLU) define the benchmark's Frechet distance.
  """
  feature_dim: int = 64

  @nn.compact
  def __call__(self, x: Array) -> tuple[Array, Array]:
    h = x * 2.0 - 1.0
    h = nn.max_pool(nn.relu(nn.Conv(32, (3, 3))(h)), (2, 2), (2, 2))
    h = nn.max_pool(nn.relu(nn.Conv(64, (3, 3))(h)), (2, 2), (2, 2))
    features = nn.relu(nn.Dense(self.feature_dim)(h.reshape(h.shape[0], -1)))
    return nn.Dense(10)(features), features


def train_classifier(key: Array, images: np.ndarray, labels: np.ndarray, steps: int,
                     feature_dim: int, batch: int = 128, lr: float = 1e-3) -> Any:
  """Adam on the cross-entropy for ``steps`` steps of ``batch`` random training images; params.

  ``images`` uint8 [N, 28, 28, 1]. Batches are drawn on the host from ``key`` (one index draw per
  step); the update is one jitted function.
  """
  model = FeatureClassifier(feature_dim)
  init_key, data_key = jax.random.split(key)
  params = model.init(init_key, jnp.zeros((1, 28, 28, 1), jnp.float32))["params"]
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
  """(logits [N, 10], features [N, feature_dim]) of images in [0, 1], in jitted batches."""
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
  """Frechet distance of the Gaussians fitted (float64 mean, unbiased covariance) to two feature
  sets [n, d] (score_sde.evaluation.metrics.frechet_distance)."""
  a, b = np.asarray(feats_a, np.float64), np.asarray(feats_b, np.float64)
  return frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))


def get_classifier(s: Settings, train_images: np.ndarray,
                   train_labels: np.ndarray) -> tuple[Any, dict]:
  """Trains the classifier, or loads it from ``<workdir>/classifier_*.msgpack``; (params, info)."""
  path = os.path.join(s.workdir, f"classifier_f{s.feature_dim}_steps{s.classifier_steps}"
                      f"_seed{s.seed}.msgpack")
  key = jax.random.fold_in(jax.random.PRNGKey(s.seed), 1)
  template = FeatureClassifier(s.feature_dim).init(key, jnp.zeros((1, 28, 28, 1)))["params"]
  t0 = time.time()
  if os.path.exists(path):
    with open(path, "rb") as f:
      params = serialization.from_bytes(template, f.read())
    logging.info("Loaded the feature classifier from %s.", path)
    cached = True
  else:
    params = train_classifier(key, train_images, train_labels, s.classifier_steps, s.feature_dim)
    os.makedirs(s.workdir, exist_ok=True)
    with open(path + ".tmp", "wb") as f:
      f.write(serialization.to_bytes(params))
    os.replace(path + ".tmp", path)
    cached = False
  return params, {"steps": s.classifier_steps, "feature_dim": s.feature_dim, "cached": cached,
                  "seconds": round(time.time() - t0, 1), "path": path}


# ------------------------------------------------------------------------------------------------
# Score model
# ------------------------------------------------------------------------------------------------
def get_score_model(s: Settings, config):
  """Trains (or resumes / reuses) the U-Net in ``<workdir>/score_model_nf*_b*_seed*``.

  Returns (trainer, single-device EMA params, info dict).
  """
  from score_sde.evaluation import evaluate
  from score_sde.train import Trainer
  workdir = os.path.join(s.workdir, f"score_model_nf{config.model.nf}_b{s.batch_size}"
                         f"_w{config.optim.warmup}_ema{config.model.ema_rate:g}_seed{s.seed}")
  mesh = None
  if s.train_devices:
    mesh = jax.make_mesh((s.train_devices,), ("data",), axis_types=(AxisType.Auto,),
                         devices=jax.devices()[:s.train_devices])
  trainer = Trainer(config, workdir, mesh=mesh)
  t0 = time.time()
  try:
    last = trainer.train()
  finally:
    trainer.checkpoints.close()
  seconds = time.time() - t0
  step = int(jax.device_get(trainer.state.step))
  params = jax.device_put(jax.device_get(trainer.state.ema_params), jax.devices()[0])
  test_loss = evaluate.test_loss(trainer, jax.random.PRNGKey(s.seed), s.num_samples)
  num_params = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(params))
  logging.info("Score model: step %d, last train loss %s, test DSM loss %.4f (%d params, %.0f s).",
               step, last.get("loss"), test_loss, num_params, seconds)
  info = {"config": CONFIG_NAME, "nf": int(config.model.nf), "num_params": num_params,
          "trained_steps": step, "batch_size": s.batch_size, "lr": float(config.optim.lr),
          "warmup": int(config.optim.warmup), "ema_rate": float(config.model.ema_rate),
          "train_loss": last.get("loss"), "test_dsm_loss": test_loss,
          "train_seconds": round(seconds, 1),  # this invocation's training (0-ish when reused)
          "reused_checkpoint": not last, "workdir": workdir}
  return trainer, params, info


def make_score_fn(sde: sde_lib.SDE, model: nn.Module,
                  params: Any) -> Callable[[Array, Array], Array]:
  """score_fn(x, t) of the network (continuous VP convention; dropout off)."""
  return get_score_fn(sde, get_model_fn(model, params, train=False), continuous=True)


def sde_with_steps(config, n: int) -> sde_lib.SDE:
  """The config's SDE with N = n discretization steps (the PC sampler takes N steps)."""
  cfg = copy.deepcopy(config)
  cfg.model.num_scales = int(n)
  return sde_lib.get_sde(cfg)


# ------------------------------------------------------------------------------------------------
# Sampling
# ------------------------------------------------------------------------------------------------
def build_sampler(name: str, options: dict, setting, config, batch: int):
  """(sde, sampler, takes_x_T) for one configuration at one NFE (or tolerance for 'ode').

  Raises ValueError (before compiling) where the configuration cannot run at that budget.
  """
  shape = (batch, 28, 28, config.data.num_channels)
  if name == "pc":
    sde = sde_with_steps(config, int(setting))
    return sde, get_sampler("pc", sde, shape, **options), False
  sde = sde_lib.get_sde(config)
  if name == "ode":
    return sde, get_sampler("ode", sde, shape, rtol=float(setting), atol=float(setting),
                            **options), True
  return sde, get_sampler(name, sde, shape, nfe=int(setting), **options), True


def draw_samples(sampler, takes_x_T: bool, sde: sde_lib.SDE, model: nn.Module, params: Any,
                 x_T: np.ndarray, key: Array, batch: int) -> tuple[np.ndarray, int, float, float]:
  """Runs one sampler over the batches of ``x_T [n_batches * batch, ...]``.

  One ``jax.jit`` of ``(params, key, x_T) -> (x, nfe)`` is compiled once (ahead of time, timed
  separately) and called per batch; batch i uses ``fold_in(key, i)`` and rows
  [i * batch, (i + 1) * batch) of x_T. Returns (samples in model space, nfe, compile seconds,
  sampling seconds); nfe is the largest over the batches (the adaptive ODE reports the largest
  over each batch's examples, which is what the batched solve spends).
  """
  if takes_x_T:
    def program(p, k, z):
      return sampler(k, make_score_fn(sde, model, p), z)
  else:
    def program(p, k, z):
      del z  # the PC sampler draws x_T itself from k
      return sampler(k, make_score_fn(sde, model, p))
  t0 = time.time()
  compiled = jax.jit(program).lower(params, key, x_T[:batch]).compile()
  t_compile = time.time() - t0
  t0 = time.time()
  out, nfe = [], 0
  for i in range(len(x_T) // batch):
    x, n = compiled(params, jax.random.fold_in(key, i), x_T[i * batch:(i + 1) * batch])
    out.append(np.asarray(x))
    nfe = max(nfe, int(n))
  return np.concatenate(out), nfe, t_compile, time.time() - t0


def sampler_grid(s: Settings) -> list[tuple[str, str, dict, list]]:
  """[(label, registry name, options, settings)] in SAMPLER_CONFIGS order."""
  registered = set(available_samplers())
  grid = []
  for label, (name, options) in SAMPLER_CONFIGS.items():
    if (s.samplers and label not in s.samplers) or name not in registered:
      continue
    if name == "ode":
      settings = list(s.ode_tols)
    elif name == "pc":
      settings = sorted(set(s.nfes) | set(s.pc_nfes))
    else:
      settings = list(s.nfes)
    if settings:
      grid.append((label, name, dict(options), settings))
  return grid


# ------------------------------------------------------------------------------------------------
# bits/dim
# ------------------------------------------------------------------------------------------------
def bits_per_dim(key: Array, sde: sde_lib.SDE, model: nn.Module, params: Any,
                 images_uint8: np.ndarray, tol: float, batch: int, centered: bool) -> dict:
  """Discrete-data bits/dim of 8-bit images (uniform dequantization, PF-ODE likelihood).

  bpd = likelihood.discrete_bpd(model-space bpd of y = dequantize(x)), i.e. model-space bpd + 7
  for centered data; mean and standard error over the images (one dequantization and one
  Hutchinson probe per image).
  """
  lik = likelihood.get_likelihood_fn(sde, rtol=tol, atol=tol, hutchinson_type="rademacher")
  fn = jax.jit(lambda p, k, x: lik(k, make_score_fn(sde, model, p), x))
  bpds, nfes, t0 = [], [], time.time()
  for i in range(0, len(images_uint8), batch):
    k_q, k_h = jax.random.split(jax.random.fold_in(key, i))
    y = likelihood.dequantize(k_q, images_uint8[i:i + batch], centered=centered)
    bpd, _, nfe = fn(params, k_h, y)
    bpds.append(np.asarray(likelihood.discrete_bpd(bpd, centered=centered)))
    nfes.append(int(nfe))
  bpds = np.concatenate(bpds)
  return {"bpd": float(bpds.mean()), "bpd_stderr": float(bpds.std(ddof=1) / np.sqrt(len(bpds)))
          if len(bpds) > 1 else None, "nfe": float(np.mean(nfes)), "num_images": int(len(bpds)),
          "tol": tol, "seconds": round(time.time() - t0, 1)}


# ------------------------------------------------------------------------------------------------
# Output
# ------------------------------------------------------------------------------------------------
def columns(res: dict) -> list[int]:
  return sorted(set(res["nfes"]) | set(res.get("pc_nfes", [])))


def fd_table(res: dict) -> str:
  """Markdown table of the classifier-feature FD (rows: samplers, columns: NFE), floor last."""
  cols = columns(res)
  results = {label: dict(r, rows=[row for row in r["rows"] if row.get("fd") is not None])
             for label, r in res["results"].items()}
  lines = table({"results": results, "floor": {}}, cols, "fd").split("\n")
  lines.append("| *floor (real vs real)* | " + " | ".join(f"{res['floor']['fd']:.3g}"
                                                          for _ in cols) + " |")
  return "\n".join(lines)


def plot(res: dict, path: str) -> None:
  """FD vs NFE (log-log), one line per sampler, the real-vs-real noise floor dashed."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(8, 5.5))
  markers = "osv^D<>ph*Xd"
  colors = [plt.cm.tab10(k) for k in range(10)] + ["darkgoldenrod", "magenta", "lime"]
  reference_colors = {"pc": "black", "ode": "dimgray"}
  for i, (label, r) in enumerate(res["results"].items()):
    rows = sorted([row for row in r["rows"] if row.get("fd") is not None], key=lambda x: x["nfe"])
    if rows:
      ls = ":" if r["sampler"] in ("pc", "ode") else "-"
      ax.plot([row["nfe"] for row in rows], [row["fd"] for row in rows], ls,
              marker=markers[i % len(markers)], ms=4, lw=1.2, label=label,
              color=reference_colors.get(r["sampler"], colors[i % len(colors)]))
  ax.axhline(res["floor"]["fd"], color="k", ls="--", lw=1.0, label="floor (real vs real)")
  ax.set_xscale("log")
  ax.set_yscale("log")
  ax.set_xlabel("NFE (score-network evaluations per sample)")
  ax.set_ylabel("Frechet distance in classifier features (not FID)")
  m, c = res["model"], res["classifier"]
  ax.set_title(f"MNIST U-Net (nf={m['nf']}, {m['trained_steps']} steps, batch {m['batch_size']}), "
               f"VP SDE; n={res['settings']['num_samples']}; classifier acc "
               f"{100 * c['test_accuracy']:.1f}%", fontsize=9)
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(fontsize=7, ncol=2)
  fig.tight_layout()
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  fig.savefig(path, dpi=100)
  plt.close(fig)


def summary(res: dict) -> str:
  m, c, b = res["model"], res["classifier"], res.get("bpd")
  lines = [f"score model: {CONFIG_NAME}, nf={m['nf']}, {m['num_params']} params, "
           f"{m['trained_steps']} steps at batch {m['batch_size']}, last train loss "
           + ("-" if m["train_loss"] is None else f"{m['train_loss']:.4f}")
           + f", test DSM loss {m['test_dsm_loss']:.4f}",
           f"feature classifier: {c['steps']} Adam steps, test accuracy "
           f"{100 * c['test_accuracy']:.2f}%, feature dim {c['feature_dim']}",
           f"noise floor (real vs real, n={res['settings']['num_samples']}): FD "
           f"{res['floor']['fd']:.4g}; uniform noise vs real: FD {res['fd_uniform_noise']:.4g}"]
  if b:
    err = f" +- {b['bpd_stderr']:.3f}" if b["bpd_stderr"] is not None else ""
    lines.append(f"bits/dim ({b['num_images']} test images, uniform dequantization): "
                 f"{b['bpd']:.3f}{err} ({b['nfe']:.0f} NFE)")
  return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# Merging runs
# ------------------------------------------------------------------------------------------------
# Settings that fix the score model, the classifier, the reference images and x_T: runs that agree
# on them drew their samples from the same model and noise, so their rows can share one table.
SHARED_SETTINGS = ("train_steps", "batch_size", "nf", "warmup", "ema_rate", "classifier_steps",
                   "feature_dim", "num_samples", "sample_batch", "seed")


def _run_entries(res: dict) -> list[dict]:
  """The runs a result is made of: its own ``runs``, or the result itself as one run."""
  if "runs" in res:
    return copy.deepcopy(res["runs"])
  return [{"settings": res["settings"], "seconds": res.get("seconds"),
           "phase_seconds": res.get("phase_seconds")}]


def merge_results(results: Sequence[dict], rtol: float = 1e-3) -> dict:
  """One result from several runs of the same model, classifier, references and x_T.

  Rows of a sampler are joined by setting (NFE, or ODE tolerance); a setting present in more than
  one run must have the same FD within ``rtol`` (it is the same computation) and is kept once,
  from the first run. bits/dim comes from the first run that has it; ``runs`` lists every run's
  settings and seconds. Raises ValueError when the runs differ in a setting of SHARED_SETTINGS,
  in the model's test loss, the classifier's accuracy or the noise floor (then their samples are
  not comparable), or when a repeated setting gives another FD.
  """
  if not results:
    raise ValueError("Nothing to merge: give at least one result.")
  first = results[0]
  close = functools.partial(math.isclose, rel_tol=rtol)
  for i, res in enumerate(results[1:], 1):
    diff = [k for k in SHARED_SETTINGS
            if res["settings"].get(k) != first["settings"].get(k)]
    if diff:
      raise ValueError(f"Result {i} differs from result 0 in settings {diff}: its samples come "
                       "from another model, classifier or x_T; rerun it with the first run's "
                       "flags and --workdir.")
    checks = {"model test DSM loss": (res["model"]["test_dsm_loss"],
                                      first["model"]["test_dsm_loss"]),
              "classifier test accuracy": (res["classifier"]["test_accuracy"],
                                           first["classifier"]["test_accuracy"]),
              "noise floor FD": (res["floor"]["fd"], first["floor"]["fd"])}
    off = [f"{name} {a:.6g} vs {b:.6g}" for name, (a, b) in checks.items() if not close(a, b)]
    if off:
      raise ValueError(f"Result {i} has the same settings as result 0 but {'; '.join(off)}: "
                       "not the same cached model / classifier (another --workdir?).")

  merged = copy.deepcopy({k: v for k, v in first.items()
                          if k not in ("results", "runs", "phase_seconds")})
  merged["runs"] = [run for res in results for run in _run_entries(res)]
  merged["seconds"] = round(sum(run.get("seconds") or 0.0 for run in merged["runs"]), 1)
  for key, cast in (("nfes", int), ("pc_nfes", int), ("ode_tols", float)):
    merged[key] = sorted({cast(v) for res in results for v in res.get(key, [])})
  if merged.get("bpd") is None:
    merged["bpd"] = next((res["bpd"] for res in results if res.get("bpd")), None)

  labels = list(dict.fromkeys(label for res in results for label in res["results"]))
  order = {label: i for i, label in enumerate(SAMPLER_CONFIGS)}
  labels.sort(key=lambda label: order.get(label, len(order)))
  merged["results"] = {}
  for label in labels:
    entries = [res["results"][label] for res in results if label in res["results"]]
    rows: dict = {}
    for entry in entries:
      for row in entry["rows"]:
        kept = rows.setdefault(row["setting"], row)
        if kept is not row and None not in (kept["fd"], row["fd"]) and not close(kept["fd"],
                                                                                  row["fd"]):
          raise ValueError(f"{label} at setting {row['setting']}: FD {kept['fd']:.6g} in one run "
                           f"and {row['fd']:.6g} in another; the runs do not share model and x_T.")
    merged["results"][label] = dict(copy.deepcopy(entries[0]),
                                    rows=[copy.deepcopy(rows[k]) for k in sorted(rows)])
  return merged


# ------------------------------------------------------------------------------------------------
# The benchmark
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Prepared:
  """Steps 1-2 of the module docstring: the score model and the quality measure."""
  config: Any
  trainer: Any
  params: Any                # single-device EMA parameters of the score model
  clf: Any                   # feature-classifier parameters
  ref_feats: np.ndarray      # classifier features of the --num_samples reference test images
  test_x: np.ndarray         # uint8 test images
  bpd_idx: np.ndarray        # indices of the --num_bpd bits/dim test images
  info: dict                 # JSON entries: model, classifier, floor, fd_uniform_noise

  @property
  def model(self) -> nn.Module:
    return self.trainer.model

  def fd(self, s: Settings, x_model: np.ndarray) -> float:
    """Classifier-feature FD of samples in model space against the reference images."""
    images = quantize(np.asarray(self.trainer.inverse_scaler(x_model)))
    return feature_fd(classifier_outputs(self.clf, s.feature_dim, images)[1], self.ref_feats)


def prepare(s: Settings, log: Callable[[str], None] = print) -> Prepared:
  """Trains / reuses the score model and the classifier; reference features and noise floor."""
  s.check()
  config = mnist_config(s)
  info: dict = {}
  trainer, params, info["model"] = get_score_model(s, config)
  log(f"score model ready: step {info['model']['trained_steps']}, test DSM loss "
      f"{info['model']['test_dsm_loss']:.4f} ({info['model']['train_seconds']} s)")
  train_x, train_y = load_split(config, "train")
  test_x, test_y = load_split(config, "test")
  clf, info["classifier"] = get_classifier(s, train_x, train_y)
  logits, test_feats = classifier_outputs(clf, s.feature_dim, to_unit(test_x))
  info["classifier"]["test_accuracy"] = float(np.mean(np.argmax(logits, -1) == test_y))
  log(f"classifier: test accuracy {100 * info['classifier']['test_accuracy']:.2f}% "
      f"({info['classifier']['seconds']} s{', cached' if info['classifier']['cached'] else ''})")
  if info["classifier"]["test_accuracy"] < 0.97:
    log("WARNING: classifier test accuracy below 97%; raise --classifier_steps.")
  rng = np.random.default_rng(s.seed)
  perm = rng.permutation(len(test_x))
  n = s.num_samples
  ref_idx, floor_idx, bpd_idx = perm[:n], perm[n:2 * n], perm[:s.num_bpd]
  ref_feats = test_feats[ref_idx]
  info["floor"] = {"fd": feature_fd(test_feats[floor_idx], ref_feats)}
  noise = quantize(rng.uniform(size=(n,) + test_x.shape[1:]))
  info["fd_uniform_noise"] = feature_fd(classifier_outputs(clf, s.feature_dim, noise)[1],
                                        ref_feats)
  log(f"noise floor (real vs real, n={n}): FD {info['floor']['fd']:.4g}; "
      f"uniform noise vs real: FD {info['fd_uniform_noise']:.4g}")
  return Prepared(config=config, trainer=trainer, params=params, clf=clf, ref_feats=ref_feats,
                  test_x=test_x, bpd_idx=bpd_idx, info=info)


def prior_noise(s: Settings, sde: sde_lib.SDE, batch: int) -> tuple[np.ndarray, Array, Array]:
  """(x_T [n_batches * batch, 28, 28, 1], sampling key, bits/dim key): the same for every run
  with the same seed, --num_samples and batch."""
  k_T, k_sample, k_bpd = jax.random.split(jax.random.PRNGKey(s.seed), 3)
  n_batches = math.ceil(s.num_samples / batch)
  return np.asarray(sde.prior_sampling(k_T, (n_batches * batch, 28, 28, 1))), k_sample, k_bpd


def run(s: Settings, log: Callable[[str], None] = print) -> dict:
  """Runs steps 1-4 of the module docstring; returns the JSON-able result (also written)."""
  t_start = time.time()
  prep = prepare(s, log)
  config, params, model = prep.config, prep.params, prep.model
  res: dict = {"settings": dataclasses.asdict(s), "nfes": list(s.nfes), "pc_nfes": list(s.pc_nfes),
               "ode_tols": list(s.ode_tols), "jax": jax.__version__,
               "backend": jax.default_backend(), "results": {}, "phase_seconds": {}, **prep.info}
  res["phase_seconds"]["score_model_and_classifier"] = round(time.time() - t_start, 1)
  phase = res["phase_seconds"]
  n = s.num_samples
  test_x, bpd_idx = prep.test_x, prep.bpd_idx

  # 3. samplers
  batch = min(s.sample_batch, n)
  sde = sde_lib.get_sde(config)
  x_T, k_sample, k_bpd = prior_noise(s, sde, batch)
  for label, name, options, settings in sampler_grid(s):
    rows = []
    for v in settings:
      try:
        sde_v, sampler, takes_x_T = build_sampler(name, options, v, config, batch)
      except ValueError as e:
        log(f"  {label} @ {v}: skipped ({e})")
        continue
      x, nfe, t_compile, t_run = draw_samples(sampler, takes_x_T, sde_v, model, params, x_T,
                                              k_sample, batch)
      x = x[:n]
      finite = np.isfinite(x.reshape(n, -1)).all(1)
      fd = prep.fd(s, x)
      rows.append({"setting": v, "nfe": nfe, "fd": fd if np.isfinite(fd) else None,
                   "finite": bool(finite.all()), "nonfinite_samples": int((~finite).sum()),
                   "compile_seconds": round(t_compile, 2), "seconds": round(t_run, 2)})
      log(f"  {label:22s} nfe={nfe:5d}  FD={fd:8.4g}  (compile {t_compile:.1f}s, "
          f"sample {t_run:.1f}s)")
    res["results"][label] = {"sampler": name, "options": options, "rows": rows,
                             "stochastic": label in STOCHASTIC or name == "pc"}
    res["seconds"] = round(time.time() - t_start, 1)
    if s.out:  # rewritten after every sampler, so a cut run keeps its numbers
      write_json(s.out, res)

  phase["sampling"] = round(time.time() - t_start - sum(phase.values()), 1)

  # 4. bits/dim
  if s.num_bpd > 0:
    res["bpd"] = bits_per_dim(k_bpd, sde, model, params, test_x[bpd_idx], s.bpd_tol,
                              min(batch, s.num_bpd), bool(config.data.centered))
    log(f"bits/dim: {res['bpd']['bpd']:.3f} ({res['bpd']['nfe']:.0f} NFE, "
        f"{res['bpd']['seconds']} s)")
  phase["bpd"] = round(time.time() - t_start - sum(phase.values()), 1)
  res["seconds"] = round(time.time() - t_start, 1)
  if s.out:
    write_json(s.out, res)
    log(f"wrote {s.out}")
  log("\nFrechet distance in classifier features (NOT FID) to held-out test images:\n"
      + fd_table(res) + "\n\n" + summary(res) + f"\n\ntotal {res['seconds']} s")
  if s.plot:
    plot(res, s.plot)
    log(f"wrote {s.plot}")
  return res


def main(argv: Sequence[str]) -> dict:
  """absl entry point. From Python, ``main(['prog', '--flag=value', ...])`` parses those flags
  (all others reset to their defaults) and runs the benchmark; returns the result dict."""
  if any(a.startswith("-") for a in argv[1:]):
    FLAGS.unparse_flags()
    FLAGS(list(argv))
  elif len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments {list(argv[1:])}.")
  if FLAGS.from_json and FLAGS.merge:
    raise app.UsageError("Give --from_json or --merge, not both.")
  if FLAGS.merge or FLAGS.from_json:
    loaded = []
    for path in FLAGS.merge or [FLAGS.from_json]:
      with open(path) as f:
        loaded.append(json.load(f))
    res = loaded[0]
    if FLAGS.merge:
      res = merge_results(loaded)
      if FLAGS.out:
        write_json(FLAGS.out, res)
        print(f"wrote {FLAGS.out}")
    print(fd_table(res) + "\n\n" + summary(res))
    if FLAGS.plot:
      plot(res, FLAGS.plot)
      print(f"wrote {FLAGS.plot}")
    return res
  return run(Settings.from_flags(), log=lambda m: print(m, flush=True))


def _cli(argv: Sequence[str]) -> None:
  main(argv)  # app.run would hand a returned dict to sys.exit


if __name__ == "__main__":
  app.run(_cli)
