"""Fast samplers (score_sde/sampling/fast.py) against exact Gaussian-mixture scores."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from score_sde import analytic, sde_lib
from score_sde.evaluation import metrics
from score_sde.sampling import available_samplers, get_sampler
from score_sde.sampling.schedules import get_time_steps, kernel_np, start_scale

SDES = {"vp": sde_lib.VPSDE(), "subvp": sde_lib.subVPSDE(), "ve": sde_lib.VESDE()}
N_SAMPLES = 2000


@pytest.fixture(scope="module")
def mixture():
  gm = analytic.standard_mixture(2)
  ref = gm.sample(jax.random.PRNGKey(1), N_SAMPLES)
  floor = np.mean([float(metrics.energy_distance(gm.sample(k, N_SAMPLES), ref))
                   for k in jax.random.split(jax.random.PRNGKey(2), 3)])
  return gm, ref, floor


# Every registered fast sampler under every SDE, with the variants spread over the SDEs.
MIXTURE_CASES = {
    "vp": [("ddim", {}), ("euler", {}), ("heun", dict(S_churn=5.0)),
           ("dpm_solver", dict(order=3)), ("dpm_solver_pp", dict(order=2, eta=1.0)),
           ("unipc", dict(order=3, denoise=True))],
    "subvp": [("ddim", dict(eta=1.0)), ("euler", dict(S_churn=5.0)), ("heun", {}),
              ("dpm_solver", dict(order=2, method="multistep")),
              ("dpm_solver_pp", dict(order=3, method="singlestep")),
              ("unipc", dict(order=2, variant="bh1"))],
    "ve": [("ddim", dict(eta=0.5)), ("euler", {}), ("heun", dict(denoise=True)),
           ("dpm_solver", dict(order=3, method="multistep", schedule="edm")),
           ("dpm_solver_pp", dict(order=3)), ("unipc", dict(order=2, schedule="time_uniform"))],
}


def test_registry_has_fast_samplers():
  assert {"ddim", "euler", "heun", "dpm_solver", "dpm_solver_pp", "unipc"} <= set(
      available_samplers())


@pytest.mark.parametrize("sde_name", sorted(SDES))
def test_samplers_reproduce_2d_mixture(mixture, sde_name):
  gm, ref, floor = mixture
  sde = SDES[sde_name]
  score_fn = gm.score_fn(sde)
  for name, options in MIXTURE_CASES[sde_name]:
    sampler = get_sampler(name, sde, (N_SAMPLES, 2), nfe=50, **options)
    x, nfe = sampler(jax.random.PRNGKey(0), score_fn)
    assert nfe == 50
    dist = float(metrics.energy_distance(x, ref))
    assert dist < 3 * floor, (sde_name, name, options, dist, floor)


def _gaussian_case(sde, t_start=None, scale=1.0):
  """Exact PF-ODE map of N(mu, diag(var)) from t_start (default T) to eps, started at
  x_s = scale x_T: x_eps = alpha_e mu + s_e / s_s (x_s - alpha_s mu)."""
  mu, var = np.array([0.7, -0.7]), np.array([0.25, 0.09])
  gm = analytic.GaussianMixture(mu[None], var[None])
  x_T = sde.prior_sampling(jax.random.PRNGKey(3), (32, 2))
  t_start = sde.T if t_start is None else t_start
  a, s, _ = kernel_np(sde, np.array([t_start, sde.sampling_eps]))
  std = np.sqrt(a[:, None] ** 2 * var + s[:, None] ** 2)
  x_s = scale * np.asarray(x_T, np.float64)
  exact = a[1] * mu + std[1] / std[0] * (x_s - a[0] * mu)
  return gm.score_fn(sde), x_T, exact


# (name, options, steps, expected order): the error vs the exact solution must fall by about
# 2^order per doubling. Multistep methods warm up with a first-order step, which caps their
# global order at 2, so the 3rd-order check uses the singlestep DPM-Solver-3.
ORDER_CASES = [
    ("euler", {}, (16, 32, 64), 1),
    ("ddim", {}, (16, 32, 64), 1),
    ("heun", {}, (16, 32, 64), 2),
    ("dpm_solver", dict(order=2), (16, 32, 64), 2),
    ("dpm_solver_pp", dict(order=2), (16, 32, 64), 2),
    ("dpm_solver", dict(order=3), (8, 16, 32), 3),
    ("unipc", dict(order=2, variant="bh1"), (16, 32, 64), 3),  # UniC raises UniP-2 to order 3
]


@pytest.mark.parametrize("name,options,steps,order", ORDER_CASES,
                         ids=[f"{c[0]}-{c[3]}" for c in ORDER_CASES])
def test_convergence_order(name, options, steps, order):
  sde = SDES["vp"]
  score_fn, x_T, exact = _gaussian_case(sde)
  errs = []
  for m in steps:
    sampler = get_sampler(name, sde, x_T.shape, steps=m, **options)
    x, _ = sampler(jax.random.PRNGKey(0), score_fn, x_T)
    errs.append(np.max(np.abs(np.asarray(x, np.float64) - exact)))
  rates = np.log2(np.array(errs[:-1]) / np.array(errs[1:]))
  assert np.all(rates > order - 0.35), (errs, rates)
  assert np.all(rates < order + 1.5), (errs, rates)


def test_ddim_eta0_equals_dpm_solver_1_and_euler():
  """DDIM (eta = 0) = DPM-Solver-1 = DPM-Solver++1 = EDM Euler on the same time steps."""
  sde = SDES["vp"]
  score_fn, x_T, _ = _gaussian_case(sde)
  key = jax.random.PRNGKey(0)
  out = [get_sampler(n, sde, x_T.shape, nfe=12, schedule="logSNR", **o)(key, score_fn, x_T)[0]
         for n, o in [("ddim", {}), ("dpm_solver", dict(order=1)),
                      ("dpm_solver_pp", dict(order=1)), ("euler", {})]]
  for x in out[1:]:
    np.testing.assert_allclose(np.asarray(x), np.asarray(out[0]), rtol=1e-4, atol=1e-4)


def test_heun_churn():
  """Without churn the output depends only on x_T; with churn it also depends on the key."""
  sde = SDES["ve"]
  score_fn, x_T, _ = _gaussian_case(sde)
  k1, k2 = jax.random.PRNGKey(0), jax.random.PRNGKey(1)
  det = get_sampler("heun", sde, x_T.shape, nfe=10)
  np.testing.assert_array_equal(np.asarray(det(k1, score_fn, x_T)[0]),
                                np.asarray(det(k2, score_fn, x_T)[0]))
  sto = get_sampler("heun", sde, x_T.shape, nfe=10, S_churn=10.0)
  assert np.max(np.abs(np.asarray(sto(k1, score_fn, x_T)[0] - sto(k2, score_fn, x_T)[0]))) > 1e-3


NFE_CASES = [
    ("heun", dict(nfe=9, denoise=True)),                      # 4 Heun steps + 1 denoise
    ("heun", dict(nfe=7)),                                    # 3 Heun + 1 final Euler
    ("heun", dict(steps=3)),                                  # 6
    ("dpm_solver", dict(nfe=10, order=3)),                    # 3 + 3 + 3 + 1
    ("dpm_solver", dict(nfe=9, order=3)),                     # 3 + 3 + 2 + 1
    ("dpm_solver_pp", dict(steps=4, order=2, method="singlestep")),  # 8
    ("unipc", dict(nfe=6, order=3)),                          # corrector is free
    ("ddim", dict(nfe=5, eta=1.0, denoise=True)),
]


def test_nfe_is_counted_honestly():
  sde = SDES["vp"]
  gm = analytic.standard_mixture(2)
  calls = []
  base = gm.score_fn(sde)

  def counting_score_fn(x, t):
    jax.debug.callback(lambda: calls.append(1))
    return base(x, t)

  expected = {0: 9, 1: 7, 2: 6, 3: 10, 4: 9, 5: 8, 6: 6, 7: 5}
  for i, (name, options) in enumerate(NFE_CASES):
    calls.clear()
    x, nfe = get_sampler(name, sde, (8, 2), **options)(jax.random.PRNGKey(0), counting_score_fn)
    jax.block_until_ready(x)
    jax.effects_barrier()
    assert nfe == len(calls) == expected[i], (name, options, nfe, len(calls))


def test_schedules():
  sde = SDES["subvp"]
  for schedule in ("time_uniform", "logSNR", "edm"):
    for t_start in (None, 0.6):
      ts = get_time_steps(sde, 10, schedule, t_start=t_start)
      assert ts.shape == (11,) and ts[-1] == sde.sampling_eps
      assert ts[0] == (sde.T if t_start is None else t_start)
      assert np.all(np.diff(ts) < 0)
  _, _, lam = kernel_np(sde, get_time_steps(sde, 10, "logSNR"))
  np.testing.assert_allclose(np.diff(lam), np.diff(lam)[0], rtol=1e-6)
  _, _, lam = kernel_np(sde, get_time_steps(sde, 10, "edm", rho=5.0))
  root = np.exp(-lam) ** (1 / 5.0)  # sigma_edm^(1/rho) is linear in the step index
  np.testing.assert_allclose(np.diff(root), np.diff(root)[0], rtol=1e-6)


@pytest.mark.parametrize("name,options,match", [
    ("nope", {}, "Unknown sampler"),
    ("ddim", dict(schedule="cosine"), "Unknown schedule"),
    ("ddim", dict(rho=7.0), "rho only applies"),
    ("heun", dict(eta=0.5), "no option"),
    ("unipc", dict(S_churn=1.0), "no option"),
    ("ddim", dict(nfe=10, steps=10), "not both"),
    ("dpm_solver", dict(nfe=2, order=3), "order 3 needs at least 3"),
    ("dpm_solver_pp", dict(nfe=2, order=3, method="multistep"), "order 3 needs at least 3"),
    ("unipc", dict(nfe=3, order=3, denoise=True), "order 3 needs at least 3"),
    ("heun", dict(nfe=1), "too small"),
    ("ddim", dict(nfe=1, denoise=True), "too small"),
    ("dpm_solver", dict(order=4), "order must be"),
    ("dpm_solver_pp", dict(eta=1.0, method="singlestep"), "multistep only"),
    ("dpm_solver", dict(method="adaptive"), "singlestep' or 'multistep"),
    ("unipc", dict(variant="bh3"), "bh1' or 'bh2"),
    ("ddim", dict(eta=-1.0), "eta must be"),
    ("euler", dict(S_churn=-1.0), "S_churn >= 0"),
    ("ddim", dict(eps=0.0), "eps must lie"),
    ("dpm_solver_pp", dict(t_start=1.5), "t_start must lie"),
    ("unipc", dict(t_start=1e-4), "t_start must lie"),
])
def test_bad_input_fails_before_compiling(name, options, match):
  with pytest.raises(ValueError, match=match):
    get_sampler(name, SDES["vp"], (4, 2), **options)


@pytest.mark.parametrize("name", ["pc", "ode", "dpm_solver_pp"])
def test_unknown_option_names_the_valid_ones(name):
  """Every registered family (PC, ODE, fast) rejects an option it does not take, e.g. t_start
  given to the PC sampler, with a ValueError that lists its options."""
  with pytest.raises(ValueError, match=rf"Sampler '{name}' has no option\(s\) \['bogus'\]; "
                                        r"its options are \[.*'eps'"):
    get_sampler(name, SDES["vp"], (4, 2), bogus=1)
  if name != "dpm_solver_pp":
    with pytest.raises(ValueError, match="t_start"):
      get_sampler(name, SDES["vp"], (4, 2), t_start=0.9)


def test_bad_shapes():
  with pytest.raises(ValueError, match="shape"):
    get_sampler("ddim", SDES["vp"], (4,))
  sampler = get_sampler("ddim", SDES["vp"], (4, 2), nfe=3)
  with pytest.raises(ValueError, match="x_T must have"):
    sampler(jax.random.PRNGKey(0), lambda x, t: -x, jnp.zeros((3, 2)))


@pytest.mark.parametrize("sde,overrides,match", [
    ("vpsde", {"sampling.method": "dpm_solver_pp", "sampling.nfe": 2,
               "sampling.options": {"order": 3}}, "order 3 needs at least 3"),
    ("vesde", {"sampling.method": "unipc", "sampling.options": {"schedule": "cosine"}},
     "Unknown schedule"),
    ("subvpsde", {"sampling.method": "heun", "sampling.nfe": 1}, "too small"),
    ("vpsde", {"sampling.method": "ddim", "sampling.options": {"order": 2}}, "no option"),
    ("vesde", {"sampling.method": "dpm_solver_pp", "sampling.options": {"t_start": 2.0}},
     "t_start must lie"),
])
def test_bad_sampler_config_fails_at_validation(sde, overrides, match):
  """validate_config builds the configured sampler (host-side only), so the CLI, the training
  loop's snapshot sampling and the eval loop all reject bad sampler options at start-up."""
  from conftest import tiny_toy_config
  from score_sde.config_validation import validate_config
  cfg = tiny_toy_config(sde, **overrides)
  with pytest.raises(ValueError, match=match) as info:
    validate_config(cfg, num_devices=1)
  assert "config.sampling" in str(info.value)


@pytest.mark.parametrize("method", ["ddim", "euler", "heun", "dpm_solver", "dpm_solver_pp",
                                    "unipc"])
def test_fast_sampler_configs_validate_on_every_sde(method):
  """No fast sampler is VP- or VE-only: each one builds from config.sampling on every SDE."""
  from conftest import tiny_toy_config
  from score_sde.config_validation import validate_config
  from score_sde.sampling import get_sampler_from_config
  for sde in ("vpsde", "subvpsde", "vesde"):
    cfg = tiny_toy_config(sde, **{"sampling.method": method, "sampling.nfe": 10})
    validate_config(cfg, num_devices=1)
    sampler = get_sampler_from_config(cfg, sde_lib.get_sde(cfg), (4, 2))
    assert sampler.nfe == 10


def test_lower_order_final_counts_the_denoising_step():
  """Under 15 steps the last step is 1st order and the one before 2nd; with denoise the denoising
  step is that last 1st-order step (as DPM-Solver++'s final step to sigma = 0)."""
  from score_sde.sampling.fast import _ms_order
  assert [_ms_order(3, i, 9, True) for i in range(9)] == [1, 2, 3, 3, 3, 3, 3, 2, 1]
  assert [_ms_order(3, i, 9, True, denoise=True) for i in range(9)] == [1, 2, 3, 3, 3, 3, 3, 3, 2]
  assert [_ms_order(3, i, 20, True) for i in range(20)][-2:] == [3, 3]
  assert [_ms_order(2, i, 5, False) for i in range(5)] == [1, 2, 2, 2, 2]


@pytest.mark.parametrize("sde_name", sorted(SDES))
def test_start_time_follows_the_exact_flow_from_t_start(sde_name):
  """With t_start < T the deterministic samplers solve the PF-ODE from t_start, starting at the
  prior draw scaled by start_scale (1 on the VP SDE, about sigma(t) / sigma_max on the VE SDE)."""
  sde = SDES[sde_name]
  t_start = 0.4
  k = start_scale(sde, t_start)
  a, s, _ = kernel_np(sde, np.array([t_start, sde.T]))
  prior_std = float(np.std(np.asarray(sde.prior_sampling(jax.random.PRNGKey(0), (20000,)))))
  # k x_T has the marginal scale of unit-variance data at t_start (to the prior's own accuracy).
  np.testing.assert_allclose(k * prior_std, np.sqrt(a[0] ** 2 + s[0] ** 2), rtol=0.02)
  assert start_scale(sde, sde.T) == 1.0
  score_fn, x_T, exact = _gaussian_case(sde, t_start, k)
  _, x_T_full, exact_full = _gaussian_case(sde)
  for name, options in [("heun", dict(steps=40)), ("dpm_solver_pp", dict(steps=40, order=2)),
                        ("unipc", dict(steps=40, order=3, schedule="edm"))]:
    sampler = get_sampler(name, sde, x_T.shape, t_start=t_start, **options)
    x, _ = sampler(jax.random.PRNGKey(0), score_fn, x_T)
    err = np.max(np.abs(np.asarray(x, np.float64) - exact)) / np.max(np.abs(exact))
    assert err < 2e-3, (name, err)
    # ... and not the flow from T (which differs visibly at t_start = 0.4)
    assert np.max(np.abs(exact - exact_full)) > 50 * err * np.max(np.abs(exact))


def test_start_time_on_unit_variance_data_samples_the_data():
  """For N(0, I) data the VP marginals are all N(0, I): started at any t_start, the PF-ODE map
  is the identity and the samples are x_T itself."""
  sde = SDES["vp"]
  gm = analytic.GaussianMixture(np.zeros((1, 2)), np.ones((1, 2)))
  x_T = sde.prior_sampling(jax.random.PRNGKey(3), (64, 2))
  for t_start in (0.9, 0.5):
    sampler = get_sampler("dpm_solver_pp", sde, x_T.shape, nfe=100, t_start=t_start)
    x, nfe = sampler(jax.random.PRNGKey(0), gm.score_fn(sde), x_T)
    assert nfe == 100
    np.testing.assert_allclose(np.asarray(x), np.asarray(x_T), rtol=2e-3, atol=2e-3)
