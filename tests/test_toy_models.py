"""Embeddings, the toy MLP and the small U-Net: formulas, conventions, shapes, and a short training run
whose score is compared with the exact Gaussian-mixture score."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.mnist import vp_continuous as mnist_vp
from configs.toy import ve as toy_ve
from configs.toy import vp as toy_vp
from score_sde import analytic, losses, sde_lib
from score_sde.models import create_model, get_model, get_model_fn, get_score_fn
from score_sde.models.embeddings import GaussianFourierProjection, get_timestep_embedding


@pytest.mark.parametrize("dim", [8, 9])
def test_timestep_embedding_formula(dim):
  t = np.array([0.0, 1.0, 17.5, 999.0])
  half = dim // 2
  freqs = np.exp(-np.arange(half) * math.log(10000) / (half - 1))
  expected = np.concatenate([np.sin(t[:, None] * freqs), np.cos(t[:, None] * freqs)], axis=1)
  if dim % 2:
    expected = np.pad(expected, [[0, 0], [0, 1]])
  np.testing.assert_allclose(get_timestep_embedding(jnp.asarray(t), dim), expected, atol=2e-4)


def test_gaussian_fourier_projection_param_and_frozen():
  layer = GaussianFourierProjection(embedding_size=4096, scale=16.0)
  x = jnp.array([0.3, -1.2])
  variables = layer.init(jax.random.PRNGKey(0), x)
  W = variables["params"]["W"]
  assert set(variables["params"]) == {"W"} and W.shape == (4096,)
  assert abs(float(jnp.std(W)) - 16.0) < 16.0 * 0.05 and abs(float(jnp.mean(W))) < 1.0
  proj = 2 * np.pi * np.asarray(x)[:, None] * np.asarray(W)[None]
  np.testing.assert_allclose(layer.apply(variables, x),
                             np.concatenate([np.sin(proj), np.cos(proj)], -1), atol=1e-3)
  grad = jax.grad(lambda v: jnp.sum(layer.apply(v, x)))(variables)
  np.testing.assert_array_equal(grad["params"]["W"], 0.0)


def _toy_config(cfg_module=toy_vp, **model):
  config = cfg_module.get_config()
  config.model.nf, config.model.num_layers = 32, 2
  config.model.update(model)
  return config


def test_toy_mlp_conventions():
  assert get_model("toy_mlp").__name__ == "ToyMLP"
  config = _toy_config(toy_ve, dropout=0.5)
  model, variables = create_model(config, jax.random.PRNGKey(0))
  x = jax.random.normal(jax.random.PRNGKey(1), (5, 2))
  sigma = jnp.array([0.01, 0.1, 1.0, 5.0, 12.0])
  out = model.apply(variables, x, sigma)
  assert out.shape == (5, 2) and np.all(np.isfinite(out))
  # scale_by_sigma (VE): the output is the unscaled network divided by the label sigma.
  unscaled_config = config.copy_and_resolve_references()
  unscaled_config.model.scale_by_sigma = False
  unscaled = type(model)(config=unscaled_config).apply(variables, x, sigma)
  np.testing.assert_allclose(out, unscaled / sigma[:, None], rtol=1e-5)
  # Dropout only in training, driven by the dropout rng.
  d1, d2 = (model.apply(variables, x, sigma, train=True, rngs={"dropout": jax.random.PRNGKey(k)})
            for k in (1, 2))
  assert not np.allclose(d1, d2)
  np.testing.assert_array_equal(model.apply(variables, x, sigma), out)
  # Fourier features embed log(label): discrete integer labels (0 included) are refused early.
  config = config.copy_and_resolve_references()
  config.training.continuous = False
  with pytest.raises(ValueError, match="positional"):
    create_model(config, jax.random.PRNGKey(0))
  config.model.embedding_type = "positional"
  _, v = create_model(config, jax.random.PRNGKey(0))
  assert "GaussianFourierProjection_0" not in v["params"]


def test_toy_mlp_learns_the_mixture_score():
  """~400 Adam steps of continuous VP DSM on a 2-D mixture: the loss drops and the learned score at
  t = 0.5 is close to the exact one (relative L2 error over p_t)."""
  config = _toy_config(nf=64, num_layers=2)
  config.optim.update(lr=3e-3, warmup=20)
  gmm = analytic.standard_mixture(dim=2)
  sde = sde_lib.get_sde(config)
  n_steps, bs = 400, 256
  model, variables = create_model(config, jax.random.PRNGKey(0))
  state = losses.init_train_state(config, variables, jax.random.PRNGKey(1))
  train = jax.jit(losses.get_multi_step_fn(losses.get_train_step_fn(config, sde, model), n_steps))
  batches = gmm.sample(jax.random.PRNGKey(2), n_steps * bs).reshape(n_steps, bs, 2)
  state, metrics = train(state, batches)
  first, last = float(metrics["loss"][:20].mean()), float(metrics["loss"][-50:].mean())

  x0 = gmm.sample(jax.random.PRNGKey(3), 4000)
  t = jnp.full((4000,), 0.5)
  mean, std = sde.marginal_prob(x0, t)
  xt = mean + std[:, None] * jax.random.normal(jax.random.PRNGKey(4), x0.shape)
  exact = gmm.score(xt, t, sde)

  def rel_err(params):
    score = get_score_fn(sde, get_model_fn(model, params), continuous=True)(xt, t)
    return float(jnp.mean(jnp.sum((score - exact) ** 2, -1)) / jnp.mean(jnp.sum(exact**2, -1)))
  err0, err = rel_err(variables["params"]), rel_err(state.params)
  print(f"toy_mlp: loss {first:.3f} -> {last:.3f}; rel. score error at t=0.5 {err0:.3f} -> {err:.4f}")
  assert last < 0.7 * first
  assert err < 0.05 and err < 0.1 * err0


def _unet_param_count(nf, ch_mult, nrb, C, fourier=True):
  """Parameter count of the documented small_unet layout, from layer shapes alone."""
  conv = lambda i, o: 9 * i * o + o
  dense = lambda i, o: i * o + o
  gn = lambda c: 2 * c
  res = lambda i, o: gn(i) + conv(i, o) + dense(4 * nf, o) + gn(o) + conv(o, o) + (
      dense(i, o) if i != o else 0)
  attn = lambda c: gn(c) + 4 * dense(c, c)
  n = (nf // 2 if fourier else 0) + dense(nf, 4 * nf) + dense(4 * nf, 4 * nf) + conv(C, nf)
  chans, skips, c = [nf], [nf], nf
  for level, m in enumerate(ch_mult):
    for _ in range(nrb):
      n += res(c, nf * m)
      c = nf * m
      skips.append(c)
    if level != len(ch_mult) - 1:
      n += conv(c, c)
      skips.append(c)
  n += 2 * res(c, c) + attn(c)  # middle; attention only at the lowest resolution
  for level, m in reversed(list(enumerate(ch_mult))):
    for _ in range(nrb + 1):
      n += res(c + skips.pop(), nf * m)
      c = nf * m
    if level != 0:
      n += conv(c, nf * ch_mult[level - 1])
      c = nf * ch_mult[level - 1]
  n += attn(nf * ch_mult[-1]) * (nrb + nrb + 1)  # the lowest level's down and up blocks
  return n + gn(c) + conv(c, C)


def test_small_unet_shapes_and_param_count():
  config = mnist_vp.get_config()  # nf=32, ch_mult=(1, 2, 2), num_res_blocks=1, fourier
  model = get_model("small_unet")(config=config)
  x = jnp.zeros((2, 28, 28, 1))
  variables = jax.eval_shape(lambda: model.init({"params": jax.random.PRNGKey(0)}, x,
                                                jnp.ones((2,))))
  count = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(variables))
  assert count == _unet_param_count(32, (1, 2, 2), 1, 1)
  assert 3e5 < count < 2e6
  # A real (tiny) forward pass on another size divisible by 4, with the positional embedding.
  config.model.update(nf=8, embedding_type="positional")
  config.data.update(image_size=12, num_channels=3)
  model, variables = create_model(config, jax.random.PRNGKey(0), batch_size=2)
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 12, 12, 3))
  out = model.apply(variables, x, jnp.array([3.0, 900.0]))
  assert out.shape == x.shape and np.all(np.isfinite(out))
  with pytest.raises(ValueError, match="divisible"):
    model.apply(variables, jnp.zeros((2, 10, 10, 3)), jnp.ones((2,)))
