"""experiments.benchmark_accelerator: the one-command accelerator benchmark, --smoke on a CPU.

One in-process smoke run (module fixture) of a train row with remat, both sampling rows and the
likelihood at tiny sizes; its JSON is checked for the device and every record's
numbers. The budget / isolation logic is checked without compiling anything.
"""
from __future__ import annotations

import json

import pytest
from absl import flags

from experiments import benchmark_accelerator as ba

# One row of each kind but Inception (its CPU compile alone takes longer than the rest; the
# Inception network and feature function are tested in tests/test_inception.py); in run order.
SMOKE_ROWS = ["train/ddpmpp_cont/float32/elementwise", "sample/pc_1000", "sample/dpm_solver_pp_20",
              "likelihood/ode"]


def _run(tmp_path, *args):
  fv = flags.FlagValues()
  ba.define_flags(fv)
  fv([__file__, *args])
  old = ba.FLAGS
  ba.FLAGS = fv
  try:
    ba.main([__file__])
  finally:
    ba.FLAGS = old


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
  out = tmp_path_factory.mktemp("acc") / "acc.json"
  _run(out.parent, "--smoke", "--budget_s=1e9", f"--out={out}", f"--rows={','.join(SMOKE_ROWS)}")
  return json.loads(out.read_text())


def test_row_names_cover_the_issue():
  rows = ba.row_names()
  assert len(rows) == len(set(rows)) == 16
  for net in ba.TRAIN_CONFIGS:
    for dtype in ("float32", "bfloat16"):
      for remat in ("elementwise", "none", "blocks"):
        assert f"train/{net}/{dtype}/{remat}" in rows
  assert {"sample/pc_1000", "sample/dpm_solver_pp_20", "likelihood/ode", "inception"} <= set(rows)
  assert ba.size("train_batch", False) == 128 and ba.size("sample_batch", False) == 256
  assert ba.size("pc_steps", False) == 1000 and ba.size("dpm_nfe", False) == 20


def test_smoke_json(smoke):
  assert smoke["platform"] == "cpu" and smoke["device"] and smoke["jax"]
  assert smoke["smoke"] is True and smoke["isolated"] is False
  rows = {r["row"]: r for r in smoke["rows"]}
  assert list(rows) == SMOKE_ROWS
  assert all(r["status"] == "ok" for r in rows.values()), rows
  train = rows["train/ddpmpp_cont/float32/elementwise"]
  assert train["remat"] == "elementwise" and train["batch"] == ba.size("train_batch", True)
  assert train["images_per_s"] > 0 and train["compile_s"] > 0 and train["loss_finite"]
  assert train["peak_memory_bytes"] > 0 and train["xla_memory_analysis"]["temp_size_in_bytes"] > 0
  pc, dpm = rows["sample/pc_1000"], rows["sample/dpm_solver_pp_20"]
  assert pc["nfe"] == ba.size("pc_steps", True) and dpm["nfe"] == ba.size("dpm_nfe", True)
  assert pc["finite"] and dpm["finite"] and pc["images_per_s"] > 0 and dpm["images_per_s"] > 0
  lik = rows["likelihood/ode"]
  assert lik["finite"] and lik["nfe"] > 0 and lik["s_per_image"] > 0
  assert lik["s_per_image_per_nfe"] == pytest.approx(lik["s_per_image"] / lik["nfe"], rel=1e-2)


def test_budget_skips_and_unknown_rows(tmp_path):
  out = tmp_path / "skipped.json"
  _run(tmp_path, "--smoke", "--budget_s=0", f"--out={out}")
  result = json.loads(out.read_text())
  assert [r["row"] for r in result["rows"]] == ba.row_names()
  assert {r["status"] for r in result["rows"]} == {"skipped (budget)"}
  with pytest.raises(Exception, match="Unknown --rows"):
    _run(tmp_path, "--smoke", "--rows=train/nope", f"--out={out}")


def test_isolated_row_failure_is_recorded(tmp_path):
  """An isolated row whose subprocess fails is a 'failed' record, not a crash of the run."""
  run_isolated = ba._run_isolated  # pylint: disable=protected-access
  record = run_isolated("no_such_row", smoke=True, timeout=120)
  assert record["status"] == "failed" and "Unknown row" in record["error"]
