"""experiments.compare_reference_samplers_mnist: our samplers vs diffusers on a network score.

Without torch / diffusers (as on CI) the scripts must say so and return; with them, a tiny run on
the real MNIST must reproduce benchmark_samplers_mnist's number for the same sampler (same model,
classifier, prior noise) and score the diffusers schedulers on the same footing.
"""
import dataclasses
import math
import sys

import pytest

from experiments import benchmark_samplers_mnist as bench
from experiments import compare_reference_samplers_mnist as cmp
from experiments import diffusers_reference
from experiments.mnist_setup import Settings

TINY = dict(train_steps=20, train_devices=1, nf=8, classifier_steps=20, num_samples=32,
            sample_batch=32, nfes=(10,))


def test_without_diffusers_it_says_so_and_returns(monkeypatch, capsys, tmp_path):
  monkeypatch.setitem(sys.modules, "diffusers", None)  # makes `import diffusers` fail
  assert diffusers_reference.import_reference("compare_reference_samplers_mnist") is None
  assert "needs torch and diffusers" in capsys.readouterr().out
  monkeypatch.chdir(tmp_path)
  assert cmp.main(["compare_reference_samplers_mnist"]) is None  # returns before any flag is read
  assert not any(tmp_path.iterdir())  # nothing trained or written


def test_tiny_comparison_reproduces_the_benchmark(mnist_dir, tmp_path):
  pytest.importorskip("torch")
  pytest.importorskip("diffusers")
  diffusers, torch = diffusers_reference.import_reference("test")
  s = Settings(data_dir=mnist_dir, workdir=str(tmp_path / "wd"), **TINY)
  bench_res = bench.run(dataclasses.replace(s, samplers=("ddim",), pc_nfes=(), ode_tols=(),
                                            num_bpd=0, out=str(tmp_path / "b.json"), plot=""))
  res = cmp.compare(dataclasses.replace(s, num_bpd=0, plot="", out=str(tmp_path / "c.json")),
                    diffusers, torch,
                    only=["ddim", "DDIM [trailing]", "sde-dpmsolver++ 2M [trailing]"], repeats=2)
  assert len(res["summary"]) == 1
  ours, theirs = res["ours"]["10"], res["reference"]["10"]
  assert {"ddim", "ddim eta=1"} <= set(ours)
  assert set(theirs) == {"DDIM [trailing]", "DPMSolverMultistep sde-dpmsolver++ 2M [trailing]"}
  # Same model, classifier, references and x_T as the benchmark: repeat 0 gives its ddim number.
  assert ours["ddim"]["fds"][0] == pytest.approx(bench_res["results"]["ddim"]["rows"][0]["fd"],
                                                 rel=1e-5)
  for row in list(ours.values()) + list(theirs.values()):
    assert row["nfe"] <= 10 and len(row["fds"]) == 2 and all(math.isfinite(f) for f in row["fds"])
    assert row["fd"] == pytest.approx(sum(row["fds"]) / 2) and row["fd_std"] >= 0
    assert row["fds"][0] != row["fds"][1]  # a new x_T (and noise) per repeat
  assert res["floor"]["fd"] == pytest.approx(bench_res["floor"]["fd"])
  assert "| 10 |" in cmp.table(res)
