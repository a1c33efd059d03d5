"""The library's structure: no import cycle (imports inside functions included) and no module
importing another module's _private name, read from the source with ast (nothing imported)."""
import ast
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("score_sde", "experiments")


def _module_name(path: pathlib.Path) -> str:
  parts = list(path.relative_to(REPO).with_suffix("").parts)
  if parts[-1] == "__init__":
    parts = parts[:-1]
  return ".".join(parts)


def _modules() -> dict[str, pathlib.Path]:
  return {_module_name(p): p for pkg in PACKAGES for p in sorted((REPO / pkg).rglob("*.py"))}


def _imports(name: str, path: pathlib.Path, known: set[str]):
  """(imported module, imported names, line) for every import statement anywhere in the file."""
  tree = ast.parse(path.read_text())
  is_pkg = path.name == "__init__.py"
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for alias in node.names:
        yield alias.name, [], node.lineno
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        pkg = name.split(".") if is_pkg else name.split(".")[:-1]
        pkg = pkg[:len(pkg) - node.level + 1]
        base = ".".join(pkg + ([base] if base else []))
      for alias in node.names:
        sub = f"{base}.{alias.name}"
        if sub in known:  # `from pkg import module`
          yield sub, [], node.lineno
        else:
          yield base, [alias.name], node.lineno


def _graph():
  modules = _modules()
  known = set(modules)
  edges, private = {m: set() for m in modules}, []
  for name, path in modules.items():
    for target, names, line in _imports(name, path, known):
      # A module depends on what it imports and on every package __init__ on the way.
      parts = target.split(".")
      for i in range(1, len(parts) + 1):
        dep = ".".join(parts[:i])
        if dep in known and dep != name and not name.startswith(dep + "."):
          edges[name].add(dep)
      if target in known and target != name:
        private += [f"{name}:{line} imports {target}.{n}" for n in names
                    if n.startswith("_") and not n.startswith("__")]
  return edges, private


def test_no_module_imports_another_modules_private_names():
  _, private = _graph()
  assert not private, "\n".join(private)


def test_no_import_cycle():
  edges, _ = _graph()
  state, stack, cycles = {}, [], []

  def visit(m):
    state[m] = "open"
    stack.append(m)
    for d in sorted(edges[m]):
      if state.get(d) == "open":
        cycles.append(" -> ".join(stack[stack.index(d):] + [d]))
      elif d not in state:
        visit(d)
    stack.pop()
    state[m] = "done"
  for m in sorted(edges):
    if m not in state:
      visit(m)
  assert not cycles, "\n".join(cycles)


@pytest.mark.parametrize("pkg", PACKAGES)
def test_the_graph_sees_the_imports(pkg):
  """Guards the test itself: known dependencies are found."""
  edges, _ = _graph()
  assert "score_sde.sde_lib" in edges["score_sde.losses"]
  assert "score_sde.sampling.base" in edges["score_sde.sampling.pc"]
  assert any(m.startswith(pkg) for m in edges)
