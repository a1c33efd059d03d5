"""Convolution gradients on XLA:CPU: JAX's own vs ``score_sde.models.conv``, per gradient.

For each ``--shapes`` entry ``H:C_in:C_out`` (a 3x3, stride-1, 'SAME', channel-last convolution
at ``--batch``; the defaults are the DDPM++ cont. training step's at batch 8) it times, after
compiling, with every array a jitted argument (never a constant XLA could fold):

* ``fwd``: the convolution itself;
* ``dx``: the input gradient (the VJP with respect to the input only);
* ``dw``: the kernel gradient (the VJP with respect to the kernel only);

once through ``lax.conv_general_dilated`` (JAX's transposition rules) and once through
:func:`score_sde.models.conv.conv_general_dilated` (canonical input-gradient convolution, kernel
gradient as one matrix product per tap in a loop), and records the largest difference between the
two gradients. With ``--torch`` (PyTorch importable; not a dependency) it also times
``torch.nn.functional.conv2d`` and its ``autograd.grad`` on the same shapes in NCHW. Prints
milliseconds per call and writes JSON.

With ``--upsample`` each ``H`` is the size of an image that a x2 nearest-neighbour upsampling
doubles before the convolution (the DDPM++ up blocks): it times the convolution of the upsampled
copy (``score_sde.models.conv`` after ``naive_upsample_2d``, what the blocks ran before) against
:func:`score_sde.models.up_or_down_sampling.naive_upsample_conv` (four 2x2 convolutions of the
image itself) and records the largest differences of the outputs and gradients.

  python -m experiments.benchmark_conv_grad --out docs/results/conv_grad_cpu.json
  PYTHONPATH=/tmp/torchsite python -m experiments.benchmark_conv_grad --torch
  python -m experiments.benchmark_conv_grad --upsample --shapes 16:256:256,8:256:256
"""
from __future__ import annotations

import os
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from jax import lax

from experiments import common
from score_sde.models import conv as conv_lib
from score_sde.models import up_or_down_sampling as updown

FLAGS = flags.FLAGS
DN = ("NHWC", "HWIO", "NHWC")
SHAPES = ("32:128:128", "16:256:256", "8:256:256", "32:128:256", "32:256:128")


def define_flags(flag_values: flags.FlagValues = FLAGS) -> None:
  """Defines this script's flags on ``flag_values``. Called when the script runs, so that importing
  the module defines no flags."""
  fv = dict(flag_values=flag_values)
  flags.DEFINE_list("shapes", list(SHAPES), "H:C_in:C_out per convolution (square H x H input, "
                    "3x3 kernel, stride 1, 'SAME').", **fv)
  flags.DEFINE_integer("batch", 8, "Images per call.", **fv)
  flags.DEFINE_integer("repeats", 10, "Timed calls per measurement, after two untimed ones.", **fv)
  flags.DEFINE_bool("torch", False, "Also time PyTorch's conv2d and its gradients (NCHW).", **fv)
  flags.DEFINE_bool("upsample", False, "H is the image before a x2 nearest-neighbour upsampling: "
                    "time the convolution of the upsampled copy against naive_upsample_conv "
                    "(not with --torch).", **fv)
  flags.DEFINE_string("out", None, "Write the results as JSON here.", **fv)


def parse_shape(text: str) -> tuple[int, int, int]:
  """'H:C_in:C_out' -> (H, C_in, C_out), failing with a message that names the entry."""
  try:
    h, c_in, c_out = (int(v) for v in text.split(":"))
  except ValueError:
    raise app.UsageError(f"--shapes entry {text!r}: write H:C_in:C_out, e.g. 32:128:128.")
  if min(h, c_in, c_out) < 1:
    raise app.UsageError(f"--shapes entry {text!r}: sizes must be positive.")
  return h, c_in, c_out


def _ms(fn: Callable[[], object], repeats: int) -> float:
  fn()
  fn()
  t0 = time.perf_counter()
  for _ in range(repeats):
    fn()
  return round((time.perf_counter() - t0) / repeats * 1e3, 3)


def _jax_times(conv, x, w, dy, repeats: int) -> tuple[dict, tuple]:
  """Times and values (output, dx, dw) of ``conv(x, w, (1, 1), 'SAME', dimension_numbers=DN)``."""
  conv3 = lambda x, w: conv(x, w, (1, 1), "SAME", dimension_numbers=DN)
  fwd = jax.jit(conv3)
  dx = jax.jit(lambda x, w, dy: jax.vjp(lambda x: conv3(x, w), x)[1](dy)[0])
  dw = jax.jit(lambda x, w, dy: jax.vjp(lambda w: conv3(x, w), w)[1](dy)[0])
  times = {"fwd_ms": _ms(lambda: jax.block_until_ready(fwd(x, w)), repeats),
           "dx_ms": _ms(lambda: jax.block_until_ready(dx(x, w, dy)), repeats),
           "dw_ms": _ms(lambda: jax.block_until_ready(dw(x, w, dy)), repeats)}
  return times, (fwd(x, w), dx(x, w, dy), dw(x, w, dy))


def _upsampled_first(x, w, *args, **kwargs):
  """The convolution of the x2 nearest-upsampled image, as the up blocks computed it before."""
  return conv_lib.conv_general_dilated(updown.naive_upsample_2d(x, 2), w, *args, **kwargs)


def _torch_times(x, w, dy, repeats: int) -> dict:
  import torch  # optional: only with --torch
  xt = torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy()).requires_grad_(True)
  wt = torch.from_numpy(np.asarray(w).transpose(3, 2, 0, 1).copy()).requires_grad_(True)
  dyt = torch.from_numpy(np.asarray(dy).transpose(0, 3, 1, 2).copy())
  conv = lambda: torch.nn.functional.conv2d(xt, wt, padding=1)

  def fwd():
    with torch.no_grad():
      conv()
  grad = lambda arg: torch.autograd.grad(conv(), (arg,), dyt)
  # Each gradient call runs the forward once more; its time is subtracted.
  f = _ms(fwd, repeats)
  return {"fwd_ms": f, "dx_ms": round(_ms(lambda: grad(xt), repeats) - f, 3),
          "dw_ms": round(_ms(lambda: grad(wt), repeats) - f, 3),
          "torch": torch.__version__, "torch_threads": torch.get_num_threads()}


def benchmark(shapes: Sequence[tuple[int, int, int]], batch: int, repeats: int,
              with_torch: bool = False, upsample: bool = False) -> dict:
  """Milliseconds per call of fwd / dx / dw per shape and implementation, and the largest
  difference between our gradients and JAX's (relative to the largest gradient entry).

  ``upsample``: ``h`` is the image before a x2 nearest-neighbour upsampling; the implementations
  are the convolution of the upsampled copy ('upsampled_first') and
  :func:`~score_sde.models.up_or_down_sampling.naive_upsample_conv` ('folded'), and the output's
  difference is recorded as well."""
  if with_torch and upsample:
    raise ValueError("with_torch and upsample cannot be combined: PyTorch's side times the plain "
                     "convolution.")
  results = {"backend": jax.default_backend(), "jax": jax.__version__, "batch": batch,
             "host_cpus": os.cpu_count(), "load_avg_1min": round(os.getloadavg()[0], 2),
             "upsample": upsample, "shapes": []}
  impls = ((("upsampled_first", _upsampled_first), ("folded", updown.naive_upsample_conv))
           if upsample else (("lax", lax.conv_general_dilated),
                             ("score_sde", conv_lib.conv_general_dilated)))
  rng = np.random.default_rng(0)
  for h, c_in, c_out in shapes:
    h_out = 2 * h if upsample else h
    x = jnp.asarray(rng.standard_normal((batch, h, h, c_in)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((3, 3, c_in, c_out)) / np.sqrt(9 * c_in), jnp.float32)
    dy = jnp.asarray(rng.standard_normal((batch, h_out, h_out, c_out)), jnp.float32)
    row = {"h": h, "c_in": c_in, "c_out": c_out}
    (ref_name, ref_conv), (name, conv) = impls
    row[ref_name], ref = _jax_times(ref_conv, x, w, dy, repeats)
    row[name], ours = _jax_times(conv, x, w, dy, repeats)
    for part, a, b in zip(("out", "dx", "dw"), ours, ref):
      if upsample or part != "out":
        row[f"{part}_rel_diff"] = float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
    if with_torch:
      row["torch"] = _torch_times(x, w, dy, repeats)
    sides = [s for s in (ref_name, name, "torch") if s in row]
    common.log(f"{h:3d}x{h:<3d} {c_in:4d}->{c_out:<4d} " + "  ".join(
        f"{s}: fwd {row[s]['fwd_ms']:7.2f} dx {row[s]['dx_ms']:7.2f} dw {row[s]['dw_ms']:7.2f}"
        for s in sides) + " ms")
    results["shapes"].append(row)
  return results


def main(argv) -> None:
  common.no_arguments(argv)
  shapes = [parse_shape(s) for s in FLAGS.shapes]
  if FLAGS.torch and FLAGS.upsample:
    raise app.UsageError("--torch and --upsample cannot be combined: PyTorch's side times the "
                         "plain convolution.")
  common.write_result(FLAGS.out, benchmark(shapes, FLAGS.batch, FLAGS.repeats, FLAGS.torch,
                                           FLAGS.upsample))


if __name__ == "__main__":
  define_flags()
  app.run(main)
