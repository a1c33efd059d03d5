"""experiments.recipes_mnist end to end with --smoke on the real MNIST (skipped where absent).

The two new recipes (EDM, rectified flow; VP-DSM goes through the same code and the existing MNIST
benchmark's tests), a few training steps each, one NFE with two samplers, bits/dim of 4 images:
checks the plumbing and the JSON, not the numbers (a CI-sized run: the full smoke run, three
recipes at every NFE, takes about 5 minutes on 2 cores). The subprocess compiles with
XLA:CPU's backend optimizations off (``--xla_backend_optimization_level=0``): nearly all of the
run is compilation (network initialization, training step, test loss, one program per sampler and
NFE, the likelihood, per recipe), which that makes several times faster.
"""
import json
import math
import os

import pytest

from experiments import recipes_mnist
from experiments_helpers import run_experiment

RECIPES = ["edm", "rectified_flow"]


@pytest.mark.slow
def test_smoke_run_compares_recipes(mnist_dir, tmp_path):
  out, png = tmp_path / "recipes.json", tmp_path / "recipes.png"
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
  proc = run_experiment("recipes_mnist", "--smoke", f"--data_dir={mnist_dir}",
                        f"--workdir={tmp_path / 'wd'}", f"--out={out}", f"--plot={png}",
                        f"--recipes={','.join(RECIPES)}", "--nfes=10", env=env)
  res = json.loads(out.read_text())
  assert png.stat().st_size > 0 and "NOT FID" in proc.stdout
  nfes = [10]
  assert res["nfes"] == nfes and list(res["recipes"]) == RECIPES
  for key in ("settings", "classifier", "floor", "fd_uniform_noise", "samplers"):
    assert key in res, key
  assert 0.0 <= res["floor"]["fd"] < res["fd_uniform_noise"]
  assert res["settings"]["train_steps"] == recipes_mnist.SMOKE["steps"]
  samplers = res["samplers"]
  assert len(samplers) >= 2
  for name, r in res["recipes"].items():
    assert r["config"] == f"configs/mnist/{name}.py" and r["model"]["nf"] == 8, name
    assert r["model"]["trained_steps"] == res["settings"]["train_steps"], name
    assert math.isfinite(r["model"]["test_loss"]), name
    # Every sampler at every NFE, finite, with what it really spent.
    assert sorted((row["sampler"], row["setting"]) for row in r["rows"]) == sorted(
        (label, n) for label in samplers for n in nfes), name
    for row in r["rows"]:
      assert row["finite"] and row["fd"] is not None and math.isfinite(row["fd"]), (name, row)
      assert row["nfe"] == row["setting"], (name, row)
    # The best sampler per NFE is the argmin of the recorded rows.
    assert [b["setting"] for b in r["best"]] == nfes, name
    for b in r["best"]:
      rows = [row for row in r["rows"] if row["setting"] == b["setting"]]
      argmin = min(rows, key=lambda row: row["fd"])
      assert (b["sampler"], b["fd"]) == (argmin["sampler"], argmin["fd"]), (name, b)
    assert math.isfinite(r["bpd"]["bpd"]) and r["bpd"]["num_images"] == 4, name
  # One x_T draw for every process, scaled by the prior's std (80 for EDM).
  stds = {name: r["prior_std"] for name, r in res["recipes"].items()}
  assert stds["edm"] == pytest.approx(80.0 * stds["rectified_flow"], rel=1e-5)
  # The tables render from the saved JSON (what --from_json prints).
  table = recipes_mnist.best_table(res)
  assert all(f"| {name} |" in table for name in RECIPES)
  assert recipes_mnist.full_table(res).count("\n") == 1 + len(RECIPES) * len(samplers)


def test_best_rows_is_the_argmin_per_nfe_and_skips_missing_fds():
  rows = [{"sampler": "a", "setting": 10, "nfe": 10, "fd": 3.0},
          {"sampler": "b", "setting": 10, "nfe": 10, "fd": 2.0},
          {"sampler": "c", "setting": 10, "nfe": None, "fd": None, "skipped": "order"},
          {"sampler": "a", "setting": 20, "nfe": 20, "fd": 1.0},
          {"sampler": "b", "setting": 20, "nfe": 20, "fd": None}]
  best = recipes_mnist.best_rows(rows, [10, 20, 35])
  assert [(b["setting"], b["sampler"], b["fd"]) for b in best] == [(10, "b", 2.0), (20, "a", 1.0)]


def test_unknown_recipe_is_a_usage_error(tmp_path):
  proc = run_experiment("recipes_mnist", "--recipes=vp_continuous,nope",
                        f"--workdir={tmp_path}", "--out=", "--plot=", check=False, timeout=300)
  assert proc.returncode != 0 and "Unknown recipe 'nope'" in proc.stderr
  assert "Traceback" not in proc.stderr
  assert not any(tmp_path.iterdir())
