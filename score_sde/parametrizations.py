"""What a network predicts, and how its input and label are preconditioned.

With x_t = alpha x_0 + sigma n (n ~ N(0, I)), every regression target is an exact function of
(x_t, t) and of the score s = -n / sigma = (alpha x_0 - x_t) / sigma^2:

  =========  ==================================  ==========================================
  name       the network output F predicts       score from F
  =========  ==================================  ==========================================
  'score'    s                                   F
  'eps'      n = -sigma s                        -F / sigma
  'x0'       x_0 = (x_t + sigma^2 s) / alpha     (alpha F - x_t) / sigma^2
  'v'        v = alpha n - sigma x_0             from n = (sigma x_t + alpha F) / (alpha^2 + sigma^2)
  'flow'     u = alpha' x_0 + sigma' n = dx_t/dt  from n = (alpha F - alpha' x_t) / (alpha sigma' - alpha' sigma)
  'edm'      EDM preconditioning (below)         from x_0 = D(x_t)
  'consistency'  a consistency model f(x_t, t)    from x_0 = f(x_t, t) (:class:`ConsistencyOutput`)
  =========  ==================================  ==========================================

EDM preconditioning (Karras et al. 2022, Table 1), for any process: with sigma_e = sigma / alpha
(the noise level of x_t / alpha = x_0 + sigma_e n) and s_d = ``sigma_data``,

  c_skip = s_d^2 / (sigma_e^2 + s_d^2)      c_out = sigma_e s_d / sqrt(sigma_e^2 + s_d^2)
  c_in = 1 / sqrt(sigma_e^2 + s_d^2)        c_noise = ln(sigma_e) / 4

  D(x_t) = c_skip x_t / alpha + c_out F(c_in x_t / alpha, label)   (the x_0 prediction).

The network sees the label sigma_e, a positive noise level: the networks here embed it as
Fourier features of log(sigma_e) = 4 c_noise (``embedding_type='fourier'``), EDM's c_noise up
to the Fourier scale. Only 'edm' changes the network's input and label; the others see x_t and
the SDE's ``noise_label(t)``.

:meth:`Parametrization.target` gives the loss target in the output's own space and the weight
w with ||eps_hat - n||^2 = w ||F - target||^2, which is how every loss of
:mod:`score_sde.losses` is one eps-space error times a weighting.

Shapes: ``x``, ``out``, ``x0``, ``noise`` are ``[batch, ...]``; ``alpha``, ``sigma`` ``[batch]``.
"""
from __future__ import annotations

from typing import Any, ClassVar, Optional, Union

import jax
import jax.numpy as jnp

Array = jax.Array

__all__ = ["Parametrization", "PARAMETRIZATIONS", "ConsistencyOutput", "get_parametrization",
           "check_parametrization", "output_to_score", "parametrization_target"]


def _bmul(a: Array, x: Array) -> Array:
  a = jnp.asarray(a)
  return a.reshape(a.shape + (1,) * (x.ndim - a.ndim)) * x


PARAMETRIZATIONS: dict[str, type["Parametrization"]] = {}


class Parametrization:
  """A network output convention. Subclasses declared with ``name=`` are registered.

  Calling an instance, ``p(out, x, alpha, sigma)``, is :meth:`to_score`.
  """

  name: ClassVar[str] = ""
  #: whether the network sees a preconditioned input and label (continuous time only)
  preconditions: ClassVar[bool] = False
  #: whether it needs d alpha / dt and d sigma / dt (continuous time only)
  needs_rates: ClassVar[bool] = False

  def __init_subclass__(cls, name: Optional[str] = None, **kwargs):
    super().__init_subclass__(**kwargs)
    if name is not None:
      cls.name = name
      PARAMETRIZATIONS[name] = cls

  def network_input(self, x: Array, alpha: Array, sigma: Array) -> Array:
    """What the network is given for x_t (x_t itself unless preconditioned)."""
    return x

  def network_label(self, alpha: Array, sigma: Array) -> Optional[Array]:
    """The network's label ``[batch]``; None: the SDE's own ``noise_label(t)``."""
    return None

  def to_score(self, out: Array, x: Array, alpha: Array, sigma: Array,
               rates: Optional[tuple[Array, Array]] = None) -> Array:
    """The score from the network output. ``rates = (d alpha / dt, d sigma / dt)`` ``[batch]``
    (``SDE.marginal_rates``), given when ``needs_rates``."""
    raise NotImplementedError

  def target(self, x0: Array, noise: Array, alpha: Array, sigma: Array,
             rates: Optional[tuple[Array, Array]] = None) -> tuple[Array, Array]:
    """``(target [batch, ...], w [batch])`` with ||eps_hat - n||^2 = w ||out - target||^2."""
    raise NotImplementedError

  def __call__(self, out: Array, x: Array, alpha: Array, sigma: Array, rates=None) -> Array:
    return self.to_score(out, x, alpha, sigma, rates)

  def describe(self) -> str:
    """The name, with any parameter (what checkpoints record)."""
    return self.name

  def __repr__(self) -> str:
    return f"{type(self).__name__}({self.describe()!r})"

  def __eq__(self, other: Any) -> bool:
    return isinstance(other, Parametrization) and self.describe() == other.describe()

  def __hash__(self) -> int:
    return hash(self.describe())


class ScoreOutput(Parametrization, name="score"):
  """F = s (NCSN / VE networks)."""

  def to_score(self, out, x, alpha, sigma, rates=None):
    return out

  def target(self, x0, noise, alpha, sigma, rates=None):
    return -_bmul(1.0 / sigma**2, _bmul(sigma, noise)), sigma**2


class EpsOutput(Parametrization, name="eps"):
  """F = n (DDPM / VP networks): s = -F / sigma."""

  def to_score(self, out, x, alpha, sigma, rates=None):
    return -_bmul(1.0 / sigma, out)

  def target(self, x0, noise, alpha, sigma, rates=None):
    return noise, jnp.ones_like(sigma)


class X0Output(Parametrization, name="x0"):
  """F = x_0: s = (alpha F - x_t) / sigma^2; ||eps err||^2 = (alpha / sigma)^2 ||x0 err||^2."""

  def to_score(self, out, x, alpha, sigma, rates=None):
    return _bmul(1.0 / sigma**2, _bmul(alpha, out) - x)

  def target(self, x0, noise, alpha, sigma, rates=None):
    return x0, (alpha / sigma) ** 2


class VOutput(Parametrization, name="v"):
  """F = v = alpha n - sigma x_0 (Salimans & Ho 2022): n = (sigma x_t + alpha F) / (alpha^2 +
  sigma^2); ||eps err||^2 = alpha^2 / (alpha^2 + sigma^2)^2 ||v err||^2."""

  def to_score(self, out, x, alpha, sigma, rates=None):
    eps = _bmul(1.0 / (alpha**2 + sigma**2), _bmul(sigma, x) + _bmul(alpha, out))
    return -_bmul(1.0 / sigma, eps)

  def target(self, x0, noise, alpha, sigma, rates=None):
    return _bmul(alpha, noise) - _bmul(sigma, x0), (alpha / (alpha**2 + sigma**2)) ** 2


class FlowOutput(Parametrization, name="flow"):
  """F = u = dx_t / dt = alpha' x_0 + sigma' n, the flow-matching velocity (u = n - x_0 for
  rectified flow). With k = alpha sigma' - alpha' sigma: n = (alpha F - alpha' x_t) / k, and
  ||eps err||^2 = (alpha / k)^2 ||u err||^2."""

  needs_rates = True

  def to_score(self, out, x, alpha, sigma, rates=None):
    da, ds = rates
    k = alpha * ds - da * sigma
    return -_bmul(1.0 / (sigma * k), _bmul(alpha, out) - _bmul(da, x))

  def target(self, x0, noise, alpha, sigma, rates=None):
    da, ds = rates
    return _bmul(da, x0) + _bmul(ds, noise), (alpha / (alpha * ds - da * sigma)) ** 2


class EDMPreconditioning(Parametrization, name="edm"):
  """EDM's preconditioned denoiser (module docstring), for any Gaussian path.

  x0_hat = c_skip x_t / alpha + c_out F(c_in x_t / alpha, sigma_e); the loss target is
  F* = (x_0 - c_skip x_t / alpha) / c_out and ||eps err||^2 = (c_out / sigma_e)^2 ||F - F*||^2.
  """

  preconditions = True

  def __init__(self, sigma_data: float = 0.5):
    sigma_data = float(sigma_data)
    if not sigma_data > 0:
      raise ValueError(f"config.model.sigma_data must be > 0 (EDM preconditioning), got "
                       f"{sigma_data}.")
    self.sigma_data = sigma_data

  def coefficients(self, alpha: Array, sigma: Array) -> tuple[Array, Array, Array, Array]:
    """``(sigma_e, c_skip, c_out, c_in)``, each ``[batch]``."""
    sd = self.sigma_data
    sigma_e = sigma / alpha
    norm = sigma_e**2 + sd**2
    return sigma_e, sd**2 / norm, sigma_e * sd * jax.lax.rsqrt(norm), jax.lax.rsqrt(norm)

  def network_input(self, x, alpha, sigma):
    _, _, _, c_in = self.coefficients(alpha, sigma)
    return _bmul(c_in / alpha, x)

  def network_label(self, alpha, sigma):
    return sigma / alpha

  def denoise(self, out: Array, x: Array, alpha: Array, sigma: Array) -> Array:
    """D(x_t) = c_skip x_t / alpha + c_out F: the x_0 prediction ``[batch, ...]``."""
    _, c_skip, c_out, _ = self.coefficients(alpha, sigma)
    return _bmul(c_skip / alpha, x) + _bmul(c_out, out)

  def to_score(self, out, x, alpha, sigma, rates=None):
    return _bmul(1.0 / sigma**2, _bmul(alpha, self.denoise(out, x, alpha, sigma)) - x)

  def target(self, x0, noise, alpha, sigma, rates=None):
    sigma_e, c_skip, c_out, _ = self.coefficients(alpha, sigma)
    x_tilde = x0 + _bmul(sigma_e, noise)              # x_t / alpha
    return _bmul(1.0 / c_out, x0 - _bmul(c_skip, x_tilde)), (c_out / sigma_e) ** 2

  def describe(self):
    return f"edm(sigma_data={self.sigma_data:g})"


class ConsistencyOutput(Parametrization, name="consistency"):
  """A consistency model (Song et al., ICML 2023): x0_hat = f(x_t, t) with the boundary
  condition f(x, eps) = x built in, read on EDM's variables y = x_t / alpha, sigma_e = sigma / alpha:

    d = max(sigma_e - sigma_min, 0),       sigma_min = sigma_e(eps) (1 + 1e-5)
    c_skip = s_d^2 / (d^2 + s_d^2)         c_out = s_d d / sqrt(s_d^2 + sigma_e^2)
    c_in = 1 / sqrt(sigma_e^2 + s_d^2)     label = sigma_e (as 'edm')
    f(x_t, t) = c_skip y + c_out F(c_in y, sigma_e).

  At t = eps, d = 0 exactly, so c_skip = 1 and c_out = 0 in floating point and f(x, eps) = y
  bitwise (= x for VE / EDM, where alpha = 1). ``sigma_min`` is sigma_e(eps) raised by a relative
  1e-5 so that float32 round-off in sigma(t) / alpha(t) at t = eps cannot leave a non-zero c_out
  (times within that band, a relative 1e-5 of the boundary noise level, also return y). Build it
  for an SDE with :meth:`for_sde` (``utils.parametrization_of`` does this from a config); the
  boundary time is ``sde.sampling_eps``.

  As a score model it reads s = (alpha f - x_t) / sigma^2, so every sampler accepts it and the
  consistency sampler recovers f = (x_t + sigma^2 s) / alpha. It is trained by the consistency
  losses of :mod:`score_sde.consistency`, not by a denoising loss (:meth:`target` raises).
  """

  preconditions = True
  BOUNDARY_SLACK = 1e-5

  def __init__(self, sigma_data: float = 0.5, sigma_min: Optional[float] = None):
    sigma_data = float(sigma_data)
    if not sigma_data > 0:
      raise ValueError(f"config.model.sigma_data must be > 0 (consistency parametrization), got "
                       f"{sigma_data}.")
    if sigma_min is None or not float(sigma_min) > 0:
      raise ValueError("The 'consistency' parametrization needs the boundary noise level "
                       "sigma_min = sigma(eps) / alpha(eps) > 0 of its SDE: build it with "
                       f"ConsistencyOutput.for_sde(sde, sigma_data), got sigma_min={sigma_min}.")
    self.sigma_data, self.sigma_min = sigma_data, float(sigma_min)

  @classmethod
  def for_sde(cls, sde, sigma_data: Optional[float] = None,
              eps: Optional[float] = None) -> "ConsistencyOutput":
    """The parametrization whose boundary is at ``eps`` (default ``sde.sampling_eps``) of ``sde``:
    sigma_min = sigma(eps) / alpha(eps) (float64) times (1 + :attr:`BOUNDARY_SLACK`)."""
    eps = float(sde.sampling_eps if eps is None else eps)
    with jax.ensure_compile_time_eval(), jax.enable_x64(True):   # host float64, even when traced
      alpha, sigma = sde.marginal_coef(jnp.asarray([eps], jnp.float64))
      sigma_e = float(sigma[0] / alpha[0])
    return cls(0.5 if sigma_data is None else sigma_data,
               sigma_e * (1.0 + cls.BOUNDARY_SLACK))

  def coefficients(self, alpha: Array, sigma: Array) -> tuple[Array, Array, Array, Array]:
    """``(sigma_e, c_skip, c_out, c_in)``, each ``[batch]``."""
    sd = self.sigma_data
    sigma_e = sigma / alpha
    d = jnp.maximum(sigma_e - self.sigma_min, 0.0)
    c_skip = sd**2 / (d**2 + sd**2)
    c_out = sd * d * jax.lax.rsqrt(sd**2 + sigma_e**2)
    return sigma_e, c_skip, c_out, jax.lax.rsqrt(sigma_e**2 + sd**2)

  def network_input(self, x, alpha, sigma):
    _, _, _, c_in = self.coefficients(alpha, sigma)
    return _bmul(c_in, _bmul(1.0 / alpha, x))

  def network_label(self, alpha, sigma):
    return sigma / alpha

  def denoise(self, out: Array, x: Array, alpha: Array, sigma: Array) -> Array:
    """f(x_t, t) = c_skip y + c_out F, y = x_t / alpha: the consistency function ``[batch, ...]``."""
    _, c_skip, c_out, _ = self.coefficients(alpha, sigma)
    return _bmul(c_skip, _bmul(1.0 / alpha, x)) + _bmul(c_out, out)

  def to_score(self, out, x, alpha, sigma, rates=None):
    return _bmul(1.0 / sigma**2, _bmul(alpha, self.denoise(out, x, alpha, sigma)) - x)

  def target(self, x0, noise, alpha, sigma, rates=None):
    raise ValueError("The 'consistency' parametrization is trained with a consistency loss: set "
                     "config.training.loss to 'consistency_distillation' or "
                     "'consistency_training' (score_sde.consistency).")

  def describe(self):
    return f"consistency(sigma_data={self.sigma_data:g}, sigma_min={self.sigma_min:.6g})"


def get_parametrization(parametrization: Union[str, Parametrization],
                        sigma_data: Optional[float] = None) -> Parametrization:
  """The :class:`Parametrization` named ``parametrization`` (an instance is returned as is).

  ``sigma_data`` (``config.model.sigma_data``, default 0.5) parametrizes 'edm'.
  """
  if isinstance(parametrization, Parametrization):
    return parametrization
  cls = PARAMETRIZATIONS.get(check_parametrization(parametrization))
  if cls is EDMPreconditioning:
    return cls(0.5 if sigma_data is None else sigma_data)
  if cls is ConsistencyOutput:
    return cls(0.5 if sigma_data is None else sigma_data)  # raises: it needs the SDE (for_sde)
  return cls()


def check_parametrization(parametrization: Union[str, Parametrization]) -> str:
  """The name, if registered; ValueError naming the choices otherwise."""
  if isinstance(parametrization, Parametrization):
    return parametrization.name
  if parametrization not in PARAMETRIZATIONS:
    raise ValueError(f"Unknown output parametrization {parametrization!r} (config.model."
                     f"parametrization); choose one of {sorted(PARAMETRIZATIONS)}.")
  return parametrization


def output_to_score(parametrization: Union[str, Parametrization], output: Array, x: Array,
                    alpha: Array, sigma: Array, rates=None) -> Array:
  """The score of x_t = alpha x_0 + sigma n from a network output of the given parametrization."""
  return get_parametrization(parametrization).to_score(output, x, alpha, sigma, rates)


def parametrization_target(parametrization: Union[str, Parametrization], x0: Array, noise: Array,
                           alpha: Array, sigma: Array, rates=None) -> tuple[Array, Array]:
  """``(target [batch, ...], weight [batch])`` of :meth:`Parametrization.target`."""
  return get_parametrization(parametrization).target(x0, noise, alpha, sigma, rates)
