"""The README's first command, exactly as written, converges on the embedded default: energy
distance within 2x its noise floor and test bits/dim within 0.05 of the exact data entropy
(issue 14). About 4 minutes on 2 CPU cores (docs: README benchmarks table)."""
import json
import os
import shlex
import subprocess
import sys

import pytest

from conftest import REPO


def _readme_main_command() -> list[str]:
  text = (REPO / "README.md").read_text()
  line = next(l for l in text.splitlines() if l.startswith("pip install -e . && python -m "))
  return shlex.split(line.split("&&", 1)[1])


@pytest.mark.slow
def test_readme_main_job_converges(tmp_path):
  cmd = _readme_main_command()
  assert cmd[:4] == ["python", "-m", "experiments.main", "--config"]
  workdir = tmp_path / "toy_vp"
  cmd = [sys.executable] + cmd[1:cmd.index("--workdir") + 1] + [str(workdir)]
  # One device, as on a laptop (the suite forces 8 host devices for its own tests).
  env = dict(os.environ, XLA_FLAGS=os.environ.get("XLA_FLAGS", "").replace(
      "xla_force_host_platform_device_count=8", "xla_force_host_platform_device_count=1"))
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)
  assert proc.returncode == 0, proc.stderr[-4000:]
  final = json.loads((workdir / "eval" / "results.json").read_text())[-1]
  assert final["step"] == 8000 and "failed" not in final
  assert final["energy_distance"] <= 2 * final["energy_distance_floor"], final
  assert abs(final["bpd"] - final["exact_bpd"]) <= 0.05, final
  assert (workdir / "samples" / "pc_step_8000" / "samples.npz").exists()
  assert (workdir / "eval" / "bpd.png").exists()
