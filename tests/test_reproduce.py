"""experiments.reproduce: the rows, a smoke run end to end, inputs that belong to another row, and
the MNIST CI row rerun against its recorded seed-to-seed spread.

The smoke run is a CIFAR-10 row at 8x8 with a random checkpoint written in the original score_sde
msgpack format, a mocked 12-image CIFAR-10 and random Inception weights at a 75 px resize.
"""
import json
import pathlib
import shutil

import numpy as np
import pytest

from experiments import reproduce, reproduce_rows
from score_sde.config_validation import validate_config
from score_sde.evaluation import evaluate, inception, metrics

ROW = "vp_ddpmpp_cont_pc"
RESULTS = pathlib.Path(__file__).resolve().parents[1] / "docs" / "results" / "reproduce_mnist.json"


@pytest.fixture(scope="module")
def variables():
  return inception.init_inception(seed=0)


def test_rows_are_complete_and_their_configs_validate():
  table = reproduce_rows.markdown_table()
  validated = set()
  for row in reproduce_rows.ROWS.values():
    assert f"`{row.id}`" in table
    assert row.metric in ("fid", "bpd", "fd")
    config = reproduce.row_config(row)
    kind = (row.metric, row.mnist is None, tuple(sorted(row.sampling.items())))
    if kind not in validated:   # each kind of override once (a validation costs ~1 s)
      validate_config(config)
      validated.add(kind)
    if row.mnist is None:
      assert row.published and row.checkpoint.pick in ("first", "last")
      # Table 3 (PC FID) uses the best-FID checkpoint, Table 2 (ODE FID, NLL) the last one.
      assert (row.checkpoint.pick == "last") == (row.table == "Table 2"), row.id
      assert (row.metric == "bpd") == bool(config.eval.enable_bpd)
    if row.metric == "bpd" and row.mnist is None:
      assert config.data.centered and config.eval.bpd_repeats == 5
      assert (config.eval.rtol, config.eval.atol) == (1e-5, 1e-5)
  assert reproduce_rows.get_row(ROW).checkpoint.index == 8
  with pytest.raises(ValueError, match=r"Unknown row 'nope'.*vp_ddpmpp_cont_pc"):
    reproduce_rows.get_row("nope")


def test_smoke_row_end_to_end_and_resume(tmp_path, variables):
  row = reproduce_rows.get_row(ROW)
  out = reproduce.smoke(row, str(tmp_path), inception_variables=variables)
  fid = out["metrics"]["fid"]
  assert len(fid["per_seed"]) == 2 and all(np.isfinite(fid["per_seed"]))
  assert fid["published"] == 2.55 and fid["difference"] == pytest.approx(fid["measured"] - 2.55)
  assert fid["stderr"] == pytest.approx(np.std(fid["per_seed"], ddof=1) / np.sqrt(2))
  assert np.isfinite(out["metrics"]["inception_score"]["measured"])
  assert out["metrics"]["sample_nfe"]["measured"] == 4                 # N = 4, no corrector
  assert out["checkpoint"]["index"] == 8 and out["checkpoint"]["training_step"] == 400000
  assert out["reference_statistics"]["built_now"]
  assert out["reference_statistics"]["feature_extractor"].endswith("/75")
  assert not out["comparable"] and out["sampling"]["predictor"] == "euler_maruyama"
  saved = json.loads((tmp_path / ROW / "reproduce.json").read_text())
  assert saved["metrics"]["fid"]["per_seed"] == fid["per_seed"]
  # A rerun reuses the statistics and the finished evaluation (nothing sampled again).
  again = reproduce.smoke(row, str(tmp_path), inception_variables=variables)
  assert not again["reference_statistics"]["built_now"]
  assert again["metrics"]["fid"]["per_seed"] == fid["per_seed"]


def test_inputs_of_another_row_fail_before_sampling(tmp_path, variables, monkeypatch):
  monkeypatch.setattr(evaluate, "run_eval", lambda *a, **k: pytest.fail("sampled"))
  row = reproduce_rows.get_row(ROW)
  config = reproduce.row_config(row)
  reproduce.shrink_config(config)
  good = reproduce.write_reference_checkpoint(config, str(tmp_path / "vp" / "checkpoint_8"),
                                              400000)
  # The last checkpoint (Table 2) given for the best-FID row (Table 3).
  folder = tmp_path / "released"
  folder.mkdir()
  last = str(folder / "checkpoint_26")
  shutil.copy(good, last)
  with pytest.raises(reproduce.RowMismatch, match=r"not the checkpoint of row 'vp_ddpmpp_cont_pc'"
                     r" \(it is the checkpoint of rows \['vp_ddpmpp_cont_ode', "
                     r"'vp_ddpmpp_cont_bpd'\]\).*checkpoint_8"):
    reproduce.run_image_row(row, last, str(tmp_path), inception_variables=variables,
                            config_hook=reproduce.shrink_config)
  with pytest.raises(reproduce.RowMismatch, match=r"holds checkpoints \[26\], not checkpoint_8"):
    reproduce.find_checkpoint(row, str(folder))
  # A checkpoint of another network (NCSN++ of the VE row) under the row's name.
  ve = reproduce.row_config(reproduce_rows.get_row("ve_ncsnpp_cont_pc"))
  reproduce.shrink_config(ve)
  other = reproduce.write_reference_checkpoint(ve, str(tmp_path / "ve" / "checkpoint_8"), 400000)
  with pytest.raises(reproduce.RowMismatch, match=r"does not belong to row 'vp_ddpmpp_cont_pc' "
                     r"\(config configs/vp/cifar10_ddpmpp_continuous.py.*Checkpoint does not fit"):
    reproduce.run_image_row(row, other, str(tmp_path), inception_variables=variables,
                            config_hook=reproduce.shrink_config)
  # Statistics made with another feature extractor (299 px resize) / another resolution.
  stats = tmp_path / "stats.npz"
  rng = np.random.default_rng(0)
  for fx, res, match in (("inception-2015-12-05/pool_3/bilinear/pytorch_fid", 8,
                          "feature extractor"),
                         ("inception-2015-12-05/pool_3/bilinear/pytorch_fid/75", 32, "32x32")):
    metrics.save_stats(stats, metrics.InceptionStats(rng.normal(size=2048), np.eye(2048), 10, fx,
                                                     res))
    with pytest.raises(reproduce.RowMismatch, match=f"do not fit row 'vp_ddpmpp_cont_pc'.*{match}"):
      reproduce.run_image_row(row, good, str(tmp_path), stats_path=str(stats),
                              inception_variables=variables,
                              config_hook=lambda c: (reproduce.shrink_config(c),
                                                     setattr(c.eval, "stats_path", str(stats))))
  assert not (tmp_path / ROW / "checkpoints").exists()   # nothing imported either


def test_mnist_ci_row_rerun_lands_within_the_recorded_spread(tmp_path, mnist_dir):
  """Retrains the CI-size MNIST row and samples one seed set; its FD must lie within 3 recorded
  seed-to-seed standard deviations of the recorded mean (docs/results/reproduce_mnist.json)."""
  recorded = json.loads(RESULTS.read_text())["rows"]["mnist_vp_pc_ci"]["metrics"]["fd"]
  row = reproduce_rows.get_row("mnist_vp_pc_ci")
  out = reproduce.run_mnist_row(row, str(tmp_path), mnist_dir, num_seeds=1, log=lambda m: None)
  fd = out["metrics"]["fd"]["measured"]
  assert out["model_info"]["trained_steps"] == row.mnist["train_steps"]
  assert abs(fd - recorded["measured"]) <= 3 * recorded["std"], (fd, recorded)
