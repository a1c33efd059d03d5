"""What the two MNIST sampler scripts share (imported by them, never run).

``benchmark_samplers_mnist`` (our samplers at every NFE, bits/dim) and
``compare_reference_samplers_mnist`` (ours vs diffusers) sample the same trained network and score
the samples the same way, so that with the same flags their numbers are directly comparable:

* :class:`Settings` and :func:`define_flags`: the flags both take, named, typed and defaulted as
  the fields of :class:`Settings`.
* :func:`prepare`: the score model (the U-Net of configs/mnist/vp_continuous.py, trained with the
  ordinary training loop or reused from ``--workdir``), the feature classifier
  (:mod:`score_sde.evaluation.mnist_features`, cached in ``--workdir``), the classifier features of
  ``--num_samples`` held-out reference test images, the real-vs-real noise floor and the
  uniform-noise ceiling. :meth:`Prepared.fd` scores a sample set. Its two halves,
  :func:`get_score_model` (any configs/mnist config: ``mnist_config(s, config_module)``) and
  :func:`prepare_reference` (everything but the score model), serve scripts that compare several
  score models against one classifier (``recipes_mnist``).
* :func:`prior_noise`: x_T and the sampling / bits/dim keys, the same for every run with the same
  seed, ``--num_samples`` and batch.
* :func:`draw_samples`: one sampler over all batches, compiled once.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
import time
import typing
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import numpy as np
from absl import flags, logging
from flax import serialization
from jax.sharding import AxisType

from configs.mnist import vp_continuous
from experiments.common import SAMPLER_CONFIGS
from score_sde import datasets, sde_lib
from score_sde.evaluation import mnist_features
from score_sde.models import get_model_fn, get_score_fn
from score_sde.sampling.base import Sampler

Array = jax.Array
FLAGS = flags.FLAGS
CONFIG_NAME = "configs/mnist/vp_continuous.py"


@dataclasses.dataclass(frozen=True)
class Settings:
  """Everything one run depends on. Each field is a flag of the same name, type and default
  (:func:`define_flags`); a script that has no flag for a field runs with its default."""
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
  def from_flags(cls, flag_values: flags.FlagValues = FLAGS, **overrides) -> "Settings":
    """The values of the parsed flags (fields without a flag keep their defaults), then
    ``overrides``."""
    values = {f.name: flag_values[f.name].value for f in dataclasses.fields(cls)
              if f.name in flag_values}
    for name, value in values.items():
      kind, item = _field_type(name)
      if kind is tuple:
        values[name] = tuple(item(v) for v in value)
    return cls(**{**values, **overrides})

  @property
  def batching(self) -> tuple[int, int]:
    """(samples per sampler call, number of calls): min(sample_batch, num_samples) and enough
    calls for num_samples."""
    batch = min(self.sample_batch, self.num_samples)
    return batch, math.ceil(self.num_samples / batch)

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


# flag (= Settings field) -> help; a flag's type and default are its field's.
HELP = {
    "data_dir": "Directory with the four MNIST idx files (.gz or not), or a tfds data directory; "
                "None: tfds' default location.",
    "workdir": "Cache of the score-model checkpoint and the classifier parameters (reruns reuse "
               "them).",
    "train_steps": "Training steps of the score model (multiple of 5).",
    "batch_size": "Training batch of the score model.",
    "train_devices": "Train data-parallel on the first N devices (0: all).",
    "nf": "U-Net width config.model.nf (default: the config's, 32).",
    "warmup": "Learning-rate warmup steps (default: the config's, 1000).",
    "ema_rate": "EMA decay of the sampled parameters (default: the config's, 0.999; a run of a "
                "few thousand steps wants less, e.g. 0.99).",
    "classifier_steps": "Adam steps of the feature classifier (batch 128).",
    "feature_dim": "Width of the classifier's penultimate (feature) layer.",
    "num_samples": "Samples per sampler and NFE; also the size of the real reference set and of "
                   "each noise-floor set.",
    "sample_batch": "Samples per jitted sampler call.",
    "nfes": "NFE grid (fast samplers and PC).",
    "pc_nfes": "Extra NFEs for the PC reference only.",
    "ode_tols": "rtol = atol of the adaptive PF-ODE reference runs.",
    "samplers": "Sampler labels of common.SAMPLER_CONFIGS (default: all).",
    "num_bpd": "Test images for bits/dim (0: skip).",
    "bpd_tol": "rtol = atol of the likelihood ODE.",
    "seed": "Seed of the classifier, the prior noise and the data subsets.",
    "out": "JSON output ('' : none).",
    "plot": "PNG output ('' : none).",
}
# The flags both MNIST scripts take (the model, the classifier, the references and x_T).
SHARED_FLAGS = ("data_dir", "workdir", "train_steps", "batch_size", "train_devices", "nf",
                "warmup", "ema_rate", "classifier_steps", "feature_dim", "num_samples",
                "sample_batch", "nfes", "seed", "out")


def define_flags(flag_values: flags.FlagValues = FLAGS, names: Sequence[str] = SHARED_FLAGS,
                 **defaults) -> None:
  """Defines on ``flag_values`` one flag per Settings field of ``names``: the field's name and
  type (a tuple is a comma-separated list), default ``Settings(**defaults)``'s value, help
  :data:`HELP`'s."""
  d = Settings(**defaults)
  define = {str: flags.DEFINE_string, int: flags.DEFINE_integer, float: flags.DEFINE_float}
  for name in names:
    kind, value = _field_type(name)[0], getattr(d, name)
    if kind is tuple:
      flags.DEFINE_list(name, [str(v) for v in value], HELP[name], flag_values=flag_values)
    else:
      define[kind](name, value, HELP[name], flag_values=flag_values)


def _field_type(name: str) -> tuple[type, type]:
  """(type, item type) of a Settings field: Optional[int] -> (int, int), tuple[float, ...] ->
  (tuple, float)."""
  hint = typing.get_type_hints(Settings)[name]
  if typing.get_origin(hint) is tuple:
    return tuple, typing.get_args(hint)[0]
  kind = next(a for a in typing.get_args(hint) or (hint,) if a is not type(None))
  return kind, kind


# --- data ----------------------------------------------------------------------------------------
def mnist_config(s: Settings, config_module: Any = vp_continuous):
  """configs/mnist/vp_continuous.py (or another configs/mnist module) with the benchmark's data,
  batch, length and overrides."""
  config = config_module.get_config()
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


def quantize(x: np.ndarray) -> np.ndarray:
  """Samples in [0, 1] (data space) -> the 8-bit grid real images live on: round(255 clip(x)) / 255.
  Non-finite values become 0 (they are counted separately)."""
  x = np.nan_to_num(np.asarray(x, np.float32), nan=0.0, posinf=1.0, neginf=0.0)
  return np.round(np.clip(x, 0.0, 1.0) * 255.0) / 255.0


# --- the feature classifier and the score model --------------------------------------------------
def get_classifier(s: Settings, train_images: np.ndarray,
                   train_labels: np.ndarray) -> tuple[Any, dict]:
  """Trains the classifier (key fold_in(PRNGKey(seed), 1)), or loads it from
  ``<workdir>/classifier_*.msgpack``; (params, info)."""
  path = os.path.join(s.workdir, f"classifier_f{s.feature_dim}_steps{s.classifier_steps}"
                      f"_seed{s.seed}.msgpack")
  key = jax.random.fold_in(jax.random.PRNGKey(s.seed), 1)
  t0 = time.time()
  if os.path.exists(path):
    with open(path, "rb") as f:
      params = serialization.from_bytes(mnist_features.init_params(key, s.feature_dim), f.read())
    logging.info("Loaded the feature classifier from %s.", path)
    cached = True
  else:
    params = mnist_features.train_classifier(key, train_images, train_labels, s.classifier_steps,
                                             s.feature_dim)
    os.makedirs(s.workdir, exist_ok=True)
    with open(path + ".tmp", "wb") as f:
      f.write(serialization.to_bytes(params))
    os.replace(path + ".tmp", path)
    cached = False
  return params, {"steps": s.classifier_steps, "feature_dim": s.feature_dim, "cached": cached,
                  "seconds": round(time.time() - t0, 1), "path": path}


def get_score_model(s: Settings, config, config_name: str = CONFIG_NAME,
                    model_dir: Optional[str] = None, teacher: Optional[Callable] = None):
  """Trains (or resumes / reuses) the U-Net of ``config`` (``config_name``: the file it comes from,
  for the record) in ``<model_dir>/score_model_nf*_b*_seed*`` (``model_dir`` default
  ``s.workdir``). ``teacher``: the teacher score_fn of a consistency-distillation config (passed
  to the Trainer).

  Returns (trainer, single-device EMA params, info dict).
  """
  from score_sde.evaluation import evaluate
  from score_sde.train import Trainer
  workdir = os.path.join(model_dir or s.workdir, f"score_model_nf{config.model.nf}_b{s.batch_size}"
                         f"_w{config.optim.warmup}_ema{config.model.ema_rate:g}_seed{s.seed}")
  mesh = None
  if s.train_devices:
    mesh = jax.make_mesh((s.train_devices,), ("data",), axis_types=(AxisType.Auto,),
                         devices=jax.devices()[:s.train_devices])
  trainer = Trainer(config, workdir, mesh=mesh, teacher=teacher)
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
  info = {"config": config_name, "nf": int(config.model.nf), "num_params": num_params,
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


# --- the prepared benchmark --------------------------------------------------------------------
@dataclasses.dataclass
class Prepared:
  """The score model and the quality measure of a run (:func:`prepare`)."""
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
    feats = mnist_features.classifier_outputs(self.clf, s.feature_dim, images)[1]
    return mnist_features.feature_fd(feats, self.ref_feats)


def prepare(s: Settings, log: Callable[[str], None] = print) -> Prepared:
  """Trains / reuses the score model and the classifier; reference features and noise floor."""
  s.check()
  config = mnist_config(s)
  info: dict = {}
  trainer, params, info["model"] = get_score_model(s, config)
  log(f"score model ready: step {info['model']['trained_steps']}, test DSM loss "
      f"{info['model']['test_dsm_loss']:.4f} ({info['model']['train_seconds']} s)")
  return Prepared(config=config, trainer=trainer, params=params, info=info,
                  **prepare_reference(s, config, info, log))


def prepare_reference(s: Settings, config, info: dict,
                      log: Callable[[str], None] = print) -> dict:
  """Everything of :func:`prepare` but the score model: trains / loads the classifier, the
  reference features and the noise floor (``config`` only names the data). Adds 'classifier',
  'floor' and 'fd_uniform_noise' to ``info``; returns the other :class:`Prepared` fields (clf,
  ref_feats, test_x, bpd_idx)."""
  train_x, train_y = load_split(config, "train")
  test_x, test_y = load_split(config, "test")
  clf, info["classifier"] = get_classifier(s, train_x, train_y)
  logits, test_feats = mnist_features.classifier_outputs(clf, s.feature_dim,
                                                         mnist_features.to_unit(test_x))
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
  info["floor"] = {"fd": mnist_features.feature_fd(test_feats[floor_idx], ref_feats)}
  noise = quantize(rng.uniform(size=(n,) + test_x.shape[1:]))
  info["fd_uniform_noise"] = mnist_features.feature_fd(
      mnist_features.classifier_outputs(clf, s.feature_dim, noise)[1], ref_feats)
  log(f"noise floor (real vs real, n={n}): FD {info['floor']['fd']:.4g}; "
      f"uniform noise vs real: FD {info['fd_uniform_noise']:.4g}")
  return dict(clf=clf, ref_feats=ref_feats, test_x=test_x, bpd_idx=bpd_idx)


# --- sampling ------------------------------------------------------------------------------------
def prior_noise(s: Settings, sde: sde_lib.SDE) -> tuple[np.ndarray, Array, Array]:
  """(x_T [num_calls * batch, 28, 28, 1] (``s.batching``), sampling key, bits/dim key): the same
  for every run with the same seed, --num_samples and --sample_batch."""
  batch, num_calls = s.batching
  k_T, k_sample, k_bpd = jax.random.split(jax.random.PRNGKey(s.seed), 3)
  return np.asarray(sde.prior_sampling(k_T, (num_calls * batch, 28, 28, 1))), k_sample, k_bpd


def draw_samples(sampler: Sampler, sde: sde_lib.SDE, model: nn.Module, params: Any, key: Array,
                 s: Settings, x_T: Optional[np.ndarray]) -> tuple[np.ndarray, int, float, float]:
  """Runs one sampler over the ``s.batching`` batches.

  One ``jax.jit`` of ``(params, key, x_T) -> (x, nfe)`` is compiled once (ahead of time, timed
  separately) and called per batch; batch i uses ``fold_in(key, i)`` and rows
  [i * batch, (i + 1) * batch) of ``x_T``, or, with ``x_T`` None, the sampler's own prior draw from
  that key. Returns (samples in model space [num_calls * batch, ...], nfe, compile seconds,
  sampling seconds); nfe is the largest over the batches (the adaptive ODE reports the largest
  over each batch's examples, which is what the batched solve spends).
  """
  batch, num_calls = s.batching

  def program(p, k, z):
    return sampler(k, make_score_fn(sde, model, p), z)

  def rows(i):
    return None if x_T is None else x_T[i * batch:(i + 1) * batch]

  t0 = time.time()
  compiled = jax.jit(program).lower(params, key, rows(0)).compile()
  t_compile = time.time() - t0
  t0 = time.time()
  out, nfe = [], 0
  for i in range(num_calls):
    x, n = compiled(params, jax.random.fold_in(key, i), rows(i))
    out.append(np.asarray(x))
    nfe = max(nfe, int(n))
  return np.concatenate(out), nfe, t_compile, time.time() - t0
