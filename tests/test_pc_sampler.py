"""PC sampler: every predictor / corrector pair reproduces an exact 2-D Gaussian mixture.

The score is the closed-form score of the perturbed mixture (score_sde.analytic), so any gap
between samples and the mixture is the sampler's own error. Quality is judged against the noise
floor of the energy distance between independent true sample sets of the same size, and the mode
weights (unequal on purpose) by posterior-argmax counts within a few binomial standard errors.
"""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from score_sde import sde_lib
from score_sde.analytic import standard_mixture
from score_sde.evaluation.metrics import energy_distance
from score_sde.sampling import get_sampler
from score_sde.sampling import pc

WEIGHTS = np.array([0.1, 0.2, 0.3, 0.4])
N_SAMPLES = 2000
N_STEPS = 500
SDES = {"vp": lambda: sde_lib.VPSDE(N=N_STEPS), "subvp": lambda: sde_lib.subVPSDE(N=N_STEPS),
        "ve": lambda: sde_lib.VESDE(N=N_STEPS)}
PREDICTORS = ["euler_maruyama", "reverse_diffusion", "ancestral_sampling", "none"]
CORRECTORS = ["none", "langevin", "ald"]
# Annealed Langevin alone under sub-VP is biased by construction, not by implementation: its step
# (snr sigma(t))^2 freezes the chain once sigma(t) is well below the data scale, and sub-VP's
# sigma(t) = 1 - alpha(t)^2 gets there while alpha(t) is still ~0.9, so the samples stay shrunk.
# (The reference never ran it: its sub-VP SDE has no `alphas`.) With a predictor it is fine.
COMBOS = [(s, p, c) for s, p, c in itertools.product(SDES, PREDICTORS, CORRECTORS)
          if (p, c) != ("none", "none") and (s, p, c) != ("subvp", "none", "ald")]

ED_FACTOR = 3.0      # samples vs truth, in units of the true-vs-true floor
WEIGHT_Z = 4.0       # allowed |count - weight| in binomial standard errors


@pytest.fixture(scope="module")
def mixture():
  gm = standard_mixture(weights=WEIGHTS)
  reference = gm.sample(jax.random.key(1), N_SAMPLES)
  floor = np.mean([float(energy_distance(gm.sample(jax.random.key(100 + i), N_SAMPLES), reference))
                   for i in range(4)])
  return gm, reference, floor


def assert_reproduces(gm, reference, floor, x, factor=ED_FACTOR):
  assert np.all(np.isfinite(np.asarray(x)))
  ratio = float(energy_distance(x, reference)) / floor
  counts = np.bincount(np.asarray(gm.posterior(x).argmax(-1)), minlength=len(WEIGHTS)) / len(x)
  z = (counts - WEIGHTS) / np.sqrt(WEIGHTS * (1 - WEIGHTS) / len(x))
  assert ratio <= factor, f"energy distance {ratio:.2f} x the true-vs-true floor"
  assert np.all(np.abs(z) <= WEIGHT_Z), f"mode weights {counts} vs {WEIGHTS} (z = {z})"
  return ratio


@pytest.mark.parametrize("sde_name,predictor,corrector", COMBOS)
def test_pc_reproduces_mixture(mixture, sde_name, predictor, corrector):
  gm, reference, floor = mixture
  sde = SDES[sde_name]()
  # Corrector-only sampling needs a bit more MCMC per noise level than PC sampling.
  n_steps, snr = (2, 0.3) if predictor == "none" else (1, 0.16)
  sampler = get_sampler("pc", sde, (N_SAMPLES, 2), predictor=predictor, corrector=corrector,
                        n_steps=n_steps, snr=snr)
  x, nfe = sampler(jax.random.key(7), gm.score_fn(sde))
  assert x.shape == (N_SAMPLES, 2)
  expected_nfe = N_STEPS * ((predictor != "none") + n_steps * (corrector != "none"))
  assert int(nfe) == expected_nfe
  assert_reproduces(gm, reference, floor, x)


def test_probability_flow_predictor_reproduces_mixture(mixture):
  gm, reference, floor = mixture
  sde = SDES["vp"]()
  sampler = pc.get_pc_sampler(sde, (N_SAMPLES, 2), "reverse_diffusion", "none",
                              probability_flow=True)
  x, nfe = sampler(jax.random.key(8), gm.score_fn(sde))
  assert int(nfe) == N_STEPS
  assert_reproduces(gm, reference, floor, x)


def test_nfe_counts_score_calls_of_a_registered_predictor():
  """A new predictor is one function; the NFE is what it actually calls, not a declared number."""
  @pc.register_predictor("test_stochastic_heun")
  def stochastic_heun(key, x, t, *, sde, score_fn, probability_flow=False):
    """Improved Euler on the reverse SDE: two score evaluations per step."""
    dt = -sde.T / sde.N
    rsde = sde.reverse(score_fn, probability_flow)
    d1, g = rsde.sde(x, t)
    noise = (g * jnp.sqrt(-dt))[:, None] * jax.random.normal(key, x.shape)
    d2, _ = rsde.sde(x + d1 * dt + noise, t + dt)
    x_mean = x + 0.5 * (d1 + d2) * dt
    return x_mean + noise, x_mean

  gm = standard_mixture()
  sde = sde_lib.VPSDE(N=25)
  x, nfe = pc.get_pc_sampler(sde, (4, 2), "test_stochastic_heun", "langevin", n_steps=3)(
      jax.random.key(0), gm.score_fn(sde))
  assert int(nfe) == 25 * (2 + 3)
  _, nfe = pc.get_pc_sampler(sde, (4, 2), "euler_maruyama", "none", denoise=False)(
      jax.random.key(0), gm.score_fn(sde))
  assert int(nfe) == 25  # the reference would have reported N (n_steps + 1) = 50


def test_partial_score_fn_reuses_the_compiled_program():
  """A jax.tree_util.Partial score_fn passes its bound arrays (e.g. parameters) as traced inputs:
  new values run the same compiled program instead of retracing."""
  gm = standard_mixture()
  sde = sde_lib.VPSDE(N=25)
  traces = [0]

  def scaled_score(scale, x, t):
    traces[0] += 1
    return scale * gm.score(x, t, sde)

  sampler = pc.get_pc_sampler(sde, (4, 2), "euler_maruyama", "none")
  x1, _ = sampler(jax.random.key(0), jax.tree_util.Partial(scaled_score, jnp.float32(1.0)))
  n_traces = traces[0]
  x2, _ = sampler(jax.random.key(0), jax.tree_util.Partial(scaled_score, jnp.float32(0.0)))
  assert traces[0] == n_traces > 0
  assert not np.allclose(x1, x2)


@pytest.mark.parametrize("sde_name", ["vp", "ve"])
def test_ancestral_step_matches_paper_rules(sde_name):
  """At a grid time the generic ancestral step equals DDPM / SMLD ancestral sampling."""
  sde = SDES[sde_name]()
  N, i = sde.N, 123
  t = jnp.full((3,), i / (N - 1) + 1e-6)
  x = jax.random.normal(jax.random.key(0), (3, 2))
  score = lambda y, s: -y / 0.7
  key = jax.random.key(1)
  x_new, x_mean = pc.ancestral_sampling(key, x, t, sde=sde, score_fn=score)
  noise = jax.random.normal(key, x.shape)
  if sde_name == "vp":
    beta, abar = sde.discrete_betas[i], sde.alphas_cumprod
    mean = (x + beta * score(x, t)) / np.sqrt(1 - beta)
    std = np.sqrt(beta * (1 - abar[i - 1]) / (1 - abar[i]))  # Ho et al.'s beta_tilde
    tol = 2e-3  # continuous vs discrete marginal std inside the variance
  else:
    sig, adj = sde.discrete_sigmas[i], sde.discrete_sigmas[i - 1]
    mean = x + (sig**2 - adj**2) * score(x, t)
    std = np.sqrt(adj**2 * (sig**2 - adj**2) / sig**2)  # paper eq. 47
    tol = 1e-4
  np.testing.assert_allclose(x_mean, mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose((x_new - x_mean) / noise, std, rtol=tol)


def test_langevin_step_size_rule():
  sde = SDES["vp"]()
  i = 200
  t = jnp.full((4,), i / (sde.N - 1) + 1e-6)
  x = jax.random.normal(jax.random.key(0), (4, 3))
  score = lambda y, s: -2.0 * y
  key = jax.random.key(1)
  _, x_mean = pc.langevin(key, x, t, sde=sde, score_fn=score, snr=0.2)
  z = jax.random.normal(key, x.shape)
  norm = lambda v: jnp.mean(jnp.linalg.norm(v, axis=-1))
  step = 2 * sde.alphas[i] * (0.2 * norm(z) / norm(score(x, t))) ** 2
  np.testing.assert_allclose(x_mean, x + step * score(x, t), rtol=1e-5)
  _, x_mean = pc.annealed_langevin(key, x, t, sde=sde, score_fn=score, snr=0.2)
  step = 2 * sde.alphas[i] * (0.2 * sde.marginal_coef(t)[1][:, None]) ** 2
  np.testing.assert_allclose(x_mean, x + step * score(x, t), rtol=1e-5)


def test_bad_options_fail_early():
  sde = sde_lib.VPSDE(N=25)
  with pytest.raises(ValueError, match="euler_maruyama"):
    pc.get_pc_sampler(sde, (4, 2), predictor="euler")
  with pytest.raises(ValueError, match="langevin"):
    pc.get_pc_sampler(sde, (4, 2), corrector="langevine")
  with pytest.raises(ValueError, match="would not sample"):
    pc.get_pc_sampler(sde, (4, 2), predictor="none", corrector="none")
  with pytest.raises(ValueError, match="probability-flow"):
    pc.get_pc_sampler(sde, (4, 2), predictor="ancestral_sampling", probability_flow=True)
  with pytest.raises(ValueError, match="n_steps"):
    pc.get_pc_sampler(sde, (4, 2), corrector="langevin", n_steps=0)
  with pytest.raises(ValueError, match="shape"):
    pc.get_pc_sampler(sde, (4,))
  sampler = get_sampler("pc", sde, (4, 2))
  with pytest.raises(ValueError, match=r"shaped like x \(4, 2\)"):
    sampler(jax.random.key(0), lambda x, t: x[:, :1])
