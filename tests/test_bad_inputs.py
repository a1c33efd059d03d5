"""Bad inputs fail at start-up with a message naming the field (fast: validation only, no training).

Each case would otherwise fail late (after training, for the eval fields under ``--mode all``), or
silently (``model.dtype=foo`` used to mean float32). The CLI cases check the one-line message of an
unknown ``--config.<field>`` and that a bad eval field stops ``--mode all`` before any step.
"""
from __future__ import annotations

import importlib
import logging
import math
import os
import pathlib
import subprocess
import sys

import pytest
from absl import flags

from conftest import tiny_toy_config
from score_sde.config_validation import (UnknownConfigFieldError, unknown_override_message,
                                         validate_config)

# ml_collections loads each config file with the deprecated load_module(); not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")

REPO = pathlib.Path(__file__).resolve().parents[1]


def _config(name: str):
  return importlib.import_module(f"configs.{name}").get_config()


def _set(cfg, **overrides):
  """``cfg`` with the overrides, of any type (a Python config can hold any value)."""
  with cfg.ignore_type():
    for key, value in overrides.items():
      node = cfg
      *path, last = key.split(".")
      for p in path:
        node = node[p]
      node[last] = value
  return cfg


def _errors(cfg) -> str:
  with pytest.raises(ValueError) as info:
    validate_config(cfg, num_devices=8)
  return str(info.value)


# (field, bad value): the toy config (vector data, fast to validate).
TOY_CASES = [
    # the examples
    ("eval.hutchinson_type", "foo"), ("eval.rtol", -1.0), ("model.dropout", 1.5),
    ("optim.warmup", -1), ("optim.lr", math.nan), ("model.dtype", "foo"),
    ("sampling.num_samples", 0), ("data.num_components", 0),
    # more of every kind: ranges, choices, types, non-finite numbers
    ("eval.atol", 0.0), ("eval.num_bpd_samples", 0), ("eval.bpd_repeats", 0),
    ("eval.begin_ckpt", -1), ("eval.batch_size", 0), ("eval.num_samples", -5),
    ("eval.inception_size", 64), ("eval.inception_sha256", "None"), ("eval.num_seeds", 0),
    ("eval.progress_secs", -1.0), ("eval.enable_bpd", "yes"),
    ("sampling.ode_method", "rk4"), ("sampling.predictor", "euler"),
    ("sampling.corrector", "metropolis"), ("sampling.snr", -0.1), ("sampling.batch_size", 0),
    ("sampling.rtol", math.inf), ("sampling.n_steps_each", -1), ("sampling.nfe", 0),
    ("training.nan_policy", "ignore"), ("training.n_jitted_steps", 0), ("training.n_iters", "10"),
    ("training.continuous", 1), ("training.max_to_keep", 0), ("training.label_dropout", 1.5),
    ("model.ema_rate", 1.0), ("model.parametrization", "noise"), ("model.num_classes", -1),
    ("model.sigma_min", 0.0), ("model.beta_max", -1.0), ("model.num_scales", 0),
    ("model.nf", 0), ("model.fourier_scale", 0.0), ("model.embedding_type", "sinusoidal"),
    ("optim.beta1", 1.0), ("optim.grad_clip", 0.0), ("optim.weight_decay", -0.1),
    ("optim.optimizer", "sgd"), ("optim.eps", 0.0), ("optim.lr", -1e-4),
    ("data.gmm_std", 0.0), ("data.gmm_radius", -1.0), ("data.dim", -2),
    ("seed", -1),
]


@pytest.mark.parametrize("field,value", TOY_CASES, ids=[f"{f}={v!r}" for f, v in TOY_CASES])
def test_bad_value_is_named_at_startup(field, value):
  message = _errors(_set(tiny_toy_config(), **{field: value}))
  assert f"config.{field}" in message, message


# (config, overrides, field named): image configs and cross-field rules.
IMAGE_CASES = [
    ("mnist.vp_continuous", {"model.ch_mult": ()}, "model.ch_mult"),
    ("mnist.vp_continuous", {"data.image_size": 0}, "data.image_size"),
    ("mnist.vp_continuous", {"data.num_channels": 0}, "data.num_channels"),
    ("mnist.vp_continuous", {"data.mnist_resize": "crop"}, "data.mnist_resize"),
    ("mnist.vp_continuous", {"eval.enable_sampling": True, "eval.is_splits": 300},
     "eval.is_splits"),
    ("mnist.vp_continuous", {"eval.enable_sampling": True, "eval.batch_size": 252},
     "eval.batch_size"),
    ("mnist.vp_continuous", {"data.dataset": "imagenet"}, "config.data.dataset"),
    ("ve.cifar10_ncsnpp_continuous", {"model.conv_size": 5}, "model.conv_size"),
    ("ve.cifar10_ncsnpp_continuous", {"model.progressive": "skip"}, "model.progressive"),
    ("ve.cifar10_ncsnpp_continuous", {"model.fir_kernel": []}, "model.fir_kernel"),
    ("ve.cifar10_ncsnpp_continuous", {"model.sigma_max": 0.001}, "model.sigma_min"),
    ("ve.ncsn.cifar10", {"optim.amsgrad": True}, "optim.amsgrad"),
    ("ve.ncsn.cifar10", {"model.interpolation": "bicubic"}, "model.interpolation"),
    ("vp.cifar10_ddpm", {"eval.end_ckpt": 5, "eval.begin_ckpt": 9}, "eval.end_ckpt"),
    ("vp.cifar10_ddpm", {"model.attn_resolutions": (0,)}, "model.attn_resolutions"),
    ("subvp.cifar10_ddpmpp_continuous", {"training.continuous": False}, "training.continuous"),
]


@pytest.mark.parametrize("name,overrides,field", IMAGE_CASES,
                         ids=[f"{n}:{','.join(o)}" for n, o, _ in IMAGE_CASES])
def test_bad_image_config_is_named_at_startup(name, overrides, field):
  message = _errors(_set(_config(name), **overrides))
  assert field in message, message


def test_gmm_weights_one_per_component():
  message = _errors(tiny_toy_config(**{"data.gmm_weights": (1.0, 2.0)}))
  assert "config.data.gmm_weights has 2 entries" in message and "num_components=8" in message


def test_every_problem_is_listed_in_one_error():
  """One round to fix a config: every bad field is in the same ValueError, one line each."""
  cfg = tiny_toy_config(**{"eval.hutchinson_type": "foo", "eval.rtol": -1.0,
                           "model.dropout": 1.5, "optim.lr": math.nan})
  message = _errors(cfg)
  lines = message.splitlines()
  assert lines[0] == "Invalid config:"
  for field in ("eval.hutchinson_type", "eval.rtol", "model.dropout", "optim.lr"):
    assert sum(f"config.{field}" in line for line in lines) == 1, (field, message)


def test_messages_say_what_to_change():
  message = _errors(tiny_toy_config(**{"eval.hutchinson_type": "foo"}))
  assert "config.eval.hutchinson_type='foo' is unknown; choose one of ['rademacher'" in message
  message = _errors(tiny_toy_config(**{"optim.warmup": -1}))
  assert "config.optim.warmup must be an integer >= 0" in message and "got -1" in message
  message = _errors(tiny_toy_config(**{"model.dropout": 1.5}))
  assert "config.model.dropout must be a finite number in [0, 1), got 1.5" in message


def test_missing_required_field_is_named():
  cfg = tiny_toy_config()
  del cfg.eval["hutchinson_type"]
  assert "config.eval.hutchinson_type is missing" in _errors(cfg)


def test_optional_fields_accept_none_and_their_empty_values():
  """None (an unset placeholder) and '' mean "the default" where the code says so."""
  validate_config(tiny_toy_config(**{"model.parametrization": ""}), num_devices=8)
  validate_config(tiny_toy_config(**{"model.parametrization": None}), num_devices=8)
  validate_config(tiny_toy_config(**{"model.parametrization": "v"}), num_devices=8)
  validate_config(tiny_toy_config(**{"eval.inception_sha256": ""}), num_devices=8)
  validate_config(tiny_toy_config(**{"eval.end_ckpt": -1}), num_devices=8)
  validate_config(tiny_toy_config(**{"optim.grad_clip": -1.0}), num_devices=8)


def test_a_field_without_a_check_is_reported(caplog):
  cfg = tiny_toy_config()
  cfg.training.n_iterz = 5   # a typo in a Python config
  with caplog.at_level(logging.WARNING):
    validate_config(cfg, num_devices=8)
  assert "training.n_iterz" in caplog.text and "no start-up check" in caplog.text


# --- the command line -------------------------------------------------------------------------
def test_unknown_override_message_names_the_field_and_the_valid_ones():
  cfg = tiny_toy_config()
  message = unknown_override_message(cfg, "training.foo")
  assert "'training.foo'" in message and "Valid fields of config.training:" in message
  assert "n_iters" in message and "\n" not in message
  assert "Did you mean training.n_iters?" in unknown_override_message(cfg, "training.n_iterz")
  assert "Valid fields of config: data, eval" in unknown_override_message(cfg, "trainin.n_iters")
  assert "sampling.options is a dict" in unknown_override_message(cfg, "sampling.options.order")
  assert unknown_override_message(cfg, "training.n_iters") is None
  assert unknown_override_message(cfg, "sampling.options") is None


def _parse(args):
  if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
  define_flags = importlib.import_module("experiments.main").define_flags
  argv = ["main.py", f"--config={REPO / 'configs/toy/vp.py'}", "--workdir=w", *args]
  fv = flags.FlagValues()
  define_flags(fv, sys_argv=argv)
  fv(argv)
  return fv


def test_unknown_override_fails_flag_parsing():
  with pytest.raises(UnknownConfigFieldError, match=r"'training\.foo'.*batch_size"):
    _parse(["--config.training.foo=1"])
  with pytest.raises(UnknownConfigFieldError, match="Did you mean eval.rtol"):
    _parse(["--config.eval.rtl=1e-3"])
  fv = _parse(["--config.eval.stats_path=/tmp/s.npz", "--config.training.n_iters=100"])
  assert fv.config.eval.stats_path == "/tmp/s.npz" and fv.config.training.n_iters == 100


def _main(*args, timeout=300):
  env = dict(os.environ, XLA_FLAGS=os.environ.get("XLA_FLAGS", "").replace(
      "xla_force_host_platform_device_count=8", "xla_force_host_platform_device_count=2"))
  return subprocess.run([sys.executable, str(REPO / "experiments" / "main.py"), *args],
                        capture_output=True, text=True, cwd=REPO, timeout=timeout, env=env)


def test_cli_unknown_field_exits_with_one_line(tmp_path):
  proc = _main("--config", "configs/toy/vp.py", "--workdir", str(tmp_path),
               "--config.training.foo=1")
  assert proc.returncode != 0
  assert "Traceback" not in proc.stderr and "AttributeError" not in proc.stderr, proc.stderr
  line = [ln for ln in proc.stderr.splitlines() if "training.foo" in ln]
  assert len(line) == 1 and "Valid fields of config.training:" in line[0], proc.stderr


def test_cli_bad_eval_field_stops_mode_all_before_training(tmp_path):
  proc = _main("--config", "configs/toy/vp.py", "--workdir", str(tmp_path), "--mode", "all",
               "--config.eval.hutchinson_type=foo", "--config.eval.rtol=-1")
  assert proc.returncode != 0
  assert "config.eval.hutchinson_type='foo'" in proc.stderr, proc.stderr[-3000:]
  assert "config.eval.rtol must be" in proc.stderr
  assert "step " not in proc.stderr and not (tmp_path / "checkpoints").exists()
