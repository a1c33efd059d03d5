"""experiments.benchmark_networks: one timed, profiled train step of a shrunk DDPM++ on CPU."""
import math

from experiments import benchmark_accelerator, benchmark_networks

CONFIG = "vp.cifar10_ddpmpp_continuous"


def test_profiled_step_splits_time_by_program_part():
  config = benchmark_accelerator.load_config(CONFIG, smoke=True)  # 8 px, nf 16, same blocks
  r = benchmark_networks.benchmark(CONFIG, batch=2, steps=1, warmup=0, dtype="float32",
                                   config=config, profile_steps=1)
  assert r["loss_finite"] and r["images_per_s"] > 0 and r["xla_temp_bytes"] > 0
  p = r["profile"]
  assert p["step_ms"] > 0 and p["top"] and all(len(row) == 3 for row in p["top"])
  # The network's convolutions and GroupNorms run forward and (transposed) backward.
  for side in ("forward", "backward"):
    assert p[side].get("convolution", 0) > 0 and p[side].get("GroupNorm", 0) > 0, (side, p)
    assert all(math.isfinite(v) and v >= 0 for v in p[side].values())
  assert set(p["forward"]) | set(p["backward"]) <= {
      part for part, _ in benchmark_networks.PROFILE_PARTS} | {"other"}


def test_jitted_steps_time_the_trainers_multi_step_program():
  """jitted_steps=k times k updates per compiled call (as the Trainer's n_jitted_steps): steps
  round up to whole calls, and the last update's loss equals that of the same updates one per
  call."""
  import pytest
  config = benchmark_accelerator.load_config(CONFIG, smoke=True)
  one = benchmark_networks.benchmark(CONFIG, batch=2, steps=2, warmup=0, dtype="float32",
                                     config=config)
  two = benchmark_networks.benchmark(CONFIG, batch=2, steps=1, warmup=0, dtype="float32",
                                     config=config, jitted_steps=2)
  assert (one["jitted_steps"], one["steps"]) == (1, 2)
  assert (two["jitted_steps"], two["steps"]) == (2, 2)
  assert two["loss_finite"] and two["images_per_s"] > 0
  assert math.isclose(two["final_loss"], one["final_loss"], rel_tol=1e-5), (one, two)
  with pytest.raises(ValueError, match="jitted_steps"):
    benchmark_networks.benchmark(CONFIG, batch=2, steps=1, warmup=0, dtype="float32",
                                 config=config, jitted_steps=0)
