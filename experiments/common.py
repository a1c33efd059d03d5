"""Helpers shared by the scripts of ``experiments/`` (imported by them, never run).

* SDEs by their command-line names (``--sdes vp,ve,subvp``): :data:`SDE_NAMES`, :func:`make_sde`.
* The exact-score benchmarks (``benchmark_samplers``, ``benchmark_start_time``,
  ``compare_reference_samplers``): the Gaussian-mixture score source :func:`mixture_source`, the
  sample distances :func:`distances` and the true-vs-true noise floor :func:`reference_and_floor`.
* The sampler grid of the two sampler benchmarks (exact score and MNIST network):
  :data:`SAMPLER_CONFIGS`, :data:`STOCHASTIC`, :data:`OWN_PRIOR_DRAW`, :func:`build_sampler`,
  :func:`start_point` and the markdown :func:`table`.
* Command-line and output helpers: :func:`no_arguments`, :func:`ints`, :func:`floats`,
  :func:`per_dim_counts`, :func:`log`, :func:`write_result`.
"""
from __future__ import annotations

import functools
from typing import Any, Optional, Sequence

import jax
import numpy as np
from absl import app

from score_sde import analytic, sde_lib
from score_sde.evaluation import metrics
from score_sde.sampling import get_sampler
from score_sde.sampling.base import Sampler
from score_sde.utils import write_json

Array = jax.Array

# --- SDEs --------------------------------------------------------------------------------------
# Command-line name -> the name it is registered under in score_sde.sde_lib.SDES.
SDE_NAMES = {"vp": "vpsde", "subvp": "subvpsde", "ve": "vesde"}


def make_sde(name: str, **params) -> sde_lib.SDE:
  """The SDE of a command-line name (:data:`SDE_NAMES`) with its default parameters (the paper's:
  VP beta in [0.1, 20], VE sigma in [0.01, 50], N = 1000) except ``params``."""
  return sde_lib.SDES[SDE_NAMES[name]](**params)


def check_sde_names(names: Sequence[str]) -> list[str]:
  """``names`` as a list; app.UsageError naming the valid ones if any is not in SDE_NAMES."""
  bad = [s for s in names if s not in SDE_NAMES]
  if bad:
    raise app.UsageError(f"Unknown SDEs {bad}; choose from {sorted(SDE_NAMES)}.")
  return list(names)


# --- exact-score benchmarks ----------------------------------------------------------------------
def mixture_source(dim: int, flag_values: Any = None) -> analytic.GaussianMixture:
  """The default score source of the exact-score benchmarks: 4 components (radius 2, std 0.3) in
  2-D / 64-D, 10 components (radius 4) in 784-D shaped (28, 28, 1); ``flag_values`` unused (the
  signature of a ``--source module:function``)."""
  del flag_values
  if dim == 784:
    return analytic.standard_mixture(784, num_components=10, radius=4.0, std=0.3, seed=0,
                                     data_shape=(28, 28, 1))
  return analytic.standard_mixture(dim, num_components=4, radius=2.0, std=0.3, seed=0)


def distances(key: Array, x: Array, y: Array) -> dict[str, float]:
  """Energy distance of the sample sets x [n, ...] and y [m, ...], and the sliced Wasserstein
  distance (random projections from ``key``) of their first min(n, m) rows."""
  n = min(x.shape[0], y.shape[0])
  return {"energy": float(metrics.energy_distance(x, y)),
          "sliced_w": float(metrics.sliced_wasserstein(key, x[:n], y[:n]))}


def reference_and_floor(source, num_samples: int, k_ref: Array, k_floor: Array,
                        k_sw: Array) -> tuple[Array, dict[str, float], list[dict[str, float]]]:
  """(reference samples, noise floor, the three floors it averages).

  The reference is ``source.sample(k_ref, n)``; the noise floor of each distance is its mean over
  three more true sample sets (keys ``split(k_floor, 3)``) against the reference: what a perfect
  sampler would score, up to noise.
  """
  ref = source.sample(k_ref, num_samples)
  floors = [distances(k_sw, source.sample(k, num_samples), ref)
            for k in jax.random.split(k_floor, 3)]
  floor = {m: float(np.mean([f[m] for f in floors])) for m in floors[0]}
  return ref, floor, floors


# --- the sampler grid ----------------------------------------------------------------------------
# label -> (registry name, options) of the sampler benchmarks. The budget is set per run by
# build_sampler: NFE for the fast samplers, steps for 'pc', the tolerance for the adaptive 'ode'.
SAMPLER_CONFIGS: dict[str, tuple[str, dict]] = {
    "ddim": ("ddim", {}),
    "euler (EDM)": ("euler", {}),
    "heun (EDM)": ("heun", {}),
    "dpm_solver-1": ("dpm_solver", dict(order=1)),
    "dpm_solver-2S": ("dpm_solver", dict(order=2, method="singlestep")),
    "dpm_solver-3S": ("dpm_solver", dict(order=3, method="singlestep")),
    "dpm_solver++2M": ("dpm_solver_pp", dict(order=2)),
    "dpm_solver++3M": ("dpm_solver_pp", dict(order=3)),
    "dpm_solver++2M-SDE": ("dpm_solver_pp", dict(order=2, eta=1.0)),
    "unipc-3 bh1": ("unipc", dict(order=3, variant="bh1")),
    "unipc-3 bh2": ("unipc", dict(order=3, variant="bh2")),
    "pc (euler_maruyama)": ("pc", {}),
    "ode (adaptive)": ("ode", {}),
}
# Rows whose samples are not a deterministic function of x_T (no error against the exact PF-ODE
# solution from the same x_T is measured for them).
STOCHASTIC = ("dpm_solver++2M-SDE", "pc (euler_maruyama)")
# Rows that start from their sampler's own prior draw from the sampling key (x_T = None) instead
# of the x_T shared by every other row. The published results (docs/results/samplers_gmm*.json,
# samplers_mnist.json) were made so; keeping it keeps them reproducible bit for bit. The noise of
# these rows is independent of the shared x_T: a different draw, not a different quality.
OWN_PRIOR_DRAW = ("pc (euler_maruyama)",)


def build_sampler(name: str, options: dict, sde: sde_lib.SDE, shape: Sequence[int],
                  setting: float) -> Sampler:
  """The sampler of one grid row at one budget ``setting``: the NFE of a fast sampler (option
  ``nfe``), the number of time steps N of 'pc' (option ``num_steps``; NFE = N for a predictor
  without corrector), the tolerance rtol = atol of the adaptive 'ode'. ValueError (from the
  registry, before compiling) where the configuration cannot run at that budget."""
  budget = {"pc": dict(num_steps=int(setting)),
            "ode": dict(rtol=float(setting), atol=float(setting))}.get(name,
                                                                       dict(nfe=int(setting)))
  return get_sampler(name, sde, tuple(shape), **budget, **options)


def start_point(label: str, x_T: Array) -> Optional[Array]:
  """The x_T a grid row starts from: the shared ``x_T``, or None (the sampler's own prior draw from
  its key) for the rows of :data:`OWN_PRIOR_DRAW`."""
  return None if label in OWN_PRIOR_DRAW else x_T


def table(res: dict, nfes: Sequence[int], metric: str = "energy") -> str:
  """A markdown table of ``res['results']``: rows = samplers, columns = NFE; the 'ode' row lists
  its own NFEs. Then, where ``res['floor']`` has ``metric``, the floor and exact-solution rows."""
  head = "| sampler | " + " | ".join(str(n) for n in nfes) + " |"
  lines = [head, "|" + "---|" * (len(nfes) + 1)]
  for label, r in res["results"].items():
    rows = [row for row in r["rows"] if metric in row]
    if not rows:
      continue
    if r["sampler"] == "ode":
      cells = ", ".join(f"{row[metric]:.3g} @ {row['nfe']}" for row in rows)
      lines.append(f"| {label} | {cells} |" + " |" * (len(nfes) - 1))
      continue
    by = {row["setting"]: row for row in rows}
    cells = [f"{by[n][metric]:.3g}" if n in by else "-" for n in nfes]
    lines.append(f"| {label} | " + " | ".join(cells) + " |")
  if metric in res["floor"]:
    lines.append("| *floor (true vs true)* | " + " | ".join(
        f"{res['floor'][metric]:.3g}" for _ in nfes) + " |")
    lines.append("| *exact PF-ODE solution* | " + " | ".join(
        f"{res['exact_ode'][metric]:.3g}" for _ in nfes) + " |")
  return "\n".join(lines)


# --- command line and output ---------------------------------------------------------------------
def ints(values: Sequence[str]) -> list[int]:
  """A list flag's items (``--nfes 5,10``) as integers; app.UsageError if one is not."""
  return _cast_all(values, int)


def floats(values: Sequence[str]) -> list[float]:
  """A list flag's items (``--t-starts 1,0.9``) as floats; app.UsageError if one is not."""
  return _cast_all(values, float)


def _cast_all(values: Sequence[str], cast: type) -> list:
  try:
    return [cast(v) for v in values]
  except ValueError as e:
    raise app.UsageError(f"Expected comma-separated {cast.__name__}s, got {','.join(values)!r} "
                         f"({e}).") from e


def per_dim_counts(spec: str, dims: Sequence[int]) -> dict[int, int]:
  """``'4000'`` (every dimension) or ``'2:8000,64:4000'`` -> {dim: count}; app.UsageError when it
  does not parse or a dimension of ``dims`` has no count."""
  try:
    if ":" not in spec:
      return {d: int(spec) for d in dims}
    counts = {int(k): int(v) for k, v in (item.split(":") for item in spec.split(","))}
  except ValueError as e:
    raise app.UsageError(f"--num-samples={spec!r}: give one count or dim:count pairs ({e}).") \
        from e
  missing = [d for d in dims if d not in counts]
  if missing:
    raise app.UsageError(f"--num-samples gives no count for dims {missing}.")
  return counts


def no_arguments(argv: Sequence[str]) -> None:
  """app.UsageError when a script's command line has positional arguments (absl leaves them in
  ``argv[1:]``): every setting of a script is a flag."""
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments {list(argv[1:])}; every setting is a flag "
                         "(--help lists them).")


log = functools.partial(print, flush=True)


def write_result(path: Optional[str], result: Any, say: bool = True) -> None:
  """Writes ``result`` as JSON to ``path`` (atomically, score_sde.utils.write_json) and, with
  ``say``, prints where; nothing when ``path`` is empty or None."""
  if path:
    write_json(path, result)
    if say:
      log(f"wrote {path}")
