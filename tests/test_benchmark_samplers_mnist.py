"""experiments/benchmark_samplers_mnist.py end to end with tiny settings on the real MNIST.

20 training steps of a narrow U-Net (nf=8), a 20-step classifier, 32 samples, NFE {5, 10} for two
samplers, bits/dim of 4 images at a loose tolerance: checks the plumbing and the JSON, not the
numbers (the real run's numbers are in docs/samplers.md).
"""
import importlib.util
import json
import math
import pathlib
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


def _load_script():
  if "benchmark_samplers_mnist" in sys.modules:  # absl flags can be defined only once
    return sys.modules["benchmark_samplers_mnist"]
  spec = importlib.util.spec_from_file_location(
      "benchmark_samplers_mnist", REPO / "experiments" / "benchmark_samplers_mnist.py")
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses look their module up there
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope="module")
def script():
  return _load_script()


def test_tiny_run_writes_finite_results(script, mnist_dir, tmp_path):
  out, png = tmp_path / "res.json", tmp_path / "res.png"
  argv = ["benchmark_samplers_mnist", f"--data_dir={mnist_dir}", f"--workdir={tmp_path / 'wd'}",
          "--train_steps=20", "--train_devices=1", "--nf=8", "--classifier_steps=20",
          "--num_samples=32", "--sample_batch=32", "--nfes=5,10", "--pc_nfes=", "--ode_tols=",
          "--samplers=ddim,dpm_solver++2M", "--num_bpd=4", "--bpd_tol=1e-2",
          f"--out={out}", f"--plot={png}"]
  result = script.main(argv)
  saved = json.loads(out.read_text())
  assert png.stat().st_size > 0
  assert saved["nfes"] == [5, 10] == result["nfes"]
  for key in ("settings", "model", "classifier", "floor", "fd_uniform_noise", "bpd", "results"):
    assert key in saved, key
  assert saved["model"]["trained_steps"] == 20 and saved["model"]["nf"] == 8
  assert 0.0 <= saved["classifier"]["test_accuracy"] <= 1.0
  assert set(saved["results"]) == {"ddim", "dpm_solver++2M"}
  for label, r in saved["results"].items():
    assert [row["nfe"] for row in r["rows"]] == [5, 10], label
    for row in r["rows"]:
      assert row["finite"] and row["fd"] is not None and math.isfinite(row["fd"]), (label, row)
      assert {"setting", "nfe", "fd", "seconds", "compile_seconds"} <= set(row)
  assert math.isfinite(saved["bpd"]["bpd"]) and saved["bpd"]["num_images"] == 4
  # The feature distance separates real digits from noise: real vs real is far below noise vs real.
  assert 0.0 <= saved["floor"]["fd"] < saved["fd_uniform_noise"]
  # The table renders from the saved JSON (what --from_json prints).
  assert "| ddim |" in script.fd_table(saved)


def test_bad_settings_fail_before_training(script, tmp_path):
  with pytest.raises(ValueError, match="multiple of 5"):
    script.run(script.Settings(workdir=str(tmp_path), train_steps=7, out="", plot=""))
  with pytest.raises(ValueError, match="Unknown sampler labels"):
    script.run(script.Settings(workdir=str(tmp_path), samplers=("nope",), out="", plot=""))


def test_feature_fd_is_zero_for_identical_sets_and_grows_with_a_shift(script):
  import numpy as np
  rng = np.random.default_rng(0)
  a = rng.normal(size=(500, 8))
  assert abs(script.feature_fd(a, a)) < 1e-8
  assert script.feature_fd(a, a + 1.0) == pytest.approx(8.0, rel=1e-6)  # ||mu shift||^2
