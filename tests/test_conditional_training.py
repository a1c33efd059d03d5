"""Class-conditional training (label embedding, label dropout), CFG with a trained toy model, and
the time-dependent classifier for classifier guidance (score_sde.controllable)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_toy_config
from score_sde import analytic, datasets, losses, sde_lib
from score_sde import controllable as C
from score_sde.models import create_model
from score_sde.sampling import get_sampler


def _cond_config(**overrides):
  cfg = tiny_toy_config("vpsde", **overrides)
  cfg.data.num_components = 4
  cfg.data.gmm_radius = 3.0
  cfg.data.gmm_std = 0.4
  cfg.model.num_classes = 4
  cfg.training.label_dropout = 0.2
  cfg.training.batch_size = 128
  cfg.training.n_jitted_steps = 50
  cfg.training.n_iters = 400
  cfg.training.log_freq = 50
  cfg.training.snapshot_freq = 100
  cfg.training.snapshot_freq_for_preemption = 100
  cfg.optim.warmup = 50
  return cfg


def test_conditional_toy_model_labels_and_null_label():
  cfg = _cond_config()
  model, variables = create_model(cfg, jax.random.PRNGKey(0))
  assert variables["params"]["class_embed"]["embedding"].shape == (5, cfg.model.nf)
  x = jax.random.normal(jax.random.PRNGKey(1), (6, 2))
  t = jnp.full((6,), 500.0)
  null = model.apply(variables, x, t, class_labels=jnp.full((6,), 4))
  np.testing.assert_array_equal(model.apply(variables, x, t), null)  # default = null label
  assert not np.allclose(model.apply(variables, x, t, class_labels=jnp.zeros(6, jnp.int32)), null)
  with pytest.raises(ValueError, match="0..4"):
    model.apply(variables, x, t, class_labels=jnp.full((6,), 5))
  # An unconditional network refuses labels and conditional score functions.
  ucfg = tiny_toy_config("vpsde")
  umodel, uvars = create_model(ucfg, jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match="unconditional network"):
    umodel.apply(uvars, x, t, class_labels=jnp.zeros(6, jnp.int32))
  with pytest.raises(ValueError, match="num_classes is not set"):
    C.get_conditional_score_fn(sde_lib.VPSDE(), umodel, uvars, ucfg)
  bad = _cond_config()
  bad.training.label_dropout = 1.5
  with pytest.raises(ValueError, match="label_dropout"):
    losses.get_loss_fn(bad, sde_lib.VPSDE(), model, train=True)


def test_small_unet_class_conditional():
  import importlib
  from score_sde.models import get_model
  cfg = importlib.import_module("configs.mnist.vp_continuous").get_config()
  cfg.data.image_size = 8
  cfg.model.nf = 8
  cfg.model.ch_mult = (1, 2)
  cfg.model.num_classes = 10
  model = get_model(cfg.model.name)(config=cfg)
  x = jnp.zeros((2, 8, 8, 1))
  t = jnp.ones((2,))
  variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, t))
  assert variables["params"]["class_embed"]["embedding"].shape == (11, 4 * cfg.model.nf)
  out = jax.eval_shape(lambda v: model.apply(v, x, t, class_labels=jnp.array([1, 10])), variables)
  assert out.shape == x.shape
  with pytest.raises(ValueError, match="0..10"):
    jax.eval_shape(lambda v: model.apply(v, x, t, class_labels=np.array([1, 11])), variables)


def test_label_dropout_one_is_the_null_label_loss():
  cfg = _cond_config()
  cfg.training.label_dropout = 1.0
  sde = sde_lib.VPSDE()
  model, variables = create_model(cfg, jax.random.PRNGKey(0))
  loss_fn = losses.get_loss_fn(cfg, sde, model, train=True)
  x = jax.random.normal(jax.random.PRNGKey(1), (16, 2))
  y = jnp.arange(16) % 4
  key = jax.random.PRNGKey(2)
  dropped = loss_fn(key, variables["params"], {"image": x, "label": y})[0]
  null = loss_fn(key, variables["params"], x)[0]
  np.testing.assert_array_equal(dropped, null)
  cfg.training.label_dropout = 0.0
  kept = losses.get_loss_fn(cfg, sde, model, train=True)(key, variables["params"],
                                                         {"image": x, "label": y})[0]
  assert float(kept) != float(null)


def test_trained_conditional_model_cfg_hits_the_right_component():
  from score_sde.train import Trainer
  cfg = _cond_config()
  trainer = Trainer(cfg)
  ds = datasets.get_dataset(cfg, "train")
  for _ in range(cfg.training.n_iters // cfg.training.n_jitted_steps):
    trainer.train_steps([next(ds) for _ in range(cfg.training.n_jitted_steps)])
  mix = datasets.get_toy_mixture(cfg)
  B = 512
  y = jnp.arange(B) % 4
  score = C.get_conditional_score_fn(trainer.sde, trainer.model, trainer.state.ema_params, cfg)
  sampler = get_sampler("dpm_solver", trainer.sde, (B, 2), nfe=16)
  hit = {}
  for w in (0.0, 3.0):
    x, _ = sampler(jax.random.PRNGKey(0), C.classifier_free_guidance(score, y, w))
    hit[w] = float(jnp.mean(jnp.argmax(mix.posterior(x), -1) == y))
  assert hit[0.0] < 0.35, hit  # unconditional: about 1 / K
  assert hit[3.0] > hit[0.0] + 0.15, hit


def test_train_classifier_and_classifier_guidance(tmp_path):
  cfg = tiny_toy_config("vpsde")
  cfg.data.num_components = 4
  cfg.data.gmm_radius = 3.0
  cfg.data.gmm_std = 0.4
  cfg.training.n_jitted_steps = 50
  cfg.optim.warmup = 20
  cfg.model.ema_rate = 0.9  # the EMA of 300 steps at 0.999 would still be the initialization
  cfg.classifier = dict(nf=32, num_layers=2, num_classes=4, n_iters=300, batch_size=128,
                        log_freq=50, snapshot_freq=300)
  model, state, metrics = C.train_classifier(cfg, str(tmp_path))
  assert int(state.step) == 300 and metrics["accuracy"] > 0.5
  # Rerunning resumes from the checkpoint (nothing left to do).
  _, state2, _ = C.train_classifier(cfg, str(tmp_path))
  np.testing.assert_array_equal(jax.tree.leaves(state2.params)[0], jax.tree.leaves(state.params)[0])
  sde = sde_lib.VPSDE(N=50)
  mix = datasets.get_toy_mixture(cfg)
  B = 400
  y = jnp.arange(B) % 4
  grad = C.get_classifier_logp_grad_fn(sde, model, state.ema_params)
  x0 = mix.sample(jax.random.PRNGKey(1), 256)
  logits = C.get_classifier_logits_fn(sde, model, state.ema_params)(x0, jnp.full((256,), 0.01))
  assert float(jnp.mean(jnp.argmax(logits, -1) == jnp.argmax(mix.posterior(x0), -1))) > 0.9
  sampler = get_sampler("ddim", sde, (B, 2), nfe=20)
  hit = {}
  for w in (0.0, 2.0):
    x, _ = sampler(jax.random.PRNGKey(0), C.classifier_guidance(mix.score_fn(sde), grad, y, w))
    hit[w] = float(jnp.mean(jnp.argmax(mix.posterior(x), -1) == y))
  assert hit[0.0] < 0.35 and hit[2.0] > 0.8, hit
