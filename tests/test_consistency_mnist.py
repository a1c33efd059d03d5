"""experiments.consistency_mnist end to end with --smoke on the real MNIST (skipped where absent):
a few-step teacher, consistency distillation from it (the teacher handed to the Trainer, trained
with the script's width, which its config file does not carry), 1- and 2-step consistency sampling
at default and greedily chosen times. Checks the plumbing and the JSON, not the numbers."""
import json
import math
import os

import numpy as np
import pytest

from experiments import consistency_mnist
from experiments_helpers import run_experiment


@pytest.mark.slow
def test_smoke_run_distils_and_scores(mnist_dir, tmp_path):
  out = tmp_path / "cm.json"
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
  proc = run_experiment("consistency_mnist", "--smoke", f"--data_dir={mnist_dir}",
                        f"--workdir={tmp_path / 'wd'}", f"--out={out}",
                        "--students=cd_vp,teacher_denoiser",
                        "--teacher_nfes=2", env=env, timeout=1800)
  res = json.loads(out.read_text())
  assert "| cd_vp |" in proc.stdout and "| teacher (VP-DSM) |" in proc.stdout
  assert 0.0 <= res["floor"]["fd"] < res["fd_uniform_noise"]
  [row] = res["teacher"]
  assert row["nfe"] == 2 and math.isfinite(row["fd"])
  assert res["teacher_model"]["nf"] == 8 and res["teacher_model"]["trained_steps"] == 5
  student = res["students"]["cd_vp"]
  assert student["loss"] == "consistency_distillation" and student["model"]["nf"] == 8
  assert student["model"]["trained_steps"] == consistency_mnist.SMOKE["steps"]
  assert sorted((r["steps"], r["times_from"]) for r in student["rows"]) == [
      (1, "edm_rho"), (2, "edm_rho"), (2, "greedy")]
  for r in student["rows"]:
    assert r["nfe"] == r["steps"] and math.isfinite(r["fd"]), r
    assert len(r["times"]) == r["steps"] and np.all(np.diff(r["times"]) < 0), r
  [greedy] = [r for r in student["rows"] if r["times_from"] == "greedy"]
  assert greedy["times"][1:] == pytest.approx(student["greedy_times"]["2"])
  assert 0.0 < greedy["times"][1] < greedy["times"][0]
  # The control: the teacher itself in the consistency sampler, nothing trained.
  control = res["students"][consistency_mnist.TEACHER_DENOISER]
  assert control["model"] == res["teacher_model"] and control["loss"] == "dsm"
  assert [(r["steps"], r["times_from"]) for r in control["rows"]] == [
      (1, "edm_rho"), (2, "edm_rho"), (2, "greedy")]
  assert all(math.isfinite(r["fd"]) for r in control["rows"])


def test_table_takes_the_best_row_per_nfe():
  res = {"floor": {"fd": 1.0},
         "teacher": [{"sampler": "a", "setting": 2, "nfe": 2, "fd": 9.0},
                     {"sampler": "b", "setting": 2, "nfe": 2, "fd": 7.0},
                     {"sampler": "c", "setting": 2, "skipped": "order"}],
         "students": {"cd_vp": {"rows": [
             {"steps": 1, "times_from": "edm_rho", "fd": 5.0},
             {"steps": 2, "times_from": "edm_rho", "fd": 4.0},
             {"steps": 2, "times_from": "greedy", "fd": 3.0}]}}}
  table = consistency_mnist.table(res)
  assert "| teacher (VP-DSM) |  | 7.0 (b) |" in table
  assert "| cd_vp | 5.0 (edm_rho times) | 3.0 (greedy times) |" in table


def test_unknown_teacher_sampler_is_a_usage_error(tmp_path):
  proc = run_experiment("consistency_mnist", "--teacher_samplers=nope", f"--workdir={tmp_path}",
                        "--out=", check=False, timeout=300)
  assert proc.returncode != 0 and "Unknown --teacher_samplers ['nope']" in proc.stderr
