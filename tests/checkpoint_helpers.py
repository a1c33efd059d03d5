"""Test helpers shared by the checkpoint-import tests (JAX msgpack and score_sde_pytorch .pth)."""
import importlib

import jax

from score_sde import losses
from score_sde.checkpointing import Checkpoints
from score_sde.models.utils import param_shapes


def tiny_config(name, **model):
  """``configs.<name>`` shrunk to 8x8 images, nf=8, two levels, 4 noise scales, 8 samples."""
  cfg = importlib.import_module(f"configs.{name}").get_config()
  cfg.data.image_size = 8
  for k, v in {**dict(nf=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,)),
               **model}.items():
    cfg.model[k] = v
  cfg.model.num_scales = 4
  cfg.sampling.num_samples = cfg.sampling.batch_size = 8
  return cfg


def restore_train_state(cfg, workdir, step):
  """The orbax train state at ``step`` of ``workdir`` (target built without compiling); asserts
  that ``step`` is the workdir's only snapshot."""
  target = jax.eval_shape(lambda p: losses.init_train_state(
      cfg, {"params": p}, jax.random.PRNGKey(0)), param_shapes(cfg))
  checkpoints = Checkpoints(workdir)
  try:
    assert checkpoints.snapshot_steps() == [step]
    return jax.device_get(checkpoints.restore(step, target))
  finally:
    checkpoints.close()
