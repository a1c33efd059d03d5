"""Our fast samplers vs Hugging Face ``diffusers`` on the score of a *trained network* (MNIST).

The network-score companion of ``experiments.compare_reference_samplers`` (which uses the exact
score of a Gaussian mixture). Everything about the model and the quality measure is
``benchmark_samplers_mnist``'s (``experiments.mnist_setup``): the same U-Net of
configs/mnist/vp_continuous.py (trained, or reused from ``--workdir``), the same self-trained MNIST
classifier, the same Frechet distance in its features to held-out test images (**not FID**), the
same noise floor, and the same prior noise x_T for every sampler (``mnist_setup.prior_noise``).
With the same flags as a ``benchmark_samplers_mnist`` run, the numbers of the two scripts are
directly comparable.

How diffusers is driven: exactly as in ``compare_reference_samplers``
(``experiments.diffusers_reference``: ``EpsModel``, ``run_reference`` and the grid of scheduler
settings ``reference_configs``): the schedulers are built with the DDPM betas that discretize the
config's VP SDE and get the network's epsilon-prediction -sigma * s_theta(x, t(s)) at the noise
level they integrate at. Our side runs the configurations of ``diffusers_reference.OURS`` and
``OURS_STOCHASTIC`` and a few of them started below T (``OURS_T_START``). For each NFE the best of
each side is compared.

  python -m experiments.compare_reference_samplers_mnist --data_dir /path/to/mnist \
      --workdir /tmp/mnist_bench --train_steps 1000 --warmup 100 --ema_rate 0.99 \
      --num_samples 256 --sample_batch 128 --nfes 10,20 \
      --out docs/results/samplers_vs_diffusers_mnist.json

Needs ``torch`` and ``diffusers`` (benchmark-only); without them it prints a message and exits 0.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable, Optional, Sequence

import jax
import numpy as np
from absl import app, flags

from experiments import common, diffusers_reference as dref, mnist_setup
from experiments.mnist_setup import Settings
from score_sde import sde_lib
from score_sde.sampling import get_sampler

FLAGS = flags.FLAGS
DEFAULT_OUT = "docs/results/samplers_vs_diffusers_mnist.json"


def define_flags(flag_values: flags.FlagValues = FLAGS) -> None:
  """Defines on ``flag_values`` the settings shared with benchmark_samplers_mnist
  (``mnist_setup.define_flags``) and this script's own flags. Called when the script runs, so that
  importing the module defines no flags."""
  fv = dict(flag_values=flag_values)
  mnist_setup.define_flags(flag_values, out=DEFAULT_OUT)
  flags.adopt_module_key_flags(mnist_setup, **fv)  # listed by --help with this script's own
  flags.DEFINE_list("only", [], "Run only the labels (ours and theirs) containing one of these "
                    "substrings.", **fv)
  flags.DEFINE_integer("repeats", 1, "Sample sets per configuration (new prior noise and sampler "
                       "noise each); the FD is their mean.", **fv)


# Our samplers started below T (option t_start; diffusers' 'leading' spacing starts at t = 0.9
# with 10 of 1000 steps, 0.95 with 20).
OURS_T_START = {
    f"{label} t_start={t}": (name, dict(options, t_start=t))
    for label, (name, options), t in [
        ("dpm_solver++2M-SDE edm +denoise",
         dref.OURS_STOCHASTIC["dpm_solver++2M-SDE edm +denoise"], 0.9),
        ("dpm_solver++2M-SDE edm +denoise",
         dref.OURS_STOCHASTIC["dpm_solver++2M-SDE edm +denoise"], 0.8),
        ("dpm_solver++2M-SDE time_uniform",
         dref.OURS_STOCHASTIC["dpm_solver++2M-SDE time_uniform"], 0.9),
        ("dpm_solver++2M-SDE", dref.OURS_STOCHASTIC["dpm_solver++2M-SDE"], 0.9),
        ("dpm_solver++2M", dref.OURS["dpm_solver++2M"], 0.9),
        ("dpm_solver++2M", dref.OURS["dpm_solver++2M"], 0.8),
        ("unipc-3 bh2", dref.OURS["unipc-3 bh2"], 0.9),
        ("ddim", dref.OURS["ddim"], 0.9),
    ]}


def _noise(s: Settings, sde: sde_lib.SDE, repeat: int):
  """(x_T, sampling key) of repeat ``repeat``; repeat 0 is benchmark_samplers_mnist's."""
  x_T, k_sample, _ = mnist_setup.prior_noise(s, sde)
  if repeat == 0:
    return x_T, k_sample
  k_T, k_sample = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(s.seed), 1000 + repeat))
  return np.asarray(sde.prior_sampling(k_T, x_T.shape)), k_sample


def _row(prep: mnist_setup.Prepared, s: Settings, draws: list) -> Optional[dict]:
  """``draws``: [(samples, nfe, seconds)] per repeat -> FD mean (and std / each over repeats)."""
  fds = []
  for x, _, _ in draws:
    x = x[:s.num_samples]
    if not np.all(np.isfinite(x)):
      return None
    fds.append(prep.fd(s, x))
  row = {"nfe": int(max(n for _, n, _ in draws)), "fd": float(np.mean(fds)),
         "seconds": round(sum(t for _, _, t in draws), 2)}
  if len(fds) > 1:
    row.update(fds=[float(f) for f in fds], fd_std=float(np.std(fds, ddof=1)))
  return row


def compare(s: Settings, diffusers, torch, only: Sequence[str] = (), repeats: int = 1,
            log: Callable[[str], None] = print) -> dict:
  """Both sides at every NFE of ``s.nfes``; with ``repeats`` > 1 every configuration draws that
  many sample sets (new x_T and sampler noise each; the first is the benchmark's) and reports the
  mean FD, its standard deviation and each value. Returns the JSON-able result."""
  if repeats < 1:
    raise ValueError(f"--repeats must be >= 1, got {repeats}.")
  prep = mnist_setup.prepare(s, log)
  sde = sde_lib.get_sde(prep.config)
  if not isinstance(sde, sde_lib.VPSDE) or isinstance(sde, sde_lib.subVPSDE):
    raise ValueError("diffusers' schedulers discretize a VP SDE; the MNIST config must use one.")
  batch, _ = s.batching
  noise = [_noise(s, sde, r) for r in range(repeats)]
  eps_model = dref.EpsModel(mnist_setup.make_score_fn(sde, prep.model, prep.params), sde, torch)
  res = {"settings": dataclasses.asdict(s), "repeats": repeats,
         "diffusers": diffusers.__version__, "torch": torch.__version__, "jax": jax.__version__,
         **prep.info, "ours": {}, "reference": {}}
  shape = (batch, 28, 28, prep.config.data.num_channels)

  def theirs_once(cls_name: str, kwargs: dict, nfe: int, r: int):
    x_T, parts, used, t0 = noise[r][0], [], 0, time.time()
    for i in range(0, len(x_T), batch):
      x, n = dref.run_reference(diffusers, torch, cls_name, kwargs, nfe, eps_model,
                                x_T[i:i + batch], sde, seed=s.seed * 1000 + i + 1_000_000 * r)
      parts.append(x)
      used = max(used, n)
    return np.concatenate(parts), used, time.time() - t0

  def record(side: str, rows: dict, label: str, nfe: int, draws: list) -> None:
    """Scores ``draws`` into ``rows[label]`` and logs it (non-finite samples: logged only)."""
    row = _row(prep, s, draws)
    if row is None:
      log(f"  {side} {label} @ {nfe}: non-finite samples")
      return
    rows[label] = row
    log(f"  {side:9s} {label:38s} nfe={row['nfe']:3d}  FD={row['fd']:8.4g}"
        + (f" +- {row['fd_std']:.3g}" if "fd_std" in row else ""))

  ours_grid = dref.selected({**dref.OURS, **dref.OURS_STOCHASTIC, **OURS_T_START}, only)
  theirs_grid = dref.selected(dref.reference_configs(stochastic=True), only)
  for nfe in s.nfes:
    ours, theirs = {}, {}
    for label, (name, options) in ours_grid.items():
      try:
        sampler = get_sampler(name, sde, shape, nfe=nfe, **options)
      except ValueError as e:
        log(f"  ours {label} @ {nfe}: skipped ({e})")
        continue
      draws = []
      for x_T, k_sample in noise:
        x, used, _, seconds = mnist_setup.draw_samples(sampler, sde, prep.model, prep.params,
                                                       k_sample, s, x_T)
        draws.append((x, used, seconds))
      record("ours", ours, label, nfe, draws)
    for label, (cls_name, kwargs) in theirs_grid.items():
      try:
        draws = [theirs_once(cls_name, kwargs, nfe, r) for r in range(repeats)]
      except Exception as e:  # pylint: disable=broad-except  # a setting that cannot run here
        log(f"  diffusers {label} @ {nfe}: failed ({type(e).__name__}: {e})")
        continue
      if max(n for _, n, _ in draws) > nfe:
        raise AssertionError(f"{label} spent more than {nfe} model calls")
      record("diffusers", theirs, label, nfe, draws)
    res["ours"][str(nfe)], res["reference"][str(nfe)] = ours, theirs
    common.write_result(s.out, res, say=False)
  res["summary"] = dref.summary(res["ours"], res["reference"], res["floor"]["fd"], ("fd",))
  return res


def table(res: dict) -> str:
  lines = ["| NFE | our best | FD | diffusers best | FD | floor | ours <= theirs |",
           "|---|---|---:|---|---:|---:|---|"]
  def fd(side: str, nfe: int, label: str) -> str:
    row = res[side][str(nfe)][label]
    return f"{row['fd']:.4g}" + (f" +- {row['fd_std']:.2g}" if "fd_std" in row else "")

  for r in res["summary"]:
    lines.append(f"| {r['nfe']} | {r['ours_best']} | {fd('ours', r['nfe'], r['ours_best'])} | "
                 f"{r['diffusers_best']} | {fd('reference', r['nfe'], r['diffusers_best'])} | "
                 f"{r['floor_fd']:.3g} | {'yes' if r['ours_at_least_as_accurate'] else 'NO'} |")
  return "\n".join(lines)


def main(argv: Sequence[str]) -> None:
  common.no_arguments(argv)
  reference = dref.import_reference("compare_reference_samplers_mnist")
  if reference is None:
    return
  diffusers, torch = reference
  s = Settings.from_flags(num_bpd=0, plot="")
  res = compare(s, diffusers, torch, only=FLAGS.only, repeats=FLAGS.repeats, log=common.log)
  common.write_result(s.out, res)
  common.log("\nFrechet distance in classifier features (NOT FID):\n" + table(res))


if __name__ == "__main__":
  define_flags()
  app.run(main)
