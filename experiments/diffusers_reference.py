"""Driving Hugging Face ``diffusers`` schedulers with our score, and the grid both sides run.

Shared by ``compare_reference_samplers`` (exact Gaussian-mixture score) and
``compare_reference_samplers_mnist`` (a trained network's score); imported, never run.

The schedulers are built with the DDPM betas that discretize our VP SDE (``beta_schedule='linear'``,
beta_start = beta_min / 1000, beta_end = beta_max / 1000, 1000 train steps). Their "network" is
:class:`EpsModel`: the exact epsilon-prediction of a ``score_fn`` at the noise level the scheduler
is integrating at. At EDM noise level s the VP state has alpha = 1 / sqrt(1 + s^2),
sigma = s alpha, log-SNR = -2 log s, so

    eps(x, s) = -sigma * score(x, t(s)),  t(s) = sde.t_from_log_snr(-2 log s).

``torch`` and ``diffusers`` are benchmark-only dependencies: :func:`import_reference` returns them,
or None after saying how to install them.
"""
from __future__ import annotations

import itertools
import math
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from score_sde import sde_lib

N_TRAIN = 1000

# Our side of the grid, label -> (registry name, options): deterministic samplers ...
OURS = {
    "ddim": ("ddim", {}),
    "heun (EDM)": ("heun", {}),
    "heun (EDM) +denoise": ("heun", dict(denoise=True)),
    "dpm_solver-3S": ("dpm_solver", dict(order=3)),
    "dpm_solver++2M": ("dpm_solver_pp", dict(order=2)),
    "dpm_solver++2M +denoise": ("dpm_solver_pp", dict(order=2, denoise=True)),
    "dpm_solver++2M time_uniform": ("dpm_solver_pp", dict(order=2, schedule="time_uniform")),
    "dpm_solver++3M": ("dpm_solver_pp", dict(order=3)),
    "dpm_solver++3M +denoise": ("dpm_solver_pp", dict(order=3, denoise=True)),
    "dpm_solver++3M edm": ("dpm_solver_pp", dict(order=3, schedule="edm")),
    "unipc-2 bh1": ("unipc", dict(order=2, variant="bh1")),
    "unipc-3 bh1": ("unipc", dict(order=3, variant="bh1")),
    "unipc-3 bh2": ("unipc", dict(order=3, variant="bh2")),
    "unipc-3 bh2 +denoise": ("unipc", dict(order=3, variant="bh2", denoise=True)),
    "unipc-3 bh2 edm": ("unipc", dict(order=3, variant="bh2", schedule="edm")),
}
# ... and stochastic ones (compared on the network score, where they are the best of ours).
OURS_STOCHASTIC = {
    "dpm_solver++2M-SDE": ("dpm_solver_pp", dict(order=2, eta=1.0)),
    "dpm_solver++2M-SDE +denoise": ("dpm_solver_pp", dict(order=2, eta=1.0, denoise=True)),
    "dpm_solver++2M-SDE time_uniform": ("dpm_solver_pp", dict(order=2, eta=1.0,
                                                             schedule="time_uniform")),
    "dpm_solver++2M-SDE edm": ("dpm_solver_pp", dict(order=2, eta=1.0, schedule="edm")),
    "dpm_solver++2M-SDE edm +denoise": ("dpm_solver_pp", dict(order=2, eta=1.0, schedule="edm",
                                                              denoise=True)),
    "dpm_solver++3M-SDE": ("dpm_solver_pp", dict(order=3, eta=1.0)),
    "ddim eta=1": ("ddim", dict(eta=1.0)),
}


def reference_configs(stochastic: bool = False):
  """label -> (diffusers scheduler class name, constructor kwargs); ``stochastic`` adds the
  ancestral / SDE schedulers (DPM-Solver++(2M) SDE, Euler ancestral, DDPM)."""
  out = {}
  for spacing in ("linspace", "leading", "trailing"):
    sp = dict(timestep_spacing=spacing)
    # clip_sample=False: DDIM's default clips x0 to [-1, 1], meant for images, not this mixture.
    out[f"DDIM [{spacing}]"] = ("DDIMScheduler", dict(sp, set_alpha_to_one=True,
                                                      clip_sample=False))
    for order in (2, 3):
      out[f"DPMSolverMultistep++ {order}M [{spacing}]"] = (
          "DPMSolverMultistepScheduler", dict(sp, algorithm_type="dpmsolver++", solver_order=order))
    out[f"DPMSolverMultistep++ 2M karras [{spacing}]"] = (
        "DPMSolverMultistepScheduler", dict(sp, algorithm_type="dpmsolver++", solver_order=2,
                                            use_karras_sigmas=True))
    if spacing == "linspace":  # options that replace the timestep spacing
      for order in (2, 3):  # steps uniform in lambda (their counterpart of our 'logSNR')
        out[f"DPMSolverMultistep++ {order}M lu_lambdas"] = (
            "DPMSolverMultistepScheduler", dict(algorithm_type="dpmsolver++", solver_order=order,
                                                use_lu_lambdas=True))
      # the singlestep scheduler has no timestep_spacing option
      # diffusers refuses final_sigmas_type='zero' with algorithm_type='dpmsolver'.
      out["DPMSolverSinglestep 3S"] = (
          "DPMSolverSinglestepScheduler", dict(algorithm_type="dpmsolver", solver_order=3,
                                               final_sigmas_type="sigma_min"))
      out["DPMSolverSinglestep++ 2S"] = (
          "DPMSolverSinglestepScheduler", dict(algorithm_type="dpmsolver++", solver_order=2))
    for variant, order in itertools.product(("bh1", "bh2"), (2, 3)):
      # bh1's B(h) = -h is infinite on a last step to sigma = 0 (non-finite samples), so bh1
      # ends at the smallest training sigma instead.
      final = dict(final_sigmas_type="sigma_min") if variant == "bh1" else {}
      out[f"UniPC {variant} p{order} [{spacing}]"] = (
          "UniPCMultistepScheduler", dict(sp, solver_type=variant, solver_order=order, **final))
    out[f"Euler [{spacing}]"] = ("EulerDiscreteScheduler", dict(sp))
    out[f"Euler karras [{spacing}]"] = ("EulerDiscreteScheduler", dict(sp, use_karras_sigmas=True))
    out[f"Heun [{spacing}]"] = ("HeunDiscreteScheduler", dict(sp))
    out[f"Heun karras [{spacing}]"] = ("HeunDiscreteScheduler", dict(sp, use_karras_sigmas=True))
    if stochastic:
      for order in (2, 3):
        out[f"DPMSolverMultistep sde-dpmsolver++ {order}M [{spacing}]"] = (
            "DPMSolverMultistepScheduler", dict(sp, algorithm_type="sde-dpmsolver++",
                                                solver_order=order))
      out[f"DPMSolverMultistep sde-dpmsolver++ 2M karras [{spacing}]"] = (
          "DPMSolverMultistepScheduler", dict(sp, algorithm_type="sde-dpmsolver++", solver_order=2,
                                              use_karras_sigmas=True))
      out[f"EulerAncestral [{spacing}]"] = ("EulerAncestralDiscreteScheduler", dict(sp))
      out[f"DDPM [{spacing}]"] = ("DDPMScheduler", dict(sp, clip_sample=False))
  return out


def _steps_for(cls_name: str, nfe: int) -> int:
  """num_inference_steps that spends at most ``nfe`` model calls (Heun: 2 steps - 1)."""
  return (nfe + 1) // 2 if cls_name == "HeunDiscreteScheduler" else nfe


class EpsModel:
  """diffusers "network": the epsilon-prediction -sigma * score(x, t(s)) of a ``score_fn`` (the
  exact mixture score, or a trained network's) at the scheduler's current noise level s."""

  def __init__(self, score, sde: sde_lib.SDE, torch):
    self.torch, self.calls = torch, 0

    @jax.jit
    def eps(x, log_snr):
      t = sde.t_from_log_snr(log_snr)
      _, sigma = sde.marginal_coef(t)
      return -sigma * score(x, jnp.full((x.shape[0],), t, x.dtype))
    self._eps = eps

  def edm_sigma(self, sched, t) -> float:
    if getattr(sched, "sigmas", None) is None:  # DDIM / DDPM: indexed by the training timestep
      abar = float(sched.alphas_cumprod[int(t)])
      return math.sqrt((1 - abar) / abar)
    idx = sched.step_index if sched.step_index is not None else 0
    return float(sched.sigmas[idx])

  def __call__(self, sched, x, t):
    self.calls += 1
    s = self.edm_sigma(sched, t)
    out = self._eps(jnp.asarray(x.numpy(), jnp.float32), jnp.float32(-2.0 * math.log(s)))
    return self.torch.from_numpy(np.asarray(out, np.float32).copy())


def run_reference(diffusers, torch, cls_name: str, kwargs: dict, nfe: int, model: EpsModel,
                  x_T: np.ndarray, sde: sde_lib.VPSDE, seed: int = 0) -> tuple[np.ndarray, int]:
  """One diffusers scheduler from x_T; its betas are the DDPM discretization of ``sde``."""
  cls = getattr(diffusers, cls_name)
  sched = cls(num_train_timesteps=N_TRAIN, beta_start=sde.beta_0 / N_TRAIN,
              beta_end=sde.beta_1 / N_TRAIN,
              beta_schedule="linear", prediction_type="epsilon", **kwargs)
  sched.set_timesteps(_steps_for(cls_name, nfe))
  x = torch.from_numpy(np.asarray(x_T, np.float32).copy()) * sched.init_noise_sigma
  model.calls = 0
  torch.manual_seed(seed)  # the noise of stochastic schedulers
  for t in sched.timesteps:
    x_in = sched.scale_model_input(x, t)
    eps = model(sched, x_in, t)
    x = sched.step(eps, t, x).prev_sample
  return x.numpy(), model.calls


def summary(ours: dict, theirs: dict, floor: float, metrics: Sequence[str]) -> list[dict]:
  """Per NFE (the keys of ``ours``: NFE -> {label: row}): the best configuration of each side by
  ``metrics[0]`` (lower is better), its value of every metric, the noise floor of the first one and
  whether ours is at least as good. NFEs where a side has no row are left out."""
  rank, out = metrics[0], []
  for nfe, o in ours.items():
    t = theirs[nfe]
    if not o or not t:
      continue
    best_o, best_t = min(o, key=lambda k: o[k][rank]), min(t, key=lambda k: t[k][rank])
    out.append({"nfe": int(nfe),
                "ours_best": best_o, **{f"ours_{m}": o[best_o][m] for m in metrics},
                "diffusers_best": best_t, **{f"diffusers_{m}": t[best_t][m] for m in metrics},
                f"floor_{rank}": floor,
                "ours_at_least_as_accurate": o[best_o][rank] <= t[best_t][rank]})
  return out


def selected(configs: dict, only: Sequence[str]) -> dict:
  """The entries of ``configs`` whose label contains one of the substrings ``only`` (``--only``);
  all of them when ``only`` is empty."""
  return {k: v for k, v in configs.items() if not only or any(w in k for w in only)}


def import_reference(script: str) -> Optional[tuple[Any, Any]]:
  """(diffusers, torch), torch set to one thread; or None after printing that ``script`` needs
  them (``pip install torch diffusers``)."""
  try:
    import diffusers
    import torch
  except ImportError as e:
    print(f"{script}: skipped, the reference needs torch and diffusers ({e}); "
          "`pip install torch diffusers` (benchmark-only dependencies).", flush=True)
    return None
  torch.set_num_threads(1)
  return diffusers, torch
