"""Re-executes the notebooks at their full settings and writes their outputs back (issue 20).

    python -m experiments.refresh_notebooks --mnist_dir ../shared/data/mnist
    python -m experiments.refresh_notebooks --notebooks quickstart    # one of them
    python -m experiments.refresh_notebooks --check                   # only compare the hashes

Each notebook of ``notebooks/`` runs top to bottom in a fresh ``python3`` kernel started in
``notebooks/`` with ``SCORE_SDE_SMOKE`` removed from its environment (the full settings; CI's smoke
run, ``tests/test_notebooks.py``, sets it to 1 and never writes). Nothing is written unless every
cell succeeds. Then the notebook is saved with its outputs and, in ``metadata["score_sde"]``:

* ``source_sha256``: :func:`source_hash` of its code cells, which
  ``tests/test_notebook_outputs.py`` recomputes (no execution), so stored outputs never silently
  belong to older code: edit a code cell and that test fails until this command is rerun;
* ``executed_utc``, ``wall_seconds``, ``machine`` (CPU model and cores, the load average when it
  started, JAX backend and devices, JAX / Python versions: :func:`machine_description`),
  ``settings = "full"``.

The same facts are written as the :data:`STAMP` line of the first markdown cell, so a reader on a
code host sees what machine made the outputs and how long it took. Widget state and nbclient's
per-cell timing metadata are not stored; figures are PNGs at the dpi the notebooks set.
Needs ``nbclient`` / ``nbformat`` / ``ipykernel`` (``pip install -e ".[test]"``).
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import pathlib
import platform
import subprocess
import sys
import time
from typing import Any, Mapping, Optional

from absl import app, flags

FLAGS = flags.FLAGS
NOTEBOOKS_DIR = pathlib.Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = ("quickstart", "sampling_and_likelihood", "controllable_generation")
# The first markdown cell's line that this command rewrites (found by this prefix).
STAMP = "**Stored outputs:**"
SMOKE_ENV = "SCORE_SDE_SMOKE"
MNIST_ENV = "SCORE_SDE_MNIST_DIR"


def define_flags(flag_values: flags.FlagValues = FLAGS) -> None:
  """Defines this script's flags (called when it runs: importing it defines none)."""
  fv = dict(flag_values=flag_values)
  flags.DEFINE_list("notebooks", list(NOTEBOOKS), "Notebook names in notebooks/ (no .ipynb).",
                    **fv)
  flags.DEFINE_string("mnist_dir", None, f"MNIST idx files for controllable_generation (sets "
                      f"{MNIST_ENV}; None: the environment's value, else tfds).", **fv)
  flags.DEFINE_integer("cell_timeout", 3600, "Seconds one cell may run.", **fv)
  flags.DEFINE_bool("check", False, "Execute nothing: report which notebooks' code differs from "
                    "what their stored outputs were made with (exit status 1 if any).", **fv)


# --- the source hash ------------------------------------------------------------------------------
def cell_text(source: Any) -> str:
  """A cell's source as one string (nbformat's JSON allows a list of lines)."""
  return source if isinstance(source, str) else "".join(source)


def source_hash(nb: Mapping[str, Any]) -> str:
  """sha256 (hex) of the notebook's code cells, in order: the code that produced the outputs.

  Markdown is left out (the stamp line changes at every refresh, and prose does not change
  outputs); ``nb`` is an ``nbformat`` notebook or the plain JSON dict of one.
  """
  codes = [cell_text(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]
  return hashlib.sha256(json.dumps(codes).encode()).hexdigest()


def stale_reason(nb: Mapping[str, Any]) -> Optional[str]:
  """None if the stored outputs were made by the notebook's current code cells, else why not."""
  meta = nb.get("metadata", {}).get("score_sde", {})
  stored = meta.get("source_sha256")
  if stored is None:
    return "no outputs stored by experiments.refresh_notebooks (metadata.score_sde missing)"
  if stored != source_hash(nb):
    return (f"its code cells changed since the outputs were stored ({meta.get('executed_utc')}): "
            f"hash {source_hash(nb)[:12]} vs stored {stored[:12]}")
  return None


# --- machine, stamp, cleaning ---------------------------------------------------------------------
def _cpu_model() -> str:
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def machine_description(env: Optional[Mapping[str, str]] = None) -> dict:
  """CPU model and usable cores, and the JAX backend / devices a kernel started with ``env`` sees.

  JAX is asked in a child process so that this process never initializes (and, on a GPU, never
  pre-allocates) a backend the kernels need.
  """
  probe = ("import jax, json; d = jax.devices(); print(json.dumps({'backend': "
           "jax.default_backend(), 'devices': f'{len(d)} x {d[0].device_kind}', "
           "'jax': jax.__version__}))")
  try:
    out = subprocess.run([sys.executable, "-c", probe], env=dict(env or os.environ),
                         capture_output=True, text=True, check=True, timeout=300).stdout
    jax_info = json.loads(out.strip().splitlines()[-1])
  except (subprocess.SubprocessError, ValueError, IndexError) as e:
    jax_info = {"backend": f"unknown ({type(e).__name__})"}
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  load = round(os.getloadavg()[0], 1) if hasattr(os, "getloadavg") else None
  return {"cpu": _cpu_model(), "cores": cores, **jax_info, "load_average_at_start": load,
          "python": platform.python_version(), "os": platform.system()}


def stamp_text(meta: Mapping[str, Any]) -> str:
  """The first markdown cell's :data:`STAMP` line for the metadata ``meta``."""
  m = meta["machine"]
  minutes = meta["wall_seconds"] / 60
  load = m.get("load_average_at_start")
  shared = (f" (load average {load} at the start: the cores were shared with other jobs)"
            if load is not None and load > m["cores"] else "")
  where = (f"{m['cores']} x {m['cpu']} cores" if m.get("backend") == "cpu"
           else f"{m.get('devices', m.get('backend'))} (host: {m['cores']} x {m['cpu']} cores)")
  return (f"{STAMP} executed top to bottom at the full settings by "
          f"`python -m experiments.refresh_notebooks` on {meta['executed_utc'][:10]}: {where}, "
          f"JAX {m.get('jax', '?')} ({m.get('backend')}), {minutes:.1f} min wall time{shared}. CI "
          f"runs the same code with `{SMOKE_ENV}=1` (tiny settings).")


def set_stamp(nb: Any, text: str) -> None:
  """Replaces the :data:`STAMP` line of the first markdown cell by ``text`` (appends it if none)."""
  cell = next(c for c in nb["cells"] if c["cell_type"] == "markdown")
  lines = [ln for ln in cell_text(cell["source"]).split("\n") if not ln.startswith(STAMP)]
  while lines and not lines[-1].strip():
    lines.pop()
  cell["source"] = "\n".join(lines + ["", text])


def strip_volatile(nb: Any) -> None:
  """Drops what should not be stored: widget state and per-cell execution timing metadata."""
  nb["metadata"].pop("widgets", None)
  for cell in nb["cells"]:
    cell.get("metadata", {}).pop("execution", None)
    if cell["cell_type"] != "code":
      continue
    cell["outputs"] = [o for o in cell["outputs"] if "application/vnd.jupyter.widget-view+json"
                       not in o.get("data", {})]


# --- execution ------------------------------------------------------------------------------------
def refresh(name: str, mnist_dir: Optional[str], cell_timeout: int) -> dict:
  """Executes ``notebooks/<name>.ipynb`` at full settings and writes it back; returns its
  ``metadata["score_sde"]``. Raises (and writes nothing) if a cell fails."""
  import nbclient
  import nbformat

  path = NOTEBOOKS_DIR / f"{name}.ipynb"
  nb = nbformat.read(path, as_version=4)
  env = {k: v for k, v in os.environ.items() if k != SMOKE_ENV}
  if mnist_dir:
    env[MNIST_ENV] = os.path.abspath(mnist_dir)
  machine = machine_description(env)
  saved = dict(os.environ)
  os.environ.clear()
  os.environ.update(env)          # the kernel inherits this process's environment
  try:
    start = time.time()
    nbclient.NotebookClient(nb, timeout=cell_timeout, kernel_name="python3",
                            record_timing=False,
                            resources={"metadata": {"path": str(NOTEBOOKS_DIR)}}).execute()
    wall = time.time() - start
  finally:
    os.environ.clear()
    os.environ.update(saved)
  meta = {"source_sha256": source_hash(nb), "settings": "full",
          "executed_utc": datetime.datetime.now(datetime.timezone.utc).strftime(
              "%Y-%m-%dT%H:%M:%SZ"),
          "wall_seconds": round(wall, 1), "machine": machine}
  nb["metadata"]["score_sde"] = meta
  set_stamp(nb, stamp_text(meta))
  strip_volatile(nb)
  nbformat.write(nb, path)
  return meta


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments {argv[1:]}; every option is a --flag.")
  unknown = [n for n in FLAGS.notebooks if not (NOTEBOOKS_DIR / f"{n}.ipynb").exists()]
  if unknown:
    raise app.UsageError(f"--notebooks: {unknown} not in {NOTEBOOKS_DIR}; choose from "
                         f"{sorted(p.stem for p in NOTEBOOKS_DIR.glob('*.ipynb'))}.")
  if FLAGS.check:
    stale = {}
    for n in FLAGS.notebooks:
      reason = stale_reason(json.loads((NOTEBOOKS_DIR / f"{n}.ipynb").read_text()))
      print(f"{n}: {reason or 'up to date'}")
      if reason:
        stale[n] = reason
    sys.exit(1 if stale else 0)
  for n in FLAGS.notebooks:
    meta = refresh(n, FLAGS.mnist_dir, FLAGS.cell_timeout)
    size = (NOTEBOOKS_DIR / f"{n}.ipynb").stat().st_size
    print(f"{n}: {meta['wall_seconds'] / 60:.1f} min, {size / 1024:.0f} KiB, "
          f"hash {meta['source_sha256'][:12]}", flush=True)


if __name__ == "__main__":
  define_flags()
  app.run(main)
