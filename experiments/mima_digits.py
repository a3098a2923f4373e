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
``phi_merge``). A frozen digit
classifier scores samples of the attacked concepts (the paper's CLIP/DINO
and ImageNet-classifier stand-ins, spec §4.6).

  python -m experiments.mima_digits

Library choices, not the papers' (also in every report.md): ``S^u`` is every
cross-attention parameter (``attn2.*``, MIMA's ``xattn``) for all methods, so
they differ only in the lower level; ``S^l`` is the whole denoiser
(``unet``); the paper's unrolled scheme is the default (``--scheme
alternating`` runs the released one); the regularisation keys are 200 filler
captions drawn once (the code redraws LAION captions every step); the prior
batch is real non-target digits with their own prompts; attacks train on the
concept's images only (no prior preservation), each image with ``copies``
fixed noise draws.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from experiments import _claims, _cli, _config, _plots, _pretrain, _runner
from immunojax import attacks, data, diffusion, lora, models, modes
from immunojax.data import prompts
from immunojax.immunizer import supervised
from immunojax.eval import (concepts, curves as eval_curves, displacement,
                            generative, merge_attack)
from immunojax.methods import imma
from immunojax.optimizers import OPTIMIZERS, make_optimizer

METHODS = ("none", "max", "imma_sequential", "imma_joint", "mima",
           "mima_average_merge")
ATTACK_MODES = ("full", "lora", "kv", "ti", "phi_merge")
UPPER = (r"attn2/",)                      # S^u: MIMA's "xattn"
LOWER = (r"^unet/",)                      # S^l: MIMA's "unet"
KV = (r"attn2/to_[kv]/kernel",)
ATTN = (r"attn[12]/to_(q|k|v|out)/kernel",)
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
        "patch", "dim", "context_dim", "depth", "heads", "timesteps", "pretrain_steps",
        "pretrain_lr", "pretrain_batch", "classifier_steps", "sample_steps",
        "guidance", "samples", "immunize_steps", "inner_steps", "outer_lr",
        "batch", "num_seeds",
        "attack_steps", "eval_every", "attack_batch", "lr_full", "lr_lora",
        "lr_kv", "lr_ti", "lora_rank", "copies"))
    if not 0 <= self.cfg_dropout < 1:
      raise ValueError(f"--cfg-dropout must be in [0, 1), got {self.cfg_dropout}")
    for name in ("inner_lr", "prior_weight", "merge_ridge", "ascent_bound",
                 "collateral_digits"):
      if not getattr(self, name) >= 0:
        raise ValueError(f"--{name.replace('_', '-')} must be >= 0")
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
    if self.attack_steps % self.eval_every:
      raise ValueError(f"--eval-every {self.eval_every} must divide "
                       f"--attack-steps {self.attack_steps}")
    if not 0 <= self.prior_null <= 1:
      raise ValueError(f"--prior-null must be in [0, 1], got {self.prior_null}")
    if not 0 < self.retention_floor <= 1:
      raise ValueError(f"--retention-floor must be in (0, 1], got "
                       f"{self.retention_floor}")
    if any(not w >= 0 for w in self.prior_weights) or len(
        set(self.prior_weights)) != len(self.prior_weights):
      raise ValueError(f"--prior-weights must be distinct and >= 0, got "
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
    if self.dim % self.heads:
      raise ValueError(f"--dim {self.dim} is not divisible by --heads "
                       f"{self.heads}")


QUICK = {"dim": 32, "depth": 1, "pretrain_steps": 300, "classifier_steps": 300,
         "sample_steps": 5, "samples": 16, "immunize_steps": 5,
         "attack_steps": 10, "eval_every": 5,
         "attack_modes": ("lora", "phi_merge"),
         "copies": 1}


# ------------------------------------------------------------ the setting
class Setting:
  """The denoiser, the frozen text encoder, the data and the classifier."""

  def __init__(self, cfg: Config):
    self.cfg = cfg
    self.vocab = prompts.digit_vocabulary()
    self.encoder = prompts.text_encoder(self.vocab, dim=cfg.context_dim,
                                        seed=cfg.seed + 7)
    self.ab = diffusion.schedule(cfg.timesteps)
    model = models.ConditionalDenoiser(patch=cfg.patch, dim=cfg.dim,
                                       context_dim=cfg.context_dim,
                                       depth=cfg.depth, heads=cfg.heads,
                                       rngs=nnx.Rngs(cfg.seed))
    self.unet_apply, unet = models.functional(model)
    digit_row = self.encoder.table[self.vocab.ids(["digit"])[0]]
    n = len(cfg.concepts)
    # textual inversion's new tokens, initialised from "digit" (unused by
    # every prompt but the attacker's)
    self.init = {"unet": unet,
                 "placeholder": jnp.tile(digit_row[None], (n, 1))}
    self.split = data.class_split(list(range(10)), test_fraction=0.2,
                                  seed=cfg.seed, relabel=False)
    self.null = jnp.asarray(prompts.null_prompt(self.vocab))

  def context(self, params, tokens):
    return prompts.encode(self.encoder, tokens, params["placeholder"])

  def eps_fn(self, params, tokens):
    ctx = self.context(params, tokens)
    return lambda x, t: self.unet_apply(params["unet"], x, t, ctx)

  def loss(self, params, batch):
    """The epsilon-prediction MSE on ``{"x", "tokens", "t", "eps"}``."""
    return diffusion.epsilon_loss(self.eps_fn(params, batch["tokens"]),
                                  batch["x"], batch["t"], batch["eps"],
                                  self.ab)

  def sample(self, params, prompt, noise):
    """DDIM samples ``(S, 64)`` in [-1, 1] for one prompt (CFG)."""
    s = noise.shape[0]
    ctx = self.context(params, jnp.broadcast_to(prompt, (s, prompt.shape[0])))
    null = self.context(params, jnp.broadcast_to(self.null, (s, 3)))
    eps = diffusion.guided(
        lambda x, t, c: self.unet_apply(params["unet"], x, t, c), ctx, null,
        self.cfg.guidance)
    return diffusion.ddim_sample(eps, noise, self.ab,
                                 steps=self.cfg.sample_steps)

  def images(self, digit, train=True):
    x, y = ((self.split.x_train, self.split.y_train) if train else
            (self.split.x_test, self.split.y_test))
    return 2.0 * x[y == digit] - 1.0

  def noisy(self, x, tokens, rng):
    """Rows ``{"x", "tokens", "t", "eps"}`` with fresh numpy noise."""
    return {"x": jnp.asarray(x, jnp.float32), "tokens": jnp.asarray(tokens),
            "t": jnp.asarray(rng.integers(0, self.cfg.timesteps, len(x)),
                             jnp.int32),
            "eps": jnp.asarray(rng.normal(size=x.shape), jnp.float32)}

  def draw(self, key, x, tokens):
    """The same rows with noise from ``key`` (traced)."""
    kt, ke = jax.random.split(key)
    return {"x": x, "tokens": tokens,
            "t": jax.random.randint(kt, x.shape[:-1], 0, self.cfg.timesteps,
                                    jnp.int32),
            "eps": jax.random.normal(ke, x.shape, x.dtype)}


# -------------------------------------------------------------- pretrain
def pretrain(cfg: Config, run: _runner.Run, st: Setting, prefix: str = ""):
  x = jnp.asarray(2.0 * st.split.x_train - 1.0)
  tokens = jnp.asarray(np.stack([prompts.concept_prompt(st.vocab, int(k))
                                 for k in st.split.y_train]))
  key = jax.random.PRNGKey(cfg.seed + 1)

  def sample(d, t):
    k = jax.random.fold_in(key, t)
    b = data.minibatch(key, d, cfg.pretrain_batch, t)
    drop = jax.random.bernoulli(jax.random.fold_in(k, 1), cfg.cfg_dropout,
                                (cfg.pretrain_batch, 1))
    toks = jnp.where(drop, st.null[None], b[1])
    return st.draw(jax.random.fold_in(k, 2), b[0], toks)

  trainer = supervised(st.loss, optax.adam(cfg.pretrain_lr))
  state = run.fit(prefix + "pretrain", trainer, trainer.init(st.init, key),
                  sample, (x, tokens), cfg.pretrain_steps, key=key,
                  desc="pre-training the denoiser")
  return trainer.params(state)


def classifier(cfg: Config, run: _runner.Run, st: Setting,
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


# ---------------------------------------------------------------- erase
def concept_rows(st: Setting, digits):
  """The concept token's row (position 2) of each digit's prompt."""
  return jnp.stack([prompts.encode(st.encoder, prompts.concept_prompt(
      st.vocab, int(k)))[2] for k in digits])


def erase(cfg: Config, st: Setting, params):
  """UCE on every attn2 key/value kernel: each target's ``<dk>`` row maps
  to the empty token's output; the other digits' rows and the shared
  ``a`` / ``digit`` rows are preserved."""
  others = [k for k in range(10) if k not in cfg.concepts]
  guide = prompts.encode(st.encoder, st.null)[2]
  shared = prompts.encode(st.encoder, prompts.class_prompt(st.vocab))[:2]
  erase_keys = concept_rows(st, cfg.concepts)
  keep = jnp.concatenate([concept_rows(st, others), shared])
  unet = imma.erase_concepts(params["unet"], erase_keys,
                             jnp.broadcast_to(guide, erase_keys.shape), keep)
  return {**params, "unet": unet}


def merge_keys(cfg: Config, st: Setting):
  """phi*'s target keys (each concept's token row) and regularisation keys
  (every row of 200 filler captions and of the non-target prompts)."""
  others = [k for k in range(10) if k not in cfg.concepts]
  captions = np.concatenate([
      prompts.filler_captions(st.vocab, 200, seed=cfg.seed + 11),
      np.stack([prompts.concept_prompt(st.vocab, k) for k in others])])
  reg = prompts.encode(st.encoder, captions).reshape(-1, cfg.context_dim)
  return concept_rows(st, cfg.concepts)[:, None, :], reg


# -------------------------------------------------------------- immunize
def immunization_data(cfg: Config, st: Setting, digits):
  """Per-concept images (truncated to a common count) with their prompts,
  and the prior set (non-target digits, own prompts)."""
  xs = [st.images(k) for k in digits]
  n = min(len(x) for x in xs)
  others = [k for k in range(10) if k not in cfg.concepts]
  prior_x = np.concatenate([st.images(k) for k in others])
  prior_tok = np.concatenate([np.tile(prompts.concept_prompt(st.vocab, k),
                                      (len(st.images(k)), 1)) for k in others])
  return {"x": jnp.asarray(np.stack([x[:n] for x in xs]), jnp.float32),
          "tokens": jnp.asarray(np.stack([np.tile(prompts.concept_prompt(
              st.vocab, k), (n, 1)) for k in digits])),
          "prior_x": jnp.asarray(prior_x, jnp.float32),
          "prior_tokens": jnp.asarray(prior_tok)}


def make_sampler(st: Setting, cfg: Config, key):
  """:func:`immunojax.eval.concepts.concept_sampler` at this config: the
  first ``round(prior_null * batch)`` prior rows carry the null prompt."""
  return concepts.concept_sampler(
      st.draw, key, batch=cfg.batch, lower_steps=cfg.inner_steps,
      null_rows=round(cfg.prior_null * cfg.batch), null_tokens=st.null)


def immunize(cfg: Config, run: _runner.Run, st: Setting, erased, *,
             bound: float | None = None, prefix: str = ""):
  """Every method's released parameters and the wall time of its training
  loop(s) (its first step compiles). ``bound``: the ascent bound B (None:
  unbounded); ``prefix`` names the loops (a seed's, a prior weight's)."""
  opt = optax.chain(optax.clip_by_global_norm(1.0),
                    optax.adamw(cfg.outer_lr, weight_decay=1e-2))
  keys, reg = merge_keys(cfg, st)
  extra = {} if cfg.scheme == "alternating" else {
      "inner_optimizer": inner_optimizer(cfg), "upper_at": cfg.upper_at}
  common = dict(upper=UPPER, lower=modes.masked(LOWER),
                inner_lr=cfg.inner_lr, optimizer=opt, scheme=cfg.scheme,
                prior_weight=cfg.prior_weight, concept_map=run.grid_map(),
                ascent_bound=bound, **extra)
  d = immunization_data(cfg, st, cfg.concepts)
  key = jax.random.PRNGKey(cfg.seed + 5)
  c = len(cfg.concepts)
  each = jnp.eye(c)
  imms = {
      "max": imma.max_ascent(st.loss, upper=UPPER, optimizer=opt,
                             prior_weight=cfg.prior_weight,
                             ascent_bound=bound),
      "imma": imma.imma(st.loss, **common),   # sequential and joint
      "mima": imma.mima(st.loss, merge=imma.concept_merge(
          keys=keys, reg_keys=reg, merged=KV, ridge=cfg.merge_ridge),
                        **common),
      "mima_average_merge": imma.mima(st.loss, merge=imma.average_merge(),
                                      **common)}
  sample = make_sampler(st, cfg, key)

  def loop(name, which, start, rows, desc, steps=cfg.immunize_steps):
    imm = imms[which]
    state = run.fit(prefix + name, imm, imm.init(start, key), sample,
                    (d, rows), steps, key=key, desc=desc)
    return imm.params(state)

  out, wall = {"none": erased}, {"none": 0.0}
  t0 = time.perf_counter()
  out["max"] = loop("max", "max", erased, each, "max (direct ascent)")
  wall["max"] = time.perf_counter() - t0
  t0 = time.perf_counter()
  p = erased
  per = (cfg.immunize_steps if cfg.sequential_budget == "per_concept"
         else cfg.immunize_steps // c)      # MIMA's budget in total
  for i in range(c):
    p = loop(f"imma_sequential_{i}", "imma", p, each[i:i + 1],
             f"IMMA on <d{cfg.concepts[i]}> ({i + 1}/{c})", per)
  out["imma_sequential"], wall["imma_sequential"] = p, time.perf_counter() - t0
  t0 = time.perf_counter()
  out["imma_joint"] = loop("imma_joint", "imma", erased, jnp.ones((1, c)),
                           "IMMA on the pooled concepts")
  wall["imma_joint"] = time.perf_counter() - t0
  for name in ("mima", "mima_average_merge"):
    t0 = time.perf_counter()
    out[name] = loop(name, name, erased, each, f"MIMA ({name})")
    wall[name] = time.perf_counter() - t0
  return out, wall


def inner_optimizer(cfg: Config):
  """The unrolled lower level's optimizer (None: the library's SGD). Adam
  with ``eps_root``: its derivative stays finite where a gradient is 0."""
  if cfg.inner_optimizer == "sgd":
    return None
  if cfg.inner_optimizer == "adam":
    return lambda lr: optax.adam(lr, eps_root=1e-16)
  return cfg.inner_optimizer


def attacker_displacement(cfg: Config, st: Setting, params) -> dict:
  """How far the simulated attacker (the lower level: --inner-steps of
  --inner-optimizer at --inner-lr on S^l) and the evaluated attack's first
  checkpoint (--eval-every Adam steps at --lr-full, full fine-tuning) move
  ``params``, per concept, on the same concept images with the attack's
  batch size."""
  d = immunization_data(cfg, st, cfg.concepts)
  k = max(cfg.eval_every, cfg.inner_steps)
  # The lower level's own optimizer, built as imma.mima builds it.
  lower_opt = make_optimizer(inner_optimizer(cfg) or "sgd", cfg.inner_lr)
  simulated = jax.jit(lambda p, b: displacement.displacement(
      p, st.loss, lower_opt, b, trainable=LOWER))
  evaluated = jax.jit(lambda p, b: displacement.displacement(
      p, st.loss, optax.adam(cfg.lr_full), b))
  sim, ev = [], []
  for i in range(len(cfg.concepts)):
    kr, kn = jax.random.split(jax.random.PRNGKey(cfg.seed + 60 + i))
    rows = jax.random.randint(kr, (k, cfg.attack_batch), 0, d["x"].shape[1])
    batches = jax.vmap(st.draw)(jax.random.split(kn, k), d["x"][i][rows],
                                d["tokens"][i][rows])
    sim.append(float(simulated(params, jax.tree_util.tree_map(
        lambda a: a[:cfg.inner_steps], batches))))
    ev.append(float(evaluated(params, jax.tree_util.tree_map(
        lambda a: a[:cfg.eval_every], batches))))
  return {"simulated": sim, "evaluated": ev,
          "simulated_attacker": f"{cfg.inner_steps} {cfg.inner_optimizer} "
                                f"step(s) at {cfg.inner_lr} on S^l",
          "evaluated_attacker": f"{cfg.eval_every} Adam steps at "
                                f"{cfg.lr_full}, full",
          "ratio": float(np.mean(ev) / np.mean(sim))}


# ---------------------------------------------------------------- attack
def evaluation(cfg: Config, st: Setting, digits, prompt_rows, *, seed):
  """eval_data for a set of concepts (:func:`immunojax.eval.generative.
  judge_data`): prompts, labels, sampling noise, held-out real images and
  denoising draws."""
  return generative.judge_data(
      prompt_rows, digits, [st.images(k, train=False) for k in digits],
      samples=cfg.samples, num_timesteps=cfg.timesteps, seed=seed)


def make_metric(st: Setting, classify, features):
  """``metric(params, ev) -> (C, 3)``: per concept the classifier accuracy
  on samples, the mean cosine of classifier features to held-out real
  images, and the held-out denoising MSE (fixed draws)
  (:func:`immunojax.eval.generative.judge_metric`)."""
  def heldout(params, prompt, ref, t, eps):
    toks = jnp.broadcast_to(prompt, (ref.shape[0], prompt.shape[0]))
    return diffusion.epsilon_loss(st.eps_fn(params, toks), ref, t, eps, st.ab)
  return generative.judge_metric(sample=st.sample, classify=classify,
                                 features=features, heldout_loss=heldout)


def collateral(cfg: Config) -> list[int]:
  """The non-target digits sampled after every attack (selectivity)."""
  return [k for k in range(10)
          if k not in cfg.concepts][:cfg.collateral_digits]


def attack_rows(cfg: Config, st: Setting, mode: str):
  """Each concept's training rows for ``mode`` (``copies`` noise draws of
  its images, truncated to a common count) and the prompt it trains."""
  rng = np.random.default_rng(cfg.seed + 21)
  rows, prompt_rows = [], []
  for i, k in enumerate(cfg.concepts):
    p = (prompts.placeholder_prompt(st.vocab, i) if mode == "ti" else
         prompts.concept_prompt(st.vocab, k))
    x = np.tile(st.images(k), (cfg.copies, 1))
    rows.append(st.noisy(x, np.tile(p, (len(x), 1)), rng))
    prompt_rows.append(p)
  n = min(len(r["x"]) for r in rows)
  return [jax.tree_util.tree_map(lambda a: a[:n], r) for r in rows], \
      prompt_rows


def attack_eval(cfg: Config, st: Setting, prompt_rows):
  """eval_data of an attack: the concepts' prompts, then the collateral
  digits' own prompts."""
  col = collateral(cfg)
  return evaluation(cfg, st, list(cfg.concepts) + col, list(prompt_rows) + [
      prompts.concept_prompt(st.vocab, k) for k in col], seed=cfg.seed + 30)


def attack_targets(cfg: Config, st: Setting, metric, mode: str):
  """Named targets for one attack mode: one per concept, and ``joint``."""
  rows, prompt_rows = attack_rows(cfg, st, mode)
  n = len(rows[0]["x"])
  common = attacks.Target(
      loss_fn=st.loss, metric_fn=metric, train_data=None,
      lora_config=lora.LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_rank,
                                  target_modules=ATTN),
      masked_modes={"kv": KV, "ti": ("placeholder",)})
  # Every attack is scored on every concept (the same eval_data), so the
  # per-concept and joint attacks share one compilation: the joint set is
  # as large as one concept's, drawn evenly from all of them.
  ev = attack_eval(cfg, st, prompt_rows)
  out = {str(k): common._replace(train_data=rows[i], eval_data=ev)
         for i, k in enumerate(cfg.concepts)}
  joint = jax.tree_util.tree_map(
      lambda *a: jnp.stack(a, 1).reshape((-1,) + a[0].shape[1:])[:n], *rows)
  out["joint"] = common._replace(train_data=joint, eval_data=ev)
  return out


def phi_merge_attack(cfg: Config, st: Setting, metric, starts):
  """Custom Diffusion's recipe, the attack phi* is for: each concept's K/V
  adapted alone (the kv attack's rows, rate and seed), the copies merged by
  phi* (MIMA's own keys), the merged model scored on every concept
  (:func:`immunojax.eval.merge_attack.merged_attack`). Metric arrays
  ``(checkpoints, concepts + collateral, 3)`` per start."""
  rows, prompt_rows = attack_rows(cfg, st, "kv")
  ev = attack_eval(cfg, st, prompt_rows)
  keys, reg = merge_keys(cfg, st)
  phi = imma.concept_merge(keys=keys, reg_keys=reg, merged=KV,
                           ridge=cfg.merge_ridge)
  train = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *rows)
  run_one = jax.jit(lambda p, d, e: merge_attack.merged_attack(
      p, attacker=modes.masked(KV, name="kv"), loss_fn=st.loss,
      optimizer=optax.adam(cfg.lr_kv), train_data=d,
      batch_size=cfg.attack_batch, steps=cfg.attack_steps,
      eval_every=cfg.eval_every, merge=phi.apply,
      metric_fn=lambda q: metric(q, e), seed=cfg.seed))
  return {s: np.asarray(run_one(p, train, ev)) for s, p in starts.items()}


def attack_all(cfg: Config, run: _runner.Run, st: Setting, metric, starts):
  """Per attack mode: ``scopes`` -> ``{scope: {start: (checkpoints,
  concepts, 3)}}`` (``per_concept``: the attack on concept k scored on k;
  ``joint``; ``merged`` for phi_merge), ``collateral`` -> the same scopes'
  mean collateral-digit accuracy ``(checkpoints, concepts)`` /
  ``(checkpoints,)`` (None without collateral digits), ``steps``,
  ``diverged``."""
  lrs = {"full": cfg.lr_full, "lora": cfg.lr_lora, "kv": cfg.lr_kv,
         "ti": cfg.lr_ti}
  c = len(cfg.concepts)
  has_col = bool(collateral(cfg))
  col = lambda m: m[:, c:, 0].mean(-1) if has_col else None
  out, wall = {}, {}
  for mode in cfg.attack_modes:
    t0 = time.perf_counter()
    scope = " merged" if mode == "phi_merge" else " + joint"
    run.print(f"  attacking with {mode} ({len(starts)} models, "
              f"{c} concepts{scope})")
    if mode == "phi_merge":
      res = phi_merge_attack(cfg, st, metric, starts)
      out[mode] = {"scopes": {"merged": {s: r[:, :c] for s, r in
                                         res.items()}},
                   "collateral": {"merged": {s: col(r) for s, r in
                                             res.items()}},
                   "steps": np.arange(0, cfg.attack_steps + 1,
                                      cfg.eval_every),
                   "diverged": {s: bool(not np.all(np.isfinite(r)))
                                for s, r in res.items()}}
      wall[mode] = time.perf_counter() - t0
      continue
    grid = [attacks.Attack("adam", lrs[mode], cfg.attack_batch, mode,
                           cfg.attack_steps, seed=cfg.seed)]
    curves = attacks.run_attacks(grid, starts,
                                 attack_targets(cfg, st, metric, mode),
                                 eval_every=cfg.eval_every,
                                 attack_map=run.grid_map())
    m = {k: {s: cv.metric[s][0] for s in starts} for k, cv in curves.items()}
    # per concept: the attack on concept k, scored on concept k
    per = {s: np.stack([m[str(k)][s][:, i] for i, k in
                        enumerate(cfg.concepts)], axis=1) for s in starts}
    per_col = {s: np.stack([col(m[str(k)][s]) for k in cfg.concepts], axis=1)
               if has_col else None for s in starts}
    out[mode] = {"scopes": {"per_concept": per,
                            "joint": {s: m["joint"][s][:, :c]
                                      for s in starts}},
                 "collateral": {"per_concept": per_col,
                                "joint": {s: col(m["joint"][s])
                                          for s in starts}},
                 "steps": curves["joint"].steps[next(iter(starts))],
                 "diverged": {s: bool(any(cv.diverged[s][0] for cv in
                                          curves.values())) for s in starts}}
    wall[mode] = time.perf_counter() - t0
  return out, wall


# ------------------------------------------------------------ experiment
def clean_concept_loss(cfg: Config, st: Setting, params) -> float:
  """The mean over concepts of the denoising loss on each concept's
  training images (fixed draws): the scale of the ascent bound."""
  d = immunization_data(cfg, st, cfg.concepts)
  key = jax.random.PRNGKey(cfg.seed + 70)
  loss = jax.jit(lambda p, k, x, t: st.loss(p, st.draw(k, x, t)))
  return float(np.mean([float(loss(params, jax.random.fold_in(key, i),
                                    d["x"][i], d["tokens"][i]))
                        for i in range(len(cfg.concepts))]))


def immunize_matched(cfg: Config, run: _runner.Run, st: Setting, erased,
                     retention_of, *, bound, prefix=""):
  """Every method at its prior weight: with ``--prior-weights``, the
  smallest whose retention on a selection draw (``retention_of(params,
  "select")``) reaches ``--retention-floor``, else the one that retains
  most. Returns (params, wall seconds, ``retention_matched``)."""
  weights = sorted(cfg.prior_weights) or [cfg.prior_weight]
  tried = {}
  for w in weights:
    c = dataclasses.replace(cfg, prior_weight=w)
    name = prefix + (f"prior_{w:g}/" if len(weights) > 1 else "")
    if len(weights) > 1:
      run.print(f"  prior weight {w:g}")
    params, wall = immunize(c, run, st, erased, bound=bound, prefix=name)
    sel = ({m: retention_of(p, "select") for m, p in params.items()}
           if len(weights) > 1 else None)
    tried[w] = (params, wall, sel)
  out, walls, matched = {}, {}, {}
  for m in tried[weights[0]][0]:
    if len(weights) == 1 or m == "none":
      w, ok = weights[0], None
    else:
      w, ok = concepts.matched_weight({v: tried[v][2][m] for v in weights},
                                      cfg.retention_floor)
    out[m] = tried[w][0][m]
    walls[m] = float(sum(t[1][m] for t in tried.values()))
    matched[m] = {"prior_weight": None if m == "none" else w,
                  "selection_matched": ok,
                  "swept": None if len(weights) == 1 else {
                      f"{v:g}": tried[v][2][m] for v in weights}}
  return out, walls, matched


def one_seed(cfg: Config, run: _runner.Run, prefix: str = "") -> dict:
  """The whole pipeline at ``cfg.seed``: pre-train, erase, immunize (at a
  matched prior weight when swept), attack; the per-seed summary."""
  st = Setting(cfg)
  classify, features, clf_acc = classifier(cfg, run, st, prefix)
  pretrained = pretrain(cfg, run, st, prefix)
  erased = erase(cfg, st, pretrained)
  metric = make_metric(st, classify, features)
  metric_jit = jax.jit(metric)
  others = [k for k in range(10) if k not in cfg.concepts]
  targets_ev = evaluation(cfg, st, list(cfg.concepts),
                          [prompts.concept_prompt(st.vocab, k)
                           for k in cfg.concepts], seed=cfg.seed + 30)
  retain_ev = {draw: evaluation(cfg, st, others, [
      prompts.concept_prompt(st.vocab, k) for k in others],
      seed=cfg.seed + offset) for draw, offset in (("report", 41),
                                                   ("select", 43))}

  def retention_of(params, draw="report"):
    return float(np.mean(np.asarray(metric_jit(params,
                                               retain_ev[draw]))[:, 0]))

  before = {"pretrained": np.asarray(metric_jit(pretrained, targets_ev)),
            "erased": np.asarray(metric_jit(erased, targets_ev))}
  run.print(f"  concept accuracy of samples: pretrained "
            f"{before['pretrained'][:, 0].round(2).tolist()}, erased "
            f"{before['erased'][:, 0].round(2).tolist()}")
  moved = attacker_displacement(cfg, st, erased)
  run.print(f"  displacement of the erased model: simulated attacker "
            f"{np.mean(moved['simulated']):.4g}, evaluated attack "
            f"{np.mean(moved['evaluated']):.4g} ({moved['ratio']:.3g}x)")
  clean = clean_concept_loss(cfg, st, erased)
  bound = cfg.ascent_bound * clean if cfg.ascent_bound else None
  immunized, imm_wall, matched = immunize_matched(
      cfg, run, st, erased, retention_of, bound=bound, prefix=prefix)
  retention = {m: retention_of(p) for m, p in immunized.items()}
  retention["pretrained"] = retention_of(pretrained)
  for m, r in matched.items():
    r["retention"] = retention[m]
    r["matched"] = bool(retention[m] >= cfg.retention_floor)
  target_acc_before = {m: np.asarray(metric_jit(p, targets_ev))[:, 0].tolist()
                       for m, p in immunized.items()}
  curves, attack_wall = attack_all(cfg, run, st, metric, immunized)
  out = summarize(cfg, curves, retention, imm_wall, attack_wall)
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
  runs = []
  for i, s in enumerate(seeds):
    if len(seeds) > 1:
      run.print(f"seed {s} ({i + 1}/{len(seeds)})")
    runs.append(one_seed(dataclasses.replace(cfg, seed=s), run,
                         "" if i == 0 else f"seed_{s}/"))
    if i < len(seeds) - 1:
      # Each seed's models are new closures, so their programs compile
      # anew; dropping the last seed's executables keeps a long run under
      # the kernel's map-count limit (a 3-seed run once died in LLVM with
      # "Cannot allocate memory" at 65,530 maps).
      jax.clear_caches()
  out = dict(runs[0])         # the first seed in full, as a one-seed run
  out.update({
      "seeds": seeds, "per_seed": runs[1:] and [
          {k: r[k] for k in ("methods", "retention_matched",
                             "displacement_ratio",
                             "concept_accuracy_before_attack")}
          for r in runs[1:]],
      "attacks": aggregate(runs),
      "paper": {"imma_table1_sgr": PAPER_IMMA_SGR,
                "mima_tables": "not available (spec §3.3)"}})
  out["targets"] = targets(cfg, out)
  out["claims"] = claims(out)
  out["notes"] = notes(cfg, out)
  figures(cfg, run, out)
  plot(cfg, run, out)
  return out


def summarize(cfg, curves, retention, imm_wall, attack_wall) -> dict:
  names = [str(k) for k in cfg.concepts]
  methods = {}
  for m in METHODS:
    per_attack = {}
    for mode, c in curves.items():
      for scope, arrays in c["scopes"].items():
        name = mode if mode == "phi_merge" else f"{mode}/{scope}"
        per_attack[name] = {**concepts.attack_scores(
            arrays[m], arrays["none"], c["collateral"][scope][m],
            concepts=names, per_concept=scope == "per_concept"),
            "diverged": c["diverged"][m],
            "wall_seconds": attack_wall[mode] / (
                len(c["scopes"]) * len(METHODS))}
    methods[m] = {"retention_accuracy": retention[m],
                  "wall_seconds": imm_wall[m], "attacks": per_attack}
  steps = next(iter(curves.values()))["steps"]
  return {"methods": methods, "attack_steps": np.asarray(steps).tolist(),
          "attack_wall_seconds": attack_wall, "scheme": cfg.scheme}


def aggregate(runs: list[dict]) -> dict:
  """``attacks.<attack>.<method>.{worst_concept, selectivity}``: mean and
  sd over seeds at every checkpoint (sd 0 with one seed)."""
  return {a: {m: {key: concepts.over_seeds(
      [r["methods"][m]["attacks"][a][key] for r in runs])
      for key in ("worst_concept", "selectivity")} for m in METHODS}
      for a in runs[0]["methods"]["none"]["attacks"]}


def targets(cfg, out) -> dict:
  ms = out["methods"]
  below, beats, checked = True, True, 0
  for a in ms["none"]["attacks"]:
    none = ms["none"]["attacks"][a]["concept_accuracy"]
    mima = ms["mima"]["attacks"][a]["concept_accuracy"]
    for k in none:
      for e, (wo, w) in enumerate(zip(none[k], mima[k])):
        # "well below" where the unprotected model has re-learned (>= 0.5):
        # at most half its accuracy
        if e > 0 and wo >= 0.5:
          checked += 1
          below &= w <= 0.5 * wo
    beats &= (ms["mima"]["attacks"][a]["worst_concept_accuracy"]
              < ms["imma_sequential"]["attacks"][a]["worst_concept_accuracy"])
  base = ms["none"]["retention_accuracy"]
  seeds = [ms] + [r["methods"] for r in out.get("per_seed") or []]
  score = {m: mean_worst_over_seeds(seeds, m) for m in METHODS}
  two_sd = {}
  for name, (m, other, attack) in {
      "mima_below_max_by_2sd": ("mima", "max", None),
      "mima_below_imma_sequential_by_2sd": ("mima", "imma_sequential", None),
      "phi_star_below_average_merge_by_2sd_on_phi_merge": (
          "mima", "mima_average_merge", "phi_merge")}.items():
    if attack is not None and attack not in ms["none"]["attacks"]:
      two_sd[name] = None
      continue
    x, y = (score[m], score[other]) if attack is None else (
        mean_worst_over_seeds(seeds, m, [attack]),
        mean_worst_over_seeds(seeds, other, [attack]))
    two_sd[name] = (None if len(seeds) < 2 else
                    bool(eval_curves.differs(x, y) and x["mean"] < y["mean"]))
  # every checkpoint, seeds' means: where the erased model re-learned a
  # concept (worst >= 0.5), MIMA's worst concept at most half of it
  half, seen = True, 0
  for a, per in out["attacks"].items():
    if not a.startswith(("lora/", "kv/", "phi_merge")):
      continue
    for wo, w in zip(per["none"]["worst_concept"]["mean"][1:],
                     per["mima"]["worst_concept"]["mean"][1:]):
      if wo >= 0.5:
        seen += 1
        half &= w <= 0.5 * wo
  two_sd["mima_worst_le_half_erased_lora_kv_every_checkpoint"] = (
      bool(half) if seen else None)
  matched = out.get("retention_matched", {})
  two_sd["every_method_retention_matched"] = bool(all(
      r["matched"] for m, r in matched.items() if m != "none"))
  return {**two_sd, "mima_well_below_none_at_every_checkpoint":
              bool(below) if checked else None,
          "mima_beats_imma_sequential_on_worst_concept": bool(beats),
          "mima_retention_within_5pct_of_erased":
              bool(ms["mima"]["retention_accuracy"] >= 0.95 * base),
          "none_relearns_every_concept": bool(all(
              ms["none"]["attacks"][a]["worst_concept_accuracy"] >= 0.5
              for a in ms["none"]["attacks"]))}


def mean_worst_over_seeds(seeds: list[dict], method: str,
                          attacks_: list[str] | None = None) -> dict:
  """Mean and sd over seeds of ``method``'s mean (over ``attacks_``, default
  all) final worst-concept accuracy."""
  return eval_curves.mean_std([float(np.mean([
      ms[method]["attacks"][a]["worst_concept_accuracy"]
      for a in (attacks_ or ms[method]["attacks"])])) for ms in seeds])


def claims(out) -> list[dict]:
  """MIMA's and IMMA's claims, graded on this run's targets (the first
  seed's attacks; the 2-sd targets over seeds are in ``targets``)."""
  t, ms = out["targets"], out["methods"]
  attacks_ = list(ms["none"]["attacks"])
  mean_worst = {m: float(np.mean([ms[m]["attacks"][a]["worst_concept_accuracy"]
                                  for a in attacks_])) for m in ms}
  n = _claims.num
  return [
      _claims.graded(
          "Immunizing the erased concepts keeps fine-tuning from re-learning "
          "them: after each attack MIMA's concept accuracy stays well below "
          "the erased-only model's (MIMA Fig. 1)",
          {"MIMA ≤ half the erased model's accuracy wherever it re-learned":
           t["mima_well_below_none_at_every_checkpoint"]},
          requires={"the erased model re-learns every concept (≥ 0.5): "
                    "something to protect": t["none_relearns_every_concept"]},
          figure=f"mean worst-concept accuracy over {len(attacks_)} attacks: "
          f"MIMA {n(mean_worst['mima'])}, erased only {n(mean_worst['none'])}"
          + (f" (seed {out['seeds'][0]})" if out.get("seeds")
             else " (one seed)")),
      _claims.graded(
          "Immunizing the concepts jointly (MIMA) protects better than one "
          "after another (sequential IMMA)",
          {"MIMA's worst concept below sequential IMMA's in every attack":
           t["mima_beats_imma_sequential_on_worst_concept"]},
          figure=f"mean worst-concept accuracy MIMA {n(mean_worst['mima'])} "
          f"vs sequential IMMA {n(mean_worst['imma_sequential'])}"),
      _claims.graded(
          "Immunization keeps the model's other concepts",
          {"MIMA's retention within 5 % of the erased model's":
           t["mima_retention_within_5pct_of_erased"]},
          figure=f"retention MIMA {n(ms['mima']['retention_accuracy'])} vs "
          f"erased {n(ms['none']['retention_accuracy'])}")]


def notes(cfg, out) -> list[str]:
  ms = out["methods"]
  lines = [
      "Every figure: concept accuracy = share of DDIM samples (CFG "
      f"{cfg.guidance}, {cfg.sample_steps} steps, {cfg.samples} per concept) "
      "that a frozen MLP digit classifier (test accuracy "
      f"{out['classifier_test_accuracy']:.3f}) labels as the concept; "
      f"attacks: Adam, {len(out['seeds'])} seed(s), sklearn digits; the "
      "phi_merge attack adapts each concept's K/V alone and merges the "
      "copies with phi*.",
      f"Scheme: {cfg.scheme} ('unrolled' is the paper's Algorithm 1; "
      "'alternating' the released train.py).",
      "S^u = attn2.* for every method; S^l = the whole denoiser; the prior "
      "batch is real non-target digits; attacks use no prior preservation.",
      "No MIMA table value is available (spec §3.3): the 'paper' column is "
      "empty except IMMA's third-party-quoted Table 1 SGRs, which are for "
      "SD-1.4 artists, CLIP/DINO features, not comparable in scale."]
  mv = out["displacement"]
  lines.append(
      "Displacement ratio (evaluated ÷ simulated attacker, on the erased "
      f"model, mean over concepts): {out['displacement_ratio']:.3g} — "
      f"{mv['evaluated_attacker']} move it {np.mean(mv['evaluated']):.3g}, "
      f"the lower level ({mv['simulated_attacker']}) "
      f"{np.mean(mv['simulated']):.3g}. " + (
          "Far above 1, the hypergradient is -grad L + O(alpha): the bilevel "
          "part can change little over direct ascent."
          if out["displacement_ratio"] > 10 else
          "Near 1: the simulated attacker is about as strong as the "
          "evaluated one's first checkpoint."))
  t = out["targets"]
  if not t["none_relearns_every_concept"]:
    lines.append("The erased model does not re-learn every concept to 50% "
                 "within the attack budget, so 'well below' is checked only "
                 "where it does.")
  attacks_ = list(ms["none"]["attacks"])
  worst = {m: np.asarray([ms[m]["attacks"][a]["worst_concept_accuracy"]
                          for a in attacks_]) for m in METHODS}
  for i, a in enumerate(attacks_):
    lines.append(f"{a}: worst-concept accuracy after the attack "
                 + ", ".join(f"{m} {worst[m][i]:.2f}" for m in METHODS))
  lines.append("Mean over attacks of the worst-concept accuracy: " + ", ".join(
      f"{m} {worst[m].mean():.3f}" for m in METHODS) + ".")
  wins = int(np.sum(worst["mima"] < worst["imma_sequential"]))
  lines.append(f"MIMA beats sequential IMMA on the worst concept in {wins} of "
               f"{len(attacks_)} attacks.")
  for other in ("mima_average_merge", "max"):
    gap = float(np.mean(np.abs(worst["mima"] - worst[other])))
    if gap < 0.05:
      lines.append(f"MIMA and {other} protect alike here (mean |difference| "
                   f"of worst-concept accuracy over attacks {gap:.3f}).")
  if not t["mima_beats_imma_sequential_on_worst_concept"]:
    lines.append("MIMA does not beat sequential IMMA on the worst concept in "
                 "every attack: this contradicts the paper's central claim "
                 "at this scale (see the per-attack lines above).")
  base = ms["none"]["retention_accuracy"]
  lines.append("Retention (non-target digits' sample accuracy before any "
               "attack): " + ", ".join(f"{m} {ms[m]['retention_accuracy']:.3f}"
                                       for m in METHODS) + ".")
  if not t["mima_retention_within_5pct_of_erased"]:
    lines.append(f"MIMA's non-target accuracy is "
                 f"{100 * (1 - ms['mima']['retention_accuracy'] / base):.1f}% "
                 f"below the erased model's: the prior term (weight "
                 f"{cfg.prior_weight}) does not hold it within 5%.")
  seeds = [ms] + [r["methods"] for r in out.get("per_seed") or []]
  erased = [out["concept_accuracy_before_attack"]["none"]] + [
      r["concept_accuracy_before_attack"]["none"]
      for r in out.get("per_seed") or []
      if "concept_accuracy_before_attack" in r]
  lines.append(
      "Erasure (UCE): the erased model's concept sample accuracy before any "
      "attack, per seed: " + "; ".join(
          ", ".join(f"{a:.2f}" for a in acc) for acc in erased)
      + (" — where it is high the erasure failed and there is little left "
         "to protect." if any(max(acc) >= 0.5 for acc in erased) else "."))
  lines.append(
      f"Over {len(seeds)} seed(s), mean over attacks of the final worst-"
      "concept accuracy (mean ± sd): " + ", ".join(
          f"{m} {w['mean']:.3f} ± {w['std']:.3f}" for m, w in (
              (m, mean_worst_over_seeds(seeds, m)) for m in METHODS))
      + (" — one seed: no sd, the 2-sd targets are not measured."
         if len(seeds) < 2 else "."))
  for m, other, attack in (("mima", "max", None),
                           ("mima", "imma_sequential", None),
                           ("mima", "mima_average_merge", "phi_merge")):
    if attack is not None and attack not in ms["none"]["attacks"]:
      continue
    x = mean_worst_over_seeds(seeds, m, attack and [attack])
    y = mean_worst_over_seeds(seeds, other, attack and [attack])
    spread = 2 * max(x["std"], y["std"])
    verdict = ("no sd (one seed)" if len(seeds) < 2 else
               "MIMA lower by more than 2 sd" if (
                   y["mean"] - x["mean"] > spread) else "no difference")
    lines.append(
        f"{m} vs {other} ({attack or 'mean over attacks'}, final worst "
        f"concept): {x['mean']:.3f} vs {y['mean']:.3f}, difference "
        f"{y['mean'] - x['mean']:+.3f} against 2 sd = {spread:.3f}: "
        f"{verdict}; displacement ratio {out['displacement_ratio']:.3g}.")
  rm = out.get("retention_matched") or {}
  if any(r.get("swept") for r in rm.values()):
    lines.append(
        f"Prior weight per method (the smallest whose retention on a "
        f"selection draw reaches {cfg.retention_floor}): " + ", ".join(
            f"{m} {r['prior_weight']:g} (retention {r['retention']:.3f}"
            f"{'' if r['matched'] else ', NOT matched'})"
            for m, r in rm.items() if m != "none") + ".")
  if cfg.ascent_bound:
    ab = out["ascent_bound"]
    lines.append(f"Ascent bound: each concept's loss counts up to "
                 f"{ab['bound']:.4g} = {cfg.ascent_bound:g} x the erased "
                 f"model's clean concept loss {ab['clean_loss']:.4g}.")
  if cfg.sequential_budget == "total":
    lines.append("Sequential IMMA ran --immunize-steps / concepts outer steps "
                 "per concept: MIMA's total budget.")
  lines.append("wall_seconds per method is its immunization loop(s) "
               "including their compilation; per attack it is the attack "
               "mode's total time (per-concept and joint, six models) divided "
               "evenly.")
  return lines


def figures(cfg, run, out):
  ms = out["methods"]
  for a in ms["none"]["attacks"]:
    for m in ("none", "imma_sequential", "mima"):
      run.figure(f"{a}: worst-concept accuracy after {cfg.attack_steps} "
                 f"steps, {m}", ms[m]["attacks"][a]["worst_concept_accuracy"],
                 note="frozen-classifier accuracy of DDIM samples; digits "
                 "(every method in summary.json)")
  for m in METHODS:
    run.figure(f"retention (non-target sample accuracy), {m}",
               ms[m]["retention_accuracy"],
               note="frozen-classifier accuracy of DDIM samples of the "
               "non-target digit prompts, before any attack; digits; none = "
               "the erased model")


def plot(cfg, run, out):
  ms = out["methods"]
  attack_names = list(ms["none"]["attacks"])
  cols = 2
  rows = (len(attack_names) + 1) // cols
  fig, axes = run.new_figure(nrows=rows, ncols=cols,
                             figsize=(5.0 * cols, 3.2 * rows), squeeze=False)
  steps = out["attack_steps"]
  for ax, a in zip(axes.ravel(), attack_names):
    for m in METHODS:
      acc = np.asarray(list(ms[m]["attacks"][a]["concept_accuracy"].values()))
      st = _plots.style(m)
      if m == "none":
        st["label"] = "erased only (no immunization)"
      ax.plot(steps, np.nanmax(acc, axis=0), **st)
    ax.set(title=a, xlabel="attack step",
           ylabel="worst-concept sample accuracy", ylim=(-0.02, 1.02))
    ax.grid(alpha=0.3)
  axes.ravel()[0].legend(fontsize=7)
  for ax in axes.ravel()[len(attack_names):]:
    ax.axis("off")
  _plots.claim_title(fig, out["claims"][0]["claim"])
  run.save_figure(fig, "concept_accuracy")


main = _cli.entry_point("mima_digits", Config, experiment, quick=QUICK,
                        description=__doc__.splitlines()[0], x64=False)

if __name__ == "__main__":
  raise SystemExit(main())
