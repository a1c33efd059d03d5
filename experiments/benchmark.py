"""Spine benchmark: MNIST U-Net training speed and memory; PC / ODE sampler and likelihood cost.

  python -m experiments.benchmark --out benchmarks/out/spine_cpu.json            # CPU, small
  python -m experiments.benchmark --out benchmarks/out/spine_gpu.json \
      --batch 128 --sample_batch 64 --train_steps 3000 --data_dir /path/to/mnist   # GPU

Measured, in order:
  train      compile time of one jitted call of ``n_jitted_steps`` steps, then steps/s and images/s
             of the MNIST U-Net (configs/mnist/vp_continuous.py) at ``--batch``; peak memory (device
             ``peak_bytes_in_use`` on GPU/TPU, the process's peak RSS on CPU).
  sampling   with the network's EMA params after ``--train_steps`` training steps (0: the
             initialisation, stated in the JSON as ``trained_steps``): PC (Euler-Maruyama, 1000 steps),
             PC (reverse diffusion + Langevin), the adaptive probability-flow ODE (RK45/dopri5,
             rtol = atol = 1e-5) and the likelihood (rtol = atol = 1e-5, Rademacher Hutchinson)
             at ``--sample_batch``: wall time (after compilation) and NFE.
  exact      the same samplers and likelihood with the exact score of a 784-dimensional Gaussian
             mixture (score_sde.analytic): the NFE an adaptive solver needs for a true score.

Training data are real MNIST when ``--data_dir`` holds the idx files, otherwise random images of
the right shape (speed does not depend on pixel values; the sampler NFE of a model trained on
noise does, so pass real data for the sampling rows). Prints a table and writes JSON.
"""
from __future__ import annotations

import os
import platform
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from experiments import common

FLAGS = flags.FLAGS


def define_flags(flag_values: flags.FlagValues = FLAGS) -> None:
  """Defines this script's flags on ``flag_values``. Called when the script runs, so that importing
  the module defines no flags."""
  fv = dict(flag_values=flag_values)
  flags.DEFINE_string("out", "benchmarks/out/spine.json", "Where to write the JSON results.", **fv)
  flags.DEFINE_integer("batch", 32, "Global training batch.", **fv)
  flags.DEFINE_integer("n_jitted_steps", 5, "Training steps per compiled call.", **fv)
  flags.DEFINE_integer("timed_calls", 10, "Compiled training calls timed after the first.", **fv)
  flags.DEFINE_integer("train_steps", 0, "Train this many steps before the sampling rows.", **fv)
  flags.DEFINE_integer("sample_batch", 8, "Batch of the sampler and likelihood rows.", **fv)
  flags.DEFINE_string("data_dir", None, "Directory with the MNIST idx files (optional).", **fv)
  config_flags.DEFINE_config_file("config", "configs/mnist/vp_continuous.py",
                                  "Config file of the U-Net (--config.<field>=value "
                                  "overrides).", **fv)
  flags.DEFINE_bool("exact", True, "Also time the samplers with the exact 784-d mixture score.",
                    **fv)
  flags.DEFINE_bool("network", True, "Time the samplers and likelihood with the U-Net (slow on "
                    "CPU).", **fv)


def _peak_memory() -> dict:
  dev = jax.devices()[0]
  stats = dev.memory_stats() if dev.platform != "cpu" else None
  if stats and "peak_bytes_in_use" in stats:
    return {"peak_device_memory_gib": stats["peak_bytes_in_use"] / 2**30}
  return {"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def _timed(fn, *args):
  """(result, seconds) of ``fn(*args)`` with all outputs ready."""
  t0 = time.perf_counter()
  out = jax.block_until_ready(fn(*args))
  return out, time.perf_counter() - t0


def _batches(trainer, config, n: int, rng: np.random.Generator, ds):
  if ds is not None:
    return [next(ds) for _ in range(n)]
  shape = (config.training.batch_size // jax.process_count(),) + trainer.shape
  return [{"image": rng.random(shape, dtype=np.float32)} for _ in range(n)]


def bench_train(config, results: dict):
  from score_sde import datasets
  from score_sde.train import Trainer
  trainer = Trainer(config)
  rng = np.random.default_rng(0)
  ds = datasets.get_dataset(config, "train") if config.data.data_dir else None
  n = int(config.training.n_jitted_steps)
  _, compile_s = _timed(trainer.train_steps, _batches(trainer, config, n, rng, ds))
  t = 0.0
  for _ in range(FLAGS.timed_calls):
    _, dt = _timed(trainer.train_steps, _batches(trainer, config, n, rng, ds))
    t += dt
  steps = FLAGS.timed_calls * n
  results["train"] = {"batch": config.training.batch_size, "n_jitted_steps": n,
                      "first_call_s (compile + run)": compile_s, "steps_per_s": steps / t,
                      "images_per_s": steps * config.training.batch_size / t,
                      "params": int(sum(x.size for x in jax.tree.leaves(trainer.state.params))),
                      **_peak_memory()}
  print(f"train: {steps / t:.2f} steps/s, {steps * config.training.batch_size / t:.0f} images/s "
        f"(batch {config.training.batch_size}), first call {compile_s:.1f} s, {_peak_memory()}")
  trained = 0
  while trained < FLAGS.train_steps:
    trainer.train_steps(_batches(trainer, config, n, rng, ds))
    trained += n
  if trained:
    loss = trainer._eval_step(trainer.state, jnp.asarray(trainer.scaler(
        _batches(trainer, config, 1, rng, ds)[0]["image"])), jax.random.PRNGKey(0))
    results["train"]["trained_steps"] = trained
    results["train"]["loss_after_training"] = float(loss)
    print(f"trained {trained} steps, loss {float(loss):.4f}")
  return trainer, trained, ds


def bench_samplers(sde, shape, score_fn, x_data, label: str) -> dict:
  """Wall time (second call) and NFE of PC, ODE and the likelihood for one score_fn."""
  from score_sde import likelihood
  from score_sde.sampling import get_sampler
  rows = {}
  runs = {
      "pc_euler_maruyama": get_sampler("pc", sde, shape, predictor="euler_maruyama",
                                       corrector="none"),
      "pc_reverse_diffusion_langevin": get_sampler("pc", sde, shape, predictor="reverse_diffusion",
                                                   corrector="langevin"),
      "ode_dopri5_1e-5": get_sampler("ode", sde, shape, rtol=1e-5, atol=1e-5),
  }
  lik = likelihood.get_likelihood_fn(sde, rtol=1e-5, atol=1e-5, hutchinson_type="rademacher")
  for name, sampler in runs.items():
    fn = jax.jit(lambda k, s=sampler: s(k, score_fn))
    (_, _), first = _timed(fn, jax.random.PRNGKey(0))
    (_, nfe), wall = _timed(fn, jax.random.PRNGKey(1))
    rows[name] = {"wall_s": wall, "first_call_s": first, "nfe": int(nfe)}
  fn = jax.jit(lambda k, x: lik(k, score_fn, x))
  (_, _, _), first = _timed(fn, jax.random.PRNGKey(0), x_data)
  (bpd, _, nfe), wall = _timed(fn, jax.random.PRNGKey(1), x_data)
  rows["likelihood_rademacher_1e-5"] = {"wall_s": wall, "first_call_s": first, "nfe": int(nfe),
                                        "bpd_model_space": float(jnp.mean(bpd))}
  for name, r in rows.items():
    print(f"{label:>6} | {name:<30} | batch {shape[0]:>4} | {r['wall_s']:8.2f} s | "
          f"NFE {r['nfe']}")
  return rows


def main(argv) -> None:
  common.no_arguments(argv)
  config = FLAGS.config
  config.training.batch_size = FLAGS.batch
  config.training.n_jitted_steps = FLAGS.n_jitted_steps
  config.data.data_dir = FLAGS.data_dir
  dev = jax.devices()[0]
  results = {"machine": {"platform": dev.platform, "device": dev.device_kind,
                         "device_count": jax.device_count(), "cpu_count": os.cpu_count(),
                         "python": platform.python_version(), "jax": jax.__version__},
             "config": config_flags.get_config_filename(FLAGS["config"])}
  print(results["machine"])
  trainer, trained, ds = bench_train(config, results)
  shape = (FLAGS.sample_batch,) + trainer.shape
  if ds is not None:
    from score_sde import likelihood
    images = np.concatenate([b["image"] for b in _batches(trainer, config, 1, None, ds)])
    x = np.round(images[: FLAGS.sample_batch] * 255.0)
    x_data = trainer.scaler(likelihood.dequantize(jax.random.PRNGKey(5), x))
  else:
    x_data = trainer.scaler(np.random.default_rng(1).random(shape, dtype=np.float32))
  x_data = jnp.asarray(x_data, jnp.float32)
  if FLAGS.network:
    results["network"] = bench_samplers(trainer.sde, shape,
                                        trainer.score_fn(trainer.state.ema_params), x_data, "net")
    results["network"]["trained_steps"] = trained
  if FLAGS.exact:
    from score_sde import analytic
    mixture = analytic.standard_mixture(dim=int(np.prod(trainer.shape)), num_components=4,
                                        data_shape=trainer.shape)
    x_exact = mixture.sample(jax.random.PRNGKey(3), FLAGS.sample_batch)
    results["exact"] = bench_samplers(trainer.sde, shape, mixture.score_fn(trainer.sde), x_exact,
                                      "exact")
  common.write_result(FLAGS.out, results)


if __name__ == "__main__":
  define_flags()
  app.run(main)
