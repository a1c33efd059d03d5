"""PF-ODE likelihood against the exact log-density of a Gaussian mixture, and the bits/dim helpers.

For the exact mixture score the probability-flow map x -> z is exact, so the instantaneous
change of variables gives log p_eps(x) = log p_T(z) + int div. The likelihood uses the prior
N(0, sigma_T^2 I) in place of p_T; the test adds that known difference, log N(z) - log p_T(z),
to the exact answer so that what remains is the solver's and the trace estimator's error.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.scipy.stats import norm

from score_sde import sde_lib
from score_sde.analytic import standard_mixture
from score_sde.likelihood import dequantize, discrete_bpd, get_likelihood_fn

WEIGHTS = np.array([0.1, 0.2, 0.3, 0.4])
EPS = 1e-5
SDES = {"vp": sde_lib.VPSDE, "subvp": sde_lib.subVPSDE, "ve": sde_lib.VESDE}


class CountingScore:
  def __init__(self, gm, sde):
    self.calls = 0
    self._score = gm.score_fn(sde)

  def _tick(self):
    self.calls += 1

  def __call__(self, x, t):
    jax.debug.callback(self._tick)
    return self._score(x, t)


def expected_bpd(gm, sde, x, z):
  """-(log p_eps(x) + log N(z) - log p_T(z)) / (D ln 2): what an exact solve would return."""
  logp = gm.log_prob(x, EPS, sde) + sde.prior_logp(z) - gm.log_prob(z, sde.T, sde)
  return -logp / (x.shape[1] * np.log(2))


@pytest.mark.parametrize("sde_name", list(SDES))
def test_exact_trace_matches_exact_log_density(sde_name):
  gm = standard_mixture(weights=WEIGHTS)
  sde = SDES[sde_name]()
  x = gm.sample(jax.random.key(0), 64)
  score = CountingScore(gm, sde)
  bpd, z, nfe = get_likelihood_fn(sde, hutchinson_type="exact", eps=EPS)(
      jax.random.key(1), score, x)
  bpd = jax.block_until_ready(bpd)
  assert bpd.shape == (64,) and z.shape == x.shape
  assert int(nfe) == score.calls > 0
  err = float(jnp.mean(jnp.abs(bpd - expected_bpd(gm, sde, x, z))))
  assert err < 5e-4, f"mean |bpd - exact| = {err} bits/dim"
  # Against the data density itself (prior mismatch and t=eps vs t=0 included).
  raw = float(jnp.mean(jnp.abs(bpd + gm.log_prob(x) / (2 * np.log(2)))))
  assert raw < 1e-2, f"mean |bpd - (-log2 p_0(x) / D)| = {raw}"


def test_hutchinson_estimators_are_unbiased():
  """Each of 8 points is repeated 64 times with independent probes: the mean estimate matches
  the exact value within its standard error; Rademacher probes have the smaller variance."""
  gm = standard_mixture(weights=WEIGHTS)
  sde = sde_lib.VPSDE()
  points, repeats = gm.sample(jax.random.key(2), 8), 64
  x = jnp.tile(points, (repeats, 1))
  variances = {}
  for kind in ["rademacher", "gaussian"]:
    likelihood_fn = get_likelihood_fn(sde, hutchinson_type=kind, eps=EPS)
    bpd, z, _ = likelihood_fn(jax.random.key(3), gm.score_fn(sde), x)
    bpd = np.asarray(bpd).reshape(repeats, 8)
    exact = np.asarray(expected_bpd(gm, sde, x, z)).reshape(repeats, 8).mean(0)
    se = bpd.std(0, ddof=1) / np.sqrt(repeats)
    zscores = (bpd.mean(0) - exact) / se
    assert np.all(np.abs(zscores) < 4.0), f"{kind}: z-scores {zscores}"
    assert abs(zscores.sum() / np.sqrt(8)) < 4.0, f"{kind}: pooled z {zscores.sum() / np.sqrt(8)}"
    variances[kind] = bpd.var(0, ddof=1)
  assert np.mean(variances["rademacher"]) < np.mean(variances["gaussian"])


def test_bad_options_fail_early():
  sde = sde_lib.VPSDE()
  with pytest.raises(ValueError, match="rademacher"):
    get_likelihood_fn(sde, hutchinson_type="Hutchinson")
  with pytest.raises(ValueError, match="dopri5"):
    get_likelihood_fn(sde, method="RK45")
  fn = get_likelihood_fn(sde)
  with pytest.raises(ValueError, match="shaped like x"):
    fn(jax.random.key(0), lambda x, t: x[:, :1], jnp.zeros((4, 2)))


def test_dequantize_stays_in_the_bin():
  x = jax.random.randint(jax.random.key(0), (1000, 3), 0, 256).astype(jnp.uint8)
  v = dequantize(jax.random.key(1), x)
  y = dequantize(jax.random.key(1), x, centered=True)
  assert float(v.min()) >= 0 and float(v.max()) < 1 and float(y.min()) >= -1 and float(y.max()) < 1
  np.testing.assert_array_equal(np.floor(np.asarray(v) * 256), np.asarray(x))
  np.testing.assert_allclose(y, 2 * v - 1, atol=1e-6)
  assert abs(float(jnp.mean(v * 256 - x)) - 0.5) < 0.02  # u ~ U[0, 1)


@pytest.mark.parametrize("centered", [False, True])
def test_discrete_bpd_matches_bin_probabilities(centered):
  """For a smooth model density the dequantized bound equals the exact discrete bits/dim.

  The model is an independent Gaussian per dimension in model space; the exact probability of a
  pixel value is the Gaussian mass of its bin, a difference of normal CDFs.
  """
  lo, width = (-1.0, 2.0) if centered else (0.0, 1.0)
  mean, std = lo + 0.45 * width, 0.2 * width
  x = jax.random.randint(jax.random.key(0), (16, 3), 70, 180)
  d = x.shape[1]
  edge = lambda k: lo + width * k / 256.0
  mass = norm.cdf((edge(x + 1) - mean) / std) - norm.cdf((edge(x) - mean) / std)
  exact = -jnp.sum(jnp.log2(mass), axis=1) / d

  keys = jax.random.split(jax.random.key(1), 256)
  y = jax.vmap(lambda k: dequantize(k, x, centered=centered))(keys)  # [256, 16, 3]
  model_bpd = -jnp.sum(norm.logpdf(y, mean, std), axis=-1) / (d * np.log(2))
  bound = jnp.mean(discrete_bpd(model_bpd, centered=centered), axis=0)
  np.testing.assert_allclose(bound, exact, atol=2e-3)
  # The offset is 8 bits/dim on [0, 1] and 7 on [-1, 1]; a uniform density gives exactly 8 bits.
  uniform_model_bpd = np.log2(width)  # -log2(1 / width^D) / D
  assert float(discrete_bpd(uniform_model_bpd, centered=centered)) == pytest.approx(8.0)
