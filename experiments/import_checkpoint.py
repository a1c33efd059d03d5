"""Import a released score_sde (JAX / Flax) or score_sde_pytorch (.pth) checkpoint into a workdir.

  python -m experiments.import_checkpoint --config configs/ve/cifar10_ncsnpp_continuous.py \
      --checkpoint /ckpts/ve/cifar10_ncsnpp_continuous/checkpoint_24 --workdir runs/ncsnpp
  python -m experiments.import_checkpoint --config configs/vp/cifar10_ddpmpp_continuous.py \
      --checkpoint /ckpts/pytorch/vp/cifar10_ddpmpp_continuous/checkpoint_8.pth --workdir runs/ddpmpp
  python -m experiments.main --config configs/ve/cifar10_ncsnpp_continuous.py \
      --workdir runs/ncsnpp --mode sample

The checkpoint (a ``checkpoint_<N>`` / ``checkpoint_<N>.pth`` file, or a directory: its newest) is
recognized as JAX or PyTorch by its content and checked against the config's network, and a
mismatch names the first differing parameter path (PyTorch: the first differing
``module.all_modules.<i>...`` key). The imported state is written as a kept orbax snapshot at the
checkpoint's training step (``--step`` to choose), holding the raw and EMA parameters, the Adam
moments and the step; ``--noema`` makes sampling / evaluation use the raw weights.
``python -m experiments.main --import_checkpoint=...`` does the same in one call. PyTorch
checkpoints are supported for NCSN++ / DDPM++ (``ncsnpp``) and DDPM (``ddpm``); see
docs/networks.md.
"""
from absl import app, flags, logging
from ml_collections import config_flags

from experiments import common

FLAGS = flags.FLAGS


def define_flags(flag_values: flags.FlagValues = FLAGS) -> None:
  """Defines this script's flags on ``flag_values``. Called when the script runs, so that importing
  the module defines no flags."""
  fv = dict(flag_values=flag_values)
  config_flags.DEFINE_config_file("config", None, "Config the checkpoint was trained with.",
                                  lock_config=True, **fv)
  flags.DEFINE_string("checkpoint", None, "checkpoint_<N> (JAX) or checkpoint_<N>.pth "
                      "(score_sde_pytorch) file, or a directory of them.", **fv)
  flags.DEFINE_string("workdir", None, "Workdir to write the orbax checkpoint into.", **fv)
  flags.DEFINE_bool("ema", True, "Sample / evaluate with the EMA weights (params_ema; PyTorch: "
                    "ema.shadow_params), else the raw ones (optimizer target; PyTorch: model).",
                    **fv)
  flags.DEFINE_integer("step", None, "Step to save at (default: the checkpoint's training step).",
                       **fv)
  flags.mark_flags_as_required(["config", "checkpoint", "workdir"], **fv)


def main(argv) -> None:
  common.no_arguments(argv)
  from score_sde.checkpoint_import import import_to_workdir
  logging.set_verbosity(logging.INFO)
  logging.get_absl_logger().addFilter(lambda r: r.levelno >= 30 or "/orbax/" not in r.pathname)
  step = import_to_workdir(FLAGS.config, FLAGS.checkpoint, FLAGS.workdir, ema=FLAGS.ema,
                           step=FLAGS.step)
  print(f"Imported {FLAGS.checkpoint} into {FLAGS.workdir} at step {step}. Next: "
        f"python -m experiments.main --config <same config> --workdir {FLAGS.workdir} "
        "--mode sample (or --mode eval --config.eval.begin_ckpt=0 --config.eval.end_ckpt=-1).")


if __name__ == "__main__":
  define_flags()
  app.run(main)
