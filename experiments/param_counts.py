"""Parameter count of the network of every config under configs/ (shapes only, nothing compiled).

  python experiments/param_counts.py                       # markdown table on stdout
  python experiments/param_counts.py --out docs/param_counts.json

Each config's network is built from ``config.model`` and initialized under ``jax.eval_shape``
(abstract shapes, no FLOPs, no XLA compile), so the whole table takes seconds. Columns: config
(module path under configs/), network (``config.model.name``), data shape, number of parameters.
"""
from __future__ import annotations

import argparse
import glob
import importlib
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from score_sde.models import utils as mutils  # noqa: E402
from score_sde.utils import data_shape  # noqa: E402


def config_names(root: str = ROOT) -> list[str]:
  """Module names (``vp.cifar10_ddpmpp_continuous``) of every config file with ``get_config``."""
  out = []
  for f in sorted(glob.glob(os.path.join(root, "configs", "**", "*.py"), recursive=True)):
    base = os.path.basename(f)
    if base == "__init__.py" or base.startswith("default_"):
      continue
    out.append(os.path.relpath(f, os.path.join(root, "configs"))[:-3].replace(os.sep, "."))
  return out


def count_params(config) -> int:
  """Number of scalars in ``model.init(...)['params']`` of ``config.model.name`` (eval_shape)."""
  model = mutils.get_model(config.model.name)(config=config)
  x = jnp.zeros((1,) + data_shape(config), jnp.float32)
  labels = jnp.ones((1,), jnp.float32)
  shapes = jax.eval_shape(lambda: model.init(
      {"params": jax.random.PRNGKey(0), "dropout": jax.random.PRNGKey(1)}, x, labels,
      train=False))["params"]
  return int(sum(np.prod(s.shape) for s in jax.tree.leaves(shapes)))


def table(names: list[str]) -> list[dict]:
  rows = []
  for name in names:
    cfg = importlib.import_module(f"configs.{name}").get_config()
    rows.append({"config": name, "network": cfg.model.name,
                 "data_shape": list(data_shape(cfg)), "params": count_params(cfg)})
  return rows


def markdown(rows: list[dict]) -> str:
  lines = ["| config | network | data shape | parameters |", "|---|---|---|---:|"]
  for r in rows:
    shape = "x".join(str(d) for d in r["data_shape"])
    lines.append(f"| `{r['config']}` | `{r['network']}` | {shape} | {r['params']:,} "
                 f"({r['params'] / 1e6:.2f}M) |")
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", default=None, help="Also write the rows as JSON here.")
  parser.add_argument("--filter", default="", help="Only configs whose name contains this.")
  args = parser.parse_args()
  rows = table([n for n in config_names() if args.filter in n])
  print(markdown(rows))
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
      json.dump(rows, f, indent=1)


if __name__ == "__main__":
  main()
