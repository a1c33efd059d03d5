"""DSM losses, optimizer, EMA and train steps against independent hand computations (numpy)."""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate

from configs.toy import vp as toy_vp
from score_sde import analytic, losses, sde_lib

B0, B1, SMIN, SMAX, N = 0.1, 20.0, 0.01, 50.0, 1000


class Affine(nn.Module):
  """A fixed 'network' whose output is known: a * x + b * log(1 + labels)."""
  config: Any = None

  @nn.compact
  def __call__(self, x, labels, train=False):
    a = self.param("a", lambda k, s: jnp.array([0.5, -1.5]), (2,))
    b = self.param("b", lambda k, s: jnp.array(0.3), ())
    return a * x + b * jnp.log1p(labels.astype(jnp.float32))[:, None]


def _np_affine(x, labels):
  return np.array([0.5, -1.5]) * x + 0.3 * np.log1p(labels)[:, None]


def _np_coefs(kind, t):
  """(alpha, sigma, g^2) from the paper's formulas, independent of sde_lib."""
  int_beta = 0.5 * t**2 * (B1 - B0) + t * B0
  if kind == "ve":
    sigma = SMIN * (SMAX / SMIN) ** t
    return np.ones_like(t), sigma, sigma**2 * 2 * np.log(SMAX / SMIN)
  alpha = np.exp(-0.5 * int_beta)
  beta = B0 + t * (B1 - B0)
  if kind == "vp":
    return alpha, np.sqrt(1 - alpha**2), beta
  return alpha, 1 - alpha**2, beta * (1 - np.exp(-2 * int_beta))


def _sde(kind):
  return {"vp": sde_lib.VPSDE(B0, B1, N), "subvp": sde_lib.subVPSDE(B0, B1, N),
          "ve": sde_lib.VESDE(SMIN, SMAX, N)}[kind]


def _batch(n=64, seed=0):
  return jax.random.normal(jax.random.PRNGKey(seed), (n, 2)) * 2.0 + 1.0


def _params():
  return Affine().init(jax.random.PRNGKey(0), jnp.zeros((1, 2)), jnp.ones((1,)))


@pytest.mark.parametrize("kind", ["vp", "subvp", "ve"])
@pytest.mark.parametrize("reduce_mean,lw", [(True, False), (False, True)])
def test_sde_loss_matches_hand_computation(kind, reduce_mean, lw):
  x0 = _batch()
  loss_fn = losses.get_sde_loss_fn(_sde(kind), Affine(), train=True, reduce_mean=reduce_mean,
                                   continuous=True, likelihood_weighting=lw)
  loss, aux = loss_fn(jax.random.PRNGKey(3), _params(), x0)
  t, z = np.asarray(aux["t"], np.float64), np.asarray(aux["noise"], np.float64)
  assert t.min() >= 1e-5 and t.max() <= 1.0 and t.std() > 0.2
  alpha, sigma, g2 = _np_coefs(kind, t)
  xt = alpha[:, None] * np.asarray(x0) + sigma[:, None] * z
  labels = sigma if kind == "ve" else 999 * t
  out = _np_affine(xt, labels)
  score = out if kind == "ve" else -out / sigma[:, None]
  if lw:
    sq = (score + z / sigma[:, None]) ** 2
  else:
    sq = (sigma[:, None] * score + z) ** 2
  per_ex = sq.mean(-1) if reduce_mean else 0.5 * sq.sum(-1)
  if lw:
    per_ex = per_ex * g2
  np.testing.assert_allclose(aux["losses"], per_ex, rtol=2e-4)
  np.testing.assert_allclose(loss, per_ex.mean(), rtol=2e-4)


def test_smld_loss_matches_hand_computation():
  x0 = _batch(256)
  loss, aux = losses.get_discrete_loss_fn(_sde("ve"), Affine(), train=True, reduce_mean=False)(
      jax.random.PRNGKey(4), _params(), x0)
  i, z = np.asarray(aux["labels"]), np.asarray(aux["noise"], np.float64)
  assert i.dtype.kind == "i" and i.min() >= 0 and i.max() <= N - 1 and i.max() - i.min() > N / 2
  sigma = np.exp(np.linspace(np.log(SMAX), np.log(SMIN), N))[i]  # descending noise levels
  out = _np_affine(np.asarray(x0) + sigma[:, None] * z, i)
  per_ex = 0.5 * ((out + z / sigma[:, None]) ** 2).sum(-1) * sigma**2  # reduce_mean=False
  np.testing.assert_allclose(loss, per_ex.mean(), rtol=2e-4)


def test_ddpm_loss_matches_hand_computation():
  x0 = _batch(256)
  loss, aux = losses.get_discrete_loss_fn(_sde("vp"), Affine(), train=True)(
      jax.random.PRNGKey(5), _params(), x0)
  i, z = np.asarray(aux["labels"]), np.asarray(aux["noise"], np.float64)
  assert i.min() >= 0 and i.max() <= N - 1 and i.max() - i.min() > N / 2
  abar = np.cumprod(1 - np.linspace(B0 / N, B1 / N, N))[i]
  xi = np.sqrt(abar)[:, None] * np.asarray(x0) + np.sqrt(1 - abar)[:, None] * z
  per_ex = ((_np_affine(xi, i) - z) ** 2).mean(-1)  # reduce_mean=True
  np.testing.assert_allclose(loss, per_ex.mean(), rtol=2e-4)


def _reference_smld_loss(vesde, model, key, params, batch, reduce_mean=False):
  """The SMLD loss exactly as the code before the SDE-owned conventions wrote it (bitwise check)."""
  label_key, z_key, _ = jax.random.split(key, 3)
  smld_sigmas = np.asarray(vesde.discrete_sigmas[::-1], np.float32)
  labels = jax.random.randint(label_key, (batch.shape[0],), 0, vesde.N)
  sigmas = jnp.asarray(smld_sigmas)[labels]
  z = jax.random.normal(z_key, batch.shape, batch.dtype)
  noise = sde_lib.batch_mul(sigmas, z)
  score = model.apply(params, batch + noise, labels, train=False)
  target = -sde_lib.batch_mul(1.0 / sigmas**2, noise)
  sq = jnp.square(score - target).reshape(batch.shape[0], -1)
  per_ex = (jnp.mean(sq, -1) if reduce_mean else 0.5 * jnp.sum(sq, -1)) * sigmas**2
  return jnp.mean(per_ex)


def _reference_ddpm_loss(vpsde, model, key, params, batch, reduce_mean=True):
  """The DDPM loss exactly as the code before the SDE-owned conventions wrote it."""
  label_key, z_key, _ = jax.random.split(key, 3)
  sqrt_ab = np.asarray(vpsde.sqrt_alphas_cumprod, np.float32)
  sqrt_1m_ab = np.asarray(vpsde.sqrt_1m_alphas_cumprod, np.float32)
  labels = jax.random.randint(label_key, (batch.shape[0],), 0, vpsde.N)
  z = jax.random.normal(z_key, batch.shape, batch.dtype)
  x_i = sde_lib.batch_mul(jnp.asarray(sqrt_ab)[labels], batch) + sde_lib.batch_mul(
      jnp.asarray(sqrt_1m_ab)[labels], z)
  sq = jnp.square(model.apply(params, x_i, labels, train=False) - z).reshape(batch.shape[0], -1)
  return jnp.mean(jnp.mean(sq, -1) if reduce_mean else 0.5 * jnp.sum(sq, -1))


@pytest.mark.parametrize("kind,reduce_mean", [("ve", False), ("ve", True), ("vp", True),
                                              ("vp", False)])
def test_discrete_losses_are_bit_identical_to_the_smld_and_ddpm_code(kind, reduce_mean):
  x0, key, params = _batch(256), jax.random.PRNGKey(9), _params()
  new = losses.get_discrete_loss_fn(_sde(kind), Affine(), train=False, reduce_mean=reduce_mean)
  ref = _reference_smld_loss if kind == "ve" else _reference_ddpm_loss
  got = jax.jit(lambda k, p, b: new(k, p, b)[0])(key, params, x0)
  want = jax.jit(lambda k, p, b: ref(_sde(kind), Affine(), k, p, b, reduce_mean))(key, params, x0)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_discrete_loss_needs_a_discrete_chain():
  with pytest.raises(ValueError, match="no discrete chain"):
    losses.get_discrete_loss_fn(_sde("subvp"), Affine(), train=True)


class ExactScoreNet(nn.Module):
  """The exact mixture score written in the network's output convention (+ an optional shift)."""
  gmm: Any
  sde: Any
  shift: tuple = (0.0, 0.0)

  def __call__(self, x, labels, train=False):
    if isinstance(self.sde, sde_lib.VESDE):
      t = jnp.log(labels / SMIN) / np.log(SMAX / SMIN)  # labels = sigma(t)
      return self.gmm.score(x, t, self.sde) + jnp.asarray(self.shift)
    t = labels / 999.0
    sigma = self.sde.marginal_coef(t)[1][:, None]
    return -sigma * (self.gmm.score(x, t, self.sde) + jnp.asarray(self.shift))


@pytest.mark.parametrize("kind,lw", [("vp", False), ("subvp", False), ("ve", False), ("ve", True)])
def test_exact_score_attains_the_analytic_minimum(kind, lw):
  """For data N(mu, s^2 I) the loss at the exact score is, per dimension,
  E_t[alpha^2 s^2 / (alpha^2 s^2 + sigma^2)] (unweighted) and
  E_t[g^2 (1 / sigma^2 - 1 / (alpha^2 s^2 + sigma^2))] (likelihood weighting)."""
  s, mu, n, eps = 0.7, np.array([1.0, -0.5]), 40000, 1e-5
  gmm = analytic.GaussianMixture(mu[None], np.full((1, 2), s**2))
  sde = _sde(kind)
  x0 = gmm.sample(jax.random.PRNGKey(1), n)
  loss_fn = jax.jit(losses.get_sde_loss_fn(sde, ExactScoreNet(gmm, sde), train=False,
                                           likelihood_weighting=lw))
  loss, aux = loss_fn(jax.random.PRNGKey(2), {}, x0)

  def integrand(t):
    alpha, sigma, g2 = _np_coefs(kind, np.array(t))
    var = alpha**2 * s**2 + sigma**2
    return g2 * (1 / sigma**2 - 1 / var) if lw else alpha**2 * s**2 / var
  expected = integrate.quad(integrand, eps, 1.0, limit=200)[0] / (1 - eps)
  se = np.std(aux["losses"]) / np.sqrt(n)
  assert abs(float(loss) - expected) < 5 * se, (float(loss), expected, se)


def test_exact_score_minimizes_the_loss_on_a_mixture():
  """E[sigma s*(x_t) + z | x_t] = 0, so shifting the score by c adds E_t[sigma^2] |c|^2 / D."""
  gmm = analytic.standard_mixture(dim=2)
  sde, n, c = _sde("vp"), 40000, (0.6, -0.8)
  x0 = gmm.sample(jax.random.PRNGKey(1), n)
  key = jax.random.PRNGKey(7)
  exact, aux = losses.get_sde_loss_fn(sde, ExactScoreNet(gmm, sde), train=False)(key, {}, x0)
  shifted, _ = losses.get_sde_loss_fn(sde, ExactScoreNet(gmm, sde, c), train=False)(key, {}, x0)
  zero_score = losses.get_sde_loss_fn(sde, Affine(), train=False)(key, {"a": jnp.zeros(2),
                                                                         "b": jnp.zeros(())}, x0)[0]
  sigma2 = np.asarray(sde.marginal_coef(aux["t"])[1]) ** 2
  excess = np.mean(sigma2) * np.sum(np.square(c)) / 2
  assert float(exact) < 0.5 * float(zero_score)
  np.testing.assert_allclose(float(shifted - exact), excess, rtol=0.05)


def _config(**optim):
  config = toy_vp.get_config()
  config.model.nf, config.model.num_layers = 16, 1
  config.optim.update(optim)
  return config


def test_warmup_schedule_and_lr_metric():
  config = _config(lr=3e-3, warmup=10, lr_decay="constant")
  sched = losses.get_lr_schedule(config)
  for step in [0, 1, 5, 10, 11, 1000]:
    np.testing.assert_allclose(sched(step), 3e-3 * min(step / 10, 1.0), rtol=1e-6)
  assert float(losses.get_lr_schedule(_config(lr=3e-3, warmup=0, lr_decay="constant"))(0)) == (
      pytest.approx(3e-3))


def test_cosine_decay_schedule():
  config = _config(lr=2e-3, warmup=10, lr_decay="cosine")
  config.training.n_iters = 110
  sched = losses.get_lr_schedule(config)
  for step in [0, 5, 10, 35, 60, 85, 110, 200]:  # warm-up, then lr (1 + cos(pi u)) / 2 to 0
    u = min(max(step - 10, 0) / 100, 1.0)
    want = 2e-3 * step / 10 if step < 10 else 2e-3 * (1 + np.cos(np.pi * u)) / 2
    np.testing.assert_allclose(sched(step), want, rtol=1e-5, atol=1e-9)
  config.optim.warmup = 200  # a run shorter than its warm-up only warms up
  np.testing.assert_allclose(losses.get_lr_schedule(config)(100), 1e-3, rtol=1e-6)


@pytest.mark.parametrize("clip,wd", [(1.0, 0.0), (-1.0, 0.0), (1.0, 0.1)])
def test_first_adam_update_by_hand(clip, wd):
  """Adam's first step is -lr g_c / (|g_c| + eps) (bias-corrected); g_c = g min(1, clip / |g|)_2;
  AdamW adds -lr wd p. A large eps makes the step depend on the gradient scale."""
  lr, eps = 0.1, 1.0
  tx = losses.get_optimizer(_config(lr=lr, warmup=0, grad_clip=clip, eps=eps, weight_decay=wd))
  params = {"w": jnp.array([1.0, -2.0, 3.0]), "GaussianFourierProjection_0": {"W": jnp.ones(2)}}
  g = {"w": jnp.array([3.0, 4.0, 12.0]), "GaussianFourierProjection_0": {"W": jnp.zeros(2)}}
  updates, _ = tx.update(g, tx.init(params), params)
  gw = np.array([3.0, 4.0, 12.0])
  gc = gw * min(1.0, clip / 13.0) if clip > 0 else gw
  expected = -lr * (gc / (np.abs(gc) + eps) + wd * np.array([1.0, -2.0, 3.0]))
  np.testing.assert_allclose(updates["w"], expected, rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(updates["GaussianFourierProjection_0"]["W"], 0.0)  # frozen, no decay


@pytest.fixture(scope="module")
def toy():
  """A small toy_mlp (VP, continuous), its state and a step builder shared by the step tests."""
  from score_sde.models import create_model
  config = _config(lr=1e-2, warmup=4)
  config.model.ema_rate = 0.9
  model, variables = create_model(config, jax.random.PRNGKey(0))
  state = losses.init_train_state(config, variables, jax.random.PRNGKey(1))
  return config, sde_lib.get_sde(config), model, state


def test_train_step_update_ema_and_metrics(toy):
  config, sde, model, state = toy
  state = state.replace(ema_params=jax.tree.map(lambda p: p + 1.0, state.params),
                        step=jnp.asarray(2, jnp.int32))
  batch = _batch(32)
  new, metrics = jax.jit(losses.get_train_step_fn(config, sde, model))(state, batch)
  # Independent recomputation from the documented pieces.
  key, loss_key = jax.random.split(state.key)
  loss_fn = losses.get_loss_fn(config, sde, model, train=True)
  tx = losses.get_optimizer(config)

  @jax.jit
  def reference(state):
    (loss, _), grads = jax.value_and_grad(loss_fn, argnums=1, has_aux=True)(loss_key, state.params,
                                                                            batch)
    updates, _ = tx.update(grads, state.opt_state, state.params)
    return loss, grads, jax.tree.map(lambda p, u: p + u, state.params, updates)
  loss, grads, params = reference(state)
  gnorm = np.sqrt(sum(np.sum(np.square(g)) for g in jax.tree.leaves(grads)))
  np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-5)
  np.testing.assert_allclose(metrics["grad_norm"], gnorm, rtol=1e-4)
  np.testing.assert_allclose(metrics["lr"], 1e-2 * 2 / 4, rtol=1e-6)
  assert int(new.step) == 3 and np.array_equal(new.key, key)
  for p_new, p_ref, e_old, e_new in zip(*map(jax.tree.leaves, (new.params, params,
                                                              state.ema_params, new.ema_params))):
    np.testing.assert_allclose(p_new, p_ref, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(e_new, 0.9 * e_old + 0.1 * p_new, rtol=1e-5, atol=1e-7)


def test_multi_step_scan_equals_single_steps_and_eval_uses_ema(toy):
  config, sde, model, state = toy
  step = losses.get_train_step_fn(config, sde, model)
  batches = jax.random.normal(jax.random.PRNGKey(9), (3, 16, 2))
  multi_state, multi_metrics = jax.jit(losses.get_multi_step_fn(step, 3))(state, batches)
  s, jstep = state, jax.jit(step)
  for i in range(3):
    s, m = jstep(s, batches[i])
    np.testing.assert_allclose(multi_metrics["loss"][i], m["loss"], rtol=1e-5)
  assert multi_metrics["loss"].shape == (3,) and int(multi_state.step) == 3
  for a, b in zip(jax.tree.leaves(multi_state), jax.tree.leaves(s)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  # eval_step = training loss of the EMA params without dropout.
  key = jax.random.PRNGKey(11)
  loss_fn = jax.jit(losses.get_loss_fn(config, sde, model, train=False))
  ev = jax.jit(losses.get_eval_step_fn(config, sde, model))(s, batches[0], key)
  np.testing.assert_allclose(ev, loss_fn(key, s.ema_params, batches[0])[0], rtol=1e-6)
  assert abs(float(ev) - float(loss_fn(key, s.params, batches[0])[0])) > 1e-6


def test_nan_policy_skip_keeps_params(toy):
  config, sde, model, state = toy
  config = config.copy_and_resolve_references()
  config.training.nan_policy = "skip"
  bad = _batch(8).at[0, 0].set(jnp.nan)
  new, metrics = jax.jit(losses.get_train_step_fn(config, sde, model))(state, bad)
  assert not np.isfinite(metrics["loss"]) and int(new.step) == 1
  for a, b in zip(jax.tree.leaves((new.params, new.ema_params, new.opt_state)),
                  jax.tree.leaves((state.params, state.ema_params, state.opt_state))):
    np.testing.assert_array_equal(a, b)


def test_loss_dispatch_and_early_errors():
  config = _config()
  model = Affine()
  for name, cls in [("vesde", sde_lib.VESDE), ("vpsde", sde_lib.VPSDE)]:
    config.training.sde, config.training.continuous = name, False
    _, aux = losses.get_loss_fn(config, sde_lib.get_sde(config), model, train=False)(
        jax.random.PRNGKey(0), _params(), _batch(4))
    assert "labels" in aux  # discrete SMLD / DDPM
  config.training.sde = "subvpsde"
  with pytest.raises(ValueError, match="continuous=True"):
    losses.get_loss_fn(config, sde_lib.get_sde(config), model, train=True)
  config.training.sde, config.training.likelihood_weighting = "vpsde", True
  with pytest.raises(ValueError, match="Likelihood weighting"):
    losses.get_loss_fn(config, sde_lib.get_sde(config), model, train=True)
  config = _config()
  loss_fn = losses.get_loss_fn(config, sde_lib.get_sde(config), model, train=True)
  with pytest.raises(ValueError, match="data shape"):
    loss_fn(jax.random.PRNGKey(0), _params(), jnp.zeros((4, 3)))
  with pytest.raises(ValueError, match="optimizer"):
    losses.get_optimizer(_config(optimizer="SGD"))
  config.training.nan_policy = "ignore"
  with pytest.raises(ValueError, match="nan_policy"):
    losses.get_train_step_fn(config, sde_lib.get_sde(config), model)
  config.training.nan_policy = "stop"
  multi = losses.get_multi_step_fn(losses.get_train_step_fn(config, sde_lib.get_sde(config),
                                                            model), 3)
  with pytest.raises(ValueError, match="n_steps=3"):
    multi(None, jnp.zeros((2, 4, 2)))
