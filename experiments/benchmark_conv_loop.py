"""Convolution gradients inside a loop on XLA:CPU: ``lax.conv_general_dilated`` vs ours.

A 4-layer channel-last conv net (1 -> 32 -> 64 -> 32 -> 1 channels, 3x3, batch 8, 28x28) takes
``--steps`` SGD steps inside one ``lax.fori_loop`` (a while loop), once with JAX's convolution and
once with :func:`score_sde.models.conv.conv_general_dilated`, and the same steps unrolled. Prints
seconds per call (after compiling) and writes JSON.

  python -m experiments.benchmark_conv_loop --out docs/results/conv_loop_cpu.json
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
from absl import app, flags
from jax import lax

from experiments import common
from score_sde.models import conv as conv_lib

FLAGS = flags.FLAGS
DN = ("NHWC", "HWIO", "NHWC")


def define_flags(flag_values: flags.FlagValues = FLAGS) -> None:
  """Defines this script's flags on ``flag_values``. Called when the script runs, so that importing
  the module defines no flags."""
  fv = dict(flag_values=flag_values)
  flags.DEFINE_integer("steps", 4, "SGD steps per compiled call.", **fv)
  flags.DEFINE_integer("repeats", 3, "Timed calls after compiling.", **fv)
  flags.DEFINE_string("out", None, "Write the results as JSON here.", **fv)


def _net(conv, weights, x):
  for i, w in enumerate(weights):
    x = conv(x, w, (1, 1), "SAME", dimension_numbers=DN)
    x = jax.nn.relu(x) if i < len(weights) - 1 else x
  return x


def _time_call(fn, arg, repeats: int) -> float:
  jax.block_until_ready(fn(arg))  # compile
  t0 = time.perf_counter()
  for _ in range(repeats):
    jax.block_until_ready(fn(arg))
  return (time.perf_counter() - t0) / repeats


def benchmark(steps: int, repeats: int) -> dict:
  """Seconds per compiled call of ``steps`` SGD steps, per convolution and loop form."""
  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  chans = (1, 32, 64, 32, 1)
  weights = [jax.random.normal(k, (3, 3, a, b)) * (2.0 / (9 * a)) ** 0.5
             for k, a, b in zip(keys, chans[:-1], chans[1:])]
  x = jnp.ones((8, 28, 28, 1))
  results = {"backend": jax.default_backend(), "jax": jax.__version__, "steps": steps}
  for name, conv in (("lax", lax.conv_general_dilated), ("score_sde", conv_lib.conv_general_dilated)):
    def step(ws, conv=conv):
      g = jax.grad(lambda ws: jnp.mean(_net(conv, ws, x) ** 2))(ws)
      return jax.tree.map(lambda a, b: a - 1e-3 * b, ws, g)
    for unroll in (False, True):
      fn = jax.jit(lambda ws, step=step, unroll=unroll: lax.fori_loop(
          0, steps, lambda i, ws: step(ws), ws, unroll=unroll))
      seconds = _time_call(fn, weights, repeats)
      label = f"{name}_{'unrolled' if unroll else 'loop'}"
      results[label + "_s"] = round(seconds, 4)
      common.log(f"{label:20s} {seconds:8.4f} s per call of {steps} steps")
  return results


def main(argv) -> None:
  common.no_arguments(argv)
  common.write_result(FLAGS.out, benchmark(FLAGS.steps, FLAGS.repeats))


if __name__ == "__main__":
  define_flags()
  app.run(main)
