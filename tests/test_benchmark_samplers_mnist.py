"""experiments.benchmark_samplers_mnist end to end with tiny settings on the real MNIST.

20 training steps of a narrow U-Net (nf=8), a 20-step classifier, 32 samples, NFE {5, 10} for two
samplers, bits/dim of 4 images at a loose tolerance: checks the plumbing and the JSON, not the
numbers (the real run's numbers are in docs/samplers.md).
"""
import json
import math
import pathlib

import numpy as np
import pytest

from experiments import benchmark_samplers_mnist as script
from experiments.mnist_setup import Settings
from experiments_helpers import run_experiment
from score_sde.evaluation import mnist_features

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_tiny_run_writes_finite_results(mnist_dir, tmp_path):
  """The documented command (python -m experiments.benchmark_samplers_mnist), tiny."""
  out, png = tmp_path / "res.json", tmp_path / "res.png"
  proc = run_experiment(
      "benchmark_samplers_mnist", f"--data_dir={mnist_dir}", f"--workdir={tmp_path / 'wd'}",
      "--train_steps=20", "--train_devices=1", "--nf=8", "--classifier_steps=20",
      "--num_samples=32", "--sample_batch=32", "--nfes=5,10", "--pc_nfes=", "--ode_tols=",
      "--samplers=ddim,dpm_solver++2M", "--num_bpd=4", "--bpd_tol=1e-2", f"--out={out}",
      f"--plot={png}")
  saved = json.loads(out.read_text())
  assert png.stat().st_size > 0
  assert saved["nfes"] == [5, 10] and "NOT FID" in proc.stdout
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


def test_bad_settings_fail_before_training(tmp_path):
  with pytest.raises(ValueError, match="multiple of 5"):
    script.run(Settings(workdir=str(tmp_path), train_steps=7, out="", plot=""))
  with pytest.raises(ValueError, match="Unknown sampler labels"):
    script.run(Settings(workdir=str(tmp_path), samplers=("nope",), out="", plot=""))
  assert not any(tmp_path.iterdir())


def test_feature_fd_is_zero_for_identical_sets_and_grows_with_a_shift():
  rng = np.random.default_rng(0)
  a = rng.normal(size=(500, 8))
  assert abs(mnist_features.feature_fd(a, a)) < 1e-8
  assert mnist_features.feature_fd(a, a + 1.0) == pytest.approx(8.0, rel=1e-6)  # ||mu shift||^2


def _split_by_run(saved: dict) -> list[dict]:
  """The committed two-run result cut back into what each run wrote: a row belongs to every run
  whose grid holds its setting (PC at 100 NFE is in both)."""
  import copy
  parts = []
  for run in saved["runs"]:
    st = run["settings"]
    part = {k: copy.deepcopy(v) for k, v in saved.items() if k not in ("runs", "results", "bpd")}
    part.update(settings=st, nfes=st["nfes"], pc_nfes=st["pc_nfes"], ode_tols=st["ode_tols"],
                seconds=run["seconds"], bpd=copy.deepcopy(saved["bpd"]) if st["num_bpd"] else None,
                results={})
    for label, r in saved["results"].items():
      grid = {"ode": st["ode_tols"], "pc": st["nfes"] + st["pc_nfes"]}.get(r["sampler"],
                                                                           st["nfes"])
      rows = [dict(row) for row in r["rows"] if row["setting"] in grid]
      if rows:
        part["results"][label] = dict(copy.deepcopy(r), rows=rows)
    parts.append(part)
  return parts


def test_merge_rebuilds_the_committed_two_run_result(tmp_path):
  saved = json.loads((REPO / "docs" / "results" / "samplers_mnist.json").read_text())
  parts = _split_by_run(saved)
  assert len(parts) == 2 and "ode (adaptive)" not in parts[1]["results"]
  assert [r["setting"] for r in parts[1]["results"]["pc (euler_maruyama)"]["rows"]] == [35, 50, 100,
                                                                                     1000]
  merged = script.merge_results(parts)
  assert merged["results"] == saved["results"]
  assert list(merged["results"]) == list(saved["results"])
  for key in ("nfes", "pc_nfes", "ode_tols", "bpd", "model", "classifier", "floor"):
    assert merged[key] == saved[key], key
  assert [run["settings"] for run in merged["runs"]] == [run["settings"] for run in saved["runs"]]
  assert merged["seconds"] == pytest.approx(sum(run["seconds"] for run in saved["runs"]))
  # The same through the command line, order of the runs reversed: the same table.
  paths = []
  for i, part in enumerate(reversed(parts)):
    paths.append(tmp_path / f"part{i}.json")
    paths[-1].write_text(json.dumps(part))
  out = tmp_path / "merged.json"
  proc = run_experiment("benchmark_samplers_mnist", f"--merge={paths[0]},{paths[1]}",
                        f"--out={out}", "--plot=")
  res = json.loads(out.read_text())
  assert res["results"] == saved["results"]
  assert script.fd_table(res) == script.fd_table(saved)
  assert script.fd_table(saved) in proc.stdout
  assert res["bpd"] == saved["bpd"]


def test_merge_refuses_runs_of_different_models_or_noise():
  saved = json.loads((REPO / "docs" / "results" / "samplers_mnist.json").read_text())
  a, b = _split_by_run(saved)
  b["settings"] = dict(b["settings"], seed=1)
  with pytest.raises(ValueError, match=r"settings \['seed'\]"):
    script.merge_results([a, b])
  a, b = _split_by_run(saved)
  b["model"]["test_dsm_loss"] *= 1.1
  with pytest.raises(ValueError, match="model test DSM loss"):
    script.merge_results([a, b])
  a, b = _split_by_run(saved)
  pc_100 = [row for row in b["results"]["pc (euler_maruyama)"]["rows"] if row["setting"] == 100]
  pc_100[0]["fd"] += 5.0  # PC at 100 NFE is in both runs
  with pytest.raises(ValueError, match="at setting 100"):
    script.merge_results([a, b])
