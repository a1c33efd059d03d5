"""Consistency models (score_sde/consistency.py, the 'consistency' parametrization and sampler):
the boundary condition is exact, the sampler keeps the contract and is exact with an exact
consistency function, the teacher step and the iCT schedule, CD on the toy lowers the energy
distance, and bad inputs fail naming the field."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.mnist import cd_vp as mnist_cd
from configs.mnist import ict as mnist_ict
from configs.toy import cd_vp, ict_vp
from score_sde import analytic, consistency, sde_lib
from score_sde.config_validation import validate_config
from score_sde.evaluation import metrics
from score_sde.models import get_network_fn
from score_sde.parametrizations import ConsistencyOutput
from score_sde.sampling import get_sampler
from score_sde.utils import parametrization_of

SDES = {"vp": lambda: sde_lib.VPSDE(), "ve": lambda: sde_lib.VESDE(),
        "edm": lambda: sde_lib.EDMSDE()}


@pytest.mark.parametrize("name", sorted(SDES))
def test_boundary_condition_is_exact(name):
  """f(x, eps) = x / alpha(eps) bitwise (x itself where alpha = 1), jitted, whatever F is; above
  eps the network's output counts."""
  sde = SDES[name]()
  p = ConsistencyOutput.for_sde(sde, 0.5)
  x = jax.random.normal(jax.random.PRNGKey(0), (8, 3)) * 3.0
  big = lambda x, label: 1e3 * jnp.ones_like(x) + label[:, None]   # any finite output
  network = get_network_fn(sde, big, True, p)

  @jax.jit
  def f(x, t):
    out, alpha, sigma, _ = network(x, t)
    return p.denoise(out, x, alpha, sigma), alpha

  y, alpha = f(x, jnp.full((8,), sde.sampling_eps, jnp.float32))
  np.testing.assert_array_equal(np.asarray(y), np.asarray(x * (1.0 / alpha[:, None])))
  if name != "vp":
    np.testing.assert_array_equal(np.asarray(y), np.asarray(x))
  t = jnp.full((8,), 2 * sde.sampling_eps + 1e-3, jnp.float32)
  assert float(jnp.min(jnp.abs(f(x, t)[0] - x))) > 1e-3
  # the config builds the same parametrization, boundary at the SDE's sampling_eps
  config = cd_vp.get_config()
  assert parametrization_of(config) == ConsistencyOutput.for_sde(sde_lib.get_sde(config), 2.87)


def _gaussian_consistency_score(sde, mu, s):
  """The exact consistency function of N(mu, s^2 I) data, whose PF-ODE is linear:
  x_eps = alpha_eps mu + sqrt(alpha_eps^2 s^2 + sigma_eps^2) / sqrt(alpha^2 s^2 + sigma^2)
  (x - alpha mu), f = x_eps / alpha_eps, given as the score (alpha f - x) / sigma^2."""
  eps = sde.sampling_eps
  a_e, s_e = sde.marginal_coef(jnp.float32(eps))

  def score_fn(x, t):
    a, sg = sde.marginal_coef(t)
    a, sg = a[:, None], sg[:, None]
    x_eps = a_e * mu + jnp.sqrt(a_e**2 * s**2 + s_e**2) / jnp.sqrt(a**2 * s**2 + sg**2) * (
        x - a * mu)
    f = x_eps / a_e
    return (a * f - x) / sg**2
  return score_fn


@pytest.mark.parametrize("name", ["vp"])
def test_sampler_contract_and_exactness(name):
  """With the exact consistency function of Gaussian data, 1, 2 and 4 steps all give the data
  law (mean, std); nfe is the step count; x_T fixes the one-step output; same key, same output."""
  sde = SDES[name]()
  mu, s, n = 1.5, 0.7, 4000
  score_fn = _gaussian_consistency_score(sde, mu, s)
  _, sig_e = sde.marginal_coef(jnp.float32(sde.sampling_eps))
  want_std = float(np.sqrt(s**2 + (sig_e / sde.marginal_coef(jnp.float32(sde.sampling_eps))[0])
                           ** 2))
  for nfe in (1, 3):
    sampler = get_sampler("consistency", sde, (n, 2), nfe=nfe)
    x, used = sampler(jax.random.PRNGKey(3), score_fn)
    assert x.shape == (n, 2) and int(used) == nfe == sampler.nfe
    assert abs(float(x.mean()) - mu) < 0.04, (nfe, float(x.mean()))
    assert abs(float(x.std()) - want_std) < 0.03, (nfe, float(x.std()))
    x2, _ = sampler(jax.random.PRNGKey(3), score_fn)
    np.testing.assert_array_equal(np.asarray(x), np.asarray(x2))
  one = get_sampler("consistency", sde, (n, 2), nfe=1)
  x_T = sde.prior_sampling(jax.random.PRNGKey(9), (n, 2))
  a, b = one(jax.random.PRNGKey(0), score_fn, x_T), one(jax.random.PRNGKey(1), score_fn, x_T)
  np.testing.assert_array_equal(np.asarray(a[0]), np.asarray(b[0]))
  two = get_sampler("consistency", sde, (n, 2), nfe=2, times=[float(two_t(sde))])
  assert two.times[1] == pytest.approx(float(two_t(sde)))


def two_t(sde):
  return sde.t_from_log_snr(jnp.float32(-2 * np.log(1.0)))


def test_sampler_bad_times_name_the_field():
  sde = sde_lib.VPSDE()
  with pytest.raises(ValueError, match=r"nfe=3 steps need 2 intermediate time.*options\.times"):
    get_sampler("consistency", sde, (4, 2), nfe=3, times=[0.5])
  with pytest.raises(ValueError, match="decreasing"):
    get_sampler("consistency", sde, (4, 2), nfe=3, times=[0.2, 0.5])
  with pytest.raises(ValueError, match="nfe"):
    get_sampler("consistency", sde, (4, 2), nfe=0)
  with pytest.raises(ValueError, match="options"):
    get_sampler("consistency", sde, (4, 2), order=2)


def test_teacher_step_and_discretization():
  """Heun on the exact Gaussian score matches the linear PF-ODE's exact step; the grid's ends are
  eps and T exactly; the iCT curriculum runs from s0 + 1 to s1 + 1."""
  sde = sde_lib.VPSDE()
  mix = analytic.GaussianMixture(np.full((1, 2), 1.5), np.full((1, 2), 0.49))
  x = jax.random.normal(jax.random.PRNGKey(0), (64, 2))
  t, t2 = jnp.full((64,), 0.5), jnp.full((64,), 0.48)
  a, sg = sde.marginal_coef(t)
  a2, sg2 = sde.marginal_coef(t2)
  exact = a2[:, None] * 1.5 + jnp.sqrt(a2**2 * 0.49 + sg2**2)[:, None] / jnp.sqrt(
      a**2 * 0.49 + sg**2)[:, None] * (x - a[:, None] * 1.5)
  step = jax.jit(lambda solver: consistency.teacher_step(sde, mix.score_fn(sde), x, t, t2, solver),
                 static_argnums=0)
  heun, euler = step("heun"), step("euler")
  err_h, err_e = float(jnp.abs(heun - exact).max()), float(jnp.abs(euler - exact).max())
  assert err_h < 2e-4 and err_h < err_e / 5, (err_h, err_e)
  s_min, s_max = consistency.sde_sigma_range(sde)
  ts, sig = jax.jit(lambda i: consistency.karras_times(sde, i, 18, sde.sampling_eps, s_min,
                                                       s_max))(jnp.arange(18))
  assert float(ts[0]) == np.float32(sde.sampling_eps) and float(ts[-1]) == np.float32(sde.T)
  assert bool(jnp.all(jnp.diff(ts) > 0)) and bool(jnp.all(jnp.diff(sig) > 0))
  n = jax.jit(lambda k: consistency.ict_num_scales(k, 1000))(jnp.array([0, 124, 125, 999]))
  assert n.tolist() == [11, 11, 21, 1281]    # K' = floor(1000 / 8) = 125
  logits = jax.jit(lambda: consistency.ict_index_logits(
      consistency.karras_sigmas(s_min, s_max, jnp.arange(1281), 11, 7.0), 11, -1.1, 2.0))()
  assert bool(jnp.all(jnp.isfinite(logits[:10]))) and bool(jnp.all(jnp.isinf(logits[10:])))


def _toy_cd_config(steps):
  config = cd_vp.get_config()
  t = config.training
  t.n_iters, t.n_jitted_steps, t.batch_size = steps, 100, 256
  t.log_freq = t.snapshot_freq = t.snapshot_freq_for_preemption = steps
  t.snapshot_sampling = False
  config.model.nf, config.optim.warmup = 64, 20
  return config


def test_cd_on_the_toy_lowers_the_energy_distance():
  """A short CD run from the exact mixture score: one-step samples move from the untrained
  network's far off distribution to within a few noise floors; the target EMA moved."""
  from score_sde import datasets
  from score_sde.datasets import toy
  from score_sde.train import Trainer
  config = _toy_cd_config(300)
  trainer = Trainer(config)
  mix = toy.get_toy_mixture(config)
  ref = np.asarray(mix.sample(jax.random.PRNGKey(5), 1000))
  sampler = get_sampler("consistency", trainer.sde, (1000, 2), nfe=1)

  def energy(params):
    x, _ = sampler(jax.random.PRNGKey(1), trainer.score_fn(params))
    return float(metrics.energy_distance(np.asarray(x), ref))

  before = energy(trainer.state.params)
  ds = datasets.get_dataset(config, "train")
  for _ in range(3):
    m = trainer.train_steps([next(ds) for _ in range(100)])
    assert np.all(np.isfinite(np.asarray(m["loss"])))
  after = energy(trainer.state.params)
  floor = float(metrics.energy_distance(np.asarray(mix.sample(jax.random.PRNGKey(6), 1000)), ref))
  assert after < before / 5 and after < 8 * floor, (before, after, floor)
  assert trainer.state.target_params is not None
  leaves = zip(jax.tree.leaves(trainer.state.target_params), jax.tree.leaves(trainer.state.params))
  assert any(float(jnp.abs(a - b).max()) > 0 for a, b in leaves)


def test_ict_loss_is_finite_and_uses_the_curriculum():
  from score_sde.models import create_model
  config = ict_vp.get_config()
  config.model.nf = 32
  sde = sde_lib.get_sde(config)
  model, variables = create_model(config, jax.random.PRNGKey(0))
  loss_fn = consistency.get_consistency_loss_fn(config, sde, model, True)
  batch = jax.random.normal(jax.random.PRNGKey(1), (64, 2)) * 2.0
  fn = jax.jit(lambda step: loss_fn(jax.random.PRNGKey(2), variables["params"], batch,
                                    {"step": step, "target_params": None}))
  loss0, aux0 = fn(jnp.int32(0))
  loss1, aux1 = fn(jnp.int32(config.training.n_iters - 1))
  assert np.isfinite(float(loss0)) and np.isfinite(float(loss1))
  assert float(aux0["metrics"]["num_scales"]) == 11 and float(aux1["metrics"]["num_scales"]) == 1281


def test_bad_configs_name_the_field():
  config = cd_vp.get_config()
  config.consistency.teacher = "configs/mnist/vp_continuous.py"
  config.consistency.teacher_workdir = "/tmp/nowhere"
  with pytest.raises(ValueError, match=r"config\.consistency\.teacher=.*data shape \(28, 28, 1\)"):
    validate_config(config)
  config = cd_vp.get_config()
  config.model.parametrization = "edm"
  with pytest.raises(ValueError, match="config.model.parametrization='consistency'"):
    validate_config(config)
  config = cd_vp.get_config()
  config.consistency.teacher = None
  with pytest.raises(ValueError, match="needs config.consistency.teacher"):
    validate_config(config)
  config = cd_vp.get_config()
  config.sampling.options = {"times": [0.5]}
  config.sampling.nfe = 4
  with pytest.raises(ValueError, match="times"):
    validate_config(config)
  config = mnist_cd.get_config()
  config.training.sde = "vesde"
  with pytest.raises(ValueError, match="trained on VPSDE"):
    validate_config(config)
  for module in (mnist_cd, mnist_ict):
    validate_config(module.get_config())


def test_cd_teacher_from_a_config_file(tmp_path):
  """CD whose teacher is a config file: the teacher is the network of that config with the EMA
  params of the newest checkpoint under consistency.teacher_workdir (here a perturbed init); no
  checkpoint there is an error naming the field."""
  from configs.toy import vp
  from score_sde.train import Trainer, consistency_teacher
  teacher = Trainer(vp.get_config(), str(tmp_path / "teacher"))   # as the file gives it
  ema = jax.tree.map(lambda p: p + 0.01, teacher.state.ema_params)
  teacher.state = teacher.state.replace(ema_params=ema)
  teacher.checkpoints.save(10, teacher.state, snapshot=True)
  teacher.close()
  config = _toy_cd_config(100)
  config.consistency.teacher = "configs/toy/vp.py"
  (tmp_path / "empty").mkdir()
  config.consistency.teacher_workdir = str(tmp_path / "empty")
  with pytest.raises(FileNotFoundError, match="config.consistency.teacher_workdir"):
    Trainer(config)
  config.consistency.teacher_workdir = str(tmp_path / "teacher")
  sde = sde_lib.get_sde(config)
  x, t = jax.random.normal(jax.random.PRNGKey(0), (16, 2)), jnp.linspace(0.01, 1.0, 16)
  got = jax.jit(consistency_teacher(config, sde))(x, t)
  want = jax.jit(teacher.score_fn(ema))(x, t)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("module", [mnist_cd, mnist_ict])
def test_mnist_configs_trace(module):
  """The MNIST CD and iCT losses trace end to end on the U-Net (jax.eval_shape: nothing compiles);
  the CD teacher here is a stand-in score of the right shape."""
  from score_sde import losses
  from score_sde.models import create_model
  config = module.get_config()
  validate_config(config)
  sde = sde_lib.get_sde(config)
  model, variables = create_model(config, jax.random.PRNGKey(0))
  teacher = (lambda x, t: -x) if module is mnist_cd else None
  loss_fn = losses.get_loss_fn(config, sde, model, True, teacher)
  batch = jax.ShapeDtypeStruct((4, 28, 28, 1), jnp.float32)
  out = jax.eval_shape(lambda b: loss_fn(jax.random.PRNGKey(1), variables["params"], b,
                                         {"step": jnp.int32(0), "target_params": None}), batch)
  assert out[0].shape == () and out[1]["losses"].shape == (4,)


def test_trainer_takes_the_teacher_directly():
  """Trainer(teacher=score_fn) distils from that function (e.g. a teacher trained with command-line
  overrides its config file does not carry) instead of config.consistency.teacher: the exact
  mixture score given directly gives the config's own loss; another score another loss."""
  from score_sde.datasets import toy
  from score_sde.train import Trainer
  config = cd_vp.get_config()
  default = Trainer(config)
  sde = default.sde
  exact = toy.get_toy_mixture(config).score_fn(sde)
  batch = jnp.asarray(toy.get_toy_mixture(config).sample(jax.random.PRNGKey(3), 64))
  key = jax.random.PRNGKey(4)
  same = Trainer(config, teacher=exact)
  other = Trainer(config, teacher=lambda x, t: jnp.zeros_like(x))
  reference = float(default.eval_loss(batch, key))
  assert float(same.eval_loss(batch, key)) == pytest.approx(reference, rel=1e-6)
  assert abs(float(other.eval_loss(batch, key)) - reference) > 1e-3 * abs(reference)


def test_greedy_times_pick_the_best_candidate_on_gaussian_data():
  """greedy_consistency_times with the exact score of N(0, 1) data under the VP SDE, where one
  re-noise / denoise step at t (u = alpha(t)^2) maps samples of variance v to variance
  u^2 v + u (1 - u) - u^2 sigma_e(eps)^2: with distance (var - 1)^2 each chosen time is (within
  the sampling noise of the variance) the best candidate below the last one, and the times fall."""
  sde = sde_lib.VPSDE()
  score_fn = lambda x, t: -x               # VP keeps N(0, 1): alpha^2 + sigma^2 = 1
  n, candidates = 200_000, 16
  x_T = sde.prior_sampling(jax.random.PRNGKey(0), (n, 1))
  x0, _ = get_sampler("consistency", sde, (n, 1), nfe=1)(jax.random.PRNGKey(1), score_fn, x_T)
  calls = []

  def distance(x):
    calls.append(len(x))
    return (float(np.var(x)) - 1.0) ** 2

  from score_sde.sampling.consistency import greedy_consistency_times
  from score_sde.sampling.schedules import get_time_steps
  out = greedy_consistency_times(sde, score_fn, x0, 4, distance,
                                 lambda k: jax.random.PRNGKey(10 + k), candidates=candidates)
  assert sorted(out) == [2, 3, 4] and [len(out[k]) for k in (2, 3, 4)] == [1, 2, 3]
  assert out[3][:1] == out[2] and out[4][:2] == out[3]
  times = out[4]
  assert np.all(np.diff(times) < 0) and all(calls[i] == n for i in range(len(calls)))
  grid = get_time_steps(sde, candidates, "edm")[1:-1]
  a_e, s_e = sde.marginal_coef(jnp.float32(sde.sampling_eps))
  s_eps2 = float(s_e / a_e) ** 2
  u_of = lambda t: float(sde.marginal_coef(jnp.float32(t))[0]) ** 2
  v, last = float(np.var(np.asarray(x0))), np.inf
  for t_k in times:
    allowed = [t for t in grid if t < last]
    dist = lambda t: (u_of(t) ** 2 * v + u_of(t) * (1 - u_of(t)) - u_of(t) ** 2 * s_eps2 - 1) ** 2
    assert t_k in [pytest.approx(t) for t in allowed]
    assert dist(t_k) <= min(dist(t) for t in allowed) + 2e-3, (t_k, allowed)
    u = u_of(t_k)
    v, last = u**2 * v + u * (1 - u) - u**2 * s_eps2, t_k
  assert abs(u_of(times[0]) - 0.5) < 0.15          # the first step's optimum: alpha^2 = 1/2
