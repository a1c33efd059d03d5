"""Evaluation: the FID Inception-v3 (Flax), its weights, and FID / IS / KID / statistics files.

Typical use::

  from score_sde.evaluation import inception, metrics, weights
  fn = inception.get_inception_fn(weights.load_inception_variables())
  stats = metrics.FeatureStats.zeros()
  for batch in batches:                       # uint8 [B, H, W, 3] or float [0, 1]
    out = fn(batch)
    stats = stats.update(out["pool_3"])
  ref = metrics.load_stats("cifar10_stats.npz", fn.feature_extractor, resolution=32)
  fid = metrics.fid_from_stats(metrics.InceptionStats.from_stats(stats, fn.feature_extractor, 32), ref)
"""
from score_sde.evaluation import inception, metrics, weights
from score_sde.evaluation.inception import InceptionV3, get_inception_fn, init_inception
from score_sde.evaluation.metrics import (FeatureStats, InceptionStats, ISStats, frechet_distance,
                                          inception_score, kernel_inception_distance, load_stats,
                                          merge_stats, save_stats)
from score_sde.evaluation.weights import load_inception_variables, read_torch_state_dict

__all__ = [
    "inception", "metrics", "weights", "InceptionV3", "get_inception_fn", "init_inception",
    "FeatureStats", "InceptionStats", "ISStats", "frechet_distance", "inception_score",
    "kernel_inception_distance", "load_stats", "merge_stats", "save_stats",
    "load_inception_variables", "read_torch_state_dict",
]
