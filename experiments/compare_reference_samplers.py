"""Our fast samplers vs the widely used implementations in Hugging Face ``diffusers``, same score.

Both sides sample the *same* continuous VP SDE (beta_min = 0.1, beta_max = 20) with the *exact*
score of a Gaussian mixture (:mod:`score_sde.analytic`), from the *same* standard-normal x_T, and
each sample set is scored by its energy distance (and sliced Wasserstein distance) to fresh true
samples; the noise floor is the distance between two true sample sets.

How diffusers is driven. Its schedulers are built with the DDPM betas that discretize our VP
(``beta_schedule='linear'``, beta_start = 0.1 / 1000, beta_end = 20 / 1000, 1000 train steps). Its
"network" is the exact noise prediction at the noise level the scheduler is integrating at: at
EDM noise level s (``scheduler.sigmas[step_index]``, or sqrt((1 - abar_t) / abar_t) for DDIM) the
VP state has alpha = 1 / sqrt(1 + s^2), sigma = s alpha, log-SNR = -2 log s, so

    eps(x, s) = -sigma * score(x, t(s)),  t(s) = sde.t_from_log_snr(-2 log s),

the exact epsilon-prediction for the state x the scheduler hands over (after
``scale_model_input``). The PF-ODE in log-SNR is the same for both sides; only the solvers, their
time steps and end points differ (diffusers goes to sigma = 0 with its last step; ours stop at
t = 1e-3 unless ``denoise``). NFE = the number of score calls, counted by wrapping the model
(Heun spends 2 steps - 1; our samplers report their own count and are checked against it).

For each NFE the best configuration of each side is compared (a grid of each side's options:
solver orders / variants, time-step spacings, Karras sigmas, ...), and matching pairs are listed.

  python experiments/compare_reference_samplers.py --dims 2,64 --nfes 10,20 \
      --out docs/results/samplers_vs_diffusers.json

Needs ``torch`` and ``diffusers`` (benchmark-only, not dependencies of score_sde); without them
the script prints a message and exits 0.
"""
from __future__ import annotations

import argparse
import itertools
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from score_sde import sde_lib
from score_sde.evaluation import metrics
from score_sde.sampling import get_sampler
from score_sde.utils import write_json

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchmark_samplers import mixture_source  # noqa: E402  (same mixtures as the benchmark)

N_TRAIN = 1000

# label -> (our registry name, options).
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


# Stochastic samplers (compared on the network score, where they are the best of ours).
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


def distance(key, x, y) -> dict[str, float]:
  return {"energy": float(metrics.energy_distance(x, y)),
          "sliced_w": float(metrics.sliced_wasserstein(key, x, y))}


def compare(dim: int, nfes, num_samples: int, seed: int, diffusers, torch, log=print) -> dict:
  source = mixture_source(dim)
  sde = sde_lib.VPSDE()
  shape = (num_samples,) + tuple(source.data_shape)
  k_ref, k_floor, k_T, k_sw, k_run = jax.random.split(jax.random.PRNGKey(seed), 5)
  ref = source.sample(k_ref, num_samples)
  floors = [distance(k_sw, source.sample(k, num_samples), ref) for k in jax.random.split(k_floor, 3)]
  floor = {m: float(np.mean([f[m] for f in floors])) for m in floors[0]}
  log(f"== d={dim}, n={num_samples}: floor energy {floor['energy']:.3g}, "
      f"sliced W {floor['sliced_w']:.3g}")
  x_T = sde.prior_sampling(k_T, shape)
  score_fn = source.score_fn(sde)
  model = EpsModel(score_fn, sde, torch)
  res = {"floor": floor, "num_samples": num_samples, "data_shape": list(source.data_shape),
         "ours": {}, "diffusers": {}}
  for nfe in nfes:
    ours, theirs = {}, {}
    for label, (name, options) in OURS.items():
      try:
        sampler = get_sampler(name, sde, shape, nfe=nfe, **options)
      except ValueError as e:
        log(f"  ours {label} @ {nfe}: skipped ({e})")
        continue
      t0 = time.time()
      x, used = sampler(k_run, score_fn, x_T)
      x = jax.block_until_ready(x)
      ours[label] = {"nfe": int(used), "seconds": round(time.time() - t0, 2),
                     **distance(k_sw, x, ref)}
    for label, (cls_name, kwargs) in reference_configs().items():
      t0 = time.time()
      try:
        x, used = run_reference(diffusers, torch, cls_name, kwargs, nfe, model, np.asarray(x_T),
                                sde)
      except Exception as e:  # a diffusers config that does not run at this NFE
        log(f"  diffusers {label} @ {nfe}: failed ({type(e).__name__}: {e})")
        continue
      if used > nfe:
        raise AssertionError(f"{label} spent {used} > {nfe} model calls")
      if not np.all(np.isfinite(x)):
        log(f"  diffusers {label} @ {nfe}: non-finite samples")
        continue
      theirs[label] = {"nfe": int(used), "seconds": round(time.time() - t0, 2),
                       **distance(k_sw, x, ref)}
    res["ours"][str(nfe)], res["diffusers"][str(nfe)] = ours, theirs
    for side, rows in (("ours", ours), ("diffusers", theirs)):
      log(f"  -- {side} @ NFE {nfe} (energy, sliced W):")
      for label, r in sorted(rows.items(), key=lambda kv: kv[1]["energy"]):
        log(f"     {label:38s} nfe={r['nfe']:3d}  {r['energy']:.4g}  {r['sliced_w']:.4g}")
  return res


def summary(res: dict) -> list[dict]:
  out = []
  for nfe in res["ours"]:
    ours, theirs = res["ours"][nfe], res["diffusers"][nfe]
    best_o = min(ours, key=lambda k: ours[k]["energy"])
    best_t = min(theirs, key=lambda k: theirs[k]["energy"])
    out.append({"nfe": int(nfe), "ours_best": best_o, "ours_energy": ours[best_o]["energy"],
                "ours_sliced_w": ours[best_o]["sliced_w"], "diffusers_best": best_t,
                "diffusers_energy": theirs[best_t]["energy"],
                "diffusers_sliced_w": theirs[best_t]["sliced_w"],
                "floor_energy": res["floor"]["energy"],
                "ours_at_least_as_accurate": ours[best_o]["energy"] <= theirs[best_t]["energy"]})
  return out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--dims", default="2,64")
  p.add_argument("--nfes", default="10,20")
  p.add_argument("--num-samples", default="2:8000,64:3000", help="one count or dim:count pairs")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default="")
  p.add_argument("--only", default="", help="run only the labels (ours and theirs) containing "
                 "one of these comma-separated substrings")
  args = p.parse_args(argv)
  if args.only:
    keep = lambda label: any(w in label for w in args.only.split(","))
    global OURS, reference_configs
    OURS = {k: v for k, v in OURS.items() if keep(k)}
    full = reference_configs
    reference_configs = lambda: {k: v for k, v in full().items() if keep(k)}
  try:
    import diffusers
    import torch
  except ImportError as e:
    print(f"compare_reference_samplers: skipped, the reference needs torch and diffusers "
          f"({e}); `pip install torch diffusers` (benchmark-only dependencies).")
    return None
  torch.set_num_threads(1)
  dims = [int(d) for d in args.dims.split(",") if d]
  nfes = [int(n) for n in args.nfes.split(",") if n]
  if ":" in args.num_samples:
    counts = {int(k): int(v) for k, v in (s.split(":") for s in args.num_samples.split(","))}
  else:
    counts = {d: int(args.num_samples) for d in dims}
  out = {"diffusers": diffusers.__version__, "torch": torch.__version__, "jax": jax.__version__,
         "nfes": nfes, "dims": {}}
  for dim in dims:
    res = compare(dim, nfes, counts[dim], args.seed, diffusers, torch,
                  log=lambda s: print(s, flush=True))
    res["summary"] = summary(res)
    out["dims"][str(dim)] = res
    print("\n| d | NFE | our best | energy | diffusers best | energy | floor | ours <= theirs |")
    print("|---|---|---|---|---|---|---|---|")
    for r in res["summary"]:
      print(f"| {dim} | {r['nfe']} | {r['ours_best']} | {r['ours_energy']:.3g} | "
            f"{r['diffusers_best']} | {r['diffusers_energy']:.3g} | {r['floor_energy']:.3g} | "
            f"{'yes' if r['ours_at_least_as_accurate'] else 'NO'} |", flush=True)
    if args.out:
      write_json(args.out, out)
  return out


if __name__ == "__main__":
  main(sys.argv[1:])
