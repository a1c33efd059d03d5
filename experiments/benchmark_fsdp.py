"""Benchmark: memory per device of the train state, replicated vs FSDP (training.param_sharding).

Two measurements (docs/distributed.md):

1. Sizes, for the paper's networks at any device count, without compiling: the train state's
   params, Adam moments and EMA per device, replicated (every device holds all of it) and sharded
   by :func:`score_sde.distributed.state_shardings` (each leaf along its largest dimension divisible
   by the device count; the leaves that have none stay replicated and are counted in full). From
   ``jax.eval_shape`` of the initialization: nothing is computed.
2. XLA's own per-device figures for one compiled train step (``compiled.memory_analysis()``:
   arguments, outputs, temporaries) of a small config on ``--compile_devices`` forced host CPU
   devices, replicated vs FSDP.

  python -m experiments.benchmark_fsdp --out docs/results/fsdp_memory.json
"""
from __future__ import annotations

import os
import sys

if "--help" not in sys.argv and "jax" not in sys.modules:  # forced host devices, before JAX
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_force_host_platform_device_count=8").strip()

import importlib  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from experiments import common  # noqa: E402
from score_sde import distributed, losses  # noqa: E402
from score_sde.models import utils as mutils  # noqa: E402

FLAGS = flags.FLAGS
DEFAULT_CONFIGS = ("vp.cifar10_ddpmpp_continuous", "ve.cifar10_ncsnpp_deep_continuous")


def define_flags(flag_values: flags.FlagValues = FLAGS) -> None:
  fv = dict(flag_values=flag_values)
  flags.DEFINE_list("configs", list(DEFAULT_CONFIGS), "Config modules for the size table.", **fv)
  flags.DEFINE_list("devices", ["1", "4", "8", "64"], "Device counts for the size table.", **fv)
  flags.DEFINE_string("compile_config", "mnist.vp_continuous", "Config compiled for XLA's "
                      "memory analysis ('' to skip).", **fv)
  flags.DEFINE_integer("compile_devices", 4, "Forced host devices of the compiled step.", **fv)
  flags.DEFINE_integer("compile_batch", 32, "Global batch of the compiled step.", **fv)
  flags.DEFINE_string("out", None, "Write the records as JSON here.", **fv)


def state_sizes(name: str, n: int) -> dict:
  """Per-device bytes of params / optimizer state / EMA for configs.<name> over n devices."""
  config = importlib.import_module(f"configs.{name}").get_config()
  params = mutils.param_shapes(config)
  state = jax.eval_shape(lambda p: losses.init_train_state(config, {"params": p},
                                                           jax.random.PRNGKey(0)), params)
  report = distributed.fsdp_report(params, n)
  parts = {"params": state.params, "opt_state": state.opt_state, "ema_params": state.ema_params}
  out = {"config": name, "devices": n, "params": int(sum(np.prod(x.shape)
                                                         for x in jax.tree.leaves(params))),
         "replicated_leaves": report["replicated_leaves"], "sharded_leaves":
         report["sharded_leaves"], "replicated_leaf_names": [p for p, _ in report["replicated"]]}
  total_rep = total_fsdp = 0
  for part, tree in parts.items():
    r = distributed.fsdp_report(tree, n)
    out[f"{part}_replicated_bytes"] = r["total_bytes"]
    out[f"{part}_fsdp_bytes_per_device"] = r["per_device_bytes"]
    total_rep += r["total_bytes"]
    total_fsdp += r["per_device_bytes"]
  out["state_replicated_bytes"], out["state_fsdp_bytes_per_device"] = total_rep, total_fsdp
  return out


def compiled_memory(name: str, n: int, batch: int) -> list[dict]:
  """XLA's memory analysis of one train step of configs.<name> on n devices, both shardings."""
  from jax.sharding import Mesh, NamedSharding
  from jax.sharding import PartitionSpec as P
  from score_sde.train import Trainer
  from score_sde.utils import data_shape
  records = []
  for mode in ("replicated", "fsdp"):
    config = importlib.import_module(f"configs.{name}").get_config()
    config.training.batch_size, config.training.n_jitted_steps = batch, 1
    config.training.param_sharding = mode
    mesh = Mesh(np.array(jax.devices()[:n]), ("data",))
    trainer = Trainer(config, mesh=mesh)
    x = jax.ShapeDtypeStruct((1, batch) + data_shape(config), np.float32,
                             sharding=NamedSharding(mesh, P(None, "data")))
    compiled = trainer._multi_step.lower(trainer.state, x).compile()  # pylint: disable=protected-access
    analysis = compiled.memory_analysis()
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
              "temp_size_in_bytes")
    rec = {"config": name, "devices": n, "batch": batch, "param_sharding": mode}
    rec.update({f: int(getattr(analysis, f)) for f in fields if hasattr(analysis, f)})
    records.append(rec)
  return records


def main(argv) -> None:
  common.no_arguments(argv)
  sizes = [state_sizes(name, int(n)) for name in FLAGS.configs for n in FLAGS.devices]
  for r in sizes:
    print(f"{r['config']} ({r['params'] / 1e6:.2f}M params) on {r['devices']} devices: "
          f"params + Adam + EMA {r['state_replicated_bytes'] / 2**20:.1f} MiB replicated, "
          f"{r['state_fsdp_bytes_per_device'] / 2**20:.1f} MiB per device with FSDP "
          f"({r['replicated_leaves']} of {r['replicated_leaves'] + r['sharded_leaves']} param "
          "leaves replicated)", flush=True)
  compiled = []
  if FLAGS.compile_config:
    compiled = compiled_memory(FLAGS.compile_config, FLAGS.compile_devices, FLAGS.compile_batch)
    for r in compiled:
      print(f"{r['config']} step, batch {r['batch']} on {r['devices']} devices, "
            f"{r['param_sharding']}: per device arguments "
            f"{r.get('argument_size_in_bytes', 0) / 2**20:.2f} MiB, temporaries "
            f"{r.get('temp_size_in_bytes', 0) / 2**20:.2f} MiB", flush=True)
  common.write_result(FLAGS.out, {"state_sizes": sizes, "compiled_step": compiled}, say=False)


if __name__ == "__main__":
  define_flags()
  app.run(main)
