"""IMMA / MIMA on the bundled digits (Zheng & Yeh, ECCV 2024 / AAAI 2025,
the re-learning setting at CPU scale).

A tiny text-conditioned denoiser (self- and cross-attention named like SD's
``to_q/to_k/to_v/to_out``) is pre-trained on all ten digits, one concept
token ``<dk>`` per digit over a frozen random "text encoder". Three target
digits are erased with the UCE closed form on every cross-attention key and
value kernel, then immunized by six methods: ``none`` (the erased model),
``max`` (direct maximisation), ``imma_sequential`` (IMMA per concept,
chained), ``imma_joint`` (IMMA on the pooled concepts), ``mima`` (per-concept
lower levels merged by phi*) and ``mima_average_merge`` (phi* replaced by a
parameter mean). Every model is then attacked through the harness with the
same seeds and budgets (full fine-tuning, LoRA, key/value-only, textual
inversion), per concept and for all concepts jointly, and by the attack
phi* is for (each concept's K/V adapted alone, the copies merged by phi*:
``phi_merge``). A frozen digit classifier scores samples of the attacked
concepts (the paper's CLIP/DINO and ImageNet-classifier stand-ins, spec
§4.6).

  python -m experiments.mima_digits

Library choices, not the papers' (the first three in every report.md):
``S^u`` is every cross-attention parameter and ``S^l`` the whole denoiser
for all methods; the prior batch is real non-target digits; attacks use no
prior preservation, each image with ``copies`` fixed noise draws; the
regularisation keys are 200 filler captions drawn once (the code redraws
LAION captions every step); ``--scheme alternating`` runs the released
scheme, the paper's unrolled one is the default.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from experiments import _cli, _config, _mima_report, _pretrain, _runner
from immunojax import models, modes
from immunojax.immunizer import supervised
from immunojax.eval import concepts, text_to_image as t2i
from immunojax.methods import imma
from immunojax.optimizers import OPTIMIZERS

METHODS = concepts.METHODS
ATTACK_MODES = t2i.ATTACK_MODES
UPPER = (r"attn2/",)                      # S^u: MIMA's "xattn"
LOWER = (r"^unet/",)                      # S^l: MIMA's "unet"
# IMMA Table 1 (ESD-erased artists, LoRA re-learning), via a third party
# (spec §3.2, unverified); no MIMA table value is available (spec §3.3).
PAPER_IMMA_SGR = {"van_gogh_clip": 4.77, "van_gogh_dino": 18.40}


@dataclasses.dataclass(frozen=True)
class Config:
  seed: int = 0
  concepts: tuple[int, ...] = (1, 3, 7)
  patch: int = 4
  dim: int = 64
  context_dim: int = 32
  depth: int = 2
  heads: int = 4
  timesteps: int = 200
  pretrain_steps: int = 3000
  pretrain_lr: float = 1e-3
  pretrain_batch: int = 128
  cfg_dropout: float = 0.1
  classifier_steps: int = 2000
  sample_steps: int = 20
  guidance: float = 3.0
  samples: int = 64
  scheme: Literal["unrolled", "alternating"] = "unrolled"
  immunize_steps: int = 1000
  inner_lr: float = 1e-2
  inner_steps: int = 1
  inner_optimizer: str = "sgd"
  upper_at: Literal["final", "every_step"] = "final"
  outer_lr: float = 1e-4
  batch: int = 32
  prior_weight: float = 1.0
  prior_weights: tuple[float, ...] = dataclasses.field(default=(), metadata={
      "help": "a grid of prior weights: each method keeps the smallest whose "
              "retention (on a selection draw) reaches --retention-floor "
              "(empty: --prior-weight for every method)"})
  retention_floor: float = 0.93
  prior_sweep: Literal["until_matched", "grid"] = dataclasses.field(
      default="until_matched", metadata={"help": "grid: every method at "
      "every weight; until_matched: the next only while below the floor"})
  prior_null: float = dataclasses.field(default=0.0, metadata={
      "help": "share of the prior batch's rows given the null prompt (the "
              "unconditional branch guidance reads)"})
  ascent_bound: float = dataclasses.field(default=0.0, metadata={
      "help": "stop ascending each concept's loss at this multiple of the "
              "erased model's clean concept loss (0: unbounded, as released)"})
  sequential_budget: Literal["per_concept", "total"] = dataclasses.field(
      default="per_concept", metadata={
          "help": "sequential IMMA's outer steps: --immunize-steps per "
                  "concept (as released) or in total (MIMA's budget)"})
  num_seeds: int = dataclasses.field(default=1, metadata={
      "help": "seeds --seed, --seed + 1, ...: the whole pipeline per seed; "
              "summary.attacks holds mean and sd over them"})
  collateral_digits: int = dataclasses.field(default=3, metadata={
      "help": "non-target digits sampled after every attack (selectivity = "
              "concept accuracy / their accuracy)"})
  uce_lambda: float = dataclasses.field(default=0.5, metadata={
      "help": "UCE's weight on the pre-trained kernel (0.5 as released, for "
              "SD's CLIP keys): lam / (lam + |k|^2) of an erased key's "
              "output stays, about 0.2 with this encoder's |k|^2 of 1.6-2.3"})
  merge_ridge: float = 0.0
  attack_modes: tuple[str, ...] = ATTACK_MODES
  attack_steps: int = 500
  eval_every: int = 50
  attack_batch: int = 32
  lr_full: float = 1e-3
  lr_lora: float = 1e-2
  lr_kv: float = 1e-3
  lr_ti: float = 5e-3
  lora_rank: int = 2
  copies: int = 16

  def __post_init__(self):
    _config.require(self, positive=(
        "patch", "dim", "context_dim", "depth", "heads", "timesteps",
        "pretrain_steps", "pretrain_lr", "pretrain_batch", "classifier_steps",
        "sample_steps", "guidance", "samples", "immunize_steps", "inner_steps",
        "outer_lr", "batch", "num_seeds", "attack_steps", "eval_every",
        "attack_batch", "lr_full", "lr_lora", "lr_kv", "lr_ti", "lora_rank",
        "copies", "retention_floor", "uce_lambda"), nonnegative=(
        "inner_lr", "prior_weight", "merge_ridge", "ascent_bound",
        "collateral_digits", "prior_weights"),
        unit=("prior_null", "retention_floor"), divisible=(
            ("dim", "heads"), ("attack_steps", "eval_every")))
    if not 0 <= self.cfg_dropout < 1:
      raise ValueError(f"--cfg-dropout must be in [0, 1), got {self.cfg_dropout}")
    if len(set(self.concepts)) != len(self.concepts) or not (
        2 <= len(self.concepts) <= 9) or not all(0 <= c <= 9
                                                 for c in self.concepts):
      raise ValueError("--concepts must be 2 to 9 distinct digits 0-9, got "
                       f"{self.concepts}")
    if self.inner_optimizer not in OPTIMIZERS:
      raise ValueError(f"--inner-optimizer must be one of {list(OPTIMIZERS)}, "
                       f"got {self.inner_optimizer!r}")
    if self.scheme == "alternating" and (
        self.inner_steps != 1 or self.inner_optimizer != "sgd"
        or self.upper_at != "final"):
      raise ValueError("--inner-steps, --inner-optimizer and --upper-at "
                       "apply to --scheme unrolled (the alternating scheme "
                       "takes one AdamW lower step, as released)")
    if not self.attack_modes or any(m not in ATTACK_MODES
                                    for m in self.attack_modes):
      raise ValueError(f"--attack-modes must be among {list(ATTACK_MODES)}, "
                       f"got {list(self.attack_modes)}")
    if len(set(self.prior_weights)) != len(self.prior_weights):
      raise ValueError(f"--prior-weights must be distinct, got "
                       f"{list(self.prior_weights)}")
    if self.collateral_digits > 10 - len(self.concepts):
      raise ValueError(f"--collateral-digits {self.collateral_digits} exceeds "
                       f"the {10 - len(self.concepts)} non-target digits")
    if (self.sequential_budget == "total"
        and self.immunize_steps < len(self.concepts)):
      raise ValueError("--sequential-budget total needs --immunize-steps >= "
                       "the number of concepts")
    if self.sample_steps > self.timesteps:
      raise ValueError("--sample-steps cannot exceed --timesteps")


QUICK = {"dim": 32, "depth": 1, "pretrain_steps": 300, "classifier_steps": 300,
         "sample_steps": 5, "samples": 16, "immunize_steps": 5,
         "attack_steps": 10, "eval_every": 5,
         "attack_modes": ("lora", "phi_merge"), "copies": 1}


# ------------------------------------------------------------ the setting
def world(cfg: Config) -> t2i.DigitTextToImage:
  """The denoiser, the frozen text encoder, the data (seeded by --seed)."""
  return t2i.DigitTextToImage(
      patch=cfg.patch, dim=cfg.dim, context_dim=cfg.context_dim,
      depth=cfg.depth, heads=cfg.heads, timesteps=cfg.timesteps,
      guidance=cfg.guidance, sample_steps=cfg.sample_steps,
      num_concepts=len(cfg.concepts), seed=cfg.seed)


# -------------------------------------------------------------- pretrain
def pretrain(cfg: Config, run: _runner.Run, st: t2i.DigitTextToImage,
             prefix: str = ""):
  key = jax.random.PRNGKey(cfg.seed + 1)
  arrays, sample = st.pretraining(key, batch=cfg.pretrain_batch,
                                  cfg_dropout=cfg.cfg_dropout)
  trainer = supervised(st.loss, optax.adam(cfg.pretrain_lr))
  state = run.fit(prefix + "pretrain", trainer, trainer.init(st.init, key),
                  sample, arrays, cfg.pretrain_steps, key=key,
                  desc="pre-training the denoiser")
  return trainer.params(state)


def classifier(cfg: Config, run: _runner.Run, st: t2i.DigitTextToImage,
               prefix: str = ""):
  model = models.MLP((64, 128, 10), rngs=nnx.Rngs(cfg.seed + 2))
  apply, init = models.functional(model)
  feats, _ = models.functional(model, "features")
  params = _pretrain.classifier(run, apply, init, st.split,
                                steps=cfg.classifier_steps, lr=1e-3,
                                batch_size=64, seed=cfg.seed + 3,
                                desc="evaluation classifier",
                                loop=prefix + "classifier")
  acc = float(models.accuracy(apply(params, jnp.asarray(st.split.x_test)),
                              st.split.y_test))
  # samples live in [-1, 1]; the classifier reads [0, 1]
  return ((lambda x: apply(params, (x + 1.0) / 2.0)),
          (lambda x: feats(params, (x + 1.0) / 2.0)), acc)


# -------------------------------------------------------------- immunize
def phi_star(cfg: Config, st: t2i.DigitTextToImage):
  """MIMA's merge layer phi* over the attn2 K/V kernels: each concept's
  token row as its key, 200 filler captions and the non-target prompts as
  regularisation keys (MIMA trains through it; phi_merge attacks with it)."""
  keys, reg = st.merge_keys(cfg.concepts, seed=cfg.seed + 11)
  return imma.concept_merge(keys=keys, reg_keys=reg, merged=t2i.KV,
                            ridge=cfg.merge_ridge)


def make_sampler(st: t2i.DigitTextToImage, cfg: Config, key):
  """:func:`immunojax.eval.concepts.concept_sampler` at this config: the
  first ``round(prior_null * batch)`` prior rows carry the null prompt."""
  return concepts.concept_sampler(
      st.draw, key, batch=cfg.batch, lower_steps=cfg.inner_steps,
      null_rows=round(cfg.prior_null * cfg.batch), null_tokens=st.null)


def immunize(cfg: Config, run: _runner.Run, st: t2i.DigitTextToImage,
             erased, *, bound: float | None = None, prefix: str = "",
             methods=None):
  """``methods``' (None: all) released parameters and loop(s)' wall time (a
  first step compiles). ``bound``: the ascent bound B (None: unbounded);
  ``prefix`` names the loops (a seed's, a prior weight's)."""
  opt = optax.chain(optax.clip_by_global_norm(1.0),
                    optax.adamw(cfg.outer_lr, weight_decay=1e-2))
  extra = {} if cfg.scheme == "alternating" else {
      "inner_optimizer": imma.inner_optimizer(cfg.inner_optimizer),
      "upper_at": cfg.upper_at}
  imms = concepts.immunizers(
      st.loss, merge=phi_star(cfg, st), upper=UPPER, optimizer=opt,
      prior_weight=cfg.prior_weight, ascent_bound=bound,
      lower=modes.masked(LOWER), inner_lr=cfg.inner_lr, scheme=cfg.scheme,
      **extra)   # concepts vmapped: a sharded map inside --devices' split fails
  d = st.concept_data(cfg.concepts, cfg.concepts)
  key = jax.random.PRNGKey(cfg.seed + 5)
  sample = make_sampler(st, cfg, key)

  def fit(name, which, start, rows, desc, steps):
    imm = imms[which]
    state = run.fit(prefix + name, imm, imm.init(start, key), sample,
                    (d, rows), steps, key=key, desc=desc)
    return imm.params(state)

  return concepts.immunize_methods(
      fit, erased, concepts=[f"<d{k}>" for k in cfg.concepts],
      steps=cfg.immunize_steps,
      sequential_steps=(cfg.immunize_steps   # MIMA's budget in total
                        if cfg.sequential_budget == "per_concept"
                        else cfg.immunize_steps // len(cfg.concepts)),
      methods=methods)


def attacker_displacement(cfg: Config, st: t2i.DigitTextToImage,
                          params) -> dict:
  """How far the lower level (as imma.mima builds it) and the evaluated
  attack's first checkpoint move ``params``, per concept, on the same images."""
  sim, ev = t2i.attacker_displacement(
      st, params, cfg.concepts,
      lower_optimizer=imma.lower_optimizer(
          imma.inner_optimizer(cfg.inner_optimizer), cfg.inner_lr),
      lower=LOWER, inner_steps=cfg.inner_steps,
      attack_optimizer=optax.adam(cfg.lr_full), attack_steps=cfg.eval_every,
      batch_size=cfg.attack_batch, seed=cfg.seed)
  return {"simulated": sim, "evaluated": ev,
          "simulated_attacker": f"{cfg.inner_steps} {cfg.inner_optimizer} "
                                f"step(s) at {cfg.inner_lr} on S^l",
          "evaluated_attacker": f"{cfg.eval_every} Adam steps at "
                                f"{cfg.lr_full}, full",
          "ratio": float(np.mean(ev) / np.mean(sim))}


# ---------------------------------------------------------------- attack
def attack_all(cfg: Config, run: _runner.Run, st: t2i.DigitTextToImage,
               metric, starts):
  """Every attack mode on every start, one call each, over ``--devices``
  (:func:`immunojax.eval.text_to_image.attack_concepts`); phi* merges."""
  return t2i.attack_concepts(
      st, metric, starts, concepts=cfg.concepts,
      attack_modes=cfg.attack_modes,
      rates={"full": cfg.lr_full, "lora": cfg.lr_lora, "kv": cfg.lr_kv,
             "ti": cfg.lr_ti},
      steps=cfg.attack_steps, eval_every=cfg.eval_every,
      batch_size=cfg.attack_batch, lora_rank=cfg.lora_rank,
      copies=cfg.copies, samples=cfg.samples, merge=phi_star(cfg, st).apply,
      # the non-target digits sampled after every attack (selectivity)
      collateral=[k for k in range(10)
                  if k not in cfg.concepts][:cfg.collateral_digits],
      seed=cfg.seed, devices=run.call_devices(), log=run.print)


# ------------------------------------------------------------ experiment
def immunize_matched(cfg: Config, run: _runner.Run,
                     st: t2i.DigitTextToImage, erased, retention_of, *,
                     bound, prefix=""):
  """Every method at its prior weight (:func:`immunojax.eval.concepts.
  match_utility` over ``--prior-weights``, ``--retention-floor``, ``--prior-
  sweep``). Returns (params, wall seconds, ``retention_matched``)."""
  weights = cfg.prior_weights or (cfg.prior_weight,)

  def train_at(w, methods):
    if len(weights) > 1:
      run.print(f"  prior weight {w:g}" + (
          "" if methods is None else f" ({', '.join(methods)})"))
    name = prefix + (f"prior_{w:g}/" if len(weights) > 1 else "")
    return immunize(dataclasses.replace(cfg, prior_weight=w), run, st,
                    erased, bound=bound, prefix=name, methods=methods)

  return concepts.match_utility(
      train_at, weights, utility=lambda p: retention_of(p, "select"),
      floor=cfg.retention_floor, sweep=cfg.prior_sweep)


def one_seed(cfg: Config, run: _runner.Run, prefix: str = "") -> dict:
  """The whole pipeline at ``cfg.seed``: pre-train, erase, immunize (at a
  matched prior weight when swept), attack; the per-seed summary."""
  st = world(cfg)
  classify, features, clf_acc = classifier(cfg, run, st, prefix)
  pretrained = pretrain(cfg, run, st, prefix)
  erased = st.erase(pretrained, cfg.concepts, lam=cfg.uce_lambda)
  metric = st.judge_metric(classify, features)
  metric_jit = jax.jit(metric)
  others = [k for k in range(10) if k not in cfg.concepts]
  targets_ev = st.judge_data(cfg.concepts, samples=cfg.samples,
                             seed=cfg.seed + 30)
  retain_ev = {draw: st.judge_data(others, samples=cfg.samples,
                                   seed=cfg.seed + off)
               for draw, off in (("report", 41), ("select", 43))}

  def retention_of(params, draw="report"):
    return float(np.mean(np.asarray(metric_jit(params, retain_ev[draw]))[:, 0]))

  before = {"pretrained": np.asarray(metric_jit(pretrained, targets_ev)),
            "erased": np.asarray(metric_jit(erased, targets_ev))}
  moved = attacker_displacement(cfg, st, erased)
  _mima_report.log_erased(run, before, moved)
  clean = st.clean_concept_loss(erased, cfg.concepts, seed=cfg.seed + 70)
  bound = cfg.ascent_bound * clean if cfg.ascent_bound else None
  immunized, imm_wall, matched = immunize_matched(
      cfg, run, st, erased, retention_of, bound=bound, prefix=prefix)
  retention = {m: retention_of(p) for m, p in immunized.items()}
  retention["pretrained"] = retention_of(pretrained)
  for m, r in matched.items():
    r.update(retention=retention[m],
             matched=bool(retention[m] >= cfg.retention_floor))
  target_acc_before = {m: np.asarray(metric_jit(p, targets_ev))[:, 0].tolist()
                       for m, p in immunized.items()}
  curves, attack_wall = attack_all(cfg, run, st, metric, immunized)
  out = _mima_report.summarize(cfg, curves, retention, imm_wall, attack_wall,
                              order=METHODS)
  out.update({
      "classifier_test_accuracy": clf_acc,
      "concepts": list(cfg.concepts),
      "concept_accuracy_before_attack": {
          "pretrained": before["pretrained"][:, 0].tolist(),
          **target_acc_before},
      "retention_accuracy_pretrained": retention["pretrained"],
      "retention_matched": matched,
      "ascent_bound": {"factor": cfg.ascent_bound, "clean_loss": clean,
                       "bound": bound},
      "displacement": moved, "displacement_ratio": moved["ratio"]})
  return out


def experiment(cfg: Config, run: _runner.Run) -> dict:
  seeds = [cfg.seed + i for i in range(cfg.num_seeds)]
  runs = run.over_seeds(seeds, lambda s, prefix: one_seed(
      dataclasses.replace(cfg, seed=s), run, prefix))
  out = _mima_report.combine(runs, seeds)
  out["paper"] = {"imma_table1_sgr": PAPER_IMMA_SGR,
                  "mima_tables": "not available (spec §3.3)"}
  out["targets"] = _mima_report.targets(cfg, out)
  out["claims"] = _mima_report.claims(out)
  out["notes"] = _mima_report.notes(cfg, out)
  _mima_report.figures(cfg, run, out)
  _mima_report.plot(cfg, run, out)
  return out


main = _cli.entry_point("mima_digits", Config, experiment, quick=QUICK,
                        description=__doc__.splitlines()[0], x64=False)

if __name__ == "__main__":
  raise SystemExit(main())
