"""EDMSDE, RectifiedFlow and CosineVPSDE (score_sde.sde_lib): their equations against independent
closed forms, the forward SDE against the marginal, and, on the exact Gaussian-mixture score,
every registered sampler and the ODE likelihood."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from score_sde import analytic, likelihood, sde_lib
from score_sde.evaluation.metrics import energy_distance
from score_sde.parametrizations import get_parametrization
from score_sde.sampling import available_samplers, get_sampler

PROCESSES = {"edmsde": sde_lib.EDMSDE, "rectified_flow": sde_lib.RectifiedFlow,
             "cosine_vpsde": sde_lib.CosineVPSDE}


def _grid(sde, n=41):
  """Times from sampling_eps (1e-5 for the VP-like ones) to T, denser near both ends."""
  lo = sde.sampling_eps if isinstance(sde, sde_lib.EDMSDE) else 1e-5
  u = np.linspace(0.0, 1.0, n)
  t = np.concatenate([lo + (sde.T - lo) * u, np.geomspace(lo, sde.T, n),
                      sde.T - np.geomspace(1e-4, 1e-1, 8) * (sde.T - lo)])
  return np.unique(t.astype(np.float32)).astype(np.float64)  # distinct in float32 too


def _cosine_alpha_ref(t, s=0.008):
  """iDDPM: alpha(t)^2 = f(t) / f(0), f(t) = cos^2(((t + s) / (1 + s)) pi / 2) (numpy float64)."""
  f = lambda u: np.cos((u + s) / (1 + s) * np.pi / 2) ** 2
  return np.sqrt(f(np.asarray(t, np.float64)) / f(0.0))


# --- equations -------------------------------------------------------------------------------
def test_registered_with_the_documented_conventions():
  for name, cls in PROCESSES.items():
    assert sde_lib.SDES[name] is cls and cls.__name__ in sde_lib.__all__
  edm, rf, cos = sde_lib.EDMSDE(), sde_lib.RectifiedFlow(), sde_lib.CosineVPSDE()
  assert (edm.T, edm.sampling_eps, edm.default_parametrization) == (80.0, 0.002, "edm")
  assert (rf.T, rf.sampling_eps, rf.default_parametrization) == (0.999, 1e-3, "flow")
  assert (cos.T, cos.sampling_eps, cos.default_parametrization) == (0.9946, 1e-3, "eps")
  other = sde_lib.EDMSDE(sigma_min=0.01, sigma_max=12.0)   # T and eps are per instance
  assert (other.T, other.sampling_eps, edm.T) == (12.0, 0.01, 80.0)
  t = jnp.asarray([1e-3, 0.3, 0.9])
  np.testing.assert_allclose(edm.noise_label(t), t)
  np.testing.assert_allclose(rf.noise_label(t), 999 * np.asarray(t), rtol=1e-6)
  np.testing.assert_allclose(cos.noise_label(t), 999 * np.asarray(t), rtol=1e-6)
  for sde in (edm, rf, cos):
    assert sde.discrete_chain is None
    assert np.all(np.asarray(sde.noise_label(jnp.asarray(_grid(sde), jnp.float32))) > 0)


def test_marginals_match_independent_closed_forms():
  with jax.enable_x64(True):
    t = np.linspace(1e-4, 0.999, 57)
    a, s = sde_lib.RectifiedFlow().marginal_coef(t)
    np.testing.assert_allclose(a, 1 - t, rtol=1e-14)
    np.testing.assert_allclose(s, t, rtol=1e-14)
    te = np.geomspace(0.002, 80.0, 57)
    a, s = sde_lib.EDMSDE().marginal_coef(jnp.asarray(te))
    np.testing.assert_allclose(a, 1.0)
    np.testing.assert_allclose(s, te, rtol=1e-14)
    tc = np.linspace(1e-5, 0.9946, 57)
    a, s = sde_lib.CosineVPSDE().marginal_coef(jnp.asarray(tc))
    ref = _cosine_alpha_ref(tc)
    np.testing.assert_allclose(a, ref, rtol=1e-10)
    np.testing.assert_allclose(np.asarray(a) ** 2 + np.asarray(s) ** 2, 1.0, rtol=1e-13)
    # Away from t = 0, sigma = sqrt(1 - alpha^2) directly; near 0 its series 2 c tan(a0) t
    # (c = pi / (2 (1 + s)), a0 = s c), which 1 - alpha^2 loses to cancellation in float32.
    mid = tc > 0.05
    np.testing.assert_allclose(np.asarray(s)[mid], np.sqrt(1 - ref[mid] ** 2), rtol=1e-10)
    c = np.pi / (2 * 1.008)
    _, s_small = sde_lib.CosineVPSDE().marginal_coef(jnp.asarray([1e-7]))
    np.testing.assert_allclose(s_small[0] ** 2, 2 * c * np.tan(0.008 * c) * 1e-7, rtol=2e-5)
  # In float32 too (1 - alpha^2 ~ 4e-7 there would keep one or two digits).
  _, s32 = sde_lib.CosineVPSDE().marginal_coef(jnp.asarray([1e-5], jnp.float32))
  np.testing.assert_allclose(s32[0], np.sqrt(1 - _cosine_alpha_ref(1e-5) ** 2), rtol=1e-5)


@pytest.mark.parametrize("name", sorted(PROCESSES))
def test_forward_sde_is_consistent_with_the_marginal(name):
  """f = d log alpha / dt and g^2 = d sigma^2 / dt - 2 f sigma^2 (forward-mode derivative of
  marginal_coef, float64, on a t grid up to T); the closed-form marginal_rates equal it, and so
  do central finite differences of log alpha."""
  sde = PROCESSES[name]()
  h = 1e-6 * sde.T

  def quantities(t):
    (alpha, sigma), (da, ds) = jax.jvp(sde.marginal_coef, (t,), (jnp.ones_like(t),))
    drift, g = sde.sde(jnp.ones((t.shape[0], 3), t.dtype), t)
    (ap, _), (am, _) = sde.marginal_coef(t + h), sde.marginal_coef(t - h)
    return dict(alpha=alpha, sigma=sigma, da=da, ds=ds, drift=drift, g=g,
                rates=sde.marginal_rates(t), fd=(jnp.log(ap) - jnp.log(am)) / (2 * h))

  with jax.enable_x64(True):
    t = _grid(sde)
    q = jax.device_get(jax.jit(quantities)(jnp.asarray(t, jnp.float64)))
  f, g, alpha, sigma = q["drift"][:, 0], q["g"], q["alpha"], q["sigma"]
  np.testing.assert_array_equal(q["drift"], f[:, None] * np.ones((1, 3)))
  np.testing.assert_allclose(f, q["da"] / alpha, rtol=1e-10, atol=1e-12)
  np.testing.assert_allclose(g**2, 2 * sigma * q["ds"] - 2 * f * sigma**2, rtol=1e-9, atol=1e-12)
  assert np.all(g > 0) and np.all(np.isfinite(g))
  (a2, s2), (da2, ds2) = q["rates"]
  for mine, ref in ((a2, alpha), (s2, sigma), (da2, q["da"]), (ds2, q["ds"])):
    np.testing.assert_allclose(mine, ref, rtol=1e-10, atol=1e-12)
  inner = (t > 1e-3 * sde.T) & (t < 0.99 * sde.T)
  np.testing.assert_allclose(q["fd"][inner], f[inner], rtol=1e-5, atol=1e-8)


def test_cosine_beta_is_iddpms_and_its_end_time_is_dpm_solvers():
  sde = sde_lib.CosineVPSDE()
  with jax.enable_x64(True):
    t = np.linspace(1e-3, 0.9946, 23)
    h = 1e-6
    ref = -2 * (np.log(_cosine_alpha_ref(t + h)) - np.log(_cosine_alpha_ref(t - h))) / (2 * h)
    np.testing.assert_allclose(sde.beta(jnp.asarray(t)), ref, rtol=1e-6)
    np.testing.assert_allclose(sde.beta(jnp.asarray(t)),
                               np.pi / 1.008 * np.tan((t + 0.008) / 1.008 * np.pi / 2), rtol=1e-9)
    a_T, _ = sde.marginal_coef(jnp.asarray([0.9946]))
    assert 8e-3 < float(a_T[0]) < 9e-3 and float(sde.beta(jnp.asarray(0.9946))) < 400


@pytest.mark.parametrize("name", sorted(PROCESSES))
def test_log_snr_inverse_and_monotone(name):
  sde = PROCESSES[name]()
  t = jnp.asarray(_grid(sde), jnp.float32)
  lam = np.asarray(sde.log_snr(t))
  assert np.all(np.isfinite(lam)) and np.all(np.diff(lam) < 0), "log-SNR must decrease in t"
  np.testing.assert_allclose(sde.t_from_log_snr(lam), t, rtol=2e-5, atol=1e-7)
  with jax.enable_x64(True):
    t64 = _grid(sde)
    (a, s), lam64, back = jax.device_get(jax.jit(
        lambda t: (sde.marginal_coef(t), sde.log_snr(t), sde.t_from_log_snr(sde.log_snr(t))))(
            jnp.asarray(t64, jnp.float64)))
  np.testing.assert_allclose(lam64, 2 * (np.log(a) - np.log(s)), rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(back, t64, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("name,scale", [("edmsde", 80.0), ("rectified_flow", 1.0),
                                        ("cosine_vpsde", 1.0)])
def test_prior_logp_against_scipy_and_prior_sampling(name, scale):
  sde = PROCESSES[name]()
  z = np.random.default_rng(0).normal(size=(5, 4, 4, 2)).astype(np.float32) * scale
  ref = stats.norm(0, scale).logpdf(z.astype(np.float64)).reshape(5, -1).sum(-1)
  np.testing.assert_allclose(sde.prior_logp(jnp.asarray(z)), ref, rtol=1e-5)
  draw = np.asarray(sde.prior_sampling(jax.random.PRNGKey(0), (20000, 2)))
  np.testing.assert_allclose(np.std(draw), scale, rtol=0.03)


@pytest.mark.parametrize("name", sorted(PROCESSES))
def test_default_parametrization_reads_its_target_as_the_score(name):
  """The network output's target under the default parametrization (edm / flow / eps), read back
  with score_from_output (through marginal_rates where needed), is the score -n / sigma."""
  sde = PROCESSES[name]()
  k1, k2 = jax.random.split(jax.random.PRNGKey(0))
  t = jnp.asarray(np.linspace(sde.sampling_eps, sde.T, 9)[1:], jnp.float32)
  x0 = jax.random.normal(k1, (t.shape[0], 2))
  n = jax.random.normal(k2, x0.shape)
  p = get_parametrization(sde.default_parametrization)
  alpha, sigma, rates = sde.network_coef(t, rates=p.needs_rates)
  xt = alpha[:, None] * x0 + sigma[:, None] * n
  target, _ = p.target(x0, n, alpha, sigma, rates)
  score = sde.score_from_output(target, xt, t)
  np.testing.assert_allclose(score * sigma[:, None], -n, rtol=2e-3, atol=2e-3)


def test_rectified_flow_velocity_stays_finite_at_the_end():
  """f x - g^2 score / 2 = E[n - x_0 | x_t]: finite up to T although f and g diverge (exact
  mixture score; x_t ~ p_t)."""
  mix = analytic.standard_mixture(dim=2)
  for T in (0.999, 0.9999):
    sde = sde_lib.RectifiedFlow(T=T)
    x0 = mix.sample(jax.random.PRNGKey(0), 256)
    n = jax.random.normal(jax.random.PRNGKey(1), x0.shape)
    t = jnp.full((256,), T)
    xt = (1 - T) * x0 + T * n
    v = jax.jit(lambda x, t: sde.reverse(mix.score_fn(sde), probability_flow=True).sde(x, t)[0])(
        xt, t)
    f, g = sde.sde(xt, t)
    assert float(jnp.max(g)) > 40 and float(jnp.max(jnp.abs(f))) > 100
    # E[n - x_0 | x_t] = x_t / T - x0_hat / T with x0_hat = E[x_0 | x_t] (|x_0| <~ 3): bounded.
    assert float(jnp.max(jnp.abs(v))) < 10, float(jnp.max(jnp.abs(v)))


def test_rectified_flow_prior_mismatch_is_second_order_in_one_minus_T():
  """KL between N(0, I) and the true marginal p_T (both ways, on a grid, D = 2) is below the
  docstring's joint-convexity bounds and, per dimension, 1/2 (v - 1 - log v) (resp.
  1/2 (1/v - 1 + log v)) with v = T^2 + e^2 m2, e = 1 - T, the per-dimension variance of p_T for
  this zero-mean mixture: e^2 (1 + O(e))."""
  mix = analytic.standard_mixture(dim=2)
  m2 = (2.0**2 + 2 * 0.3**2) / 2                       # E|x_0|^2 / D
  u = np.linspace(-7, 7, 561)
  grid = jnp.asarray(np.stack(np.meshgrid(u, u), -1).reshape(-1, 2), jnp.float32)
  cell = (u[1] - u[0]) ** 2
  for T in (0.9, 0.95, 0.98):
    e = 1 - T
    sde = sde_lib.RectifiedFlow(T=T)
    log_p = np.asarray(mix.log_prob(grid, jnp.full((grid.shape[0],), T), sde), np.float64)
    log_q = np.asarray(sde.prior_logp(grid), np.float64)
    kl_pq = np.sum(np.exp(log_p) * (log_p - log_q)) * cell / 2
    kl_qp = np.sum(np.exp(log_q) * (log_q - log_p)) * cell / 2
    bound_pq = 0.5 * (T**2 - 1 - 2 * np.log(T)) + e**2 * m2 / 2
    bound_qp = 0.5 * (1 / T**2 - 1 + 2 * np.log(T)) + e**2 * m2 / (2 * T**2)
    assert 0 < kl_pq <= bound_pq and 0 < kl_qp <= bound_qp, (T, kl_pq, bound_pq, kl_qp, bound_qp)
    v = T**2 + e**2 * m2
    np.testing.assert_allclose(kl_pq, 0.5 * (v - 1 - np.log(v)), rtol=0.02)
    np.testing.assert_allclose(kl_qp, 0.5 * (1 / v - 1 + np.log(v)), rtol=0.02)
    assert 0.8 < kl_pq / e**2 <= 1.0 and 0.8 < kl_qp / e**2 <= 1.05


# --- construction --------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(PROCESSES))
def test_built_from_a_toy_config(name):
  from configs.toy import vp as toy_vp
  cfg = toy_vp.get_config()
  cfg.training.sde = name
  sde = sde_lib.get_sde(cfg)
  assert type(sde) is PROCESSES[name] and sde.N == cfg.model.num_scales
  if name == "edmsde":     # sigma_min / sigma_max are config.model fields of the toy config
    assert (sde.sigma_min, sde.sigma_max, sde.T) == (cfg.model.sigma_min, cfg.model.sigma_max,
                                                     cfg.model.sigma_max)
  else:
    assert sde.params() == PROCESSES[name]().replace(N=cfg.model.num_scales).params()
    cfg.model.T = 0.99     # an end time in config.model is read
    assert sde_lib.get_sde(cfg).T == 0.99
  cfg.training.sde = name.upper()
  assert type(sde_lib.get_sde(cfg)) is PROCESSES[name]


@pytest.mark.parametrize("cls,kwargs,arg", [
    (sde_lib.EDMSDE, dict(sigma_min=0.0), "sigma_min"),
    (sde_lib.EDMSDE, dict(sigma_min=1.0, sigma_max=0.5), "sigma_max"),
    (sde_lib.EDMSDE, dict(sigma_max=float("inf")), "sigma_max"),
    (sde_lib.EDMSDE, dict(sigma_min=float("nan")), "sigma_min"),
    (sde_lib.EDMSDE, dict(N=0), "N"),
    (sde_lib.RectifiedFlow, dict(T=1.0), "T"),
    (sde_lib.RectifiedFlow, dict(T=0.0), "T"),
    (sde_lib.RectifiedFlow, dict(T=float("nan")), "T"),
    (sde_lib.RectifiedFlow, dict(T="late"), "T"),
    (sde_lib.CosineVPSDE, dict(s=-0.1), "s"),
    (sde_lib.CosineVPSDE, dict(T=1.0), "T"),
    (sde_lib.CosineVPSDE, dict(T=-0.5), "T"),
    (sde_lib.CosineVPSDE, dict(s=float("inf")), "s"),
])
def test_bad_constructor_arguments_name_the_argument(cls, kwargs, arg):
  with pytest.raises(ValueError, match=rf"\b{arg}="):
    cls(**kwargs)


@pytest.mark.parametrize("name", sorted(PROCESSES))
def test_no_discrete_chain_refuses_discrete_use_clearly(name):
  sde = PROCESSES[name]()
  t = jnp.asarray([0.5 * sde.T])
  for call in (sde.check_discrete, lambda: sde.discrete_noise_label(t),
               lambda: sde.network_coef(t, continuous=False)):
    with pytest.raises(ValueError, match="continuous=True"):
      call()


# --- every sampler and the likelihood on the exact mixture score --------------------------------
N_SAMPLES, CHUNKS, NULL_DRAWS = 1000, 4, 64

# The last (highest-NFE) setting of each sampler in this file's runs. 'pc' runs N = 1000 steps;
# EDM's time is its noise level, so DDIM's default grid uniform in t is uniform in sigma (one step
# from sigma ~ 1.3 to 0.002 at 60 NFE): it takes the EDM schedule there. Rectified flow's
# sigma / alpha runs from 999 down to 1e-3 (EDM: 80 to 0.002), so the RK / singlestep solvers
# need a few more evaluations than on the other two: the NFE below are chosen for it.
SAMPLING = {"pc": dict(predictor="reverse_diffusion", corrector="langevin", snr=0.1),
            "ode": dict(rtol=1e-4, atol=1e-4), "ddim": dict(nfe=60), "euler": dict(nfe=80),
            "heun": dict(nfe=51), "dpm_solver": dict(nfe=30), "dpm_solver_pp": dict(nfe=20),
            "unipc": dict(nfe=20)}
OVERRIDES = {("edmsde", "ddim"): dict(schedule="edm")}


# The consistency sampler reads f(x, t) = (x + sigma^2 score) / alpha: given a score model it is
# Tweedie's E[x_0 | x_t], not a sampler of the data, so it is not run on the exact score here; its
# exactness with the exact consistency function of Gaussian data is tests/test_consistency.py's.
NOT_SCORE_SAMPLERS = {"consistency"}


def test_every_registered_sampler_is_covered():
  assert set(SAMPLING) | NOT_SCORE_SAMPLERS == set(available_samplers())


@pytest.fixture(scope="module")
def mixture_problem():
  """The d = 2 mixture, one data set of N_SAMPLES, and the noise floor: the mean energy distance
  of NULL_DRAWS independent true sample sets of the same size to that data set (one draw scatters
  by ~70% around it)."""
  mix = analytic.standard_mixture(dim=2)
  data = mix.sample(jax.random.PRNGKey(11), N_SAMPLES)
  ed = jax.jit(energy_distance)
  keys = jax.random.split(jax.random.PRNGKey(1000), NULL_DRAWS)
  null = jax.jit(lambda ks: jax.lax.map(lambda k: energy_distance(mix.sample(k, N_SAMPLES), data),
                                        ks))(keys)
  return mix, data, ed, float(np.mean(np.asarray(null)))


@pytest.fixture(scope="module")
def sdes():
  return {name: cls() for name, cls in PROCESSES.items()}


@pytest.mark.parametrize("sampler", sorted(SAMPLING))
@pytest.mark.parametrize("name", sorted(PROCESSES))
def test_every_sampler_converges_on_the_exact_score(mixture_problem, sdes, name, sampler):
  """CHUNKS x N_SAMPLES samples; the mean energy distance of the chunks to the data is at most
  twice the noise floor (so one unlucky chunk does not decide)."""
  mix, data, ed, floor = mixture_problem
  sde = sdes[name]
  options = {**SAMPLING[sampler], **OVERRIDES.get((name, sampler), {})}
  run = get_sampler(sampler, sde, (CHUNKS * N_SAMPLES, 2), **options)
  x, nfe = run(jax.random.PRNGKey(5), mix.score_fn(sde))
  assert np.all(np.isfinite(np.asarray(x)))
  dist = float(np.mean([ed(x[i * N_SAMPLES:(i + 1) * N_SAMPLES], data) for i in range(CHUNKS)]))
  print(f"{name} {sampler} nfe={int(nfe)} energy distance {dist:.5f} floor {floor:.5f} "
        f"ratio {dist / floor:.2f}")
  assert dist <= 2 * floor, (name, sampler, dist, floor, int(nfe))


def test_rectified_flow_pc_with_few_steps_recovers_from_its_stiff_end(mixture_problem):
  """N = 100 < T / (1 - T): the first Euler-Maruyama step overshoots (factor 1 - dt / (1 - T)
  = -8.99), yet the samples reach the noise floor (x_T carries almost no information on x_0)."""
  mix, data, ed, floor = mixture_problem
  sde = sde_lib.RectifiedFlow()
  run = get_sampler("pc", sde, (CHUNKS * N_SAMPLES, 2), predictor="euler_maruyama",
                    corrector="none", num_steps=100)
  x, _ = run(jax.random.PRNGKey(5), mix.score_fn(sde))
  dist = float(np.mean([ed(x[i * N_SAMPLES:(i + 1) * N_SAMPLES], data) for i in range(CHUNKS)]))
  assert dist <= 2 * floor, (dist, floor)


@pytest.mark.parametrize("name", sorted(PROCESSES))
def test_ode_likelihood_is_exact(mixture_problem, sdes, name):
  """bits/dim of 64 data points within 0.005 of the exact log p_eps; with the exact log p_T(z) in
  place of the prior's (the documented prior mismatch at T), within 1e-4."""
  mix, data, _, _ = mixture_problem
  sde = sdes[name]
  x = jnp.asarray(data[:64])
  bpd, z, _ = likelihood.get_likelihood_fn(sde, hutchinson_type="exact", rtol=1e-6, atol=1e-6)(
      jax.random.PRNGKey(0), mix.score_fn(sde), x)
  bits = 2 * np.log(2)
  exact = -np.asarray(mix.log_prob(x, jnp.full((64,), 1e-5), sde)) / bits
  prior_gap = np.asarray(sde.prior_logp(z) - mix.log_prob(z, jnp.full((64,), sde.T), sde)) / bits
  err = np.asarray(bpd) - exact
  print(f"{name} likelihood: max |error| {np.abs(err).max():.2e} bits/dim, mean {err.mean():.2e}; "
        f"without the prior mismatch {np.abs(err + prior_gap).max():.2e}")
  np.testing.assert_allclose(np.asarray(bpd), exact, atol=5e-3)
  np.testing.assert_allclose(np.asarray(bpd) + prior_gap, exact, atol=1e-4)
