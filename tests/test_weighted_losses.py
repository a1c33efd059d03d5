"""Parametrizations and weighted denoising losses (issue 15): every loss is lambda(t) times the DSM
loss on the same batch, t and noise; EDM's and flow matching's native forms; time sampling; bad
combinations fail before anything compiles."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.toy import vp as toy_vp
from configs.toy import ve as toy_ve
from score_sde import losses, parametrizations, sde_lib
from score_sde.config_validation import validate_config
from score_sde.models import create_model, get_model_fn, get_network_fn, get_score_fn
from score_sde.parametrizations import PARAMETRIZATIONS, ConsistencyOutput, get_parametrization


@pytest.fixture(scope="module", params=["vp", "ve"])
def setup(request):
  cfg = (toy_vp if request.param == "vp" else toy_ve).get_config()
  cfg.model.scale_by_sigma = False
  sde = sde_lib.get_sde(cfg)
  model, variables = create_model(cfg, jax.random.PRNGKey(0))
  batch = jax.random.normal(jax.random.PRNGKey(1), (128, 2)) * 2.0
  return cfg, sde, model, variables["params"], batch


# 'consistency' has no denoising target: it is trained by score_sde.consistency's losses.
DENOISING = sorted(set(PARAMETRIZATIONS) - {"consistency"})


def test_consistency_parametrization_refuses_a_denoising_target():
  sde = sde_lib.VPSDE()
  z = jnp.zeros((2, 3))
  (a, s), rates = sde.marginal_rates(jnp.array([0.3, 0.6]))
  with pytest.raises(ValueError, match="consistency loss"):
    ConsistencyOutput.for_sde(sde, 0.5).target(z, z, a, s, rates)


@pytest.mark.parametrize("name", DENOISING)
def test_targets_map_to_the_true_score_and_weights_convert_errors(name):
  """target -> score is -n / sigma exactly, and ||eps_hat - n||^2 = w ||F - target||^2."""
  sde = sde_lib.VPSDE()
  x0 = jax.random.normal(jax.random.PRNGKey(0), (16, 3))
  n = jax.random.normal(jax.random.PRNGKey(1), (16, 3))
  t = jnp.linspace(0.02, 0.98, 16)
  (a, s), rates = sde.marginal_rates(t)
  x = a[:, None] * x0 + s[:, None] * n
  p = get_parametrization(name)
  target, w = p.target(x0, n, a, s, rates)
  np.testing.assert_allclose(-s[:, None] * p.to_score(target, x, a, s, rates), n, atol=5e-5)
  d = 0.01 * jax.random.normal(jax.random.PRNGKey(2), target.shape)
  eps_hat = -s[:, None] * p.to_score(target + d, x, a, s, rates)
  np.testing.assert_allclose(jnp.sum((eps_hat - n) ** 2, -1), w * jnp.sum(d**2, -1), rtol=1e-2)


@pytest.mark.parametrize("loss", sorted(losses.LOSSES))
@pytest.mark.parametrize("parametrization", ["eps", "score", "x0", "v", "flow", "edm"])
def test_each_loss_is_lambda_times_the_dsm_loss(setup, loss, parametrization):
  _, sde, model, params, batch = setup
  key = jax.random.PRNGKey(3)
  _, dsm = losses.get_sde_loss_fn(sde, model, False, parametrization=parametrization)(
      key, params, batch)
  weighted = losses.get_weighted_loss_fn(sde, model, False, loss, parametrization=parametrization,
                                         t_sampling="uniform")
  value, aux = weighted(key, params, batch)
  np.testing.assert_array_equal(aux["t"], dsm["t"])
  (a, s), rates = sde.marginal_rates(aux["t"])
  lam = losses.LOSSES[loss][0](a, s, rates, 0.5)
  np.testing.assert_allclose(aux["losses"], lam * dsm["losses"], rtol=5e-4)
  np.testing.assert_allclose(value, jnp.mean(lam * dsm["losses"]), rtol=5e-4)


def test_named_weightings_against_their_formulas(setup):
  _, sde, *_ = setup
  t = jnp.linspace(0.05, 0.95, 7) * sde.T
  (a, s), (da, ds) = sde.marginal_rates(t)
  lam = {k: v[0](a, s, (da, ds), 0.5) for k, v in losses.LOSSES.items()}
  se = s / a
  np.testing.assert_allclose(lam["eps"], 1.0)
  np.testing.assert_allclose(lam["x0"], se**2, rtol=1e-6)
  np.testing.assert_allclose(lam["v"], (a**2 + s**2) ** 2 / a**2, rtol=1e-6)
  np.testing.assert_allclose(lam["flow_matching"], (ds - da * s / a) ** 2, rtol=1e-5)
  np.testing.assert_allclose(lam["edm"], (se**2 + 0.25) / 0.25, rtol=1e-6)


def test_edm_loss_with_edm_preconditioning_is_the_unit_weighted_F_regression(setup):
  """Karras et al. eq. 2 + Table 1: lambda(sigma) ||D - x0||^2 = ||F - F*||^2, with the network
  given c_in x / alpha and the label sigma / alpha."""
  cfg, sde, model, params, batch = setup
  key = jax.random.PRNGKey(4)
  value, aux = losses.get_weighted_loss_fn(sde, model, False, "edm", parametrization="edm",
                                           sigma_data=0.7)(key, params, batch)
  t, z = aux["t"], aux["noise"]
  a, s = sde.marginal_coef(t)
  se = s / a
  norm = se**2 + 0.49
  c_skip, c_out, c_in = 0.49 / norm, se * 0.7 / jnp.sqrt(norm), 1 / jnp.sqrt(norm)
  x_tilde = batch + se[:, None] * z
  F = get_model_fn(model, params)(c_in[:, None] * x_tilde, se)
  direct = jnp.mean((F - (batch - c_skip[:, None] * x_tilde) / c_out[:, None]) ** 2, -1)
  np.testing.assert_allclose(aux["losses"], direct, rtol=2e-4)
  # The denoiser: x0_hat = c_skip x~ + c_out F, and the score wrapper agrees with it.
  p = parametrizations.EDMPreconditioning(0.7)
  x_t = a[:, None] * x_tilde
  score = get_score_fn(sde, get_model_fn(model, params), parametrization=p)(x_t, t)
  x0_hat = c_skip[:, None] * x_tilde + c_out[:, None] * F
  np.testing.assert_allclose(score, (a[:, None] * x0_hat - x_t) / s[:, None] ** 2, rtol=1e-3,
                             atol=1e-3)


def test_flow_matching_with_velocity_output_regresses_dx_dt(setup):
  _, sde, model, params, batch = setup
  key = jax.random.PRNGKey(5)
  _, aux = losses.get_weighted_loss_fn(sde, model, False, "flow_matching",
                                       parametrization="flow")(key, params, batch)
  t, z = aux["t"], aux["noise"]
  (a, s), (da, ds) = sde.marginal_rates(t)
  x_t = a[:, None] * batch + s[:, None] * z
  u = da[:, None] * batch + ds[:, None] * z
  F = get_model_fn(model, params)(x_t, sde.noise_label(t))
  np.testing.assert_allclose(aux["losses"], jnp.mean((F - u) ** 2, -1), rtol=2e-4)


def test_time_sampling():
  sde = sde_lib.VPSDE()
  key = jax.random.PRNGKey(0)
  t = losses.sample_t(key, 200_000, sde, 1e-5, "lognormal")
  a, s = sde.marginal_coef(t)
  log_se = np.log(np.asarray(s / a))
  assert abs(log_se.mean() + 1.2) < 0.02 and abs(log_se.std() - 1.2) < 0.02
  t = losses.sample_t(key, 200_000, sde, 1e-3, "logit_normal", 0.5, 0.8)
  assert float(t.min()) >= 1e-3 and float(t.max()) <= sde.T
  logit = np.log((np.asarray(t) - 1e-3) / (sde.T - np.asarray(t)))
  assert abs(logit.mean() - 0.5) < 0.02 and abs(logit.std() - 0.8) < 0.02
  t = losses.sample_t(key, 1000, sde, 0.1, "uniform")
  assert float(t.min()) >= 0.1


def test_network_fn_sees_preconditioned_input_and_label():
  sde = sde_lib.VPSDE()
  seen = {}

  def model_fn(x, labels):
    seen["x"], seen["labels"] = x, labels
    return jnp.zeros_like(x)
  x = jnp.ones((3, 2)) * 3.0
  t = jnp.array([0.1, 0.5, 0.9])
  a, s = sde.marginal_coef(t)
  get_network_fn(sde, model_fn, parametrization=parametrizations.EDMPreconditioning(0.5))(x, t)
  np.testing.assert_allclose(seen["labels"], s / a, rtol=1e-6)
  np.testing.assert_allclose(seen["x"][:, 0], 3.0 / a / jnp.sqrt((s / a) ** 2 + 0.25), rtol=1e-6)
  get_network_fn(sde, model_fn, parametrization="v")(x, t)
  np.testing.assert_allclose(seen["labels"], sde.noise_label(t))
  np.testing.assert_array_equal(seen["x"], x)


def test_training_with_a_weighted_loss_lowers_it():
  from score_sde.train import Trainer
  cfg = toy_vp.get_config()
  cfg.training.loss, cfg.model.parametrization, cfg.model.scale_by_sigma = "edm", "edm", False
  cfg.training.n_iters, cfg.training.batch_size = 200, 256
  cfg.training.log_freq = cfg.training.snapshot_freq = cfg.training.snapshot_freq_for_preemption = 100
  cfg.training.n_jitted_steps = 50
  validate_config(cfg, jax.device_count())
  trainer = Trainer(cfg)
  loss_fn = losses.get_loss_fn(cfg, trainer.sde, trainer.model, train=False)
  from score_sde.datasets.toy import get_toy_mixture
  batch = get_toy_mixture(cfg).sample(jax.random.PRNGKey(0), 2048)
  before = float(loss_fn(jax.random.PRNGKey(1), trainer.state.params, batch)[0])
  trainer.train()
  after = float(loss_fn(jax.random.PRNGKey(1), trainer.state.params, batch)[0])
  assert np.isfinite(after) and after < 0.8 * before, (before, after)


@pytest.mark.parametrize("changes,match", [
    (dict(loss="nope"), "Unknown config.training.loss 'nope'"),
    (dict(loss="edm", continuous=False), "continuous-time loss"),
    (dict(loss="v", likelihood_weighting=True), "'dsm' loss only"),
    (dict(t_sampling="lognormal"), "t_sampling applies to the weighted losses"),
])
def test_bad_loss_settings_fail_in_get_loss_fn(setup, changes, match):
  cfg, sde, model, *_ = setup
  cfg = cfg.copy_and_resolve_references()
  for k, v in changes.items():
    setattr(cfg.training, k, v)
  with pytest.raises(ValueError, match=match):
    losses.get_loss_fn(cfg, sde, model, train=True)


def test_bad_parametrization_settings():
  with pytest.raises(ValueError, match="sigma_data must be > 0"):
    get_parametrization("edm", sigma_data=0.0)
  with pytest.raises(ValueError, match="Unknown output parametrization 'z'"):
    get_parametrization("z")
  sde = sde_lib.VPSDE()
  with pytest.raises(ValueError, match="continuous-time networks"):
    get_network_fn(sde, lambda x, l: x, continuous=False, parametrization="edm")
  with pytest.raises(ValueError, match="continuous-time networks"):
    get_score_fn(sde, lambda x, l: x, continuous=False, parametrization="flow")
  cfg = toy_vp.get_config()
  cfg.model.parametrization, cfg.model.embedding_type = "edm", "positional"
  with pytest.raises(ValueError, match="scale_by_sigma=False") as e:
    validate_config(cfg, 1)
  assert "embedding_type='fourier'" in str(e.value)


def test_recipes_toy_runs_end_to_end(tmp_path):
  """experiments.recipes_toy on tiny sizes: trains, measures bits/dim and every sampler row."""
  from experiments import recipes_toy
  out = recipes_toy.run_recipe("rectified_flow", str(tmp_path / "rf"), steps=50, nfes=[10],
                               num=200, num_bpd=50)
  assert out["steps"] == 50 and out["loss"] == "flow_matching" and out["parametrization"] == "flow"
  assert np.isfinite(out["bpd"]) and out["exact_bpd"] > 0
  assert set(out["samples"]) == {"heun@10", "dpm_solver_pp@10", "dpm_solver_pp@35"}
  for row in out["samples"].values():
    assert np.isfinite(row["energy_distance"]) and row["energy_distance_floor"] > 0
