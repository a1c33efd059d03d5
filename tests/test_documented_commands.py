"""Every command line README.md and docs/*.md show for the CLI parses, so a documented command
cannot rot.

Each ``python experiments/main.py ...`` / ``python -m experiments.main ...`` (one line, or several
joined by trailing backslashes) is parsed with the real flag definitions of experiments/main.py
(a fresh absl ``FlagValues`` + ml_collections' config flag; nothing is trained), and the resulting
config must pass ``validate_config``. Every ``--config.<field>=value`` mentioned elsewhere in the
text (offline FID settings, ...) must parse against each shipped config that has the field.
Paths are not checked (``/path/to/...`` is fine); documentation placeholders for non-config flags
(``--num_processes=N``) are given sample values, and ``--config ...`` a toy config.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.util
import pathlib
import re
import shlex
import sys

import pytest
from absl import flags

# ml_collections loads each config file with the deprecated load_module(); not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")

REPO = pathlib.Path(__file__).resolve().parents[1]
DOCS = sorted([REPO / "README.md", *(REPO / "docs").glob("**/*.md")])
_CLI = re.compile(r"python3?\s+(?:-m\s+experiments\.main\b|\S*experiments/main\.py\b)")
_SHELL_OPERATORS = {"&", "&&", ";", "|", "||", ">", ">>", "2>&1"}
# Values the docs write as placeholders for non-config flags -> a value of the flag's type.
_PLACEHOLDERS = {"--num_processes": {"N": "2"}, "--process_id": {"i": "0"},
                 "--workdir": {"W": "runs/w"}}
_TEMPLATE_CONFIG = "configs/toy/vp.py"   # for '--config ...'
# --config.<field>=value in prose: the whole flag quoted ('--config.x={"a": 1}'), the value quoted
# (--config.x='(1, 2)'), or neither.
_OVERRIDE = re.compile(r"'--config\.([A-Za-z_][\w.]*)=([^']*)'"
                       r"|--config\.([A-Za-z_][\w.]*)=(?:'([^']*)'|\"([^\"]*)\"|([^\s`'\"]+))")


@dataclasses.dataclass
class Command:
  where: str          # file:line
  args: list[str]     # the flags, as the shell would pass them


def _logical_lines(text: str):
  """(first line number, text) with backslash continuations joined."""
  lines = text.splitlines()
  i = 0
  while i < len(lines):
    start, parts = i + 1, [lines[i]]
    while parts[-1].rstrip().endswith("\\") and i + 1 < len(lines):
      parts[-1] = parts[-1].rstrip()[:-1]
      i += 1
      parts.append(lines[i])
    yield start, " ".join(p.strip() for p in parts)
    i += 1


def _tokens(rest: str) -> list[str]:
  """Shell words of a command tail, up to the first shell operator or the end of inline code."""
  rest = rest.split("`", 1)[0]
  try:
    words = shlex.split(rest)
  except ValueError:   # an unbalanced quote closing an enclosing string (ssh --command="...")
    words = shlex.split(rest.rstrip().rstrip("\"'"))
  out = []
  for w in words:
    if w in _SHELL_OPERATORS:
      break
    out.append(w)
  return out


def documented_commands() -> tuple[list[Command], dict[str, list[tuple[str, str]]]]:
  """(the CLI commands, ``{file:line: [(path, value)]}`` of the other ``--config.`` overrides)."""
  commands, inline = [], {}
  for doc in DOCS:
    rel = doc.relative_to(REPO)
    for line_no, line in _logical_lines(doc.read_text()):
      matches = list(_CLI.finditer(line))
      for m in matches:
        commands.append(Command(f"{rel}:{line_no}", _tokens(line[m.end():])))
      text = line[:matches[0].start()] if matches else line
      found = [(m[0], m[1]) if m[0] else (m[2], next(v for v in m[3:] if v))
               for m in _OVERRIDE.findall(text)]
      if found:
        inline[f"{rel}:{line_no}"] = found
  return commands, inline


COMMANDS, INLINE = documented_commands()


def _define_flags():
  if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
  return importlib.import_module("experiments.main").define_flags


def _normalize(args: list[str]) -> list[str]:
  """Joins '--flag value' pairs into '--flag=value' and fills documentation placeholders."""
  out, i = [], 0
  while i < len(args):
    a = args[i]
    if a.startswith("--") and "=" not in a and i + 1 < len(args) and not args[i + 1].startswith(
        "-") and not a.startswith("--config."):
      a, i = f"{a}={args[i + 1]}", i + 1
    name, _, value = a.partition("=")
    if name == "--config" and value == "...":
      value = _TEMPLATE_CONFIG
    if name == "--config" and (REPO / value).is_file():
      value = str(REPO / value)  # the docs' paths are relative to the repository root
    value = _PLACEHOLDERS.get(name, {}).get(value, value)
    out.append(f"{name}={value}" if _ else a)
    i += 1
  return out


def parse(args: list[str]):
  """Parses ``args`` (flags only) with experiments/main.py's flags; returns the FlagValues."""
  argv = ["main.py", *args]
  fv = flags.FlagValues()
  _define_flags()(fv, sys_argv=argv)
  fv(argv)
  return fv


def test_the_docs_show_commands():
  """Guards the extraction itself: a regex that matched nothing would make the tests vacuous."""
  where = {c.where.split(":")[0] for c in COMMANDS}
  assert len(COMMANDS) >= 15 and {"README.md", "docs/evaluation.md", "docs/samplers.md"} <= where
  readme_mnist = [c for c in COMMANDS if "--config.data.data_dir=/path/to/mnist" in c.args]
  assert readme_mnist, "the README's MNIST command was not found"
  assert any(p == "eval.inception_weights" for found in INLINE.values() for p, _ in found)


@pytest.mark.parametrize("command", COMMANDS, ids=[c.where for c in COMMANDS])
def test_documented_command_parses_and_validates(command):
  from score_sde.config_validation import validate_config
  args = _normalize(command.args)
  try:
    fv = parse(args)
  except flags.Error as e:
    pytest.fail(f"{command.where}: `{' '.join(command.args)}` does not parse: {e}")
  assert fv["config"].present and fv["workdir"].present, command.where
  overrides = [a.split("=", 1)[0][len("--config."):] for a in args if a.startswith("--config.")]
  for path in overrides:  # the override reached the config
    node = fv.config
    for part in path.split("."):
      node = node[part]
  validate_config(fv.config)


def _shipped_configs() -> list[str]:
  return sorted(str(p.relative_to(REPO)) for p in (REPO / "configs").rglob("*.py")
                if p.name != "__init__.py" and not p.name.startswith("default_"))


@functools.lru_cache(maxsize=None)
def _fields_of(cfg_file: str) -> frozenset[str]:
  from score_sde.config_validation import config_leaf_paths
  spec = importlib.util.spec_from_file_location("cfg", REPO / cfg_file)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return frozenset(config_leaf_paths(module.get_config()))


@pytest.mark.parametrize("where", sorted(INLINE))
def test_documented_override_parses_for_every_config_with_the_field(where):
  """``--config.eval.inception_weights=/path/to/the.pth`` in prose must work as written."""
  import ml_collections
  for path, value in INLINE[where]:
    with_field = [f for f in _shipped_configs() if path in _fields_of(f)]
    assert with_field, f"{where}: --config.{path} names a field no shipped config has"
    for cfg_file in with_field:
      try:
        fv = parse([f"--config={REPO / cfg_file}", "--workdir=runs/x", f"--config.{path}={value}"])
      except flags.Error as e:
        pytest.fail(f"{where}: --config.{path}={value} does not parse with {cfg_file}: {e}")
      assert isinstance(fv.config, ml_collections.ConfigDict)


def test_an_override_that_does_not_parse_fails_here(tmp_path):
  """The check has teeth: a bare-None field (the bug typed placeholders fix) or an unknown field
  fails the parse."""
  bare = tmp_path / "bare_none.py"
  bare.write_text("from configs.toy.vp import get_config as _toy\n\n\ndef get_config():\n"
                  "  config = _toy()\n  config.eval.other_path = None\n  return config\n")
  with pytest.raises(flags.Error, match="eval.other_path is not supported"):
    parse([f"--config={bare}", "--workdir=w", "--config.eval.other_path=/p.npz"])
  parse([f"--config={REPO / 'configs/toy/vp.py'}", "--workdir=w",
         "--config.eval.stats_path=/p.npz"])
  with pytest.raises(flags.Error, match="training.foo"):
    parse([f"--config={REPO / 'configs/toy/vp.py'}", "--workdir=w", "--config.training.foo=1"])
  with pytest.raises(flags.Error, match="n_iters"):
    parse([f"--config={REPO / 'configs/toy/vp.py'}", "--workdir=w",
           "--config.training.n_iters=many"])
