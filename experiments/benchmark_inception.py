"""Throughput of the Flax FID Inception (images/s) and the time to evaluate 10k / 50k samples.

  python experiments/benchmark_inception.py --batch 32 --iters 16 --out /tmp/inception_cpu.json
  python experiments/benchmark_inception.py --batch 500 --iters 20 --precision highest,default \
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

import argparse
import json
import platform
import time

import jax
import numpy as np

from score_sde.evaluation import inception, metrics, weights


def _load_variables(path: str | None):
  try:
    return weights.load_inception_variables(path, download=False), "pytorch-fid 2015-12-05 (real)"
  except (FileNotFoundError, ValueError) as e:
    print(f"[benchmark] real weights unavailable ({str(e).splitlines()[0][:120]}...): "
          "using RANDOM weights of the same shapes (same cost, meaningless features).")
    return inception.init_inception(seed=0), "random (real weights absent)"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  on_cpu = jax.default_backend() == "cpu"
  parser.add_argument("--batch", type=int, default=8 if on_cpu else 500)
  parser.add_argument("--iters", type=int, default=3 if on_cpu else 20)
  parser.add_argument("--image-size", type=int, default=32)
  parser.add_argument("--precision", default="highest",
                      help="comma list of conv precisions: highest (true f32), default (backend)")
  parser.add_argument("--weights", default=None, help="path of the .pth (else the cache)")
  parser.add_argument("--out", default=None, help="write the results as JSON here")
  args = parser.parse_args()
  if args.batch < 1 or args.iters < 1:
    parser.error("--batch and --iters must be >= 1")

  variables, weights_kind = _load_variables(args.weights)
  variables = jax.device_put(variables)
  images = np.random.default_rng(0).integers(
      0, 256, (args.batch, args.image_size, args.image_size, 3), dtype=np.uint8)
  images = jax.device_put(images)
  device = jax.devices()[0]
  results = {"device": f"{device.platform}:{device.device_kind}", "jax": jax.__version__,
             "host": platform.node(), "weights": weights_kind, "batch": args.batch,
             "image_size": args.image_size, "iters": args.iters, "runs": []}
  for precision in args.precision.split(","):
    fn = inception.get_inception_fn(variables, precision=None if precision == "default"
                                    else precision)
    t0 = time.perf_counter()
    jax.block_until_ready(fn(images))
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(args.iters):
      t0 = time.perf_counter()
      jax.block_until_ready(fn(images))
      times.append(time.perf_counter() - t0)
    per_batch = float(np.median(times))
    ips = args.batch / per_batch
    # Host-side float64 statistics and the FID itself.
    feats = np.asarray(fn(images)["pool_3"])
    t0 = time.perf_counter()
    stats = metrics.FeatureStats.zeros().update(feats)
    stats_per_image = (time.perf_counter() - t0) / args.batch
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
           "measured_images": args.batch * args.iters,
           "stats_update_s_per_image": stats_per_image, "fid_s": fid_s,
           "features_10k_s": 10_000 / ips, "time_10k_samples_s": total(10_000),
           "time_50k_samples_s": total(50_000), "extrapolated": True}
    results["runs"].append(run)
    print(f"[{results['device']}] precision={precision:8s} batch={args.batch} "
          f"{args.image_size}px->299: {ips:9.1f} img/s measured on {args.batch * args.iters} "
          f"images; extrapolated 10k samples (features + stats + FID) {total(10_000):8.1f} s, "
          f"50k {total(50_000):8.1f} s (FID {fid_s:.2f} s; compile+first call {compile_s:.1f} s;"
          f" weights: {weights_kind})")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(results, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
