"""Running a script of the experiments package as its documented command, from a test."""
import os
import pathlib
import subprocess
import sys
from typing import Optional

REPO = pathlib.Path(__file__).resolve().parents[1]


def run_experiment(name: str, *args: str, check: bool = True, timeout: float = 900,
                   env: Optional[dict] = None) -> subprocess.CompletedProcess:
  """``python -m experiments.<name> *args`` from the repository root (the environment of the test
  session: its forced host devices and thread settings, unless ``env``); with ``check`` an
  AssertionError carrying the end of stderr when the exit status is not 0."""
  proc = subprocess.run([sys.executable, "-m", f"experiments.{name}", *args], capture_output=True,
                        text=True, cwd=REPO, timeout=timeout, env=env or dict(os.environ))
  if check and proc.returncode != 0:
    raise AssertionError(f"experiments.{name} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
  return proc
