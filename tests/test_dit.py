"""DiT (score_sde/models/dit.py): DiT's published parameter counts, adaLN-Zero initialization,
scan == unrolled, patchify / unpatchify, the class table's null row under classifier-free
guidance, training with several processes / losses, bfloat16, and bad configs."""
import importlib

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from configs.dit import default_dit_configs as dit_configs
from score_sde import losses, sde_lib
from score_sde.config_validation import validate_config
from score_sde.models import count_params, create_model, get_model
from score_sde.models import dit

XL2_PUBLISHED = 675_129_632   # "DiT Parameters" printed by DiT's train.py for DiT-XL/2


def _published_count(depth: int, D: int, p: int, channels: int = 4, classes: int = 1000,
                     image_size: int = 32, learn_sigma: bool = True) -> int:
  """DiT's parameter count from its layer list (models.py), its frozen position table included."""
  out = p * p * channels * (2 if learn_sigma else 1)
  tokens = (image_size // p) ** 2
  block = ((D * 3 * D + 3 * D) + (D * D + D)              # attention qkv, proj
           + (D * 4 * D + 4 * D) + (4 * D * D + D)        # MLP fc1, fc2
           + (D * 6 * D + 6 * D))                         # adaLN modulation
  return ((p * p * channels * D + D)                      # patch embedding (Conv2d p x p)
          + (256 * D + D) + (D * D + D)                   # timestep MLP
          + (classes + 1) * D                             # class table with the null row
          + tokens * D                                    # fixed sin-cos table (frozen param)
          + depth * block
          + (D * 2 * D + 2 * D) + (D * out + out))        # final adaLN, final linear


def _tiny(**model):
  """MNIST DiT config shrunk to 8x8x1, D = 32, 2 heads, 2 blocks, p = 2 (16 tokens)."""
  cfg = importlib.import_module("configs.dit.mnist_dit_s2").get_config()
  cfg.data.image_size = 8
  cfg.model.hidden_size, cfg.model.depth, cfg.model.num_heads = 32, 2, 2
  for k, v in model.items():
    cfg.model[k] = v
  return cfg


def _randomized(variables, scale=0.2, seed=7):
  """Every parameter replaced by N(0, scale^2): the zero-initialized layers would hide the rest."""
  leaves, tree = jax.tree.flatten(variables)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  return jax.tree.unflatten(tree, [scale * jax.random.normal(k, a.shape, a.dtype)
                                   for k, a in zip(keys, leaves)])


def test_sizes_table_agrees_with_the_configs():
  assert dit_configs.DIT_SIZES == dit.DIT_SIZES
  assert dit_configs.PATCH_SIZES == dit.PATCH_SIZES


@pytest.mark.parametrize("name", dit_configs.REFERENCE_NAMES)
def test_reference_parameter_counts_equal_dit(name):
  """All 12 DiT models at DiT's setting (32x32x4 latents, 1000 classes, learned sigma), from
  jax.eval_shape: ours + the fixed position table (a constant here, a frozen parameter in DiT) =
  DiT's count."""
  cfg = dit_configs.reference_config(name)
  depth, D, _ = dit.DIT_SIZES[name.split("/")[0]]
  p = int(name.split("/")[1])
  ours = count_params(cfg)
  assert ours + dit.fixed_position_params(cfg) == _published_count(depth, D, p)
  assert dit.fixed_position_params(cfg) == (32 // p) ** 2 * D
  if name == "XL/2":
    assert ours + dit.fixed_position_params(cfg) == XL2_PUBLISHED == _published_count(28, 1152, 2)


@pytest.fixture(scope="module")
def tiny_cond():
  """(config, model, initial variables, randomized variables, jitted apply) of a tiny
  class-conditional DiT (3 classes): one initialization shared by the tests below."""
  cfg = _tiny(num_classes=3)
  model, variables = create_model(cfg, jax.random.PRNGKey(0))
  apply = jax.jit(lambda v, x, t, y: model.apply(v, x, t, class_labels=y))
  return cfg, model, variables, _randomized(variables), apply


_X = jax.random.normal(jax.random.PRNGKey(1), (4, 8, 8, 1))
_T = jnp.array([1.0, 100.0, 500.0, 999.0])


def test_adaln_zero_initialization(tiny_cond):
  """At init every modulation and the output layer are zero (adaLN-Zero), so every block is the
  identity and the output is exactly zero for any input, noise level and class."""
  cfg, model, variables, _, apply = tiny_cond
  params = variables["params"]
  for layer in (params["blocks_0"]["adaLN_modulation"], params["blocks_1"]["adaLN_modulation"],
                params["final_layer"]["adaLN_modulation"], params["final_layer"]["linear"]):
    assert not np.any(layer["kernel"]) and not np.any(layer["bias"])
  assert np.abs(params["blocks_0"]["attn"]["qkv"]["kernel"]).min() >= 0
  assert np.std(params["blocks_0"]["fc1"]["kernel"]) > 0.05     # Xavier, not zero
  np.testing.assert_allclose(np.std(params["t_embedder_0"]["kernel"]), 0.02, rtol=0.1)
  np.testing.assert_array_equal(apply(variables, _X, _T, jnp.array([0, 1, 2, 3])),
                                np.zeros(_X.shape))


def _count_prims(jaxpr, name: str) -> int:
  n = 0
  for eqn in jaxpr.eqns:
    n += eqn.primitive.name == name
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      n += _count_prims(sub, name)
  return n


def test_scan_equals_unrolled_and_does_not_grow_with_depth(tiny_cond):
  cfg, model, _, variables, apply = tiny_cond
  unrolled = get_model("dit")(config=cfg, scan_blocks=False)
  y = jnp.array([0, 1, 2, 3])
  a = apply(variables, _X, _T, y)
  b = jax.jit(lambda v: unrolled.apply(v, _X, _T, class_labels=y))(variables)
  assert float(jnp.abs(a).max()) > 0.1
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  assert sorted(variables["params"]) == ["blocks_0", "blocks_1", "class_embed", "final_layer",
                                         "t_embedder_0", "t_embedder_1", "x_embedder"]
  # The traced program holds one block: as many matmuls at depth 3 as at depth 6 (unrolled: more).
  dots = {}
  for depth, scan in ((3, True), (6, True), (3, False)):
    m = get_model("dit")(config=_tiny(depth=depth), scan_blocks=scan)
    v = jax.eval_shape(lambda: m.init(jax.random.PRNGKey(0), _X, _T))
    dots[depth, scan] = _count_prims(jax.make_jaxpr(m.apply)(v, _X, _T).jaxpr, "dot_general")
  assert dots[3, True] == dots[6, True] < dots[3, False], dots


@pytest.mark.parametrize("p", dit.PATCH_SIZES)
def test_patchify_round_trip_and_layout(p):
  x = jax.random.normal(jax.random.PRNGKey(p), (2, 16, 24, 3))
  tokens = dit.patchify(x, p)
  assert tokens.shape == (2, (16 // p) * (24 // p), p * p * 3)
  np.testing.assert_array_equal(dit.unpatchify(tokens, p, 16, 24), x)
  i, j = 1, 2   # token i * (W / p) + j is the patch at row i, column j
  np.testing.assert_array_equal(tokens[:, i * (24 // p) + j],
                                x[:, i * p:(i + 1) * p, j * p:(j + 1) * p, :].reshape(2, -1))
  with pytest.raises(ValueError, match="not divisible by the patch size"):
    dit.patchify(x[:, :15], p)


def test_position_table_is_dits_2d_sincos():
  D, gh, gw = 16, 3, 5
  table = dit.sincos_2d_position_embedding(D, gh, gw)
  assert table.shape == (gh * gw, D)
  omega = 1.0 / 10000 ** (np.arange(4) / 4)
  i, j = 2, 3
  want = np.concatenate([np.sin(j * omega), np.cos(j * omega), np.sin(i * omega),
                         np.cos(i * omega)])
  np.testing.assert_allclose(table[i * gw + j], want, rtol=1e-6, atol=1e-6)
  assert len({tuple(r) for r in np.round(table, 5)}) == gh * gw   # every position distinct


def test_class_table_null_row_and_classifier_free_guidance(tiny_cond):
  from score_sde import conditional, guidance
  cfg, model, init_vars, variables, apply = tiny_cond
  table = init_vars["params"]["class_embed"]["embedding"]
  assert table.shape == (4, 32)                             # 3 classes + the null row
  np.testing.assert_allclose(np.std(table), 0.02, rtol=0.5)  # DiT's N(0, 0.02^2)
  x, t = _X[:3], jnp.full((3,), 0.5)
  cond = jax.jit(conditional.get_conditional_score_fn(sde_lib.VPSDE(), model, variables, cfg))
  null, y = jnp.full((3,), 3), jnp.array([0, 1, 2])
  both = cond(jnp.concatenate([x, x]), jnp.concatenate([t, t]), jnp.concatenate([y, null]))
  s_c, s_u = both[:3], both[3:]
  assert float(jnp.abs(s_c - s_u).max()) > 1e-3
  guided = guidance.classifier_free_guidance(cond, y, 2.0)   # one call on the doubled batch
  np.testing.assert_allclose(guided(x, t), s_u + 2.0 * (s_c - s_u), rtol=1e-5, atol=1e-5)
  # No class labels = the null class.
  np.testing.assert_array_equal(apply(variables, _X, _T, None),
                                apply(variables, _X, _T, jnp.full((4,), 3)))
  with pytest.raises(ValueError, match="0..3"):
    jax.eval_shape(lambda v: model.apply(v, x, t, class_labels=np.array([0, 1, 4])), variables)


# (sde, loss, parametrization, embedding): VP DSM and EDM trained; the rest traced.
_TRAINED = [("vpsde", "dsm", None, "positional"), ("edmsde", "edm", "edm", "fourier")]
_TRACED = [("rectified_flow", "flow_matching", "flow", "positional"), ("subvpsde", "dsm", None, "positional"), ("vesde", "dsm", None, "fourier"),
           ("vpsde", "eps", None, "positional"), ("vpsde", "x0", "x0", "positional"),
           ("cosine_vpsde", "v", "v", "positional"), ("vesde", "edm", "edm", "fourier"),
           ("vpsde", "dsm", "score", "positional")]


def _process_config(sde, loss, parametrization, embedding):
  cfg = _tiny(embedding_type=embedding)
  mnist = {"edmsde": "edm", "rectified_flow": "rectified_flow", "vesde": "ve_continuous"}
  if sde in mnist:   # the MNIST U-Net recipe's process fields
    ref = importlib.import_module(f"configs.mnist.{mnist[sde]}").get_config()
    for k in ("sigma_min", "sigma_max", "fourier_scale", "sigma_data"):
      cfg.model[k] = ref.model[k]
    cfg.data.centered = ref.data.centered
    cfg.sampling.method, cfg.sampling.predictor = ref.sampling.method, ref.sampling.predictor
    cfg.sampling.corrector = ref.sampling.corrector
  cfg.training.sde = sde
  cfg.training.loss = loss
  cfg.model.parametrization = parametrization
  cfg.model.scale_by_sigma = sde == "vesde" and parametrization is None
  if sde in ("edmsde", "vesde") and loss == "edm":
    cfg.model.sigma_min, cfg.model.sigma_max = 0.002, 80.0
  if sde == "cosine_vpsde":
    cfg.model.T, cfg.model.s = 0.9946, 0.008
  if loss == "flow_matching":
    cfg.training.t_sampling = "logit_normal"
  cfg.training.batch_size = 8
  validate_config(cfg, num_devices=8)
  return cfg


def test_every_process_and_loss_traces():
  """Loss and gradient of every other (process, loss, parametrization) pair, traced only."""
  x = jnp.zeros((8, 8, 8, 1))
  for combo in _TRACED:
    cfg = _process_config(*combo)
    sde = sde_lib.get_sde(cfg)
    model = get_model("dit")(config=cfg)
    v = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, jnp.ones(8)))
    loss_fn = losses.get_loss_fn(cfg, sde, model, train=True)
    out = jax.eval_shape(jax.value_and_grad(lambda p: loss_fn(jax.random.PRNGKey(1), p, x)[0]),
                         v["params"])
    assert out[0].shape == () and jax.tree.structure(out[1]) == jax.tree.structure(v["params"])


@pytest.mark.parametrize("combo", _TRAINED, ids=[c[1] for c in _TRAINED])
def test_train_steps_lower_the_loss(combo):
  """The jitted train step (optimizer, EMA) of a one-block DiT on one batch: with the step's key
  reset each time (same t and noise draws), the loss falls."""
  cfg = _process_config(*combo)
  cfg.model.depth = 1
  cfg.optim.lr, cfg.optim.warmup = 3e-3, 0
  sde = sde_lib.get_sde(cfg)
  model, variables = create_model(cfg, jax.random.PRNGKey(0))
  state = losses.init_train_state(cfg, variables, jax.random.PRNGKey(1))
  step = jax.jit(losses.get_train_step_fn(cfg, sde, model))
  # One smooth pattern at random contrasts: structure a few steps can learn.
  pattern = jnp.outer(jnp.linspace(-1, 1, 8), jnp.linspace(1, -1, 8))[None, :, :, None]
  batch = jax.random.uniform(jax.random.PRNGKey(2), (8, 1, 1, 1), minval=0.3) * pattern
  key = state.key
  seen = []
  for _ in range(20):
    state, metrics = step(state.replace(key=key), batch)
    seen.append(float(metrics["loss"]))
  assert np.all(np.isfinite(seen)) and seen[-1] < 0.8 * seen[0], seen
  assert np.abs(state.params["final_layer"]["linear"]["kernel"]).max() > 0


def test_bfloat16_matches_float32(tiny_cond):
  cfg, _, _, variables, apply = tiny_cond
  ref = apply(variables, _X, _T, None)
  bf16 = cfg.copy_and_resolve_references()
  bf16.model.dtype = "bfloat16"
  out = jax.jit(get_model("dit")(config=bf16).apply)(variables, _X, _T)
  assert out.dtype == jnp.float32
  assert float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref)) < 0.05


def test_bad_patch_and_head_configs_name_the_field():
  cfg = importlib.import_module("configs.dit.mnist_dit_s2").get_config()
  cfg.model.patch_size = 8
  with pytest.raises(ValueError, match=r"config.data.image_size=28 is not divisible by "
                                       r"config.model.patch_size=8.*\[2, 4\]"):
    validate_config(cfg, num_devices=8)
  cfg = _tiny(num_heads=5)
  with pytest.raises(ValueError, match="config.model.num_heads=5"):
    validate_config(cfg, num_devices=8)
  cfg = _tiny(patch_size=4)
  model = get_model("dit")(config=cfg)
  with pytest.raises(ValueError, match="10x10 is not divisible by config.model.patch_size=4"):
    jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 10, 10, 1)),
                                      jnp.ones(1)))
