"""The FID / IS / KID fields of `config.eval`, shared by the default configs of every dataset."""
import ml_collections
from ml_collections.config_dict import placeholder


def add_image_eval_fields(evaluate: ml_collections.ConfigDict) -> None:
  """FID / IS / KID fields of ``config.eval`` (docs/evaluation.md)."""
  evaluate.stats_path = placeholder(str)  # reference stats file; None: under <workdir>/fid_stats/
  evaluate.fid_stats_split = "train"    # split --mode fid_stats summarizes
  evaluate.inception_weights = placeholder(str)  # local .pth path; None: cache, else download
  evaluate.inception_download = True    # False: never download (offline)
  evaluate.inception_sha256 = "6726825d"  # checksum prefix of the weights file; None skips the check
  evaluate.inception_size = 299         # Inception input side (299 = the standard protocol)
  evaluate.num_seeds = 1                # 3: the 3-seed protocol (each seed, min and mean reported)
  evaluate.kid_num_features = 10000     # samples / reference rows kept for KID
  evaluate.is_splits = 10
  evaluate.progress_secs = 300.0        # save mid-checkpoint progress this often
