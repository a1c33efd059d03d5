"""Throughput of the Flax FID Inception (images/s) and the time to evaluate 10k / 50k samples.

  python -m experiments.benchmark_inception --batch 32 --iters 16 --out /tmp/inception_cpu.json
  python -m experiments.benchmark_inception --batch 500 --iters 20 --precision highest,default \
      --out inception_gpu.json

"Evaluate" = Inception features of every sample + float64 running statistics (FeatureStats
update on the host) + one Frechet distance against a 2048-d reference: the Inception part of
`--mode eval` (sampling not included). The 10k / 50k times are extrapolated from the measured
batches (iters x batch images), the statistics update from its measured per-image cost and the
FID from one measured call; the JSON says how many images were measured.

Uses the real pytorch-fid weights when they are in the cache (or --weights PATH; never downloads),
else random weights of the same shapes (identical cost; the output says which). Images are random
uint8 at --image-size, resized to 299 inside the jitted function like a real evaluation. Timing is
per batch after one compile-and-warm-up call, with block_until_ready.
"""
from __future__ import annotations

import platform
import time

import jax
import numpy as np
from absl import app, flags

from experiments import common
from score_sde.evaluation import inception, metrics, weights

FLAGS = flags.FLAGS


def define_flags(flag_values: flags.FlagValues = FLAGS) -> None:
  """Defines this script's flags on ``flag_values``. Called when the script runs, so that importing
  the module defines no flags."""
  fv = dict(flag_values=flag_values)
  flags.DEFINE_integer("batch", None, "Images per Inception call (default: 8 on CPU, 500 on an "
                       "accelerator).", lower_bound=1, **fv)
  flags.DEFINE_integer("iters", None, "Timed calls (default: 3 on CPU, 20 on an accelerator).",
                       lower_bound=1, **fv)
  flags.DEFINE_integer("image-size", 32, "Side of the random uint8 images (resized to 299).", **fv)
  flags.DEFINE_list("precision", ["highest"], "Conv precisions to time: highest (true f32), "
                    "default (the backend's).", **fv)
  flags.DEFINE_string("weights", None, "Path of the .pth (else the cache).", **fv)
  flags.DEFINE_string("out", None, "Write the results as JSON here.", **fv)


def _load_variables(path: str | None):
  try:
    return weights.load_inception_variables(path, download=False), "pytorch-fid 2015-12-05 (real)"
  except (FileNotFoundError, ValueError) as e:
    print(f"[benchmark] real weights unavailable ({str(e).splitlines()[0][:120]}...): "
          "using RANDOM weights of the same shapes (same cost, meaningless features).")
    return inception.init_inception(seed=0), "random (real weights absent)"


def main(argv) -> None:
  common.no_arguments(argv)
  on_cpu = jax.default_backend() == "cpu"
  batch = FLAGS.batch or (8 if on_cpu else 500)
  iters = FLAGS.iters or (3 if on_cpu else 20)
  image_size = FLAGS["image-size"].value
  variables, weights_kind = _load_variables(FLAGS.weights)
  variables = jax.device_put(variables)
  images = np.random.default_rng(0).integers(
      0, 256, (batch, image_size, image_size, 3), dtype=np.uint8)
  images = jax.device_put(images)
  device = jax.devices()[0]
  results = {"device": f"{device.platform}:{device.device_kind}", "jax": jax.__version__,
             "host": platform.node(), "weights": weights_kind, "batch": batch,
             "image_size": image_size, "iters": iters, "runs": []}
  for precision in FLAGS.precision:
    fn = inception.get_inception_fn(variables, precision=None if precision == "default"
                                    else precision)
    t0 = time.perf_counter()
    jax.block_until_ready(fn(images))
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(iters):
      t0 = time.perf_counter()
      jax.block_until_ready(fn(images))
      times.append(time.perf_counter() - t0)
    per_batch = float(np.median(times))
    ips = batch / per_batch
    # Host-side float64 statistics and the FID itself.
    feats = np.asarray(fn(images)["pool_3"])
    t0 = time.perf_counter()
    stats = metrics.FeatureStats.zeros().update(feats)
    stats_per_image = (time.perf_counter() - t0) / batch
    rng = np.random.default_rng(1)
    ref_feats = rng.random((4096, inception.POOL3_DIM))
    ref = metrics.InceptionStats.from_features(ref_feats)
    stats = metrics.FeatureStats.zeros().update(rng.random((4096, inception.POOL3_DIM)))
    t0 = time.perf_counter()
    metrics.frechet_distance(stats.mean, stats.cov, ref.mu, ref.sigma)
    fid_s = time.perf_counter() - t0

    def total(n):
      return n / ips + n * stats_per_image + fid_s
    run = {"precision": precision, "compile_and_first_call_s": compile_s,
           "median_batch_s": per_batch, "images_per_s": ips,
           "measured_images": batch * iters,
           "stats_update_s_per_image": stats_per_image, "fid_s": fid_s,
           "features_10k_s": 10_000 / ips, "time_10k_samples_s": total(10_000),
           "time_50k_samples_s": total(50_000), "extrapolated": True}
    results["runs"].append(run)
    print(f"[{results['device']}] precision={precision:8s} batch={batch} "
          f"{image_size}px->299: {ips:9.1f} img/s measured on {batch * iters} "
          f"images; extrapolated 10k samples (features + stats + FID) {total(10_000):8.1f} s, "
          f"50k {total(50_000):8.1f} s (FID {fid_s:.2f} s; compile+first call {compile_s:.1f} s;"
          f" weights: {weights_kind})")
  common.write_result(FLAGS.out, results)


if __name__ == "__main__":
  define_flags()
  app.run(main)
