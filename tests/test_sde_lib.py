"""SDE formulas against independent closed forms (numpy / scipy), not against our own code."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate, stats

from score_sde import sde_lib

jax.config.update("jax_enable_x64", False)
T_GRID = np.array([1e-5, 1e-3, 0.1, 0.37, 0.5, 0.9, 1.0], np.float32)


def _beta(t, b0=0.1, b1=20.0):
  return b0 + t * (b1 - b0)


def _int_beta(t, b0=0.1, b1=20.0):
  return integrate.quad(lambda s: _beta(s, b0, b1), 0, t)[0]


@pytest.mark.parametrize("t", T_GRID)
def test_vp_marginal_matches_integrated_beta(t):
  """alpha(t) = exp(-1/2 int_0^t beta), sigma^2 = 1 - alpha^2 (the OU transition)."""
  sde = sde_lib.VPSDE()
  alpha, sigma = sde.marginal_coef(jnp.asarray([t]))
  ib = _int_beta(float(t))
  np.testing.assert_allclose(alpha[0], np.exp(-0.5 * ib), rtol=1e-5)
  np.testing.assert_allclose(sigma[0], np.sqrt(1 - np.exp(-ib)), rtol=2e-4)


@pytest.mark.parametrize("t", T_GRID)
def test_subvp_variance_solves_its_ode(t):
  """For dx = f x dt + g dw the variance obeys dV/dt = -beta V + g^2 with V(0) = 0 (per unit x0=0)."""
  sde = sde_lib.subVPSDE()
  g2 = lambda s: float(sde.sde(jnp.zeros((1, 1)), jnp.asarray([s]))[1][0]) ** 2
  sol = integrate.solve_ivp(lambda s, v: -_beta(s) * v + g2(s), (0, float(t)), [0.0],
                            rtol=1e-10, atol=1e-12)
  _, sigma = sde.marginal_coef(jnp.asarray([t]))
  np.testing.assert_allclose(sigma[0] ** 2, sol.y[0, -1], rtol=2e-3, atol=1e-9)
  # sub-VP std is 1 - alpha^2 and never exceeds the VP std.
  alpha = np.exp(-0.5 * _int_beta(float(t)))
  np.testing.assert_allclose(sigma[0], 1 - alpha**2, rtol=2e-4, atol=1e-8)
  assert sigma[0] <= sde_lib.VPSDE().marginal_coef(jnp.asarray([t]))[1][0] + 1e-7


@pytest.mark.parametrize("t", T_GRID)
def test_ve_variance_is_integral_of_g_squared(t):
  """sigma(t)^2 - sigma(0)^2 = int_0^t g(s)^2 ds with sigma(t) = smin (smax/smin)^t."""
  sde = sde_lib.VESDE()
  g2 = lambda s: float(sde.sde(jnp.zeros((1, 1)), jnp.asarray([s]))[1][0]) ** 2
  var = integrate.quad(g2, 0, float(t))[0] + 0.01**2
  _, sigma = sde.marginal_coef(jnp.asarray([t]))
  np.testing.assert_allclose(sigma[0] ** 2, var, rtol=1e-4)
  np.testing.assert_allclose(sigma[0], 0.01 * (50 / 0.01) ** float(t), rtol=1e-5)


def test_vp_discretize_is_the_ddpm_chain():
  sde = sde_lib.VPSDE(N=1000)
  betas = np.linspace(0.1 / 1000, 20 / 1000, 1000)
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 3))
  for i in [0, 1, 500, 999]:
    t = jnp.full((4,), i / 999.0)
    f, G = sde.discretize(x, t)
    np.testing.assert_allclose(x + f, np.sqrt(1 - betas[i]) * np.asarray(x), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(G, np.sqrt(betas[i]), rtol=1e-5)
  # The chain's marginal after i steps equals the closed-form alphabar (DDPM eq. 4).
  np.testing.assert_allclose(sde.alphas_cumprod, np.cumprod(1 - betas), rtol=1e-10)


def test_ve_discretize_is_the_smld_chain():
  sde = sde_lib.VESDE(N=100)
  sigmas = np.exp(np.linspace(np.log(0.01), np.log(50.0), 100))
  x = jnp.ones((2, 5))
  for i in [0, 1, 50, 99]:
    t = jnp.full((2,), i / 99.0)
    f, G = sde.discretize(x, t)
    prev = sigmas[i - 1] if i > 0 else 0.0
    np.testing.assert_allclose(f, 0.0)
    np.testing.assert_allclose(G, np.sqrt(sigmas[i] ** 2 - prev**2), rtol=1e-4)


def test_subvp_discretize_is_euler_maruyama():
  sde = sde_lib.subVPSDE(N=50)
  x = jax.random.normal(jax.random.PRNGKey(1), (3, 2))
  t = jnp.asarray([0.2, 0.5, 0.8])
  drift, g = sde.sde(x, t)
  f, G = sde.discretize(x, t)
  np.testing.assert_allclose(f, drift / 50, rtol=1e-6)
  np.testing.assert_allclose(G, g * np.sqrt(1 / 50), rtol=1e-6)


@pytest.mark.parametrize("sde,scale", [(sde_lib.VPSDE(), 1.0), (sde_lib.subVPSDE(), 1.0),
                                       (sde_lib.VESDE(), 50.0)])
def test_prior_logp_against_scipy_and_prior_sampling(sde, scale):
  z = np.random.default_rng(0).normal(size=(5, 4, 4, 2)).astype(np.float32) * scale
  ref = stats.norm(0, scale).logpdf(z.astype(np.float64)).reshape(5, -1).sum(-1)
  np.testing.assert_allclose(sde.prior_logp(jnp.asarray(z)), ref, rtol=1e-5)
  s = sde.prior_sampling(jax.random.PRNGKey(0), (20000, 2))
  np.testing.assert_allclose(np.std(np.asarray(s)), scale, rtol=0.03)


@pytest.mark.parametrize("sde", [sde_lib.VPSDE(), sde_lib.subVPSDE(), sde_lib.VESDE()])
def test_log_snr_inverse_and_monotone(sde):
  t = jnp.linspace(1e-3, 1.0, 101)
  lam = sde.log_snr(t)
  assert np.all(np.diff(np.asarray(lam)) < 0), "log-SNR must decrease in t"
  np.testing.assert_allclose(sde.t_from_log_snr(lam), t, atol=2e-5)


@pytest.mark.parametrize("sde", [sde_lib.VPSDE(), sde_lib.subVPSDE(), sde_lib.VESDE()])
def test_reverse_sde_and_probability_flow(sde):
  x = jax.random.normal(jax.random.PRNGKey(2), (3, 2))
  t = jnp.asarray([0.1, 0.5, 0.9])
  score_fn = lambda x, t: -x * 2.0
  drift, g = sde.sde(x, t)
  rdrift, rg = sde.reverse(score_fn).sde(x, t)
  np.testing.assert_allclose(rdrift, drift - (g**2)[:, None] * (-2 * x), rtol=1e-5)
  np.testing.assert_allclose(rg, g)
  pdrift, pg = sde.reverse(score_fn, probability_flow=True).sde(x, t)
  np.testing.assert_allclose(pdrift, drift - 0.5 * (g**2)[:, None] * (-2 * x), rtol=1e-5)
  np.testing.assert_allclose(pg, 0.0)
  f, G = sde.discretize(x, t)
  rf, rG = sde.reverse(score_fn).discretize(x, t)
  np.testing.assert_allclose(rf, f - (G**2)[:, None] * (-2 * x), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(rG, G)


def test_bad_parameters_fail_early():
  with pytest.raises(ValueError, match="beta_min < beta_max"):
    sde_lib.VPSDE(beta_min=1.0, beta_max=0.5)
  with pytest.raises(ValueError, match="sigma_min < sigma_max"):
    sde_lib.VESDE(sigma_min=1.0, sigma_max=0.5)
  with pytest.raises(ValueError, match="N >= 1"):
    sde_lib.VPSDE(N=0)
  import ml_collections
  cfg = ml_collections.ConfigDict({"training": {"sde": "vpsdee"}, "model": {}})
  with pytest.raises(ValueError, match="vesde"):
    sde_lib.get_sde(cfg)


def test_vp_with_too_few_scales_keeps_the_sde_but_refuses_the_ddpm_chain():
  """N < beta_max makes beta_i > 1: continuous use works, the discrete chain raises a message."""
  import warnings
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    sde = sde_lib.VPSDE(N=6)
  x = jnp.ones((2, 3))
  mean, std = sde.marginal_prob(x, jnp.full((2,), 0.5))
  assert np.isfinite(np.asarray(mean)).all() and np.isfinite(np.asarray(std)).all()
  with pytest.raises(ValueError, match="num_scales to at least 20"):
    sde.discretize(x, jnp.full((2,), 0.5))
  sde_lib.VPSDE(N=20).check_ddpm_chain()  # beta_N = 1: alpha = 0, still a chain


def test_analytic_mixture_score_is_grad_of_log_prob():
  from score_sde.analytic import GaussianMixture
  rng = np.random.default_rng(0)
  a = rng.normal(size=(2, 3, 3))
  covs = a @ a.transpose(0, 2, 1) + 0.2 * np.eye(3)
  gm = GaussianMixture(rng.normal(size=(2, 3)), covs, weights=[0.3, 0.7])
  x = jnp.asarray(rng.normal(size=(6, 3)), jnp.float32)
  for sde in [sde_lib.VPSDE(), sde_lib.subVPSDE(), sde_lib.VESDE()]:
    t = jnp.linspace(0.05, 0.95, 6)
    auto = jax.vmap(jax.grad(lambda xi, ti: gm.log_prob(xi[None], ti[None], sde)[0]))(x, t)
    np.testing.assert_allclose(gm.score(x, t, sde), auto, rtol=1e-4, atol=1e-5)
  # Against scipy at t = 0.
  ref = np.log(0.3 * stats.multivariate_normal(gm.means_np[0], covs[0]).pdf(np.asarray(x))
               + 0.7 * stats.multivariate_normal(gm.means_np[1], covs[1]).pdf(np.asarray(x)))
  np.testing.assert_allclose(gm.log_prob(x), ref, rtol=1e-4)
