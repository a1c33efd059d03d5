"""The notebooks run top to bottom (tiny settings through SCORE_SDE_SMOKE=1)."""
import os
import pathlib

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = pathlib.Path(__file__).resolve().parents[1] / "notebooks"


def _run(name: str) -> str:
  nb = nbformat.read(NOTEBOOKS / name, as_version=4)
  os.environ["SCORE_SDE_SMOKE"] = "1"  # inherited by the kernel
  nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                          resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
  return "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                   for o in c.get("outputs", []))


@pytest.mark.parametrize("name", sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")))
def test_notebook_runs(name, request):
  if name == "controllable_generation.ipynb":  # trains on MNIST: the real files, offline
    os.environ["SCORE_SDE_MNIST_DIR"] = request.getfixturevalue("mnist_dir")
  text = _run(name)
  assert "Error" not in text
  if name == "sampling_and_likelihood.ipynb":
    assert "identical params: True" in text
