"""experiments.benchmark_start_time: the t_start sweep on an exact mixture score, tiny."""
import json

import jax
import numpy as np

from experiments import benchmark_start_time as bst
from experiments import common
from experiments_helpers import run_experiment
from score_sde.sampling import get_sampler


def test_tiny_sweep_writes_rows_and_t_start_T_is_the_default(tmp_path):
  out = tmp_path / "r.json"
  proc = run_experiment("benchmark_start_time", "--sdes=ve", "--dims=2", "--nfes=10",
                        "--t-starts=1,0.5", "--num-samples=400", f"--out={out}")
  assert "t_start = 0.5" in proc.stdout
  run = json.loads(out.read_text())["runs"]["ve_d2"]
  assert len(run["rows"]) == len(bst.CONFIGS) * 2
  assert all(r["nfe"] == 10 and np.isfinite(r["energy"]) for r in run["rows"])
  # The t_start = 1 row is the sampler with its default start, on the same x_T and key.
  source, sde = common.mixture_source(2), common.make_sde("ve")
  k_ref, _, k_sample, k_sw, k_T = jax.random.split(jax.random.PRNGKey(0), 5)
  x_T = sde.prior_sampling(k_T, (400, 2))
  x, _ = get_sampler("dpm_solver_pp", sde, (400, 2), nfe=10, order=2)(
      k_sample, source.score_fn(sde), x_T)
  energy = common.distances(k_sw, x, source.sample(k_ref, 400))["energy"]
  row = next(r for r in run["rows"] if r["sampler"] == "dpm_solver++2M" and r["t_start"] == 1)
  assert row["energy"] == energy
  # From T the deterministic samplers are within a few noise floors at 10 NFE; from t = 0.5, where
  # sigma(t) = 0.71 is below the data's scale (means at radius 2), the scaled prior is a poor start.
  for label in ("dpm_solver++2M", "unipc-3 bh2"):
    e = {r["t_start"]: r["energy"] for r in run["rows"] if r["sampler"] == label}
    assert e[1.0] < 3 * run["floor"] and e[0.5] > 3 * e[1.0], (label, e, run["floor"])
  assert bst.table(run).count("\n") == len(bst.CONFIGS) + 2
