"""The committed notebooks carry outputs made by their current code (no execution here: reads JSON).

``python -m experiments.refresh_notebooks`` stores a hash of the code cells with the outputs; a
code edit without a refresh fails :func:`test_stored_outputs_belong_to_the_current_code`.
"""
import copy
import json
import pathlib

import pytest

from experiments import refresh_notebooks as R

NOTEBOOKS = pathlib.Path(__file__).resolve().parents[1] / "notebooks"
NAMES = sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb"))
MAX_BYTES = 1_000_000   # stored outputs stay small: a few PNGs at modest dpi and short tables


def _load(name: str) -> dict:
  return json.loads((NOTEBOOKS / f"{name}.ipynb").read_text())


def test_every_notebook_is_refreshed_by_the_command():
  assert sorted(R.NOTEBOOKS) == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_stored_outputs_belong_to_the_current_code(name):
  reason = R.stale_reason(_load(name))
  assert reason is None, (f"notebooks/{name}.ipynb: {reason}. Rerun `python -m "
                          f"experiments.refresh_notebooks --notebooks {name}` and commit it.")


@pytest.mark.parametrize("name", NAMES)
def test_stored_outputs_are_complete_and_small(name):
  nb = _load(name)
  size = (NOTEBOOKS / f"{name}.ipynb").stat().st_size
  assert size < MAX_BYTES, f"notebooks/{name}.ipynb is {size} bytes"
  meta = nb["metadata"]["score_sde"]
  assert meta["settings"] == "full" and meta["wall_seconds"] > 0 and meta["machine"]["cores"] > 0
  first_md = next(c for c in nb["cells"] if c["cell_type"] == "markdown")
  assert R.stamp_text(meta) in R.cell_text(first_md["source"])
  assert "widgets" not in nb["metadata"]
  code = [c for c in nb["cells"] if c["cell_type"] == "code"]
  assert all(c["execution_count"] is not None for c in code), "a code cell was not executed"
  outputs = [o for c in code for o in c["outputs"]]
  assert not [o for o in outputs if o["output_type"] == "error"]
  assert any("image/png" in o.get("data", {}) for o in outputs), "no figure stored"


@pytest.mark.parametrize("name", NAMES)
def test_notebooks_import_the_installed_package(name):
  code = "".join(R.cell_text(c["source"]) for c in _load(name)["cells"] if c["cell_type"] == "code")
  assert "sys.path" not in code
  assert "pip install -e ." in R.cell_text(next(c for c in _load(name)["cells"]
                                            if c["cell_type"] == "code")["source"])


def test_source_hash_sees_code_edits_only():
  nb = _load(NAMES[0])
  base = R.source_hash(nb)
  edited = copy.deepcopy(nb)
  cell = next(c for c in edited["cells"] if c["cell_type"] == "code")
  cell["source"] = R.cell_text(cell["source"]) + "\n"
  assert R.source_hash(edited) != base and R.stale_reason(edited) is not None
  as_lines = copy.deepcopy(nb)   # nbformat's JSON may store a source as a list of lines
  for c in as_lines["cells"]:
    c["source"] = R.cell_text(c["source"]).splitlines(keepends=True)
  assert R.source_hash(as_lines) == base
  prose = copy.deepcopy(nb)      # markdown (and the stamp line in it) is not hashed
  R.set_stamp(prose, R.STAMP + " elsewhere")
  assert R.source_hash(prose) == base
  unstamped = copy.deepcopy(nb)
  unstamped["metadata"].pop("score_sde", None)
  assert "missing" in R.stale_reason(unstamped)


def test_set_stamp_replaces_its_line():
  nb = {"cells": [{"cell_type": "code", "source": "x = 1"},
                  {"cell_type": "markdown", "source": "# Title\n\nProse.\n"}]}
  R.set_stamp(nb, R.STAMP + " one")
  R.set_stamp(nb, R.STAMP + " two")
  assert nb["cells"][1]["source"] == f"# Title\n\nProse.\n\n{R.STAMP} two"
