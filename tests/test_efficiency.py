"""Gradient accumulation (training.micro_batches), rematerialization (model.remat) and FSDP
(training.param_sharding): each equals the plain step, and bad settings fail before compiling."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_toy_config
from score_sde import losses, sde_lib
from score_sde.config_validation import validate_config
from score_sde.models import create_model


@pytest.mark.parametrize("overrides", [
    {},                                                         # DSM, continuous VP
    {"training.continuous": False, "training.sde": "vesde",     # SMLD chain
     "model.embedding_type": "positional"},
    {"model.num_classes": 3, "training.label_dropout": 0.5},    # class labels, label dropout
], ids=["dsm", "smld", "conditional"])
def test_micro_batches_give_the_full_batch_loss_and_gradient(overrides):
  cfg = tiny_toy_config(**overrides)
  model, variables = create_model(cfg, jax.random.PRNGKey(0))
  loss_fn = losses.get_loss_fn(cfg, sde_lib.get_sde(cfg), model, train=True)
  x = jax.random.normal(jax.random.PRNGKey(1), (16, 2))
  batch = ({"image": x, "label": jnp.arange(16) % 3} if "model.num_classes" in overrides else x)
  full = jax.value_and_grad(loss_fn, argnums=1, has_aux=True)
  micro = losses.accumulated_value_and_grad(loss_fn, 4)
  key = jax.random.PRNGKey(5)
  ((loss1, _), g1), ((loss4, _), g4) = jax.jit(
      lambda p: (full(key, p, batch), micro(key, p, batch)))(variables["params"])
  np.testing.assert_allclose(loss4, loss1, rtol=2e-6)
  scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(g1))
  assert scale > 0
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * scale), g4, g1)


def test_split_micro_batches_is_strided():
  x = jnp.arange(12)
  np.testing.assert_array_equal(losses.split_micro_batches(x, 3),
                                [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8, 11]])
  with pytest.raises(ValueError, match="micro_batches=5 does not divide the batch of 12"):
    losses.split_micro_batches(x, 5)


def test_micro_batches_need_a_split_loss():
  cfg = tiny_toy_config(**{"training.micro_batches": 2})
  plain = lambda key, params, batch: (jnp.zeros(()), {})
  with pytest.raises(ValueError, match="micro_batches > 1 needs a loss built as a"):
    losses.get_train_step_fn(cfg, sde_lib.get_sde(cfg), None, loss_fn=plain)


@pytest.mark.parametrize("value,match", [
    (0, "training.micro_batches must be an integer >= 1"),
    (3, "micro_batches=3 does not divide the per-device batch of 8"),
])
def test_bad_micro_batches_fail_at_start_up(value, match):
  cfg = tiny_toy_config(**{"training.micro_batches": value})
  with pytest.raises(ValueError, match=match):
    validate_config(cfg)


# --- FSDP (and accumulation) through the Trainer: 4 of the 8 forced host devices -----------------
def _train(mesh, **overrides):
  """Losses and final state of 3 x 2 toy updates on fixed batches (batch 16: 4 per device)."""
  from score_sde.train import Trainer
  cfg = tiny_toy_config(**{"training.batch_size": 16, "training.n_jitted_steps": 2,
                           "model.nf": 16, **overrides})
  trainer = Trainer(cfg, mesh=mesh)
  rng = np.random.default_rng(0)
  out = []
  for _ in range(3):
    batches = [{"image": rng.normal(size=(16, 2)).astype(np.float32)} for _ in range(2)]
    out.append(np.asarray(trainer.train_steps(batches)["loss"]))
  return np.concatenate(out), trainer.state


def test_fsdp_with_micro_batches_equals_the_replicated_full_batch_run():
  from jax.sharding import Mesh
  mesh4 = Mesh(np.array(jax.devices()[:4]), ("data",))
  loss_r, state_r = _train(mesh4)
  loss_f, state_f = _train(mesh4, **{"training.param_sharding": "fsdp",
                                     "training.micro_batches": 2})   # 2 examples / device each
  np.testing.assert_allclose(loss_f, loss_r, rtol=1e-5)
  for tree_f, tree_r in [(state_f.params, state_r.params), (state_f.ema_params, state_r.ema_params),
                         (state_f.opt_state, state_r.opt_state)]:
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), tree_f,
                 tree_r)
  # Really sharded: every params / Adam leaf with a dimension divisible by 4 is split in 4 ...
  kernel = state_f.params["Dense_1"]["kernel"]             # [16, 16]
  assert kernel.addressable_shards[0].data.size == kernel.size // 4
  moments = [x for x in jax.tree.leaves(state_f.opt_state) if x.shape == (16, 16)]
  assert moments and all(m.addressable_shards[0].data.size == 64 for m in moments)
  assert state_r.params["Dense_1"]["kernel"].addressable_shards[0].data.size == kernel.size
  # ... and a leaf without one (the output bias [2]) stays replicated.
  out_bias = [x for x in jax.tree.leaves(state_f.params) if x.shape == (2,)]
  assert out_bias and all(b.addressable_shards[0].data.shape == (2,) for b in out_bias)


def test_fsdp_report_and_specs():
  from jax.sharding import PartitionSpec as P
  from score_sde import distributed
  assert distributed.fsdp_spec((3, 3, 128, 256), 8) == P(None, None, None, "data")
  assert distributed.fsdp_spec((512, 128), 8) == P("data", None)
  assert distributed.fsdp_spec((3,), 8) == P()
  assert distributed.fsdp_spec((16,), 1) == P()
  params = {"k": jnp.zeros((16, 8)), "b": jnp.zeros((3,))}
  r = distributed.fsdp_report(params, 4)
  assert r["total_bytes"] == (128 + 3) * 4 and r["per_device_bytes"] == (32 + 3) * 4
  assert r["replicated"] == [("b", (3,))] and r["sharded_leaves"] == 1
  cfg = tiny_toy_config(**{"training.param_sharding": "zero3"})
  with pytest.raises(ValueError, match="param_sharding='zero3' is unknown"):
    validate_config(cfg)


# --- rematerialization ---------------------------------------------------------------------------
def _net_config(name: str):
  import importlib
  if name == "toy_mlp":
    return tiny_toy_config()
  if name == "small_unet":
    cfg = importlib.import_module("configs.mnist.vp_continuous").get_config()
    cfg.model.nf, cfg.data.image_size = 8, 8
    return cfg
  if name == "dit":
    cfg = importlib.import_module("configs.dit.cifar10_dit_s2").get_config()
    cfg.model.hidden_size, cfg.model.depth, cfg.model.num_heads = 32, 3, 2
    cfg.data.image_size, cfg.data.num_channels = 8, 1
    return cfg
  from test_networks import load, shrink
  base = {"ncsnpp": "vp.cifar10_ddpmpp_continuous", "ddpm": "vp.cifar10_ddpm"}[name]
  return shrink(load(base), **({"nf": 32} if name == "ddpm" else {"num_res_blocks": 2}))


@pytest.mark.parametrize("name", ["ncsnpp", "ddpm", "small_unet", "toy_mlp", "dit"])
def test_remat_keeps_the_parameter_tree(name):
  from flax.traverse_util import flatten_dict
  from score_sde.models.utils import param_shapes
  cfg = _net_config(name)
  trees = {}
  for mode in ("none", "elementwise", "blocks", "full"):
    cfg.model.remat = mode
    trees[mode] = {k: v.shape for k, v in flatten_dict(param_shapes(cfg)).items()}
  assert trees["blocks"] == trees["none"] and trees["full"] == trees["none"]
  assert trees["elementwise"] == trees["none"]


def _remat_value_and_grads(cfg, x, modes):
  """Loss and gradients of one training-mode forward (dropout on) per remat mode, one compile."""
  from score_sde.models.utils import get_model_fn
  cfg.model.dropout = 0.1
  model, variables = create_model(cfg, jax.random.PRNGKey(0))
  labels = jnp.linspace(1.0, 900.0, x.shape[0])

  def value_and_grad(mode):
    c = cfg.copy_and_resolve_references()
    c.model.remat = mode
    m = type(model)(config=c)
    f = lambda p: jnp.mean(get_model_fn(m, p, train=True, rng=jax.random.PRNGKey(7))(x, labels) ** 2)
    return jax.value_and_grad(f)
  params = variables["params"]
  jaxprs = {mode: str(jax.make_jaxpr(value_and_grad(mode))(params)) for mode in modes}
  return jax.jit(lambda p: [value_and_grad(mode)(p) for mode in modes])(params), jaxprs


@pytest.mark.parametrize("name,shape,modes", [
    ("toy_mlp", (8, 2), ("none", "blocks", "full", "elementwise")),
    ("small_unet", (2, 8, 8, 1), ("none", "elementwise")),  # (larger networks: docs/networks.md)
    ("dit", (2, 8, 8, 1), ("none", "blocks", "elementwise")),
])
def test_remat_gives_the_same_loss_and_gradient(name, shape, modes):
  x = jax.random.normal(jax.random.PRNGKey(1), shape)
  results, jaxprs = _remat_value_and_grads(_net_config(name), x, modes)
  (loss0, g0) = results[0]
  scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(g0))
  for loss, grads in results[1:]:
    np.testing.assert_allclose(loss, loss0, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5 * scale), grads, g0)
  # Really rematerialized: 'blocks' checkpoints every block, 'full' the network once.
  count = lambda s: s.count("checkpoint[") + s.count("remat")
  # (DiT's identical blocks are one scan: one checkpointed loop body.)
  least = 1 if name == "dit" else 2
  assert count(jaxprs["none"]) == 0
  if "blocks" in modes:
    assert count(jaxprs["blocks"]) >= least
  if "elementwise" in modes:   # every block, with the policy that keeps conv / dot outputs
    assert count(jaxprs["elementwise"]) >= least and "policy" in jaxprs["elementwise"]
  if "full" in modes:
    assert 1 <= count(jaxprs["full"]) < count(jaxprs["blocks"])


def test_elementwise_remat_stores_less_and_recomputes_no_convolution():
  """model.remat='elementwise' on NCSN++: XLA's temporaries of the compiled gradient are well below
  those of 'none' (measured 22.0 -> 10.8 MB), and the program holds no more convolutions than
  with 'none' (conv outputs are stored, only elementwise ops are recomputed), unlike 'blocks'."""
  from score_sde.models.utils import get_model_fn
  from test_networks import load, shrink
  # Two levels of two scanned res blocks (attention at 8x8): scanned and unscanned blocks.
  cfg = shrink(load("vp.cifar10_ddpmpp_continuous"), num_res_blocks=2, image_size=16, nf=16,
               ch_mult=(1, 1), attn_resolutions=(8,))
  model, variables = create_model(cfg, jax.random.PRNGKey(0))
  x = jax.random.normal(jax.random.PRNGKey(1), (8, 16, 16, 3))
  labels = jnp.linspace(0.1, 0.9, 8)
  stats = {}
  for mode in ("none", "elementwise", "blocks"):
    c = cfg.copy_and_resolve_references()
    c.model.remat = mode
    m = type(model)(config=c)
    f = jax.grad(lambda p: jnp.mean(get_model_fn(m, p, train=True, rng=jax.random.PRNGKey(7))(
        x, labels) ** 2))
    lowered = jax.jit(f).lower(variables["params"])
    stats[mode] = (lowered.compile().memory_analysis().temp_size_in_bytes,
                   lowered.as_text().count("convolution("))
  (temp_none, conv_none), (temp_ew, conv_ew), (_, conv_blocks) = (
      stats["none"], stats["elementwise"], stats["blocks"])
  assert temp_ew < 0.7 * temp_none, stats
  assert conv_ew == conv_none < conv_blocks, stats


def test_remat_of_a_scanned_run_of_blocks():
  """model.remat='blocks' on scan.apply_units: the scanned loop body is checkpointed, same values."""
  import flax.linen as nn
  from score_sde.models import scan

  class Run(nn.Module):
    remat: bool

    @nn.compact
    def __call__(self, h):
      units = [(nn.Dense(4),) for _ in range(3)]
      return scan.apply_units(self, units, lambda m, h, _: jnp.tanh(m[0](h)), h,
                              remat=self.remat)[-1]

  h = jax.random.normal(jax.random.PRNGKey(0), (2, 4))
  params = Run(False).init(jax.random.PRNGKey(1), h)
  assert jax.tree.map(jnp.shape, Run(True).init(jax.random.PRNGKey(1), h)) == jax.tree.map(
      jnp.shape, params)
  grad = lambda r: jax.grad(lambda p: jnp.sum(Run(r).apply(p, h) ** 2))
  jaxpr = str(jax.make_jaxpr(grad(True))(params))
  assert "scan" in jaxpr and ("checkpoint[" in jaxpr or "remat" in jaxpr)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               jax.jit(grad(True))(params), jax.jit(grad(False))(params))


def test_bad_remat_fails_at_start_up():
  import importlib
  with pytest.raises(ValueError, match="config.model.remat='layers' is unknown"):
    validate_config(tiny_toy_config(**{"model.remat": "layers"}))
  cfg = importlib.import_module("configs.ve.ncsnv2.cifar10").get_config()
  for mode in ("blocks", "elementwise"):
    cfg.model.remat = mode
    with pytest.raises(ValueError, match=f"model.remat='{mode}' is not implemented for "
                                         "config.model.name='ncsnv2_64'"):
      validate_config(cfg)
