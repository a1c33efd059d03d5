"""Forward SDEs of score-based generative modeling (Song et al., ICLR 2021).

Every SDE here is linear in ``x`` and has a Gaussian perturbation kernel

    p_{0t}(x_t | x_0) = N(x_t; alpha(t) x_0, sigma(t)^2 I),

so one method, :meth:`SDE.marginal_coef`, returns ``(alpha(t), sigma(t))`` and everything
else that depends on the kernel (``marginal_prob``, ``log_snr``, its inverse, the fast samplers
and the analytic Gaussian-mixture score) is derived from it. Each SDE owns its own coefficients;
samplers and losses only call these methods.

Shapes: ``x`` is ``[batch, *data_shape]`` and ``t`` is ``[batch]``. Per-example quantities
(diffusion, alpha, sigma, prior log-density) are ``[batch]``.
"""
from __future__ import annotations

import abc
import inspect
from typing import Any, Callable, ClassVar, Optional

import jax
import jax.numpy as jnp
import numpy as np

from score_sde.parametrizations import (PARAMETRIZATIONS, Parametrization, check_parametrization,
                                        get_parametrization, output_to_score,
                                        parametrization_target)

Array = jax.Array
ScoreFn = Callable[[Array, Array], Array]

__all__ = ["SDE", "LinearBetaSDE", "VPSDE", "subVPSDE", "VESDE", "EDMSDE", "RectifiedFlow",
           "CosineVPSDE", "batch_mul", "get_sde", "SDES", "PARAMETRIZATIONS",
           "check_parametrization", "output_to_score", "parametrization_target"]


def batch_mul(a: Array, x: Array) -> Array:
  """Multiplies per-example scalars ``a [batch]`` into ``x [batch, ...]``."""
  a = jnp.asarray(a)
  return a.reshape(a.shape + (1,) * (x.ndim - a.ndim)) * x


def _sum_except_batch(x: Array) -> Array:
  return jnp.sum(x.reshape(x.shape[0], -1), axis=-1)


# --- the SDE base class -----------------------------------------------------------------------
SDES: dict[str, type["SDE"]] = {}


class SDE(abc.ABC):
  """dx = f(x, t) dt + g(t) dw on t in [0, T], with a Gaussian perturbation kernel.

  A subclass defines the equations (``sde``, ``marginal_coef``, the prior and the inverse of the
  log-SNR) and, by default, gets everything else. Declared as ``class MySDE(SDE, name='mysde')``
  it is registered: ``config.training.sde = 'mysde'`` builds it with :meth:`from_config`.

  Conventions it owns (so models, losses and samplers never switch on the SDE's class):
    * :meth:`noise_label`: what a continuous-time network sees for time t.
    * ``default_parametrization``: what its network outputs ('eps' here; see
      :data:`PARAMETRIZATIONS`), mapped to a score by :meth:`score_from_output`.
    * the discrete chain (``discrete_chain``: None, or 'ddpm' / 'smld'): :meth:`discrete_noise_label`
      and :meth:`discrete_kernel` for discrete-time training and networks.

  Attributes:
    N: number of discretization steps (sampling and discrete training).
    T: end time.
    sampling_eps: the smallest time samplers integrate down to by default.
  """

  T: float = 1.0
  sampling_eps: float = 1e-3
  name: ClassVar[Optional[str]] = None
  default_parametrization: ClassVar[str] = "eps"
  discrete_chain: ClassVar[Optional[str]] = None

  def __init_subclass__(cls, name: Optional[str] = None, **kwargs):
    super().__init_subclass__(**kwargs)
    cls.name = name
    if name is not None:
      key = name.lower()
      if key in SDES and SDES[key].__qualname__ != cls.__qualname__:
        raise ValueError(f"An SDE named {key!r} is already registered ({SDES[key].__name__}).")
      SDES[key] = cls

  def __new__(cls, *args, **kwargs):
    self = super().__new__(cls)
    bound = inspect.signature(cls.__init__).bind_partial(self, *args, **kwargs)
    bound.apply_defaults()
    self._params = {k: v for k, v in bound.arguments.items() if k != "self"}
    return self

  def __init__(self, N: int):
    if int(N) < 1:
      raise ValueError(f"SDE needs N >= 1 discretization steps, got N={N}.")
    self.N = int(N)

  # --- construction -----------------------------------------------------------------------------
  @classmethod
  def from_config(cls, config) -> "SDE":
    """Builds the SDE from ``config.model``: each constructor argument is read from the field of
    the same name (``N`` from ``num_scales``); a field that is absent or None keeps the default."""
    kwargs = {}
    for arg, p in inspect.signature(cls.__init__).parameters.items():
      if arg == "self" or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
        continue
      field = "num_scales" if arg == "N" else arg
      value = config.model.get(field, None)
      if value is not None:
        kwargs[arg] = value
    return cls(**kwargs)

  def params(self) -> dict[str, Any]:
    """The constructor arguments this SDE was built with (defaults filled in)."""
    return dict(self._params)

  def replace(self, **changes) -> "SDE":
    """A copy with some constructor arguments changed, e.g. ``sde.replace(N=100)``."""
    return type(self)(**{**self._params, **changes})

  def __repr__(self) -> str:
    args = ", ".join(f"{k}={v!r}" for k, v in self._params.items())
    return f"{type(self).__name__}({args})"

  # --- the equations each SDE defines -----------------------------------------------------
  @abc.abstractmethod
  def sde(self, x: Array, t: Array) -> tuple[Array, Array]:
    """Returns ``(f(x, t) [batch, ...], g(t) [batch])``."""

  @abc.abstractmethod
  def marginal_coef(self, t: Array) -> tuple[Array, Array]:
    """Returns ``(alpha(t), sigma(t))`` with x_t = alpha(t) x_0 + sigma(t) z, each of t's shape."""

  @abc.abstractmethod
  def prior_sampling(self, key: Array, shape: tuple[int, ...]) -> Array:
    """Draws ``x_T`` from the prior p_T of the given full shape ``[batch, ...]``."""

  @abc.abstractmethod
  def prior_logp(self, z: Array) -> Array:
    """log p_T(z) per example, ``[batch]``."""

  @abc.abstractmethod
  def t_from_log_snr(self, log_snr: Array) -> Array:
    """Inverse of :meth:`log_snr`."""

  # --- derived quantities ---------------------------------------------------------------------
  def marginal_prob(self, x: Array, t: Array) -> tuple[Array, Array]:
    """Mean ``alpha(t) x [batch, ...]`` and std ``sigma(t) [batch]`` of p_{0t}(x_t | x_0 = x)."""
    alpha, sigma = self.marginal_coef(t)
    return batch_mul(alpha, x), sigma

  def log_snr(self, t: Array) -> Array:
    """lambda(t) = log(alpha(t)^2 / sigma(t)^2), decreasing in t."""
    alpha, sigma = self.marginal_coef(t)
    return 2.0 * (jnp.log(alpha) - jnp.log(sigma))

  def snr(self, t: Array) -> Array:
    """alpha(t)^2 / sigma(t)^2."""
    return jnp.exp(self.log_snr(t))

  def discretize(self, x: Array, t: Array) -> tuple[Array, Array]:
    """One step x_{i+1} = x_i + f_i + G_i z_i of the forward process (Euler-Maruyama here).

    f_i = f(x, t) dt, G_i = g(t) sqrt(dt), dt = T / N. VP and VE override this with the DDPM and
    SMLD chains. Returns ``(f [batch, ...], G [batch])``.
    """
    dt = self.T / self.N
    drift, diffusion = self.sde(x, t)
    return drift * dt, diffusion * jnp.sqrt(dt)

  def discrete_index(self, t: Array) -> Array:
    """Step index i = floor(t (N - 1) / T) of the discrete chain, ``[batch]`` int32.

    A margin of 1e-4 steps keeps float32 round-off from sending t = i (N - 1)^-1 T to step i - 1;
    the reference's PC time grid linspace(T, eps, N) maps to the same indices as in score_sde.
    """
    return jnp.floor(t * (self.N - 1) / self.T + 1e-4).astype(jnp.int32)

  def reverse(self, score_fn: ScoreFn, probability_flow: bool = False) -> "ReverseSDE":
    """The reverse-time SDE, or the probability-flow ODE when ``probability_flow``.

    dx = [f(x, t) - c g(t)^2 score(x, t)] dt + g_rev(t) dw_bar, with c = 1/2 and g_rev = 0 for the
    probability-flow ODE and c = 1, g_rev = g otherwise.
    """
    return ReverseSDE(self, score_fn, probability_flow)

  # --- network conventions -------------------------------------------------------------------
  def noise_label(self, t: Array) -> Array:
    """The label a continuous-time network sees at time t ``[batch]``: 999 t / T (the reference's
    VP / sub-VP convention); VE overrides it with sigma(t)."""
    return t * (999.0 / self.T)

  def score_from_output(self, output: Array, x: Array, t: Array,
                        parametrization: Optional[str | Parametrization] = None,
                        continuous: bool = True) -> Array:
    """The score at (x, t) from the network output of ``parametrization`` (None: this SDE's
    ``default_parametrization``), read with :meth:`network_coef`."""
    p = get_parametrization(parametrization or self.default_parametrization)
    alpha, sigma, rates = self.network_coef(t, x.dtype, continuous, p.needs_rates)
    return p.to_score(output, x, alpha, sigma, rates)

  def marginal_rates(self, t: Array) -> tuple[tuple[Array, Array], tuple[Array, Array]]:
    """``((alpha, sigma), (d alpha / dt, d sigma / dt))``, each of t's shape (forward-mode
    derivative of :meth:`marginal_coef`; a subclass may give closed forms)."""
    return jax.jvp(self.marginal_coef, (t,), (jnp.ones_like(t),))

  def network_coef(self, t: Array, dtype=jnp.float32, continuous: bool = True,
                   rates: bool = False) -> tuple[Array, Array, Optional[tuple[Array, Array]]]:
    """``(alpha, sigma, rates)`` a network's output is read with: the marginal's at t (and its
    :meth:`marginal_rates` when ``rates``, else None) or, with ``continuous=False``, the discrete
    chain's at step :meth:`discrete_noise_label` (t)."""
    if continuous:
      if rates:
        (alpha, sigma), r = self.marginal_rates(t)
        return alpha, sigma, r
      return (*self.marginal_coef(t), None)
    if rates:
      raise ValueError("Rates d alpha / dt, d sigma / dt are undefined for a discrete chain: set "
                       "config.training.continuous=True.")
    return (*self.discrete_kernel(self.discrete_noise_label(t), dtype), None)

  def check_discrete(self) -> None:
    """Raises ValueError unless this SDE has a discrete chain (discrete training / networks)."""
    if self.discrete_chain is None:
      raise ValueError(f"{type(self).__name__} has no discrete chain, so discrete-time training "
                       "and networks are undefined: set config.training.continuous=True.")

  def discrete_noise_label(self, t: Array) -> Array:
    """The label a discrete-time network sees at time t (the chain's step)."""
    self.check_discrete()
    raise NotImplementedError

  def discrete_kernel(self, labels: Array, dtype=jnp.float32) -> tuple[Array, Array]:
    """``(alpha_i, sigma_i) [batch]`` of the discrete chain's marginal x_i = alpha_i x_0 + sigma_i z
    at the steps ``labels`` (as :meth:`discrete_noise_label` gives them)."""
    self.check_discrete()
    raise NotImplementedError


class ReverseSDE:
  """Reverse-time SDE / probability-flow ODE of a forward :class:`SDE` for a given score."""

  def __init__(self, forward: SDE, score_fn: ScoreFn, probability_flow: bool):
    self.forward = forward
    self.score_fn = score_fn
    self.probability_flow = bool(probability_flow)
    self.N = forward.N
    self.T = forward.T

  @property
  def _c(self) -> float:
    return 0.5 if self.probability_flow else 1.0

  def _reversed(self, f: Array, g: Array, x: Array, t: Array) -> tuple[Array, Array]:
    """(f - c g^2 score(x, t), g), with g = 0 for the probability-flow ODE."""
    rev_f = f - batch_mul(g**2, self.score_fn(x, t)) * self._c
    return rev_f, (jnp.zeros_like(g) if self.probability_flow else g)

  def sde(self, x: Array, t: Array) -> tuple[Array, Array]:
    """Returns ``(drift [batch, ...], diffusion [batch])`` of the reverse process (time runs T->0)."""
    return self._reversed(*self.forward.sde(x, t), x, t)

  def discretize(self, x: Array, t: Array) -> tuple[Array, Array]:
    """Reverse of :meth:`SDE.discretize`: rev_f = f - c G^2 score, rev_G = G (0 for the ODE)."""
    return self._reversed(*self.forward.discretize(x, t), x, t)


def _standard_normal_logp(z: Array, scale: float = 1.0) -> Array:
  d = np.prod(z.shape[1:])
  return -0.5 * d * np.log(2 * np.pi * scale**2) - _sum_except_batch(z**2) / (2 * scale**2)


class LinearBetaSDE(SDE):
  """Base of the VP and sub-VP SDEs: drift -1/2 beta(t) x with beta(t) = beta_min + t (beta_max -
  beta_min), so alpha(t) = exp(-t^2 (beta_max - beta_min) / 4 - t beta_min / 2); prior N(0, I).
  Subclasses define the diffusion and sigma(t)."""

  def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, N: int = 1000):
    super().__init__(N)
    if not 0 <= beta_min < beta_max:
      raise ValueError(f"{type(self).__name__} needs 0 <= beta_min < beta_max, got {beta_min}, "
                       f"{beta_max}.")
    self.beta_0 = float(beta_min)
    self.beta_1 = float(beta_max)

  def beta(self, t: Array) -> Array:
    return self.beta_0 + t * (self.beta_1 - self.beta_0)

  def _log_mean_coeff(self, t: Array) -> Array:
    return -0.25 * t**2 * (self.beta_1 - self.beta_0) - 0.5 * t * self.beta_0

  def prior_sampling(self, key, shape):
    return jax.random.normal(key, shape)

  def prior_logp(self, z):
    return _standard_normal_logp(z)

  def _t_from_log_alpha(self, log_alpha: Array) -> Array:
    # Solves 1/4 (b1 - b0) t^2 + 1/2 b0 t + log_alpha = 0 for t >= 0.
    b0, db = self.beta_0, self.beta_1 - self.beta_0
    return 2.0 * (-log_alpha) / (0.5 * b0 + jnp.sqrt(0.25 * b0**2 - db * log_alpha))


class VPSDE(LinearBetaSDE, name="vpsde"):
  """Variance-preserving SDE: dx = -1/2 beta(t) x dt + sqrt(beta(t)) dw.

  beta(t) = beta_min + t (beta_max - beta_min). Its N-step discretization is the DDPM chain with
  betas linspace(beta_min / N, beta_max / N, N). Networks predict eps = -sigma(t) score and see
  999 t (continuous) or the DDPM step t (N - 1) (discrete).
  """

  discrete_chain = "ddpm"

  def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, N: int = 1000):
    super().__init__(beta_min, beta_max, N)
    self.discrete_betas = np.linspace(beta_min / N, beta_max / N, N)
    self.alphas = 1.0 - self.discrete_betas
    self.alphas_cumprod = np.cumprod(self.alphas)
    with np.errstate(invalid="ignore"):  # NaN when N < beta_max; check_ddpm_chain() says so
      self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
      self.sqrt_1m_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)

  def check_discrete(self) -> None:
    """The DDPM chain exists and is valid (:meth:`check_ddpm_chain`)."""
    super().check_discrete()
    self.check_ddpm_chain()

  def check_ddpm_chain(self) -> None:
    """Raise unless the N-step DDPM chain is valid (every beta_i = beta(t_i) / N below 1).

    The continuous SDE works for any N; the discrete chain (DDPM loss, discrete-time models,
    ancestral and reverse-diffusion predictors) needs N >= beta_max.
    """
    if self.discrete_betas.max() > 1.0:
      raise ValueError(
          f"VPSDE(N={self.N}, beta_max={self.beta_1:g}) gives DDPM betas up to "
          f"{self.discrete_betas.max():.3g} > 1, so the discrete chain is undefined; raise "
          f"config.model.num_scales to at least {self.beta_1:g} or use continuous training / "
          f"samplers.")

  def sde(self, x, t):
    beta_t = self.beta(t)
    return -0.5 * batch_mul(beta_t, x), jnp.sqrt(beta_t)

  def marginal_coef(self, t):
    log_alpha = self._log_mean_coeff(t)
    return jnp.exp(log_alpha), jnp.sqrt(-jnp.expm1(2.0 * log_alpha))

  def t_from_log_snr(self, log_snr):
    # alpha^2 = sigmoid(lambda)  =>  log alpha = -1/2 softplus(-lambda).
    return self._t_from_log_alpha(-0.5 * jax.nn.softplus(-log_snr))

  def discretize(self, x, t):
    """DDPM: x_{i+1} = sqrt(1 - beta_i) x_i + sqrt(beta_i) z, i = round-down(t (N-1) / T)."""
    self.check_ddpm_chain()
    timestep = self.discrete_index(t)
    beta = jnp.asarray(self.discrete_betas, x.dtype)[timestep]
    alpha = jnp.asarray(self.alphas, x.dtype)[timestep]
    f = batch_mul(jnp.sqrt(alpha), x) - x
    return f, jnp.sqrt(beta)

  def discrete_noise_label(self, t):
    """The DDPM step t (N - 1) (a float; the network embeds it as is)."""
    return t * (self.N - 1)

  def discrete_kernel(self, labels, dtype=jnp.float32):
    """(sqrt(alphabar_i), sqrt(1 - alphabar_i)) at i = int(labels)."""
    self.check_discrete()
    i = jnp.asarray(labels).astype(jnp.int32)
    return (jnp.asarray(self.sqrt_alphas_cumprod, dtype)[i],
            jnp.asarray(self.sqrt_1m_alphas_cumprod, dtype)[i])


class subVPSDE(LinearBetaSDE, name="subvpsde"):
  """sub-VP SDE: dx = -1/2 beta(t) x dt + sqrt(beta(t) (1 - exp(-2 int_0^t beta))) dw.

  Same drift and mean as VP; its std is 1 - alpha(t)^2, always below the VP std.
  """

  def sde(self, x, t):
    beta_t = self.beta(t)
    discount = -jnp.expm1(-2 * self.beta_0 * t - (self.beta_1 - self.beta_0) * t**2)
    return -0.5 * batch_mul(beta_t, x), jnp.sqrt(beta_t * discount)

  def marginal_coef(self, t):
    log_alpha = self._log_mean_coeff(t)
    return jnp.exp(log_alpha), -jnp.expm1(2.0 * log_alpha)

  def t_from_log_snr(self, log_snr):
    # alpha / (1 - alpha^2) = r = exp(lambda / 2)  =>  alpha = 2 r / (1 + sqrt(1 + 4 r^2)).
    r = jnp.exp(0.5 * log_snr)
    alpha = 2.0 * r / (1.0 + jnp.sqrt(1.0 + 4.0 * r**2))
    return self._t_from_log_alpha(jnp.log(alpha))


class VESDE(SDE, name="vesde"):
  """Variance-exploding SDE: dx = sigma(t) sqrt(2 log(sigma_max / sigma_min)) dw.

  sigma(t) = sigma_min (sigma_max / sigma_min)^t; the N-step discretization is the SMLD chain
  over geometric noise levels; the prior is N(0, sigma_max^2 I). Networks output the score and
  see sigma(t) (continuous) or the SMLD step round((T - t)(N - 1)), 0 = sigma_max (discrete).
  """

  sampling_eps = 1e-5
  default_parametrization = "score"
  discrete_chain = "smld"

  def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0, N: int = 1000):
    super().__init__(N)
    if not 0 < sigma_min < sigma_max:
      raise ValueError(f"VESDE needs 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}.")
    self.sigma_min = float(sigma_min)
    self.sigma_max = float(sigma_max)
    self.discrete_sigmas = np.exp(np.linspace(np.log(sigma_min), np.log(sigma_max), N))

  def sigma(self, t: Array) -> Array:
    return self.sigma_min * (self.sigma_max / self.sigma_min) ** t

  def sde(self, x, t):
    diffusion = self.sigma(t) * np.sqrt(2 * (np.log(self.sigma_max) - np.log(self.sigma_min)))
    return jnp.zeros_like(x), diffusion

  def marginal_coef(self, t):
    return jnp.ones_like(t), self.sigma(t)

  def prior_sampling(self, key, shape):
    return jax.random.normal(key, shape) * self.sigma_max

  def prior_logp(self, z):
    return _standard_normal_logp(z, self.sigma_max)

  def t_from_log_snr(self, log_snr):
    log_sigma = -0.5 * log_snr
    return (log_sigma - np.log(self.sigma_min)) / (np.log(self.sigma_max) - np.log(self.sigma_min))

  def discretize(self, x, t):
    """SMLD: x_{i+1} = x_i + sqrt(sigma_{i+1}^2 - sigma_i^2) z (sigma_{-1} = 0)."""
    timestep = self.discrete_index(t)
    sigmas = jnp.asarray(self.discrete_sigmas, x.dtype)
    sigma = sigmas[timestep]
    adjacent = jnp.where(timestep == 0, jnp.zeros_like(t), sigmas[jnp.maximum(timestep - 1, 0)])
    return jnp.zeros_like(x), jnp.sqrt(sigma**2 - adjacent**2)

  def noise_label(self, t):
    """sigma(t) (NCSN++ conditions on log sigma through Fourier features)."""
    return self.marginal_coef(t)[1]

  def discrete_noise_label(self, t):
    """The SMLD step round((T - t)(N - 1)), int32: 0 is sigma_max, N - 1 is sigma_min."""
    return jnp.round((self.T - t) * (self.N - 1)).astype(jnp.int32)

  def discrete_kernel(self, labels, dtype=jnp.float32):
    """(1, sigma_i) with sigma_i = flip(discrete_sigmas)[labels] (descending noise levels)."""
    sigmas = jnp.asarray(self.discrete_sigmas[::-1], dtype)[labels]
    return jnp.ones_like(sigmas), sigmas


# --- Gaussian paths written as x_t = alpha(t) x_0 + sigma(t) n (docs/processes.md) -------------
def _check_finite(owner: str, **values: float) -> None:
  for arg, v in values.items():
    try:
      ok = np.isfinite(float(v))
    except (TypeError, ValueError):
      ok = False
    if not ok:
      raise ValueError(f"{owner} needs a finite number for {arg}, got {arg}={v!r}.")


class EDMSDE(SDE, name="edmsde"):
  """EDM's process (Karras et al. 2022): x_t = x_0 + t n, i.e. sigma(t) = t, s(t) = 1.

      alpha(t) = 1,  sigma(t) = t,  f(x, t) = d log alpha / dt = 0,
      g(t)^2 = d sigma^2 / dt - 2 f sigma^2 = 2 t,       so dx = sqrt(2 t) dw,

  on t in [sigma_min, sigma_max]: the time *is* the noise level, ``T = sigma_max`` and
  ``sampling_eps = sigma_min`` (set per instance). The prior is N(0, sigma_max^2 I); the true
  marginal at T is p_0 convolved with it, and by joint convexity KL(p_T || prior) <=
  E|x_0|^2 / (2 D sigma_max^2) nats per dimension.
  Half log-SNR lambda(t) = -log t, so t = exp(-log_snr / 2). Networks see the noise level t itself
  (positive, like VE's sigma) and default to EDM's preconditioning ('edm'). There is no discrete
  chain (continuous-time training only).
  """

  default_parametrization = "edm"

  def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0, N: int = 1000):
    super().__init__(N)
    _check_finite("EDMSDE", sigma_min=sigma_min, sigma_max=sigma_max)
    if not 0 < sigma_min < sigma_max:
      raise ValueError(f"EDMSDE needs 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, "
                       f"sigma_max={sigma_max}.")
    self.sigma_min = float(sigma_min)
    self.sigma_max = float(sigma_max)
    self.T = self.sigma_max
    self.sampling_eps = self.sigma_min

  def sde(self, x, t):
    return jnp.zeros_like(x), jnp.sqrt(2.0 * t)

  def marginal_coef(self, t):
    return jnp.ones_like(t), t

  def marginal_rates(self, t):
    """((1, t), (0, 1))."""
    return (jnp.ones_like(t), t), (jnp.zeros_like(t), jnp.ones_like(t))

  def log_snr(self, t):
    return -2.0 * jnp.log(t)

  def prior_sampling(self, key, shape):
    return jax.random.normal(key, shape) * self.sigma_max

  def prior_logp(self, z):
    return _standard_normal_logp(z, self.sigma_max)

  def t_from_log_snr(self, log_snr):
    return jnp.exp(-0.5 * log_snr)

  def noise_label(self, t):
    """The noise level sigma(t) = t."""
    return t


class RectifiedFlow(SDE, name="rectified_flow"):
  """Rectified flow / flow matching's linear path (Liu et al. 2023; Lipman et al. 2023):

      x_t = (1 - t) x_0 + t n,   alpha(t) = 1 - t,  sigma(t) = t,   prior N(0, I),
      f(t) = d log alpha / dt = -1 / (1 - t),
      g(t)^2 = d sigma^2 / dt - 2 f sigma^2 = 2 t + 2 t^2 / (1 - t) = 2 t / (1 - t).

  Half log-SNR lambda(t) = log((1 - t) / t) (computed as log1p(-t) - log t), so
  t = sigmoid(-lambda) = sigmoid(-log_snr / 2). The probability-flow velocity
  f x - g^2 score / 2 = E[n - x_0 | x_t] stays finite as t -> 1, but f and g diverge there, and
  at t = 1 the marginal is N(0, I) whatever the data, so a score cannot determine the velocity.

  End time. The process is stopped at ``T`` < 1 (default 0.999): samplers start from the prior
  N(0, I) at t = T, the likelihood integrates up to T and scores z = x_T under N(0, I); training
  draws t in [eps, T]. The true marginal at T is p_T = E_{x_0} N((1 - T) x_0, T^2 I); by joint
  convexity of KL, with e = 1 - T and m2 = E|x_0|^2 / D,

      KL(p_T || N(0, I)) <= (T^2 - 1 - 2 log T) / 2 + e^2 m2 / 2 = e^2 (1 + m2 / 2) + O(e^3),
      KL(N(0, I) || p_T) <= (1/T^2 - 1 + 2 log T) / 2 + e^2 m2 / (2 T^2)
                          = e^2 (1 + m2 / 2) + O(e^3)

  nats per dimension: 1e-6 (1 + m2 / 2) at T = 0.999. To leading order both are
  e^2 (1 + |E x_0|^2 / (2 D)) + O(e^3) per dimension (p_T has mean e E[x_0], covariance
  T^2 I + e^2 Cov(x_0) and higher cumulants O(e^3)), so the bound's m2 / 2 is loose. Per
  example, log N(z; 0, I) - log p_T(z) is O(e) per dimension, of mean zero up to O(e^2): that
  much noise in one example's likelihood (~4.5e-3 bits/dim at most on the d = 2 test mixture).

  Near T the drift is stiff (f = -1/e): with N < T / e steps the PC predictors' Euler-Maruyama
  factor 1 - dt / (1 - t), dt = T / N, is negative at t = T and the first step overshoots; but
  x_t there carries almost no information on x_0 (alpha = e) and the exact score pulls the state
  back in the next steps (N = 100 still samples the d = 2 test mixture at its noise floor). In
  sigma / alpha the process spans (1e-3, 999) against EDM's (0.002, 80), so the fast samplers
  need a few more steps than on EDMSDE for the same error.

  Networks see the label 999 t (T-independent: the marginal at t does not depend on T, so
  neither does the label; positive for t > 0) and default to the flow-matching velocity
  u = n - x_0 ('flow').
  """

  default_parametrization = "flow"

  def __init__(self, T: float = 0.999, N: int = 1000):
    super().__init__(N)
    _check_finite("RectifiedFlow", T=T)
    if not 0 < T < 1:
      raise ValueError(f"RectifiedFlow needs an end time 0 < T < 1 (its drift diverges at t = 1), "
                       f"got T={T}.")
    self.T = float(T)

  def sde(self, x, t):
    return batch_mul(-1.0 / (1.0 - t), x), jnp.sqrt(2.0 * t / (1.0 - t))

  def marginal_coef(self, t):
    return 1.0 - t, t

  def marginal_rates(self, t):
    """((1 - t, t), (-1, 1))."""
    return (1.0 - t, t), (-jnp.ones_like(t), jnp.ones_like(t))

  def log_snr(self, t):
    return 2.0 * (jnp.log1p(-t) - jnp.log(t))

  def prior_sampling(self, key, shape):
    return jax.random.normal(key, shape)

  def prior_logp(self, z):
    return _standard_normal_logp(z)

  def t_from_log_snr(self, log_snr):
    return jax.nn.sigmoid(-0.5 * log_snr)

  def noise_label(self, t):
    """999 t (not 999 t / T: see the class docstring)."""
    return 999.0 * t


class CosineVPSDE(SDE, name="cosine_vpsde"):
  """The cosine schedule of improved DDPM (Nichol & Dhariwal 2021) as a VP SDE:

      alpha(t)^2 = F(t) / F(0),  F(t) = cos^2(((t + s) / (1 + s)) pi / 2),  sigma^2 = 1 - alpha^2,
      f(t) = d log alpha / dt = -beta(t) / 2,  g(t) = sqrt(beta(t)),
      beta(t) = (pi / (1 + s)) tan(((t + s) / (1 + s)) pi / 2),   prior N(0, I).

  With c = pi / (2 (1 + s)) and a0 = s c, they are evaluated without cancellation as
  alpha = sin((1 - t) c) / cos(a0), sigma^2 = sin(t c) sin((t + 2 s) c) / cos(a0)^2 (from
  cos^2 a0 - cos^2 a = sin(a - a0) sin(a + a0)) and beta = 2 c / tan((1 - t) c), accurate as
  t -> 0 (sigma^2 ~ 2 c tan(a0) t, where 1 - alpha^2 would cancel) and as t -> 1. The inverse
  of lambda = log(alpha / sigma) uses
  (cos a, sin a) = (cos(a0) alpha, sqrt(sin^2 a0 + cos^2 a0 sigma^2)) and
  t c = a - a0 = atan2(cos(a0) sigma^2 / (sin a + alpha sin a0), alpha cos^2 a0 + sin a sin a0),
  with alpha^2 = sigmoid(log_snr), sigma^2 = sigmoid(-log_snr).

  End time. beta(t) = 2 c / tan((1 - t) c) ~ 2 / (1 - t) diverges at t = 1 (alpha(1) = 0,
  log-SNR -> -inf), so the drift and diffusion are unbounded and a sampler's first steps would
  be arbitrarily stiff. The process stops at ``T`` = 0.9946 by default, as DPM-Solver does for
  this schedule: there alpha(T) ~ 8.4e-3 (lambda(T) ~ -4.8, close to the VP SDE's -5.0 at
  T = 1), beta(T) ~ 3.7e2 (beta(T) T / (2 N) ~ 0.18 for the PC predictors' Euler step at
  N = 1000) and the prior N(0, I) differs from the marginal by
  KL <= alpha(T)^2 m2 / 2 + O(alpha(T)^4) ~ 3.5e-5 m2 nats per dimension, either way round,
  m2 = E|x_0|^2 / D (joint convexity, as for :class:`RectifiedFlow`). Networks see 999 t (VP's
  999 t / T at T = 1, but T-independent, as for :class:`RectifiedFlow`) and predict eps.
  """

  def __init__(self, s: float = 0.008, T: float = 0.9946, N: int = 1000):
    super().__init__(N)
    _check_finite("CosineVPSDE", s=s, T=T)
    if not s >= 0:
      raise ValueError(f"CosineVPSDE needs an offset s >= 0, got s={s}.")
    if not 0 < T < 1:
      raise ValueError(f"CosineVPSDE needs an end time 0 < T < 1 (beta(t) diverges at t = 1), "
                       f"got T={T}.")
    self.s = float(s)
    self.T = float(T)
    self._c = np.pi / (2.0 * (1.0 + self.s))
    self._a0 = self.s * self._c
    self._cos_a0, self._sin_a0 = np.cos(self._a0), np.sin(self._a0)

  def beta(self, t: Array) -> Array:
    """beta(t) = -2 d log alpha / dt = 2 c / tan((1 - t) c)."""
    return 2.0 * self._c / jnp.tan((1.0 - t) * self._c)

  def sde(self, x, t):
    beta_t = self.beta(t)
    return -0.5 * batch_mul(beta_t, x), jnp.sqrt(beta_t)

  def marginal_coef(self, t):
    alpha = jnp.sin((1.0 - t) * self._c) / self._cos_a0
    sigma = jnp.sqrt(jnp.sin(t * self._c) * jnp.sin((t + 2.0 * self.s) * self._c)) / self._cos_a0
    return alpha, sigma

  def marginal_rates(self, t):
    """d alpha / dt = -alpha beta / 2, d sigma / dt = alpha^2 beta / (2 sigma)."""
    alpha, sigma = self.marginal_coef(t)
    half_beta = 0.5 * self.beta(t)
    return (alpha, sigma), (-alpha * half_beta, alpha**2 * half_beta / sigma)

  def log_snr(self, t):
    return 2.0 * (jnp.log(jnp.sin((1.0 - t) * self._c))
                  - 0.5 * (jnp.log(jnp.sin(t * self._c))
                           + jnp.log(jnp.sin((t + 2.0 * self.s) * self._c))))

  def prior_sampling(self, key, shape):
    return jax.random.normal(key, shape)

  def prior_logp(self, z):
    return _standard_normal_logp(z)

  def t_from_log_snr(self, log_snr):
    alpha = jnp.exp(-0.5 * jax.nn.softplus(-log_snr))   # sqrt(sigmoid(log_snr))
    var = jax.nn.sigmoid(-log_snr)                      # sigma^2
    ca, sa = self._cos_a0, self._sin_a0
    sin_a = jnp.sqrt(sa**2 + ca**2 * var)
    return jnp.arctan2(ca * var / (sin_a + alpha * sa), alpha * ca**2 + sin_a * sa) / self._c

  def noise_label(self, t):
    """999 t (see the class docstring)."""
    return 999.0 * t


def get_sde(config) -> SDE:
  """Builds the SDE registered under ``config.training.sde`` (:data:`SDES`) from ``config.model``
  (:meth:`SDE.from_config`)."""
  name = str(config.training.sde).lower()
  if name not in SDES:
    raise ValueError(
        f"Unknown SDE {config.training.sde!r} in config.training.sde; choose one of {sorted(SDES)}.")
  return SDES[name].from_config(config)
