"""Parameter count of the network of every config under configs/ (shapes only, nothing compiled).

  python -m experiments.param_counts                       # markdown table on stdout
  python -m experiments.param_counts --out docs/param_counts.json

Each config's network is built from ``config.model`` and initialized under ``jax.eval_shape``
(abstract shapes, no FLOPs, no XLA compile), so the whole table takes seconds. Columns: config
(module path under configs/), network (``config.model.name``), data shape, number of parameters.

A second table lists the 12 DiT models at DiT's reference setting (``configs/dit/
default_dit_configs.reference_config``: 32x32x4 latents, 1000 classes, learned sigma; not run
configs): our count, the fixed position table DiT stores as a frozen parameter, and their sum,
which is DiT's published count (DiT-XL/2: 675,129,632; tests/test_dit.py).
"""
from __future__ import annotations

import importlib
import pkgutil

import configs
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from experiments import common
from score_sde.models import utils as mutils
from score_sde.utils import data_shape

FLAGS = flags.FLAGS


def define_flags(flag_values: flags.FlagValues = FLAGS) -> None:
  """Defines this script's flags on ``flag_values``. Called when the script runs, so that importing
  the module defines no flags."""
  fv = dict(flag_values=flag_values)
  flags.DEFINE_string("out", None, "Also write the rows as JSON here.", **fv)
  flags.DEFINE_string("filter", "", "Only configs whose name contains this.", **fv)


def config_names() -> list[str]:
  """Module names (``vp.cifar10_ddpmpp_continuous``) of every config under configs/ (the
  ``default_*`` bases and package ``__init__`` files excepted), sorted."""
  return sorted(m.name.removeprefix("configs.")
                for m in pkgutil.walk_packages(configs.__path__, "configs.")
                if not m.ispkg and not m.name.rsplit(".", 1)[-1].startswith("default_"))


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


def dit_reference_rows() -> list[dict]:
  """DiT-S/B/L/XL x 2/4/8 at DiT's reference setting: our parameters, the fixed position table
  (T * D) and their sum, DiT's count."""
  from configs.dit import default_dit_configs
  from score_sde.models.dit import fixed_position_params
  rows = []
  for name in default_dit_configs.REFERENCE_NAMES:
    cfg = default_dit_configs.reference_config(name)
    ours, table_size = count_params(cfg), fixed_position_params(cfg)
    rows.append({"config": f"DiT-{name}", "network": "dit", "data_shape": list(data_shape(cfg)),
                 "params": ours, "position_table": table_size, "dit_count": ours + table_size})
  return rows


def dit_markdown(rows: list[dict]) -> str:
  lines = ["| DiT model | data shape | parameters | + fixed position table | = DiT's count |",
           "|---|---|---:|---:|---:|"]
  for r in rows:
    shape = "x".join(str(d) for d in r["data_shape"])
    lines.append(f"| {r['config']} | {shape} | {r['params']:,} | {r['position_table']:,} | "
                 f"{r['dit_count']:,} ({r['dit_count'] / 1e6:.2f}M) |")
  return "\n".join(lines)


def main(argv) -> None:
  common.no_arguments(argv)
  rows = table([n for n in config_names() if FLAGS.filter in n])
  common.log(markdown(rows))
  dit_rows = [r for r in dit_reference_rows()   # any --filter that is part of 'dit DiT-XL/2'
              if FLAGS.filter.lower() in f"dit {r['config']}".lower()]
  if dit_rows:
    common.log("\n" + dit_markdown(dit_rows))
  common.write_result(FLAGS.out, rows + dit_rows, say=False)


if __name__ == "__main__":
  define_flags()
  app.run(main)
