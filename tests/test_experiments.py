"""experiments/ is a package: every module imports (all in one process: scripts define their flags
only when they run), every script answers ``--help`` through absl, and every command line the docs
show for a script parses with that script's flags."""
import concurrent.futures
import importlib
import pathlib
import pkgutil
import re
import shlex

import pytest
from absl import flags

import experiments
from experiments_helpers import run_experiment

REPO = pathlib.Path(__file__).resolve().parents[1]
MODULES = sorted(m.name for m in pkgutil.iter_modules(experiments.__path__))
SHARED = ("common", "diffusers_reference", "mnist_setup", "reproduce_rows")  # imported by scripts, never run
SCRIPTS = [m for m in MODULES if m not in SHARED]


def test_every_module_imports_in_one_process():
  assert {"main", "benchmark_samplers", "benchmark_samplers_mnist", "common"} <= set(MODULES)
  for name in MODULES:
    module = importlib.import_module(f"experiments.{name}")
    assert module.__doc__, name
  for name in SCRIPTS:  # a script keeps the package's shape: flags by define_flags, an absl main
    module = importlib.import_module(f"experiments.{name}")
    assert callable(module.define_flags) and callable(module.main), name


def test_every_script_answers_help():
  """``python -m experiments.<name> --help`` prints the module's usage and its flags (absl exits
  with status 1 after printing help). Runs the scripts side by side: most of the cost is imports."""
  with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
    procs = dict(zip(SCRIPTS, pool.map(
        lambda name: run_experiment(name, "--help", check=False, timeout=300), SCRIPTS)))
  for name, proc in procs.items():
    assert proc.returncode in (0, 1) and "Traceback" not in proc.stderr, (name, proc.stderr[-2000:])
    first_line = importlib.import_module(f"experiments.{name}").__doc__.split("\n")[0]
    assert first_line in proc.stdout and "--" in proc.stdout, (name, proc.stdout[:500])


def _documented_commands():
  """(doc:line, script, flags) of every ``python -m experiments.<script> ...`` in README.md and
  docs/*.md other than experiments.main (tests/test_documented_commands.py parses those),
  backslash continuations joined; ``...`` (the flags of the command above) dropped, and the
  brackets of optional flags (``[--out x.json]``)."""
  out = []
  for doc in [REPO / "README.md", *sorted((REPO / "docs").glob("**/*.md"))]:
    text = re.sub(r"\\\n\s*", " ", doc.read_text())
    for line_no, line in enumerate(text.splitlines(), 1):
      for m in re.finditer(r"python3? -m experiments\.(\w+)([^`\n#]*)", line):
        if m.group(1) != "main":
          words = [w.strip("[]") for w in shlex.split(m.group(2)) if w != "..."]
          out.append((f"{doc.name}:{line_no}", m.group(1), words))
  return out


COMMANDS = _documented_commands()


def test_the_docs_show_script_commands():
  scripts = {script for _, script, _ in COMMANDS}
  assert {"benchmark_samplers", "benchmark_samplers_mnist", "compare_reference_samplers",
          "compare_reference_samplers_mnist", "benchmark_start_time"} <= scripts, scripts


@pytest.mark.parametrize("where,script,args", COMMANDS, ids=[c[0] for c in COMMANDS])
def test_documented_script_command_parses(where, script, args):
  """The documented flags exist and have values of their type (nothing runs)."""
  fv = flags.FlagValues()
  importlib.import_module(f"experiments.{script}").define_flags(fv)
  try:
    fv([script, *args])
  except flags.Error as e:
    pytest.fail(f"{where}: `{' '.join(args)}` does not parse for experiments.{script}: {e}")
