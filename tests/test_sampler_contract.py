"""The one sampler contract (score_sde.sampling.base), for every registered sampler, and a new SDE
written in this file that samples and gives likelihoods with nothing edited outside sde_lib."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from score_sde import analytic, likelihood, sde_lib
from score_sde.evaluation.metrics import energy_distance
from score_sde.sampling import available_samplers, get_sampler, get_sampler_from_config

# Options that make each sampler deterministic (a function of x_T only) and quick.
DETERMINISTIC = {
    "pc": dict(predictor="euler_maruyama", corrector="none", probability_flow=True,
               num_steps=50),
    "ode": dict(rtol=1e-3, atol=1e-3),
    "ddim": dict(nfe=10), "euler": dict(nfe=10), "heun": dict(nfe=10),
    "dpm_solver": dict(nfe=10), "dpm_solver_pp": dict(nfe=10), "unipc": dict(nfe=10),
    "consistency": dict(nfe=1),
}
STOCHASTIC = {"pc": dict(predictor="reverse_diffusion", corrector="langevin", num_steps=50),
              "ddim": dict(nfe=10, eta=1.0), "dpm_solver_pp": dict(nfe=10, eta=1.0),
              "heun": dict(nfe=10, S_churn=5.0), "consistency": dict(nfe=3)}


def test_every_registered_sampler_is_covered():
  assert set(DETERMINISTIC) == set(available_samplers())


@pytest.fixture(scope="module")
def problem():
  sde = sde_lib.VPSDE(N=50)
  mix = analytic.standard_mixture(dim=2)
  x_T = sde.prior_sampling(jax.random.PRNGKey(1), (16, 2))
  return sde, mix.score_fn(sde), x_T


@pytest.mark.parametrize("name", sorted(DETERMINISTIC))
def test_same_x_T_same_samples_bitwise_however_called(problem, name):
  sde, score_fn, x_T = problem
  sampler = get_sampler(name, sde, x_T.shape, **DETERMINISTIC[name])
  x1, nfe = sampler(jax.random.PRNGKey(0), score_fn, x_T)
  assert isinstance(nfe, jax.Array) and nfe.dtype == jnp.int32 and nfe.shape == () and nfe > 0
  x2, _ = sampler(jax.random.PRNGKey(123), score_fn, x_T)          # another key
  x3, _ = sampler(jax.random.PRNGKey(0), score_fn, np.asarray(x_T))  # numpy x_T
  x4, _ = sampler(jax.random.PRNGKey(0), score_fn, x_T=x_T)        # keyword
  for other in (x2, x3, x4):
    np.testing.assert_array_equal(np.asarray(x1), np.asarray(other))
  assert np.all(np.isfinite(np.asarray(x1)))


@pytest.mark.parametrize("name", sorted(STOCHASTIC))
def test_stochastic_samplers_take_x_T_and_use_the_key(problem, name):
  sde, score_fn, x_T = problem
  sampler = get_sampler(name, sde, x_T.shape, **STOCHASTIC[name])
  x1, nfe = sampler(jax.random.PRNGKey(0), score_fn, x_T)
  x1b, _ = sampler(jax.random.PRNGKey(0), score_fn, x_T)
  x2, _ = sampler(jax.random.PRNGKey(1), score_fn, x_T)
  assert nfe.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(x1), np.asarray(x1b))
  assert not np.array_equal(np.asarray(x1), np.asarray(x2))


def test_pc_without_x_T_draws_the_prior_from_the_key(problem):
  """x_T=None is the prior draw of the key's first split: passing that draw gives the same bits."""
  sde, score_fn, x_T = problem
  sampler = get_sampler("pc", sde, x_T.shape, **STOCHASTIC["pc"])
  key = jax.random.PRNGKey(4)
  drawn, _ = sampler(key, score_fn)
  _, prior_key = jax.random.split(key)
  given, _ = sampler(key, score_fn, sde.prior_sampling(prior_key, x_T.shape))
  np.testing.assert_array_equal(np.asarray(drawn), np.asarray(given))


def test_pc_num_steps_sets_the_grid_and_nfe(problem):
  sde, score_fn, x_T = problem
  _, nfe = get_sampler("pc", sde, x_T.shape, num_steps=7, denoise=False)(
      jax.random.PRNGKey(0), score_fn, x_T)
  assert int(nfe) == 7
  # num_steps = sde.N is the default, bitwise.
  a, _ = get_sampler("pc", sde, x_T.shape)(jax.random.PRNGKey(0), score_fn, x_T)
  b, _ = get_sampler("pc", sde, x_T.shape, num_steps=sde.N)(jax.random.PRNGKey(0), score_fn, x_T)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with pytest.raises(ValueError, match="num_steps"):
    get_sampler("pc", sde, x_T.shape, num_steps=0)


def test_config_and_direct_construction_agree_bitwise(problem):
  from configs.toy import vp as toy_vp
  sde, score_fn, x_T = problem
  cfg = toy_vp.get_config()
  cfg.sampling.method = "dpm_solver_pp"
  cfg.sampling.nfe = 10
  a, _ = get_sampler_from_config(cfg, sde, x_T.shape)(jax.random.PRNGKey(0), score_fn, x_T)
  b, _ = get_sampler("dpm_solver_pp", sde, x_T.shape, nfe=10)(jax.random.PRNGKey(0), score_fn, x_T)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("name", sorted(DETERMINISTIC))
def test_bad_x_T_and_wrong_score_shapes_fail_before_running(problem, name):
  sde, score_fn, x_T = problem
  sampler = get_sampler(name, sde, x_T.shape, **DETERMINISTIC[name])
  with pytest.raises(ValueError, match="x_T must have the sampler's shape"):
    sampler(jax.random.PRNGKey(0), score_fn, jnp.zeros((3, 2)))
  for bad in (lambda x, t: x[:, :1], lambda x, t: jnp.sum(x), lambda x, t: x[:1]):
    with pytest.raises(ValueError, match="shaped like x"):
      sampler(jax.random.PRNGKey(0), bad, x_T)


@pytest.mark.parametrize("eps", [0.0, -1e-3, 1.0, 2.0])
def test_one_eps_rule_for_every_sampler(problem, eps):
  sde, _, x_T = problem
  for name in sorted(DETERMINISTIC):
    with pytest.raises(ValueError, match=r"eps must lie in \(0, T"):
      get_sampler(name, sde, x_T.shape, eps=eps, **DETERMINISTIC[name])
  with pytest.raises(ValueError, match=r"eps must lie in \(0, T"):
    likelihood.get_likelihood_fn(sde, eps=eps)


# --- a new SDE, written here, with nothing edited outside sde_lib --------------------------------
class ConstantRateVP(sde_lib.SDE, name="test_constant_rate_vp"):
  """dx = -b/2 x dt + sqrt(b) dw: alpha = exp(-b t / 2), sigma^2 = 1 - exp(-b t), prior N(0, I)."""

  def __init__(self, b: float = 12.0, N: int = 200):
    super().__init__(N)
    self.b = float(b)

  def sde(self, x, t):
    return -0.5 * self.b * x, jnp.full(t.shape, np.sqrt(self.b), x.dtype)

  def marginal_coef(self, t):
    return jnp.exp(-0.5 * self.b * t), jnp.sqrt(-jnp.expm1(-self.b * t))

  def prior_sampling(self, key, shape):
    return jax.random.normal(key, shape)

  def prior_logp(self, z):
    d = np.prod(z.shape[1:])
    return -0.5 * d * np.log(2 * np.pi) - 0.5 * jnp.sum(z.reshape(z.shape[0], -1) ** 2, -1)

  def t_from_log_snr(self, log_snr):
    return jax.nn.softplus(-log_snr) / self.b  # exp(-b t) = sigmoid(lambda)


def test_new_sde_is_registered_and_built_from_config():
  from configs.toy import vp as toy_vp
  cfg = toy_vp.get_config()
  cfg.training.sde = "test_constant_rate_vp"
  sde = sde_lib.get_sde(cfg)
  assert isinstance(sde, ConstantRateVP) and sde.N == cfg.model.num_scales and sde.b == 12.0
  assert sde.replace(N=10).params() == {"b": 12.0, "N": 10}


@pytest.fixture(scope="module")
def new_sde_problem():
  sde = ConstantRateVP()
  mix = analytic.standard_mixture(dim=2)
  n = 1000
  data = np.asarray(mix.sample(jax.random.PRNGKey(11), n))
  floor = float(energy_distance(np.asarray(mix.sample(jax.random.PRNGKey(12), n)), data))
  return sde, mix, data, floor


SAMPLING = {"pc": dict(predictor="reverse_diffusion", corrector="langevin", snr=0.1),
            "ode": dict(rtol=1e-4, atol=1e-4), "ddim": dict(nfe=60), "euler": dict(nfe=40),
            "heun": dict(nfe=31), "dpm_solver": dict(nfe=20), "dpm_solver_pp": dict(nfe=20),
            "unipc": dict(nfe=20)}


@pytest.mark.parametrize("name", sorted(SAMPLING))
def test_new_sde_samples_with_every_sampler(new_sde_problem, name):
  sde, mix, data, floor = new_sde_problem
  sampler = get_sampler(name, sde, data.shape, **SAMPLING[name])
  x, nfe = sampler(jax.random.PRNGKey(5), mix.score_fn(sde))
  dist = float(energy_distance(np.asarray(x), data))
  assert dist < 4 * floor, (name, dist, floor, int(nfe))


def test_new_sde_likelihood_is_exact(new_sde_problem):
  sde, mix, data, _ = new_sde_problem
  x = jnp.asarray(data[:64])
  bpd, _, _ = likelihood.get_likelihood_fn(sde, hutchinson_type="exact", rtol=1e-6, atol=1e-6)(
      jax.random.PRNGKey(0), mix.score_fn(sde), x)
  exact = -np.asarray(mix.log_prob(x, jnp.full((64,), 1e-5), sde)) / (2 * np.log(2))
  np.testing.assert_allclose(np.asarray(bpd), exact, atol=2e-3)
