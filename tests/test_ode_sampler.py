"""Probability-flow ODE sampler and encoder against an exact 2-D Gaussian mixture score.

NFE is checked against a host-side counter: the score function fires a ``jax.debug.callback``
once per batched evaluation (the callback takes no batched operand, so under the per-example
``vmap`` it runs once per evaluation of the whole batch).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from score_sde import sde_lib
from score_sde.analytic import standard_mixture
from score_sde.evaluation.metrics import energy_distance
from score_sde.sampling import get_sampler
from score_sde.sampling import ode

WEIGHTS = np.array([0.1, 0.2, 0.3, 0.4])
N_SAMPLES = 2000
SDES = {"vp": sde_lib.VPSDE, "subvp": sde_lib.subVPSDE, "ve": sde_lib.VESDE}


class CountingScore:
  """Exact mixture score that counts its batched evaluations on the host."""

  def __init__(self, gm, sde):
    self.calls = 0
    self._score = gm.score_fn(sde)

  def _tick(self):
    self.calls += 1

  def __call__(self, x, t):
    jax.debug.callback(self._tick)
    return self._score(x, t)


@pytest.fixture(scope="module")
def mixture():
  gm = standard_mixture(weights=WEIGHTS)
  reference = gm.sample(jax.random.key(1), N_SAMPLES)
  floor = np.mean([float(energy_distance(gm.sample(jax.random.key(100 + i), N_SAMPLES), reference))
                   for i in range(4)])
  return gm, reference, floor


_CACHE = {}


def shared(sde_name, gm):
  """One SDE, counting score and compiled sampler per SDE, shared by the tests below."""
  if sde_name not in _CACHE:
    sde = SDES[sde_name]()
    _CACHE[sde_name] = sde, CountingScore(gm, sde), get_sampler("ode", sde, (N_SAMPLES, 2))
  return _CACHE[sde_name]


@pytest.mark.parametrize("sde_name", list(SDES))
def test_ode_sampler_reproduces_mixture_with_honest_nfe(mixture, sde_name):
  gm, reference, floor = mixture
  sde, score, sampler = shared(sde_name, gm)
  calls = score.calls
  x, nfe = sampler(jax.random.key(3), score)
  x = jax.block_until_ready(x)
  assert int(nfe) == score.calls - calls > 0
  ratio = float(energy_distance(x, reference)) / floor
  counts = np.bincount(np.asarray(gm.posterior(x).argmax(-1)), minlength=4) / N_SAMPLES
  z = (counts - WEIGHTS) / np.sqrt(WEIGHTS * (1 - WEIGHTS) / N_SAMPLES)
  assert ratio <= 2.0, f"energy distance {ratio:.2f} x the true-vs-true floor"
  assert np.all(np.abs(z) <= 4.0), f"mode weights {counts} vs {WEIGHTS}"


@pytest.mark.parametrize("sde_name", ["vp", "ve"])
def test_decode_encode_roundtrip(mixture, sde_name):
  gm, x, _ = mixture
  sde, score, sampler = shared(sde_name, gm)
  calls = score.calls
  z, nfe_enc = ode.get_ode_encoder(sde, x.shape)(score, x)
  assert int(nfe_enc) == score.calls - calls > 0
  # The latents are prior draws: their mean log-density matches E[log N(0, sigma_T^2 I)].
  prior_z = sde.prior_sampling(jax.random.key(0), x.shape)
  assert abs(float(jnp.mean(sde.prior_logp(z)) - jnp.mean(sde.prior_logp(prior_z)))) < 0.1
  x_back, _ = sampler(jax.random.key(0), score, z)
  err = np.abs(np.asarray(x_back - x))
  # A few points sit between modes, where the decoder stretches space a lot (largest measured
  # errors 4e-3 VP, 0.1 VE); typical points come back to ~3e-5.
  per_point = err.max(axis=1)
  assert err.mean() < 5e-4 and np.quantile(per_point, 0.99) < 5e-3 and per_point.max() < 0.5, (
      f"decode(encode(x)) error: mean {err.mean()}, 99% {np.quantile(per_point, 0.99)}, "
      f"max {per_point.max()}")


@pytest.fixture(scope="module")
def latent_problem(mixture):
  gm = mixture[0]
  sde, score, sampler = shared("vp", gm)
  z = sde.prior_sampling(jax.random.key(5), (N_SAMPLES, 2))
  x_ref, _ = sampler(jax.random.key(0), score, z)
  return gm, sde, z, x_ref


@pytest.mark.parametrize("method,num_steps,tol", [("tsit5", None, 5e-4), ("heun", None, 5e-4),
                                                  ("euler", 50, 0.05), ("dopri5", 20, 1e-3)])
def test_other_methods_nfe_and_accuracy(latent_problem, method, num_steps, tol):
  gm, sde, z, x_ref = latent_problem
  score = CountingScore(gm, sde)
  denoise = method == "euler"  # one extra reverse-diffusion step at eps: one more evaluation
  x, nfe = ode.get_ode_sampler(sde, z.shape, method=method, num_steps=num_steps,
                               denoise=denoise)(jax.random.key(0), score, z)
  x = jax.block_until_ready(x)
  assert int(nfe) == score.calls
  if method == "euler":
    assert int(nfe) == num_steps + 1
  err = float(jnp.mean(jnp.abs(x - x_ref)))
  assert err < tol, f"{method}: mean error {err} against the default dopri5 solve"


def test_each_example_has_its_own_step_size():
  """Per-example step counts differ, and examples solved in another batch take the same steps as
  before and land on the same points: each example's solve does not depend on its batch."""
  gm = standard_mixture(weights=WEIGHTS)
  sde = sde_lib.VPSDE()
  field = ode.single_example_field(sde, gm.score_fn(sde))
  solve = jax.jit(lambda y: ode.solve_per_example(field, y, None, sde.T, 1e-3))
  z = sde.prior_sampling(jax.random.key(11), (64, 2))
  x, stats, nfe = solve(z)
  steps = np.asarray(stats["num_steps"])
  assert steps.max() > steps.min() + 2, f"per-example step counts {steps} barely differ"
  assert int(nfe) == int(ode.solver_nfe("dopri5", steps.max()))
  # The easiest and the hardest example together, in reverse order, in a batch of 2.
  pick = np.array([steps.argmax(), steps.argmin()])
  x_pair, stats_pair, nfe_pair = solve(z[pick])
  np.testing.assert_array_equal(np.asarray(stats_pair["num_steps"]), steps[pick])
  np.testing.assert_allclose(x_pair, x[pick], rtol=1e-5, atol=1e-6)
  assert int(nfe_pair) == int(nfe)  # the batch costs what its slowest example costs


def test_bad_options_fail_early():
  sde = sde_lib.VPSDE()
  with pytest.raises(ValueError, match="dopri5"):
    ode.get_ode_sampler(sde, (4, 2), method="rk45")
  with pytest.raises(ValueError, match="num_steps"):
    ode.get_ode_sampler(sde, (4, 2), method="euler")
  with pytest.raises(ValueError, match="rtol"):
    ode.get_ode_encoder(sde, (4, 2), rtol=0.0)
  gm = standard_mixture()
  sampler = get_sampler("ode", sde, (4, 2))
  with pytest.raises(ValueError, match="x_T must have"):
    sampler(jax.random.key(0), gm.score_fn(sde), jnp.zeros((3, 2)))
  with pytest.raises(ValueError, match="shaped like x"):
    sampler(jax.random.key(0), lambda x, t: x[:, :1])
  with pytest.raises(ValueError, match="x must have shape"):
    ode.get_ode_encoder(sde, (4, 2))(gm.score_fn(sde), jnp.zeros((4, 3)))
