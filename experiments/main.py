"""score-sde command line: train, evaluate and sample from ml-collections configs.

  python -m experiments.main --config configs/toy/vp.py --workdir runs/toy_vp
  python -m experiments.main --config configs/mnist/vp_continuous.py --workdir runs/mnist \
      --config.data.data_dir=/path/to/mnist --config.training.n_iters=2000 --mode train

--mode: train | eval | sample | all (train, then eval, then sample; the default) | fid_stats
(reference Inception statistics of config.eval.fid_stats_split, written to config.eval.stats_path
or <workdir>/fid_stats/<dataset>_<split>_<size>.npz; see docs/evaluation.md) | posthoc_ema (the
EMA of width config.eval.sigma_rel reconstructed from the snapshots a run with
config.training.posthoc_ema_every > 0 stored, written as a checkpoint of
<workdir>/posthoc_ema/sigma_rel_<x>; with config.eval.sigma_rel set, eval and sample read that
reconstruction, and all reconstructs it after training; see docs/posthoc_ema.md).
--import_checkpoint=/path/to/checkpoint_26 first writes a released score_sde (JAX) checkpoint, or a
score_sde_pytorch checkpoint_<N>.pth, into --workdir (score_sde/checkpoint_import.py; see
docs/networks.md), e.g.

  python -m experiments.main --config configs/vp/cifar10_ddpmpp_continuous.py --workdir runs/vp \
      --mode sample --import_checkpoint=/ckpts/vp/cifar10_ddpmpp_continuous/checkpoint_26

Any config field can be overridden with --config.<group>.<field>=value; an unknown field is an
error. Runs resume from the newest checkpoint in --workdir.
"""
import os
import sys

from absl import app, flags, logging

from score_sde.config_validation import define_config_flag

FLAGS = flags.FLAGS


def define_flags(flag_values: flags.FlagValues = FLAGS, sys_argv: list[str] | None = None) -> None:
  """Defines this command's flags on ``flag_values``; ``sys_argv``: the command line the config
  overrides are read from (default ``sys.argv``). tests/test_documented_commands.py parses every
  documented command line with these definitions."""
  # An unknown --config.<field> exits with one line naming it and the valid fields of its group.
  define_config_flag("config", None, "Path to a config file (ml-collections).",
                     flag_values=flag_values, lock_config=True, sys_argv=sys_argv)
  fv = dict(flag_values=flag_values)
  flags.declare_key_flag("config", **fv)  # listed by --helpshort with the flags below
  flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs, samples and results.",
                      **fv)
  flags.DEFINE_enum("mode", "all", ["train", "eval", "sample", "all", "fid_stats",
                                    "train_classifier", "posthoc_ema"],
                    "What to run (train_classifier: the noise-conditional classifier for "
                    "classifier guidance, checkpoints in <workdir>/classifier; "
                    "docs/controllable.md; posthoc_ema: reconstruct the EMA of "
                    "config.eval.sigma_rel, docs/posthoc_ema.md).", **fv)
  flags.DEFINE_integer("checkpoint", None, "Step of the checkpoint to sample from (default: "
                       "newest); with --mode posthoc_ema, the snapshot step to reconstruct at.",
                       **fv)
  flags.DEFINE_string("import_checkpoint", None,
                      "A released score_sde JAX checkpoint or score_sde_pytorch .pth (file, or "
                      "directory of checkpoint_<N>[.pth]) to import into --workdir before running "
                      "--mode.", **fv)
  flags.DEFINE_bool("import_ema", True, "With --import_checkpoint: sample / evaluate with the EMA "
                    "weights (params_ema / PyTorch ema); false: the raw weights.", **fv)
  flags.DEFINE_bool("allow_config_mismatch", False, "Restore checkpoints written by a run with "
                    "another configuration (SDE, network shapes, parametrization, data; "
                    "docs/reliability.md): a deliberate transfer. Default: refuse, naming the "
                    "fields.", **fv)
  flags.DEFINE_string("coordinator_address", None, "host:port of process 0 for multi-process runs "
                      "(see score_sde/distributed.py).", **fv)
  flags.DEFINE_integer("num_processes", None, "Number of processes in a multi-process run.", **fv)
  flags.DEFINE_integer("process_id", None, "Index of this process in a multi-process run.", **fv)
  flags.mark_flags_as_required(["config", "workdir"], **fv)


define_flags()


def main(argv):
  del argv
  import jax
  from score_sde import distributed, train
  from score_sde.checkpointing import CheckpointMismatch
  from score_sde.config_validation import validate_config
  from score_sde import posthoc_ema
  from score_sde.evaluation import evaluate
  from score_sde.signals import Interrupted, StopSignals
  distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  logging.set_verbosity(logging.INFO)
  logging.set_stderrthreshold(logging.INFO)
  # Orbax logs every checkpoint operation at INFO; keep its warnings (python level 30) only.
  logging.get_absl_logger().addFilter(
      lambda r: r.levelno >= 30 or "/orbax/" not in r.pathname)
  config = FLAGS.config
  logging.info("JAX %s: %d process(es), %d device(s) (%s).", jax.__version__,
               jax.process_count(), jax.device_count(), jax.devices()[0].platform)
  validate_config(config)  # every problem is named before anything is written
  # Post-hoc EMA: with config.eval.sigma_rel, eval / sample read the reconstruction's workdir.
  sigma_rel = config.eval.get("sigma_rel", None)
  problem, eval_workdir = posthoc_ema.check_invocation(config, FLAGS.workdir, FLAGS.mode)
  if problem:
    logging.error("%s", problem)
    sys.exit(1)

  def write_config():
    train.check_writable(FLAGS.workdir)
    with open(os.path.join(FLAGS.workdir, f"config_{FLAGS.mode}.txt"), "w") as f:
      f.write(str(config))
  phases = [("start", write_config)]
  if FLAGS.import_checkpoint:
    from score_sde.checkpoint_import import import_to_workdir

    def import_phase():
      step = import_to_workdir(config, FLAGS.import_checkpoint, FLAGS.workdir,
                               ema=FLAGS.import_ema)
      logging.info("Imported %s into %s at step %d.", FLAGS.import_checkpoint, FLAGS.workdir, step)
    phases.append(("import", import_phase))
  if FLAGS.mode == "train_classifier":
    phases.append(("train_classifier", lambda: train.train_classifier(config, FLAGS.workdir)))
  if FLAGS.mode == "fid_stats":
    phases.append(("fid_stats", lambda: evaluate.run_fid_stats(config, FLAGS.workdir)))
  mismatch = dict(allow_config_mismatch=FLAGS.allow_config_mismatch)
  if FLAGS.mode in ("train", "all"):
    phases.append(("train", lambda: train.train(config, FLAGS.workdir, **mismatch)))
  if FLAGS.mode == "posthoc_ema" or (FLAGS.mode == "all" and sigma_rel is not None):
    phases.append(("posthoc_ema", lambda: evaluate.run_posthoc_ema(
        config, FLAGS.workdir, FLAGS.checkpoint if FLAGS.mode == "posthoc_ema" else None,
        **mismatch)))
  if FLAGS.mode in ("eval", "all"):
    phases.append(("eval", lambda: evaluate.run_eval(config, eval_workdir, **mismatch)))
  if FLAGS.mode in ("sample", "all"):
    phases.append(("sample", lambda: evaluate.run_sample(config, eval_workdir, FLAGS.checkpoint,
                                                         **mismatch)))
  # One signal policy for every mode (score_sde/signals.py): SIGTERM / SIGINT end the phase in
  # flight at a safe point, later phases do not start, the exit status is 128 + the signal.
  # Faults the user fixes (a checkpoint of another run, no checkpoint yet, disk full, an
  # unwritable directory) are one line, not a traceback (docs/reliability.md).
  with StopSignals() as stop:
    try:
      for name, phase in phases:
        stop.check(f"stopped before {name}; rerun the same command to resume.")
        phase()
    except Interrupted as e:
      logging.error("%s", e)
      sys.exit(e.exit_code)
    except (CheckpointMismatch, OSError) as e:
      logging.error("%s", e)
      sys.exit(1)


if __name__ == "__main__":
  app.run(main)
