"""Two local processes (loopback coordinator, gloo) x 4 CPU devices == one process x 8 devices."""
import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np

SCRIPT = pathlib.Path(__file__).parent / "scripts" / "dist_train.py"


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_match_one_process(tmp_path):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  single = tmp_path / "single.json"
  subprocess.run([sys.executable, str(SCRIPT), str(single)], check=True, env=env, timeout=600)
  multi = tmp_path / "multi.json"
  addr = f"127.0.0.1:{_free_port()}"
  procs = [subprocess.Popen([sys.executable, str(SCRIPT), str(multi), addr, "2", str(i)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  outs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  a, b = json.loads(single.read_text()), json.loads(multi.read_text())
  assert a["process_count"] == 1 and b["process_count"] == 2
  np.testing.assert_allclose(b["losses"], a["losses"], rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(b["param_sums"], a["param_sums"], rtol=1e-4, atol=1e-5)
