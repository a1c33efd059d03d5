"""Guidance, inpainting and colorization against exact scores (score_sde.controllable)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from score_sde import analytic, sde_lib
from score_sde import controllable as C
from score_sde.sampling import get_sampler

K = 4


@pytest.fixture(scope="module")
def mix():
  return analytic.standard_mixture(dim=2, num_components=K, radius=2.0, std=0.3)


def _labelled_score(mix, sde):
  """Exact labelled score with the null label K meaning the unconditional score."""
  def score(x, t, y):
    s_c = mix.score(x, t, sde, labels=jnp.minimum(y, K - 1))
    return jnp.where((y == K)[:, None], mix.score(x, t, sde), s_c)
  return score


@pytest.mark.parametrize("sde", [sde_lib.VPSDE(), sde_lib.subVPSDE(), sde_lib.VESDE(sigma_max=5.)])
def test_classifier_guidance_with_exact_classifier_is_exact_conditional_score(mix, sde):
  x, y = mix.sample(jax.random.PRNGKey(0), 256, return_labels=True)
  x = x + jax.random.normal(jax.random.PRNGKey(1), x.shape)
  t = jax.random.uniform(jax.random.PRNGKey(2), (256,), minval=0.01, maxval=1.0)
  y = (y + 1) % K  # not always the component the point came from
  grad = C.logp_grad_from_logits(C.mixture_classifier(mix, sde))
  guided = C.classifier_guidance(mix.score_fn(sde), grad, y, 1.0, num_classes=K)
  exact = mix.score(x, t, sde, labels=y)
  np.testing.assert_allclose(guided(x, t), exact, rtol=1e-4, atol=1e-4 * float(
      jnp.abs(exact).max()))
  # scale 0: the unconditional score, bitwise.
  plain = C.classifier_guidance(mix.score_fn(sde), grad, y, 0.0)
  np.testing.assert_array_equal(plain(x, t), mix.score(x, t, sde))


def test_classifier_free_guidance_is_the_guided_combination(mix):
  sde = sde_lib.VPSDE()
  x = jax.random.normal(jax.random.PRNGKey(0), (64, 2)) * 2
  t = jnp.full((64,), 0.3)
  y = jnp.arange(64) % K
  lab = _labelled_score(mix, sde)
  s_c, s_u = mix.score(x, t, sde, labels=y), mix.score(x, t, sde)
  for w in (0.0, 1.0, 2.5):  # s_u + w (s_c - s_u)
    np.testing.assert_allclose(C.classifier_free_guidance(lab, y, w, num_classes=K)(x, t),
                               s_u + w * (s_c - s_u), rtol=1e-4, atol=1e-4)
  lab.num_classes = K  # as get_conditional_score_fn sets it
  np.testing.assert_array_equal(C.classifier_free_guidance(lab, y, 1.0)(x, t),
                                C.classifier_free_guidance(lab, y, 1.0, num_classes=K)(x, t))


@pytest.mark.parametrize("name,opts", [
    ("pc", dict(predictor="reverse_diffusion", corrector="langevin", snr=0.16)),
    ("ode", dict(rtol=1e-4, atol=1e-4)),
    ("dpm_solver", dict(nfe=20)),
])
def test_guided_sampling_recovers_component(mix, name, opts):
  sde = sde_lib.VPSDE(N=50)
  B = 400
  y = jnp.arange(B) % K
  grad = C.logp_grad_from_logits(C.mixture_classifier(mix, sde))
  guided = C.classifier_guidance(mix.score_fn(sde), grad, y, 1.0, num_classes=K)
  sampler = get_sampler(name, sde, (B, 2), **opts)
  x, _ = sampler(jax.random.PRNGKey(3), guided)
  assert float(jnp.mean(jnp.argmax(mix.posterior(x), -1) == y)) > 0.97
  for k in range(K):  # each class's samples centre on its component's mean
    sel = np.asarray(y == k)
    np.testing.assert_allclose(np.asarray(x)[sel].mean(0), mix.means_np[k], atol=0.1)
  x_u, _ = sampler(jax.random.PRNGKey(3), mix.score_fn(sde))
  assert float(jnp.mean(jnp.argmax(mix.posterior(x_u), -1) == y)) < 0.5


@pytest.mark.parametrize("name,opts", [
    ("pc", dict(predictor="reverse_diffusion", corrector="langevin")), ("ddim", dict(nfe=10))])
def test_guidance_scale_zero_is_unconditional(mix, name, opts):
  sde = sde_lib.VPSDE(N=20)
  y = jnp.arange(32) % K
  sampler = get_sampler(name, sde, (32, 2), **opts)
  base, _ = sampler(jax.random.PRNGKey(5), mix.score_fn(sde))
  grad = C.logp_grad_from_logits(C.mixture_classifier(mix, sde))
  cg, _ = sampler(jax.random.PRNGKey(5), C.classifier_guidance(mix.score_fn(sde), grad, y, 0.0))
  cfg, _ = sampler(jax.random.PRNGKey(5), C.classifier_free_guidance(
      _labelled_score(mix, sde), y, 0.0, num_classes=K))
  np.testing.assert_array_equal(cg, base)
  # One call on the doubled batch [x; x]: s_u may differ from the plain batch's in the last bit.
  np.testing.assert_allclose(cfg, base, rtol=0, atol=1e-5)


# --- inpainting / colorization with an exact Gaussian score ---------------------------------
def _gaussian(dim, seed):
  rng = np.random.default_rng(seed)
  a = rng.normal(size=(dim, dim))
  cov = 0.5 * a @ a.T / dim + 0.3 * np.eye(dim)
  return rng.normal(size=dim) * 0.5, cov


def _conditional(mu, cov, known, value):
  k, u = known == 1, known == 0
  gain = cov[np.ix_(u, k)] @ np.linalg.inv(cov[np.ix_(k, k)])
  return mu[u] + gain @ (value[k] - mu[k]), cov[np.ix_(u, u)] - gain @ cov[np.ix_(k, u)]


@pytest.mark.parametrize("method,opts,tol_se", [
    ("pc", dict(predictor="reverse_diffusion", corrector="langevin", n_steps=10), 4.0),
    ("ode", dict(rtol=1e-4, atol=1e-4), 6.0),
])
def test_inpainting_gaussian_matches_closed_form(method, opts, tol_se):
  mu, cov = _gaussian(4, 0)
  g = analytic.GaussianMixture(mu[None], cov[None])
  known = np.array([1.0, 1.0, 0.0, 0.0])
  value = mu + np.array([0.6, -0.8, 0.0, 0.0])
  cm, cc = _conditional(mu, cov, known, value)
  sde = sde_lib.VESDE(sigma_max=10.0, N=100)
  B = 2000
  data = np.broadcast_to(value, (B, 4)).astype(np.float32)
  data = data + np.array([0, 0, 9.0, -9.0], np.float32)  # garbage in the unknown part is ignored
  inpaint = C.get_inpainter(sde, (B, 4), method, **opts)
  x, nfe = inpaint(jax.random.PRNGKey(0), g.score_fn(sde), data, known)
  x = np.asarray(x)
  np.testing.assert_array_equal(x[:, :2], data[:, :2])  # known part exactly unchanged
  se = np.sqrt(np.diag(cc) / B)
  assert np.all(np.abs(x[:, 2:].mean(0) - cm) < tol_se * se), (x[:, 2:].mean(0), cm, se)
  np.testing.assert_allclose(np.cov(x[:, 2:].T), cc, atol=0.12 * np.abs(cc).max())
  # The fill-in follows the known values, not the unconditional marginal.
  marg_dist = np.abs(mu[2:] - cm) / se
  assert np.all(np.abs(x[:, 2:].mean(0) - cm) / se < marg_dist)
  assert int(nfe) > 0


def test_inpainting_image_mask_broadcast_and_independent_parts():
  # Known and unknown pixels independent: the fill-in must be the unknown marginal.
  shape = (512, 2, 2, 1)
  mu = np.array([1.0, -1.0, 0.5, 0.0])
  var = np.array([0.2, 0.3, 0.5, 0.4])
  g = analytic.GaussianMixture(mu[None], var[None], data_shape=shape[1:])
  sde = sde_lib.VPSDE(N=100)
  mask = np.array([[1.0, 0.0], [0.0, 1.0]])[..., None]  # [H, W, 1], shared by the batch
  data = np.full(shape, 3.0, np.float32)
  inpaint = C.get_inpainter(sde, shape, "pc", predictor="euler_maruyama", corrector="none")
  x, nfe = inpaint(jax.random.PRNGKey(1), g.score_fn(sde), data, mask)
  x = np.asarray(x).reshape(512, 4)
  assert int(nfe) == 100
  np.testing.assert_array_equal(x[:, [0, 3]], 3.0)
  np.testing.assert_allclose(x[:, [1, 2]].mean(0), mu[[1, 2]], atol=4 * np.sqrt(0.5 / 512))
  np.testing.assert_allclose(x[:, [1, 2]].var(0), var[[1, 2]], rtol=0.2)


@pytest.mark.parametrize("method", ["pc", "ode"])
def test_colorization_keeps_grayscale(method):
  shape = (64, 2, 2, 3)
  mu, cov = _gaussian(12, 1)
  g = analytic.GaussianMixture(mu[None], cov[None], data_shape=shape[1:])
  sde = sde_lib.VPSDE(N=20)
  gray = np.asarray(g.sample(jax.random.PRNGKey(2), 64)).mean(-1)  # [B, H, W]
  opts = dict(rtol=1e-3, atol=1e-3) if method == "ode" else dict(n_steps=1)
  colorize = C.get_colorizer(sde, shape, method, **opts)
  x, _ = colorize(jax.random.PRNGKey(3), g.score_fn(sde), gray)
  x = np.asarray(x)
  np.testing.assert_allclose(x.mean(-1), gray, atol=1e-5)
  assert np.all(np.isfinite(x)) and x.std(-1).mean() > 0.05  # colour was filled in
  q = C.colorization_matrix()
  np.testing.assert_allclose(q.T @ q, np.eye(3), atol=1e-12)
  np.testing.assert_allclose(q[:, 0], np.ones(3) / np.sqrt(3))


# --- file loaders -----------------------------------------------------------------------------
def test_loaders_npy_and_png(tmp_path):
  from PIL import Image
  mask = np.zeros((4, 4), np.uint8)
  mask[:2] = 255
  Image.fromarray(mask).save(tmp_path / "m.png")
  m = C.load_mask(str(tmp_path / "m.png"))
  assert m.shape == (4, 4, 1) and m[:2].min() == 1 and m[2:].max() == 0
  np.save(tmp_path / "m.npy", (mask > 0).astype(np.float32))
  np.testing.assert_array_equal(C.load_mask(str(tmp_path / "m.npy")), m[..., 0])
  rgb = np.random.default_rng(0).integers(0, 256, (4, 4, 3)).astype(np.uint8)
  Image.fromarray(rgb).save(tmp_path / "c.png")
  np.testing.assert_allclose(C.load_grayscale(str(tmp_path / "c.png"))[..., 0],
                             rgb.mean(-1) / 255.0, atol=1e-6)
  with pytest.raises(ValueError, match="No such file"):
    C.load_array(str(tmp_path / "missing.png"))


# --- bad input --------------------------------------------------------------------------------
def test_bad_inputs_fail_early(mix):
  sde = sde_lib.VPSDE(N=100)
  grad = C.logp_grad_from_logits(C.mixture_classifier(mix, sde))
  with pytest.raises(ValueError, match="out of range"):
    C.classifier_guidance(mix.score_fn(sde), grad, jnp.array([0, 4]), 1.0, num_classes=K)
  with pytest.raises(ValueError, match="out of range"):
    C.classifier_free_guidance(_labelled_score(mix, sde), np.array([-1, 0]), 1.0, num_classes=K)
  with pytest.raises(ValueError, match="out of range"):
    C.bind_labels(_labelled_score(mix, sde), np.array([5]), K)
  # Guidance without a conditional model.
  with pytest.raises(ValueError, match="does not take labels"):
    C.classifier_free_guidance(mix.score_fn(sde), np.array([0, 1]), 1.0, num_classes=K)
  with pytest.raises(ValueError, match="needs num_classes"):
    C.classifier_free_guidance(_labelled_score(mix, sde), np.array([0, 1]), 1.0)
  with pytest.raises(ValueError, match="classifier_logp_grad_fn"):
    C.classifier_guidance(mix.score_fn(sde), mix.score_fn(sde), np.array([0]), 1.0)
  with pytest.raises(ValueError, match="finite scalar"):
    C.classifier_guidance(mix.score_fn(sde), grad, np.array([0]), float("nan"))
  # Inpainting / colorization shapes.
  inpaint = C.get_inpainter(sde, (8, 2))
  with pytest.raises(ValueError, match="Mask shape"):
    inpaint(jax.random.PRNGKey(0), mix.score_fn(sde), np.zeros((8, 2)), np.ones((8, 3)))
  with pytest.raises(ValueError, match="0 \\(fill in\\) or 1"):
    inpaint(jax.random.PRNGKey(0), mix.score_fn(sde), np.zeros((8, 2)), np.full((2,), 0.5))
  with pytest.raises(ValueError, match="sampler's shape"):
    inpaint(jax.random.PRNGKey(0), mix.score_fn(sde), np.zeros((4, 2)), np.ones((2,)))
  with pytest.raises(ValueError, match="RGB"):
    C.get_colorizer(sde, (8, 4, 4, 1))
  colorize = C.get_colorizer(sde, (2, 4, 4, 3))
  with pytest.raises(ValueError, match="Grayscale input"):
    colorize(jax.random.PRNGKey(0), lambda x, t: x, np.zeros((2, 3, 4)))
  with pytest.raises(ValueError, match="method='pc' or 'ode'"):
    C.get_inpainter(sde, (8, 2), "dpm_solver")
