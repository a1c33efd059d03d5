"""The rows of the score-SDE paper (Song et al. 2021, arXiv 2011.13456) that a released checkpoint
can reproduce, and the MNIST rows this framework's own models reach on 2 CPU cores: one place.

Each :class:`Row` chains what a number depends on: the published value, the config, the released
checkpoint (Google-Drive folder of yang-song/score_sde and score_sde_pytorch, same folder names in
both, and which ``checkpoint_<N>`` in it), the sampler settings (``config.sampling`` overrides),
the sample count and seed sets, the reference statistics and, for bits/dim, the likelihood
protocol. ``experiments/reproduce.py`` runs a row; ``docs/reproduce.md`` is this table in prose.

Where the values come from (checked, Nov 2026):

* Published FID / IS / FID (ODE) / NLL: the checkpoint table of the score_sde and
  score_sde_pytorch READMEs ("results reported in the paper"), which repeats Table 2 (NLL and
  FID of the black-box ODE sampler) and Table 3 (FID / IS of the PC sampler).
* Which checkpoint: the READMEs' rule: "the first checkpoint (with a smaller number) is the one
  that we reported FID scores in our paper's Table 3 ... The second checkpoint (with a larger
  number) is the one that we reported likelihood values and FIDs of black-box ODE samplers in our
  paper's Table 2 ... The latter is the last checkpoint during training." The index itself is
  written only where a source states it (``Checkpoint.source``); the last checkpoint's index
  follows from the reference's ``run_lib.py`` (``checkpoint_<step // snapshot_freq>``, the last
  at ``n_iters``: 1.3M / 50k = 26, deep models 950k / 50k = 19). Otherwise ``index`` is None and
  the run takes the smaller / larger ``checkpoint_<N>`` of the folder as the README says.
* Sampler settings: the reference configs and the PyTorch demo notebook's table (VE:
  reverse-diffusion predictor + Langevin corrector, snr 0.16, one corrector step; VP / sub-VP:
  Euler-Maruyama, no corrector; N = 1000; the last denoising step on), the ODE sampler at
  rtol = atol = 1e-5 (reference ``sampling.get_ode_sampler`` defaults, RK45 there, dopri5 here).
* Likelihood protocol: the reference ``likelihood.get_likelihood_fn`` defaults (Rademacher
  Hutchinson probes, rtol = atol = 1e-5, integration from eps = 1e-5) and ``run_lib.evaluate``
  (uniformly dequantized test set, 5 passes over it, ``offset = 7 - inverse_scaler(-1)``: +7 bits
  for centered data, +8 for data in [0, 1]).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

# The protocol every CIFAR-10 sample-quality row uses.
CIFAR10_STATS = ("CIFAR-10 train split (50,000 images), 2015-12-05 Inception-v3 pool_3 "
                 "(inception-2015-12-05/pool_3/bilinear/pytorch_fid), built by "
                 "--mode fid_stats / experiments.reproduce if missing")
NUM_SAMPLES = 50_000
NUM_SEEDS = 3          # seed sets: the JSON reports their mean and its standard error
BPD_PROTOCOL = dict(split="test", dequantization="uniform: (x + u) / 256, u ~ U[0, 1)",
                    repeats=5, hutchinson_type="rademacher", rtol=1e-5, atol=1e-5, eps=1e-5,
                    num_images=10_000)
README = ("score_sde / score_sde_pytorch README checkpoint table")


@dataclasses.dataclass(frozen=True)
class Checkpoint:
  """A released checkpoint: ``<folder>/checkpoint_<index>`` (JAX msgpack) or
  ``checkpoint_<index>.pth`` (score_sde_pytorch).

  ``pick``: 'first' (smallest N in the folder: the best-FID checkpoint, Table 3) or 'last'
  (largest N: the end of training, Table 2). ``index``: N where a source states it (``source``),
  else None (the run applies ``pick`` to the folder it is given).
  """
  folder: str
  pick: str
  index: Optional[int] = None
  source: str = ""

  @property
  def name(self) -> str:
    n = "<N>" if self.index is None else str(self.index)
    return f"{self.folder}/checkpoint_{n}"


@dataclasses.dataclass(frozen=True)
class Row:
  """One published number and everything needed to reproduce it.

  metric: 'fid' (FID and IS of samples vs the reference statistics), 'bpd' (test bits/dim of the
  probability-flow ODE) or 'fd' (MNIST: classifier-feature Frechet distance). ``published``: the
  paper's values by JSON key (fid, inception_score, bpd, fd). ``sampling`` / ``eval``: overrides of
  ``config.sampling`` / ``config.eval``. ``mnist``: MNIST rows only, the training and measuring
  settings (:class:`experiments.mnist_setup.Settings` fields).
  """
  id: str
  table: str
  model: str
  metric: str
  published: dict
  config: str
  checkpoint: Optional[Checkpoint] = None
  sampling: dict = dataclasses.field(default_factory=dict)
  eval: dict = dataclasses.field(default_factory=dict)
  num_samples: int = NUM_SAMPLES
  num_seeds: int = NUM_SEEDS
  stats: str = CIFAR10_STATS
  source: str = README
  notes: str = ""
  mnist: Optional[dict] = None

  @property
  def config_module(self) -> str:
    """``configs/vp/x.py`` -> ``configs.vp.x``."""
    return self.config[:-3].replace("/", ".")

  def settings_text(self) -> str:
    """The sampler settings in one line (docs and --list)."""
    s = self.sampling
    if self.metric == "bpd":
      p = dict(BPD_PROTOCOL)
      if self.mnist is not None:   # the MNIST rows' passes are their seed sets
        p.update(rtol=self.mnist["bpd_tol"], repeats=self.num_seeds)
      return (f"PF-ODE likelihood, {p['hutchinson_type']} Hutchinson, rtol=atol={p['rtol']:g}, "
              f"eps={p['eps']:g}, uniform dequantization, {p['repeats']} passes")
    if s.get("method") == "ode":
      return f"PF-ODE (adaptive RK), rtol=atol={s.get('rtol', 1e-5):g}, denoise"
    corr = s.get("corrector", "none")
    text = f"PC: {s['predictor']}"
    if corr != "none":
      text += f" + {corr} (snr {s['snr']}, {s.get('n_steps_each', 1)} step)"
    else:
      text += ", no corrector"
    n = s.get("num_scales")
    return text + (f", N={n}" if n else ", N=1000") + ", denoise"


# --- sampler settings -----------------------------------------------------------------------
_VE_PC = dict(method="pc", predictor="reverse_diffusion", corrector="langevin", snr=0.16,
              n_steps_each=1, noise_removal=True, probability_flow=False)
_VP_PC = dict(method="pc", predictor="euler_maruyama", corrector="none", noise_removal=True,
              probability_flow=False)
_ANCESTRAL = dict(method="pc", predictor="ancestral_sampling", corrector="none",
                  noise_removal=True, probability_flow=False)
_ODE = dict(method="ode", rtol=1e-5, atol=1e-5, noise_removal=True)

_ISSUE_11 = ("yang-song/score_sde#11 (author: 'checkpoint_8 was for Table 3, and the other one "
             "for Table 2', for the VP and deep-VP DDPM++ cont. folders)")
_DEMO = "score_sde_pytorch Score_SDE_demo_PyTorch.ipynb loads "
_LAST_26 = ("last checkpoint: reference run_lib saves checkpoint_<step // 50000>; n_iters 1.3M "
            "-> 26")
_LAST_19 = "last checkpoint: deep configs train 950k steps, 950000 // 50000 = 19"


def _fid(id, model, config, folder, fid, is_=None, sampling=None, index=None, source="",
         table="Table 3", pick="first", notes=""):
  published = {"fid": fid}
  if is_ is not None:
    published["inception_score"] = is_
  return Row(id=id, table=table, model=model, metric="fid", published=published, config=config,
             checkpoint=Checkpoint(folder, pick, index, source), sampling=sampling or {},
             notes=notes)


def _bpd(id, model, config, folder, bpd, index=None, source=""):
  return Row(id=id, table="Table 2", model=model, metric="bpd", published={"bpd": bpd},
             config=config, checkpoint=Checkpoint(folder, "last", index, source),
             eval=dict(bpd_repeats=BPD_PROTOCOL["repeats"], hutchinson_type="rademacher",
                       rtol=1e-5, atol=1e-5, num_bpd_samples=BPD_PROTOCOL["num_images"]),
             num_samples=0, num_seeds=1, stats="-",
             notes="bits/dim of the uniformly dequantized test set, +7 offset (centered data)")


CIFAR10_ROWS = [
    # Table 3: FID / IS with the PC sampler, best-FID checkpoint (the smaller number).
    _fid("ve_ncsnpp_cont_pc", "NCSN++ cont. (VE)", "configs/ve/cifar10_ncsnpp_continuous.py",
         "ve/cifar10_ncsnpp_continuous", 2.38, 9.83, _VE_PC, 24,
         _DEMO + "exp/ve/cifar10_ncsnpp_continuous/checkpoint_24.pth"),
    _fid("ve_ncsnpp_deep_cont_pc", "NCSN++ cont. (deep, VE)",
         "configs/ve/cifar10_ncsnpp_deep_continuous.py", "ve/cifar10_ncsnpp_deep_continuous",
         2.20, 9.89, _VE_PC),
    _fid("ve_ncsnpp_pc", "NCSN++ (VE)", "configs/ve/cifar10_ncsnpp.py", "ve/cifar10_ncsnpp",
         2.45, 9.73, _VE_PC, notes="discrete-time NCSN++ (SMLD objective, sigma-indexed)"),
    _fid("vp_ddpmpp_cont_pc", "DDPM++ cont. (VP)", "configs/vp/cifar10_ddpmpp_continuous.py",
         "vp/cifar10_ddpmpp_continuous", 2.55, 9.58, _VP_PC, 8,
         _ISSUE_11 + "; " + _DEMO + "exp/vp/cifar10_ddpmpp_continuous/checkpoint_8.pth"),
    _fid("vp_ddpmpp_deep_cont_pc", "DDPM++ cont. (deep, VP)",
         "configs/vp/cifar10_ddpmpp_deep_continuous.py", "vp/cifar10_ddpmpp_deep_continuous",
         2.41, 9.68, _VP_PC, 8, _ISSUE_11),
    _fid("vp_ddpmpp_pc", "DDPM++ (VP)", "configs/vp/cifar10_ddpmpp.py", "vp/cifar10_ddpmpp",
         2.78, 9.64, _ANCESTRAL,
         notes="discrete-time DDPM++ (DDPM objective); ancestral sampling as its config"),
    _fid("subvp_ddpmpp_cont_pc", "DDPM++ cont. (sub-VP)",
         "configs/subvp/cifar10_ddpmpp_continuous.py", "subvp/cifar10_ddpmpp_continuous", 2.61,
         9.56, _VP_PC),
    _fid("subvp_ddpmpp_deep_cont_pc", "DDPM++ cont. (deep, sub-VP)",
         "configs/subvp/cifar10_ddpmpp_deep_continuous.py",
         "subvp/cifar10_ddpmpp_deep_continuous", 2.41, 9.57, _VP_PC),
    _fid("vp_ddpm_pc", "DDPM (VP, Ho et al. architecture)", "configs/vp/ddpm/cifar10.py",
         "vp/cifar10_ddpm", 3.24, None, _ANCESTRAL, table="README",
         notes="README row vp/cifar10_ddpm (FID 3.24, no IS); ancestral sampling, 1000 steps"),
    # Table 2: FID of the black-box PF-ODE sampler, last checkpoint (the larger number).
    _fid("vp_ddpm_ode", "DDPM (VP)", "configs/vp/ddpm/cifar10.py", "vp/cifar10_ddpm", 3.37,
         sampling=_ODE, table="Table 2", pick="last"),
    _fid("vp_ddpm_cont_ode", "DDPM cont. (VP)", "configs/vp/ddpm/cifar10_continuous.py",
         "vp/cifar10_ddpm_continuous", 3.69, sampling=_ODE, table="Table 2", pick="last"),
    _fid("subvp_ddpm_cont_ode", "DDPM cont. (sub-VP)", "configs/subvp/cifar10_ddpm_continuous.py",
         "subvp/cifar10_ddpm_continuous", 3.56, sampling=_ODE, index=26, table="Table 2",
         pick="last", source=_LAST_26 + "; zhenzhel/lift_map_detect#1 names checkpoint 26"),
    _fid("vp_ddpmpp_cont_ode", "DDPM++ cont. (VP)", "configs/vp/cifar10_ddpmpp_continuous.py",
         "vp/cifar10_ddpmpp_continuous", 3.93, sampling=_ODE, index=26, table="Table 2",
         pick="last", source=_LAST_26 + "; " + _ISSUE_11),
    _fid("subvp_ddpmpp_cont_ode", "DDPM++ cont. (sub-VP)",
         "configs/subvp/cifar10_ddpmpp_continuous.py", "subvp/cifar10_ddpmpp_continuous", 3.16,
         sampling=_ODE, index=26, table="Table 2", pick="last",
         source=_LAST_26 + "; " + _DEMO + "exp/subvp/cifar10_ddpmpp_continuous/checkpoint_26.pth"),
    _fid("vp_ddpmpp_deep_cont_ode", "DDPM++ cont. (deep, VP)",
         "configs/vp/cifar10_ddpmpp_deep_continuous.py", "vp/cifar10_ddpmpp_deep_continuous",
         3.08, sampling=_ODE, index=19, table="Table 2", pick="last",
         source=_LAST_19 + "; " + _ISSUE_11),
    _fid("subvp_ddpmpp_deep_cont_ode", "DDPM++ cont. (deep, sub-VP)",
         "configs/subvp/cifar10_ddpmpp_deep_continuous.py",
         "subvp/cifar10_ddpmpp_deep_continuous", 2.92, sampling=_ODE, index=19, table="Table 2",
         pick="last", source=_LAST_19),
    # Table 2: NLL (bits/dim) on the uniformly dequantized test set, last checkpoint.
    _bpd("vp_ddpm_bpd", "DDPM (VP)", "configs/vp/ddpm/cifar10.py", "vp/cifar10_ddpm", 3.28),
    _bpd("vp_ddpm_cont_bpd", "DDPM cont. (VP)", "configs/vp/ddpm/cifar10_continuous.py",
         "vp/cifar10_ddpm_continuous", 3.21),
    _bpd("subvp_ddpm_cont_bpd", "DDPM cont. (sub-VP)", "configs/subvp/cifar10_ddpm_continuous.py",
         "subvp/cifar10_ddpm_continuous", 3.05, 26, _LAST_26),
    _bpd("vp_ddpmpp_cont_bpd", "DDPM++ cont. (VP)", "configs/vp/cifar10_ddpmpp_continuous.py",
         "vp/cifar10_ddpmpp_continuous", 3.16, 26, _LAST_26 + "; " + _ISSUE_11),
    _bpd("subvp_ddpmpp_cont_bpd", "DDPM++ cont. (sub-VP)",
         "configs/subvp/cifar10_ddpmpp_continuous.py", "subvp/cifar10_ddpmpp_continuous", 3.02,
         26, _LAST_26),
    _bpd("vp_ddpmpp_deep_cont_bpd", "DDPM++ cont. (deep, VP)",
         "configs/vp/cifar10_ddpmpp_deep_continuous.py", "vp/cifar10_ddpmpp_deep_continuous",
         3.13, 19, _LAST_19 + "; " + _ISSUE_11),
    _bpd("subvp_ddpmpp_deep_cont_bpd", "DDPM++ cont. (deep, sub-VP)",
         "configs/subvp/cifar10_ddpmpp_deep_continuous.py",
         "subvp/cifar10_ddpmpp_deep_continuous", 2.99, 19, _LAST_19),
]

# --- MNIST: this framework's own models, sized for 2 CPU cores --------------------------------
# Every MNIST row trains (or reuses, cached in --workdir) the small U-Net of its config with these
# settings and measures with the classifier-feature FD of score_sde.evaluation.mnist_features
# (the MNIST stand-in for FID; reference: held-out test images) or the test bits/dim.
# The model settings are those of experiments.recipes_mnist's recorded run (5000 steps at batch
# 32, nf = 16, the config's warm-up 1000 and EMA 0.999), so its VP model serves these rows as well.
MNIST_TRAIN = dict(train_steps=5000, batch_size=32, nf=16, warmup=1000, ema_rate=0.999,
                   classifier_steps=200, feature_dim=64, num_samples=256, sample_batch=128,
                   num_bpd=8, bpd_tol=1e-5)
MNIST_SEEDS = 3
_MNIST_PC_STEPS = 50   # N of the PC samplers (config.model.num_scales)
MNIST_STATS = ("classifier-feature FD (score_sde.evaluation.mnist_features, the benchmark's "
               "classifier) against held-out MNIST test images")


def _mnist(id, model, config, metric, sampling, published=None, notes="",
           **settings):
  mnist = dict(MNIST_TRAIN, **settings)
  return Row(id=id, table="MNIST", model=model, metric=metric, published=published or {},
             config=config, sampling=sampling, num_samples=mnist["num_samples"],
             num_seeds=MNIST_SEEDS, stats=MNIST_STATS if metric == "fd" else "-",
             source="measured here (docs/results/reproduce_mnist.json)", notes=notes,
             mnist=mnist)


_N = dict(num_scales=_MNIST_PC_STEPS)
MNIST_ROWS = [
    _mnist("mnist_vp_pc", "MNIST small U-Net (VP)", "configs/mnist/vp_continuous.py", "fd",
           dict(_VP_PC, **_N)),
    _mnist("mnist_subvp_pc", "MNIST small U-Net (sub-VP)", "configs/mnist/subvp_continuous.py",
           "fd", dict(_VP_PC, **_N)),
    _mnist("mnist_ve_pc", "MNIST small U-Net (VE)", "configs/mnist/ve_continuous.py", "fd",
           dict(_VE_PC, **_N)),
    _mnist("mnist_vp_ode", "MNIST small U-Net (VP)", "configs/mnist/vp_continuous.py", "fd",
           dict(_ODE, rtol=1e-3, atol=1e-3),
           notes="PF-ODE at rtol=atol=1e-3 (1e-5 costs ~10x the NFE on 2 cores)"),
    _mnist("mnist_vp_bpd", "MNIST small U-Net (VP)", "configs/mnist/vp_continuous.py", "bpd", {}),
    # The row CI reruns (tests/test_reproduce.py): 20 steps of an nf=8 net; its samples are noise-like
    # (FD far above the real-data floor): it checks the pipeline, not sample quality.
    _mnist("mnist_vp_pc_ci", "MNIST tiny U-Net (VP), CI size", "configs/mnist/vp_continuous.py",
           "fd", dict(_VP_PC, num_scales=20), train_steps=20, nf=8, warmup=10, ema_rate=0.99,
           classifier_steps=30, feature_dim=32, num_samples=64, sample_batch=64, num_bpd=0,
           notes="CI tolerance row: a rerun must land within the recorded seed-to-seed spread"),
]

ROWS: dict[str, Row] = {r.id: r for r in CIFAR10_ROWS + MNIST_ROWS}


def get_row(row_id: str) -> Row:
  """The row ``row_id``; ValueError listing the known ids otherwise."""
  if row_id not in ROWS:
    raise ValueError(f"Unknown row {row_id!r}. Known rows (python -m experiments.reproduce "
                     f"--list): {', '.join(ROWS)}.")
  return ROWS[row_id]


def rows_of_folder(folder: str) -> list[Row]:
  """Every row whose checkpoint lives in the released ``folder``."""
  return [r for r in ROWS.values() if r.checkpoint is not None and r.checkpoint.folder == folder]


def markdown_table(rows: Optional[list[Row]] = None) -> str:
  """The rows as the markdown table of docs/reproduce.md."""
  rows = list(ROWS.values()) if rows is None else rows
  head = ("| row | table | model | published | config | checkpoint | sampler | samples x seeds |\n"
          "|---|---|---|---|---|---|---|---|")
  lines = [head]
  for r in rows:
    pub = ", ".join(f"{k} {v}" for k, v in r.published.items()) or "see MNIST results"
    ck = "trained here" if r.checkpoint is None else (
        f"`{r.checkpoint.name}` ({'best FID' if r.checkpoint.pick == 'first' else 'last'})")
    n = (f"{r.num_samples} x {r.num_seeds}" if r.metric != "bpd" else
         f"{r.eval.get('num_bpd_samples') or r.mnist['num_bpd']} test images")
    lines.append(f"| `{r.id}` | {r.table} | {r.model} | {pub} | `{r.config}` | {ck} | "
                 f"{r.settings_text()} | {n} |")
  return "\n".join(lines)


def as_dict(row: Row) -> dict[str, Any]:
  """The row as JSON-able data (written beside every result)."""
  return dataclasses.asdict(row)
