"""MNIST: the pixel-space DiT-S/2 against the MNIST U-Net at equal training steps (issue 16).

Both configs train the same recipe -- VP SDE, continuous DSM loss, eps output, batch, data order
(seed), warm-up -- and differ in the network (and DiT's learning rate 1e-4 vs the U-Net's 2e-4,
each config's own):

  mnist.vp_continuous   small_unet, nf = 32, ch_mult (1, 2, 2): 1.08M parameters
  dit.mnist_dit_s2      DiT-S/2: 196 tokens of 2x2 patches, D = 384, 12 blocks, 6 heads: 32.5M

For each: parameters, the first compiled call (compile + n_jitted_steps steps), training
images/s of the compiled train step (steps after the first call, real MNIST batches), and, with
``--steps`` > 0, the held-out DSM loss after that many steps: the training loss of the raw
(non-EMA) params on ``--eval_images`` test images with one fixed key (the same t and noise draws
for both networks; lower is a better denoiser at the sampled noise levels). The EMA (0.999) is
not used: after a short run it still averages mostly over early steps.

    python -m experiments.benchmark_dit_mnist --data_dir ../shared/data/mnist --steps 200 \\
        --out docs/results/dit_mnist.json

Also reported: CPU seconds of the process (all threads) per step, and images per CPU second, the
figure least affected by other jobs on a shared CPU (run with
``XLA_FLAGS=--xla_cpu_multi_thread_eigen=false`` to keep XLA:CPU on one thread).

Frechet distance and bits/dim need full runs (the configs' 20000 steps at batch 128) and the
MNIST recipe benchmark (experiments/recipes_mnist.py), which today imports configs.mnist.<recipe>
and names runs by the U-Net's model.nf, so it does not run DiT yet. Measured numbers and costs:
docs/networks.md (DiT section).
"""
from __future__ import annotations

import importlib
import resource
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from absl import app, flags

from experiments import common

FLAGS = flags.FLAGS
CONFIGS = ("mnist.vp_continuous", "dit.mnist_dit_s2")


def define_flags(flag_values: flags.FlagValues = FLAGS) -> None:
  """Defines this script's flags on ``flag_values`` (called when the script runs)."""
  fv = dict(flag_values=flag_values)
  flags.DEFINE_string("data_dir", "../shared/data/mnist", "The four MNIST idx files.", **fv)
  flags.DEFINE_list("configs", list(CONFIGS), "Config modules under configs/.", **fv)
  flags.DEFINE_integer("batch", 32, "Training batch.", **fv)
  flags.DEFINE_integer("steps", 0, "Training steps (a multiple of 5); 0: only the timing "
                       "calls.", **fv)
  flags.DEFINE_integer("calls", 2, "With --steps 0: compiled calls timed after the first.", **fv)
  flags.DEFINE_integer("jitted_steps", 1, "Training steps per compiled call "
                       "(config.training.n_jitted_steps; 1 compiles fastest).", **fv)
  flags.DEFINE_integer("eval_images", 512, "Test images of the held-out loss.", **fv)
  flags.DEFINE_integer("seed", 0, "Seed of data order and initialization (both configs).", **fv)
  flags.DEFINE_string("out", "", "Write the JSON result here.", **fv)


def _cpu_seconds() -> float:
  r = resource.getrusage(resource.RUSAGE_SELF)
  return r.ru_utime + r.ru_stime


def run_config(name: str, data_dir: str, batch: int, steps: int, calls: int, eval_images: int,
               seed: int, jitted_steps: int = 1, log: Callable[[str], None] = print) -> dict:
  """Trains ``configs.<name>`` for ``steps`` (or ``calls`` timed calls) on one device; its row."""
  from score_sde import datasets, losses
  from score_sde.models import count_params
  from score_sde.train import Trainer
  config = importlib.import_module(f"configs.{name}").get_config()
  t = config.training
  t.n_jitted_steps = n = jitted_steps
  t.log_freq = t.snapshot_freq = t.snapshot_freq_for_preemption = n
  total = steps if steps > 0 else (calls + 1) * n
  if total % n:
    raise app.UsageError(f"--steps={steps} must be a multiple of --jitted_steps={n}.")
  config.data.data_dir = data_dir
  config.seed = 42 + seed
  t.batch_size, t.n_iters = batch, max(total, n)
  t.snapshot_sampling = False
  from jax.sharding import AxisType
  mesh = jax.make_mesh((1,), ("data",), axis_types=(AxisType.Auto,), devices=jax.devices()[:1])
  trainer = Trainer(config, None, mesh=mesh)
  ds = datasets.get_dataset(config, "train")
  t0, c0 = time.time(), _cpu_seconds()
  jax.block_until_ready(trainer.train_steps([next(ds) for _ in range(n)]))
  first, first_cpu = time.time() - t0, _cpu_seconds() - c0
  batches = [[next(ds) for _ in range(n)] for _ in range(total // n - 1)]
  t0, c0, last = time.time(), _cpu_seconds(), None
  for b in batches:
    last = trainer.train_steps(b)
  jax.block_until_ready(last)
  timed = total - n
  seconds, cpu = time.time() - t0, _cpu_seconds() - c0
  row = {"config": name, "network": config.model.name, "params": count_params(config),
         "batch": batch, "steps": total, "first_call_seconds": round(first, 1),
         "first_call_cpu_seconds": round(first_cpu, 1),
         "seconds_per_step": seconds / timed if timed else None,
         "images_per_second": timed * batch / seconds if timed else None,
         "cpu_seconds_per_step": cpu / timed if timed else None,
         "images_per_cpu_second": timed * batch / cpu if timed else None,
         "lr": float(config.optim.lr)}
  if steps > 0:
    config.eval.batch_size = eval_images
    images = next(datasets.get_dataset(config, "eval"))["image"][:eval_images]
    x = trainer.scaler(jnp.asarray(images))
    loss_fn = jax.jit(losses.get_loss_fn(config, trainer.sde, trainer.model, train=False))
    params = jax.device_get(trainer.state.params)
    row["heldout_dsm_loss"] = float(loss_fn(jax.random.PRNGKey(1234), params, x)[0])
    row["eval_images"] = int(x.shape[0])
  log(f"{name}: {row['params']:,} params, first call {first:.0f} s, "
      f"{row['images_per_second'] or float('nan'):.2f} images/s "
      f"({row['images_per_cpu_second'] or float('nan'):.2f} per CPU s) at batch {batch}"
      + (f", held-out DSM loss {row['heldout_dsm_loss']:.4f} after {total} steps"
         if steps > 0 else ""))
  return row


def markdown(rows: Sequence[dict]) -> str:
  lines = ["| config | network | parameters | batch | steps | first call (s; CPU s) "
           "| train images/s | images per CPU s | held-out DSM loss |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
  for r in rows:
    ips = f"{r['images_per_second']:.2f}" if r["images_per_second"] else "-"
    ipc = f"{r['images_per_cpu_second']:.2f}" if r["images_per_cpu_second"] else "-"
    loss = f"{r['heldout_dsm_loss']:.4f}" if "heldout_dsm_loss" in r else "-"
    lines.append(f"| `{r['config']}` | `{r['network']}` | {r['params'] / 1e6:.2f}M | {r['batch']} "
                 f"| {r['steps']} | {r['first_call_seconds']}; {r['first_call_cpu_seconds']} "
                 f"| {ips} | {ipc} | {loss} |")
  return "\n".join(lines)


def main(argv: Sequence[str]) -> None:
  common.no_arguments(argv)
  rows = [run_config(name, FLAGS.data_dir, FLAGS.batch, FLAGS.steps, FLAGS.calls,
                     FLAGS.eval_images, FLAGS.seed, FLAGS.jitted_steps, log=common.log)
          for name in FLAGS.configs]
  common.log(markdown(rows))
  import os
  info = {"backend": jax.default_backend(), "cpu_count": os.cpu_count(),
          "load_average": [round(v, 1) for v in os.getloadavg()]}
  common.write_result(FLAGS.out, {"rows": rows, "machine": info}, say=True)


if __name__ == "__main__":
  define_flags()
  app.run(main)
