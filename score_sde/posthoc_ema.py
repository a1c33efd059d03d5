"""Post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion
Models", Sec. 3 and Appendix C): track two power-function EMAs during training, store snapshots of
them, and after training reconstruct the EMA of any width from the snapshots.

**Power-function EMA.** With exponent gamma > 0 and t the number of updates applied (t = 1 after
the first update),

  beta_t = (1 - 1/t)^(gamma + 1),   ema_t = beta_t ema_{t-1} + (1 - beta_t) theta_t,

which unrolls to the exact average ema_t = sum_{tau=1..t} w_tau theta_tau with
w_tau = (tau^(gamma+1) - (tau-1)^(gamma+1)) / t^(gamma+1): the integral over (tau - 1, tau] of the
continuous profile p_t(s) = (gamma + 1) s^gamma / t^(gamma+1) on [0, t] (the weights telescope to
one; beta_1 = 0, so ema_1 = theta_1 and the initial value never counts). Its width relative to
t, the standard deviation of s / t under p_t, is

  sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3))),

decreasing from 1/sqrt(12) ~ 0.2887 (gamma = 0, the running mean) to 0 (gamma -> inf). Inverting
it, gamma is the largest real root of the cubic  gamma^3 + 7 gamma^2 + (16 - s) gamma + (12 - s)
with s = sigma_rel^-2 ((gamma + 2)^2 (gamma + 3) = s (gamma + 1) expanded); it is positive
exactly when 0 < sigma_rel < 1/sqrt(12) (:data:`SIGMA_REL_MAX`). sigma_rel 0.05 -> gamma 16.97,
0.10 -> 6.94.

**Reconstruction.** Snapshot i is the EMA with exponent g_i at step t_i: the params trajectory
integrated against p_i = p_{t_i, g_i} (theta piecewise constant on (tau - 1, tau]). Any
combination sum_i x_i snapshot_i integrates theta against sum_i x_i p_i, so the best
reconstruction of a target profile q (exponent g at step t) in the least-squares sense solves the
normal equations A x = b with the inner products of the profiles in closed form: for t_a <= t_b,

  <p_a, p_b> = int_0^{t_a} p_a p_b ds = (g_a + 1)(g_b + 1) / ((g_a + g_b + 1) t_b) (t_a / t_b)^{g_b}

(symmetric otherwise), A_ij = <p_i, p_j>, b_i = <p_i, q>. The weights are normalized to sum to one
(a constant trajectory is reproduced exactly). A target equal to a stored profile gets weight one
on that snapshot. The fit's relative error ||sum x_i p_i - q|| / ||q|| follows from the same inner
products and is reported with every reconstruction.

**Where things go.** With ``config.training.posthoc_ema_every = k > 0`` the train state carries
the EMAs (:class:`PowerEMAs`, updated inside the jitted train step) and every k steps (and at
``n_iters``) the Trainer writes one ``.npz`` per tracked sigma_rel to
``<workdir>/posthoc_ema/step_<step>-sigma_rel_<sigma_rel>.npz`` (params only, written atomically:
a temp file renamed into place, then read back). ``--mode posthoc_ema --config.eval.sigma_rel=x``
(:func:`score_sde.evaluation.evaluate.run_posthoc_ema`) writes the reconstruction as a kept checkpoint of the workdir
``<workdir>/posthoc_ema/sigma_rel_<x>/`` (EMA and raw params both the reconstruction, the run's
fingerprint), which ``--mode eval`` / ``--mode sample`` read like any other run
(docs/posthoc_ema.md).
"""
from __future__ import annotations

import json
import os
import re
import zipfile
from typing import Any, Optional, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["SIGMA_REL_MAX", "DEFAULT_SIGMA_RELS", "sigma_rel_to_gamma", "gamma_to_sigma_rel",
           "power_ema_beta", "power_ema_weights", "profile_inner_products", "solve_weights",
           "PowerEMAs", "init_power_emas", "update_power_emas", "tracking_of", "Snapshot",
           "snapshot_dir", "snapshot_name", "save_snapshot", "list_snapshots", "load_snapshot",
           "remove_snapshots_after", "combine_snapshots", "reconstruct", "reconstruction_dir",
           "is_reconstruction", "check_invocation","NoSnapshots"]

SIGMA_REL_MAX = float(1.0 / np.sqrt(12.0))   # sigma_rel of gamma = 0 (the running mean)
DEFAULT_SIGMA_RELS = (0.05, 0.10)
SNAPSHOT_DIR = "posthoc_ema"
MARKER = "posthoc_ema.json"   # in a reconstruction's workdir: what it was made from


# --- the math ---------------------------------------------------------------------------------
def _check_sigma_rel(sigma_rel: np.ndarray) -> None:
  bad = ~((sigma_rel > 0) & (sigma_rel < SIGMA_REL_MAX))
  if np.any(bad):
    raise ValueError(f"sigma_rel must be in (0, {SIGMA_REL_MAX:.6f}) = (0, 1/sqrt(12)) (gamma > "
                     f"0), got {sigma_rel[bad].tolist()}.")


def sigma_rel_to_gamma(sigma_rel) -> np.ndarray:
  """The exponent gamma > 0 of the power-function EMA of relative width ``sigma_rel`` (float64,
  same shape): the largest real root of gamma^3 + 7 gamma^2 + (16 - s) gamma + (12 - s),
  s = sigma_rel^-2. ValueError outside (0, 1/sqrt(12))."""
  sigma_rel = np.asarray(sigma_rel, np.float64)
  _check_sigma_rel(sigma_rel)
  out = []
  for s in np.ravel(sigma_rel) ** -2.0:
    roots = np.polynomial.polynomial.polyroots([12.0 - s, 16.0 - s, 7.0, 1.0])
    g = float(np.max(roots[np.abs(roots.imag) <= 1e-9 * max(1.0, np.abs(roots).max())].real))
    # One Newton step on the real polynomial polishes the eigenvalue-based root.
    f = ((g + 7.0) * g + 16.0 - s) * g + 12.0 - s
    df = (3.0 * g + 14.0) * g + 16.0 - s
    out.append(g - f / df if df != 0 else g)
  return np.asarray(out, np.float64).reshape(sigma_rel.shape)


def gamma_to_sigma_rel(gamma) -> np.ndarray:
  """sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3))) (float64)."""
  gamma = np.asarray(gamma, np.float64)
  return np.sqrt((gamma + 1.0) / ((gamma + 2.0) ** 2 * (gamma + 3.0)))


def power_ema_beta(t, gamma):
  """beta_t = (1 - 1/t)^(gamma + 1) (numpy, float64); t >= 1 counts the updates applied."""
  t = np.asarray(t, np.float64)
  with np.errstate(divide="ignore"):  # t = 1: log1p(-1) = -inf, beta = 0
    return np.exp((np.asarray(gamma, np.float64) + 1.0) * np.log1p(-1.0 / t))


def power_ema_weights(t: int, gamma: float) -> np.ndarray:
  """The weights w_tau, tau = 1..t, of theta_tau in the power EMA at step t (float64, sum 1)."""
  tau = np.arange(int(t) + 1, dtype=np.float64)
  c = (tau / float(t)) ** (float(gamma) + 1.0)
  return np.diff(c)


def profile_inner_products(t_a, g_a, t_b, g_b) -> np.ndarray:
  """<p_a, p_b> of power-function profiles (step t, exponent g), broadcast; float64."""
  t_a, g_a, t_b, g_b = (np.asarray(v, np.float64) for v in (t_a, g_a, t_b, g_b))
  a_first = t_a <= t_b
  t_max = np.maximum(t_a, t_b)
  ratio = np.where(a_first, t_a / t_b, t_b / t_a)
  expo = np.where(a_first, g_b, g_a)   # the exponent of the profile that runs longer
  return (g_a + 1.0) * (g_b + 1.0) / ((g_a + g_b + 1.0) * t_max) * ratio ** expo


def solve_weights(steps: Sequence[float], gammas: Sequence[float], target_step: float,
                  target_gamma: float) -> tuple[np.ndarray, float]:
  """(x, rel_err): least-squares weights of the stored profiles (steps[i], gammas[i]) for the
  target profile (target_step, target_gamma), normalized to sum to one, and the fit's relative L2
  error ||sum x_i p_i - q|| / ||q||."""
  steps = np.asarray(steps, np.float64)
  gammas = np.asarray(gammas, np.float64)
  if steps.shape != gammas.shape or steps.ndim != 1 or not len(steps):
    raise ValueError("solve_weights needs matching non-empty 1-D steps and gammas.")
  a = profile_inner_products(steps[:, None], gammas[:, None], steps[None, :], gammas[None, :])
  b = profile_inner_products(steps, gammas, target_step, target_gamma)
  qq = float(profile_inner_products(target_step, target_gamma, target_step, target_gamma))
  # The Gram matrix of many overlapping profiles is ill-conditioned; lstsq (SVD) returns the
  # minimum-norm solution where plain solve would amplify round-off.
  scale = np.sqrt(np.diag(a))
  x = np.linalg.lstsq(a / np.outer(scale, scale), b / scale, rcond=1e-13)[0] / scale
  x = x / np.sum(x)
  err2 = float(x @ a @ x - 2.0 * x @ b + qq)
  return x, float(np.sqrt(max(err2, 0.0) / qq))


# --- tracking inside the train step -------------------------------------------------------------
@flax.struct.dataclass
class PowerEMAs:
  """The tracked power-function EMAs of the train state (:class:`score_sde.losses.TrainState`'s
  ``power_emas``): ``sigma_rels`` float32 [k] (what they track, checked when a run resumes) and
  ``emas``, a tuple of k params trees."""
  sigma_rels: jax.Array
  emas: tuple


def tracking_of(config) -> tuple[int, tuple[float, ...]]:
  """(every, sigma_rels) of ``config.training``: ``posthoc_ema_every`` (absent / None: 0 = off)
  and ``posthoc_ema_sigma_rels`` (absent / None: (0.05, 0.10))."""
  tc = config.training
  every = int(tc.get("posthoc_ema_every", 0) or 0)
  rels = tc.get("posthoc_ema_sigma_rels", None)
  rels = DEFAULT_SIGMA_RELS if rels is None else tuple(float(r) for r in rels)
  return every, rels


def init_power_emas(params: Any, sigma_rels: Sequence[float]) -> PowerEMAs:
  """Fresh EMAs: copies of ``params`` (their value never counts: beta_1 = 0)."""
  return PowerEMAs(sigma_rels=jnp.asarray(sigma_rels, jnp.float32),
                   emas=tuple(jax.tree.map(jnp.array, params) for _ in sigma_rels))


def update_power_emas(power_emas: PowerEMAs, params: Any, t: jax.Array,
                      gammas: Sequence[float]) -> PowerEMAs:
  """One update at step ``t`` (the number of updates applied, including this one; traced int):
  ema <- ema + (1 - beta_t) (params - ema), 1 - beta_t = -expm1((gamma + 1) log1p(-1/t)) (exact
  in float32 also where beta_t rounds to one)."""
  if len(gammas) != len(power_emas.emas):
    raise ValueError(f"The state tracks {len(power_emas.emas)} power EMAs but the config asks for "
                     f"{len(gammas)} (config.training.posthoc_ema_sigma_rels).")
  t = jnp.asarray(t, jnp.float32)
  emas = []
  for g, ema in zip(gammas, power_emas.emas):
    step = -jnp.expm1((float(g) + 1.0) * jnp.log1p(-1.0 / t))
    emas.append(jax.tree.map(lambda e, p, s=step: e + s.astype(e.dtype) * (p - e), ema, params))
  return power_emas.replace(emas=tuple(emas))


# --- snapshots on disk ------------------------------------------------------------------------
_NAME = re.compile(r"^step_(\d+)-sigma_rel_([0-9.eE+-]+)\.npz$")
_META = "__posthoc_ema_meta__"


@flax.struct.dataclass
class Snapshot:
  """A stored EMA snapshot: ``path``, ``step``, ``sigma_rel``, ``gamma``."""
  path: str = flax.struct.field(pytree_node=False)
  step: int = flax.struct.field(pytree_node=False)
  sigma_rel: float = flax.struct.field(pytree_node=False)
  gamma: float = flax.struct.field(pytree_node=False)


class NoSnapshots(FileNotFoundError):
  """A run stored no post-hoc EMA snapshots (``training.posthoc_ema_every`` was 0)."""


def snapshot_dir(workdir: str) -> str:
  return os.path.join(workdir, SNAPSHOT_DIR)


def _rel_text(sigma_rel: float) -> str:
  return f"{float(sigma_rel):.6g}"


def snapshot_name(step: int, sigma_rel: float) -> str:
  """``step_<step, 9 digits>-sigma_rel_<sigma_rel, 6 significant digits>.npz``."""
  return f"step_{int(step):09d}-sigma_rel_{_rel_text(sigma_rel)}.npz"


def _flatten(params: Any) -> dict[str, np.ndarray]:
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  return {jax.tree_util.keystr(p): _host(v) for p, v in leaves}


def _host(x) -> np.ndarray:
  """A replicated (possibly multi-process) array as numpy: its first addressable shard."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    x = x.addressable_shards[0].data
  return np.asarray(jax.device_get(x))


def save_snapshot(directory: str, step: int, sigma_rel: float, params: Any,
                  fingerprint: Optional[dict] = None) -> str:
  """Writes ``params`` (the EMA of ``sigma_rel`` at ``step``) to ``directory``; returns the path.

  Atomic: written to ``<name>.tmp``, flushed to disk, read back (every array listed), then renamed
  into place; a write interrupted at any point leaves no ``.npz`` of that name (an existing one is
  replaced only by a complete file). OSError (one line, naming the directory) if it fails.
  """
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, snapshot_name(step, sigma_rel))
  tmp = path + ".tmp"
  arrays = _flatten(params)
  meta = {"step": int(step), "sigma_rel": float(sigma_rel),
          "gamma": float(sigma_rel_to_gamma(sigma_rel)), "fingerprint": fingerprint}
  try:
    with open(tmp, "wb") as f:
      np.savez(f, **{_META: np.asarray(json.dumps(meta))}, **arrays)
      f.flush()
      os.fsync(f.fileno())
    with zipfile.ZipFile(tmp) as z:
      names = {n[:-4] for n in z.namelist()}
    if names != set(arrays) | {_META}:
      raise OSError(f"{tmp} reads back with other arrays than were written")
    os.replace(tmp, path)
  except OSError as e:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise OSError(getattr(e, "errno", None) or 0, (
        f"Could not write the post-hoc EMA snapshot of step {step} to {directory}: "
        f"{e.strerror or e}. Earlier snapshots and checkpoints are intact; free disk space or "
        "choose a writable --workdir, then rerun to resume.")) from None
  return path


def _read_meta(path: str) -> dict:
  with np.load(path) as z:
    return json.loads(str(z[_META]))


def list_snapshots(directory: str) -> list[Snapshot]:
  """The complete snapshots in ``directory``, by (step, sigma_rel); ``.tmp`` leftovers of an
  interrupted write are not snapshots (and are ignored)."""
  out = []
  if not os.path.isdir(directory):
    return out
  for name in os.listdir(directory):
    m = _NAME.match(name)
    if not m:
      continue
    rel = float(m.group(2))
    out.append(Snapshot(os.path.join(directory, name), int(m.group(1)), rel,
                        float(sigma_rel_to_gamma(rel))))
  return sorted(out, key=lambda s: (s.step, s.sigma_rel))


def remove_snapshots_after(directory: str, step: int) -> list[int]:
  """Deletes the snapshots of steps > ``step`` and ``.tmp`` leftovers (a resumed run rewrites
  them from the restored state); returns the steps removed."""
  removed = set()
  if not os.path.isdir(directory):
    return []
  for name in os.listdir(directory):
    if name.endswith(".npz.tmp"):
      os.remove(os.path.join(directory, name))
  for s in list_snapshots(directory):
    if s.step > step:
      os.remove(s.path)
      removed.add(s.step)
  return sorted(removed)


def load_snapshot(snapshot: Snapshot, template: Any, fingerprint: Optional[dict] = None,
                  allow_mismatch: bool = False) -> Any:
  """The params tree stored in ``snapshot`` (numpy float arrays, the structure of ``template``).

  ValueError when its arrays do not match the template's names and shapes, or (unless
  ``allow_mismatch``) its stored fingerprint differs from ``fingerprint``.
  """
  from score_sde.checkpointing import CheckpointMismatch, describe_mismatch
  leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
  with np.load(snapshot.path) as z:
    meta = json.loads(str(z[_META]))
    stored = meta.get("fingerprint")
    if fingerprint is not None and stored is not None:
      diff = describe_mismatch(stored, fingerprint)
      if diff and not allow_mismatch:
        raise CheckpointMismatch(f"The post-hoc EMA snapshot {snapshot.path} was written by a run "
                                 "with another configuration:\n  " + "\n  ".join(diff))
    out = []
    for p, v in leaves:
      k = jax.tree_util.keystr(p)
      if k not in z.files or z[k].shape != tuple(np.shape(v)):
        raise ValueError(f"The post-hoc EMA snapshot {snapshot.path} does not hold {k} of shape "
                         f"{tuple(np.shape(v))}: it was written for another network.")
      out.append(z[k])
  return jax.tree_util.tree_unflatten(treedef, out)


def combine_snapshots(snapshots: Sequence[Snapshot], weights: Sequence[float], template: Any,
                      **load_kw) -> Any:
  """sum_i weights[i] snapshot_i as a params tree of the template's dtypes (accumulated in
  float64 on the host, one snapshot in memory at a time)."""
  if len(snapshots) != len(weights):
    raise ValueError("combine_snapshots needs one weight per snapshot.")
  acc = None
  for s, w in zip(snapshots, weights):
    if w == 0:
      continue
    tree = load_snapshot(s, template, **load_kw)
    term = jax.tree.map(lambda x, w=float(w): np.asarray(x, np.float64) * w, tree)
    acc = term if acc is None else jax.tree.map(np.add, acc, term)
  if acc is None:
    raise ValueError("All reconstruction weights are zero.")
  return jax.tree.map(lambda a, t: a.astype(np.dtype(t.dtype)), acc, template)


def reconstruct(directory: str, sigma_rel: float, template: Any, step: Optional[int] = None,
                fingerprint: Optional[dict] = None, allow_mismatch: bool = False
                ) -> tuple[Any, dict]:
  """(params, info): the EMA of ``sigma_rel`` at ``step`` (default: the newest snapshot step)
  reconstructed from the snapshots in ``directory`` at steps <= ``step``.

  info: step, sigma_rel, gamma, the snapshots used with their weights, and ``fit_rel_error`` (the
  relative L2 error of the fitted profile). :class:`NoSnapshots` when there are none; ValueError
  for a step without snapshots or a sigma_rel out of range.
  """
  gamma = float(sigma_rel_to_gamma(sigma_rel))
  snaps = list_snapshots(directory)
  if not snaps:
    raise NoSnapshots(f"No post-hoc EMA snapshots under {directory}: the run stored none. Train "
                      "with config.training.posthoc_ema_every > 0 to store them.")
  steps = sorted({s.step for s in snaps})
  if step is None:
    step = steps[-1]
  if int(step) not in steps:
    raise FileNotFoundError(f"No post-hoc EMA snapshots at step {step} under {directory}; snapshot "
                     f"steps: {steps}.")
  use = [s for s in snaps if s.step <= int(step)]
  x, err = solve_weights([s.step for s in use], [s.gamma for s in use], float(step), gamma)
  params = combine_snapshots(use, x, template, fingerprint=fingerprint,
                             allow_mismatch=allow_mismatch)
  info = {"step": int(step), "sigma_rel": float(sigma_rel), "gamma": gamma,
          "fit_rel_error": err,
          "snapshots": [{"file": os.path.basename(s.path), "step": s.step,
                         "sigma_rel": s.sigma_rel, "weight": float(w)} for s, w in zip(use, x)]}
  return params, info


# --- the command line: --mode posthoc_ema ------------------------------------------------------
def reconstruction_dir(workdir: str, sigma_rel: float) -> str:
  """The workdir of a reconstruction: ``<workdir>/posthoc_ema/sigma_rel_<sigma_rel>``."""
  return os.path.join(snapshot_dir(workdir), f"sigma_rel_{_rel_text(sigma_rel)}")


def is_reconstruction(workdir: str) -> bool:
  """Whether ``workdir`` holds a post-hoc EMA reconstruction (evaluation and sampling only)."""
  return os.path.exists(os.path.join(workdir, MARKER))


def _no_snapshots_message(workdir: str) -> str:
  return (f"No post-hoc EMA snapshots under {snapshot_dir(workdir)}: the run in {workdir} stored "
          "none (config.training.posthoc_ema_every was 0). Train with "
          "--config.training.posthoc_ema_every=<k> > 0 (a multiple of n_jitted_steps) to store "
          "them.")


def check_invocation(config, workdir: str, mode: str) -> tuple[Optional[str], str]:
  """(problem, eval_workdir) of a command line, from files and the config only (nothing built).

  ``problem``: one line when ``mode`` cannot work (posthoc_ema without ``config.eval.sigma_rel``
  or without snapshots; eval / sample of a sigma_rel not reconstructed yet; all with a sigma_rel
  but no snapshots configured), else None. ``eval_workdir``: where eval / sample read
  checkpoints: the reconstruction of ``config.eval.sigma_rel`` (:func:`reconstruction_dir`) when
  it is set, else ``workdir``.
  """
  sigma_rel = config.eval.get("sigma_rel", None)
  if sigma_rel is None:
    if mode == "posthoc_ema":
      return ("--mode posthoc_ema reconstructs the EMA of width config.eval.sigma_rel: set "
              f"--config.eval.sigma_rel (e.g. 0.07), in (0, {SIGMA_REL_MAX:.4f}).", workdir)
    return None, workdir
  if is_reconstruction(workdir):  # --workdir names a reconstruction itself
    if mode == "posthoc_ema":
      return (f"{workdir} holds a post-hoc EMA reconstruction; pass the run's own --workdir to "
              "--mode posthoc_ema.", workdir)
    return None, workdir
  out = reconstruction_dir(workdir, sigma_rel)
  if mode == "posthoc_ema" and not list_snapshots(snapshot_dir(workdir)):
    return _no_snapshots_message(workdir), out
  if mode == "all" and not tracking_of(config)[0]:
    return (f"--mode all with config.eval.sigma_rel={sigma_rel:g} reconstructs that EMA after "
            "training, but config.training.posthoc_ema_every=0 stores no snapshots: set it > 0 "
            "(or leave config.eval.sigma_rel unset).", out)
  if mode in ("eval", "sample") and not os.path.isdir(os.path.join(out, "checkpoints")):
    return (f"No post-hoc EMA reconstruction of sigma_rel={sigma_rel:g} in {out}: run --mode "
            f"posthoc_ema --config.eval.sigma_rel={sigma_rel:g} with this --workdir first (or "
            "leave config.eval.sigma_rel unset to use the run's own checkpoints).", out)
  return None, out
