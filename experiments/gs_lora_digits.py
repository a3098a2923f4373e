"""GS-LoRA / GS-LoRA++ continual forgetting on the bundled digits (Zhao et
al., CVPR 2024 / T-PAMI, the continual protocol at CPU scale).

A small ViT with a CosFace head is pre-trained on all ten digits; four
deletion requests then each forget two classes ("10-2, 8-2, 6-2, 4-2", the
mirror of 100-20 ... 40-20) in three data regimes (10% of each class,
4-shot, and 10% with retained classes that have no training images).
Methods: GS-LoRA (alpha per regime), GS-LoRA++, LoRA without group sparsity, and
the full fine-tuning baselines (forget loss alone, L2, EWC, retraining from
scratch); the released alpha = 1e-4 runs beside the tuned one in the ratio
regime. A relearning probe (the attack harness) then fine-tunes the models
after task 1 on a few images of every class and tracks how fast the
forgotten classes return, against a model pre-trained without them (the
attacker chosen on a validation half of the forgotten classes' test images,
scored on the other half).

  python -m experiments.gs_lora_digits

Deviations from the released code and the paper, each deliberate (also in
every report.md):
  * accuracy is top-1 with the CosFace margin on, as the released code
    evaluates (the true class must win by m in cosine);
  * alpha is chosen per regime by :mod:`experiments.gs_lora_regimes` (after
    a 20-epoch warm-up; the released 1e-4 runs beside it), and in the
    missing-class regime the forget bound is on every example's CE
    (``bounded_each``, BND 25): the released bound on the batch-mean CE is
    met there by one forgotten class alone while the other stays; GS-LoRA++'s
    push term uses lambda_f 0.5 with BND_pro 1.0 (the released 0.01-0.06 /
    18-50 are for 512-d face features);
  * every baseline trains the same forget loss as GS-LoRA on all
    weights but the head (the paper's baselines relabel the forgotten images
    and replay); retraining starts from a fresh model with its random
    CosFace head frozen;
  * ratio subsets are stratified per class (the code draws 10% of the pooled
    split), the class order is a seeded numpy permutation, batches are padded
    to a static size with zero weights (a ragged last batch is exact).
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments import _claims, _cli, _config, _options, _plots, _rundir, _runner
from immunojax import attacks, data, lora, losses, masks, models
from immunojax.data import continual
from immunojax.eval import continual as continual_eval, forgetting, relearning
from immunojax.methods import gs_lora as gs

Regime = Literal["ratio", "few_shot", "missing"]
ForgetTerm = Literal["bounded", "bounded_each"]
Method = Literal["gs_lora", "gs_lora_pp", "lora", "finetune", "l2", "ewc",
                 "retrain"]
METHODS = ("gs_lora", "gs_lora_pp", "lora", "finetune", "l2", "ewc",
           "retrain")
LORA_FAMILY = forgetting.LORA_FAMILY
FFN = forgetting.FFN
# T-PAMI Table 3 (CASIA-100 face, 10% data), task 100-20, GS-LoRA row, and
# the few-shot block's GS-LoRA / GS-LoRA++ Acc_r, in %.
PAPER = {"h_task1": 74.40, "acc_r_task1": 74.16, "acc_f_task1": 0.00,
         "h_task4": 73.76, "few_shot_acc_r_task1_gs_lora": 72.85,
         "few_shot_acc_r_task1_gs_lora_pp": 68.25, "trainable_share": 1.28}


@dataclasses.dataclass(frozen=True)
class Config(_options.Probe):
  dim: int = 64
  depth: int = 4
  heads: int = 4
  mlp_dim: int = 128
  dropout: float = 0.1
  cosface_scale: float = 64.0
  margin: float = 0.35
  pretrain_epochs: int = 50
  pretrain_lr: float = 1e-3
  first_retained: int = 8
  per_task: int = 2
  num_tasks: int = 4
  regimes: tuple[Regime, ...] = ("ratio", "few_shot", "missing")
  methods: tuple[Method, ...] = METHODS
  ratio: float = 0.1
  shots: int = 4
  missing_classes: int = 1
  epochs: int = 100
  batch_size: int = 48
  few_shot_batch: int = 4
  lr: float = 1e-2
  min_lr: float = 1e-5
  weight_decay: float = 0.05
  rank: int = 4
  reinit_a: Literal["code", "peft"] = dataclasses.field(
      default="code", metadata={"help": "A init of tasks after the first: "
                                "the code's kaiming a=sqrt(50), or peft's "
                                "sqrt(5)"})
  bound: float = dataclasses.field(default=105.0, metadata={
      "help": "BND of the forget term at CosFace scale 64 (scaled with "
              "--cosface-scale)"})
  beta_ratio: tuple[float, ...] = (0.2, 0.25, 0.25, 0.2)
  beta_few_shot: tuple[float, ...] = (0.3, 0.4, 0.28, 0.2)
  alpha_ratio: float = dataclasses.field(default=1.0, metadata={
      "help": "group-lasso alpha in the ratio regime (chosen by "
              "experiments.gs_lora_regimes)"})
  alpha_few_shot: float = dataclasses.field(default=0.01, metadata={
      "help": "alpha in the few-shot regime (chosen by gs_lora_regimes)"})
  alpha_missing: float = dataclasses.field(default=0.01, metadata={
      "help": "alpha in the missing-class regime (chosen by "
              "gs_lora_regimes)"})
  forget_ratio: ForgetTerm = dataclasses.field(default="bounded", metadata={
      "help": "forget term in the ratio regime: the released bound on the "
              "batch-mean CE, or bounded_each (--bound-each on every "
              "example's CE; chosen by gs_lora_regimes)"})
  forget_few_shot: ForgetTerm = "bounded"
  forget_missing: ForgetTerm = "bounded_each"
  bound_each: float = dataclasses.field(default=25.0, metadata={
      "help": "BND of the bounded_each term at CosFace scale 64 (scaled "
              "with --cosface-scale)"})
  alpha_warmup_epochs: int = 20
  released_alpha: float = 1e-4
  prototype_weight: float = 0.5
  prototype_bound: float = 1.0
  pull_weight: float = 0.0
  baseline_lr: float = 1e-4
  retrain_lr: float = 3e-4
  l2_weight: float = 0.1
  ewc_weight: float = 10.0
  zero_rtol: float = 1e-3
  probe_shots: int = 4
  probe_modes: tuple[Literal["full", "lora"], ...] = ("full", "lora")

  def __post_init__(self):
    super().__post_init__()
    _config.require(self, positive=(
        "dim", "depth", "heads", "mlp_dim", "cosface_scale",
        "pretrain_epochs", "pretrain_lr", "first_retained", "per_task",
        "num_tasks", "regimes", "methods", "ratio", "shots", "epochs",
        "batch_size", "few_shot_batch", "lr", "min_lr", "rank", "bound",
        "bound_each",
        "beta_ratio", "beta_few_shot", "baseline_lr", "retrain_lr",
        "zero_rtol", "probe_shots", "probe_modes"), nonnegative=(
        "dropout", "margin", "weight_decay", "missing_classes",
        "alpha_ratio", "alpha_few_shot", "alpha_missing",
        "alpha_warmup_epochs", "released_alpha", "prototype_weight",
        "prototype_bound", "pull_weight", "l2_weight", "ewc_weight"))
    continual.tasks(range(10), first_retained=self.first_retained,
                    per_task=self.per_task, num_tasks=self.num_tasks)
    for name in ("beta_ratio", "beta_few_shot"):
      if len(getattr(self, name)) < self.num_tasks:
        raise ValueError(f"--{name.replace('_', '-')} needs one beta per "
                         f"task ({self.num_tasks}), got "
                         f"{len(getattr(self, name))}")
    last_kept = self.first_retained - (self.num_tasks - 1) * self.per_task
    if "missing" in self.regimes and self.missing_classes >= last_kept:
      raise ValueError(f"--missing-classes {self.missing_classes} must leave "
                       f"a retained class with data in the last task "
                       f"({last_kept} retained)")
    if self.ratio > 1:
      raise ValueError(f"--ratio must be in (0, 1], got {self.ratio}")
    if self.probe_steps % 10:
      raise ValueError(f"--probe-steps must be a multiple of 10, got "
                       f"{self.probe_steps}")
    if self.dim % self.heads:
      raise ValueError(f"--dim {self.dim} is not divisible by --heads "
                       f"{self.heads}")
    if self.rank > min(self.dim, self.mlp_dim):
      raise ValueError(f"--rank {self.rank} exceeds min(dim, mlp_dim)")


QUICK = {"dim": 32, "depth": 2, "heads": 2, "mlp_dim": 64, "rank": 2,
         "pretrain_epochs": 25, "pretrain_lr": 3e-3, "epochs": 6,
         "alpha_warmup_epochs": 2, "few_shot_batch": 48,
         "probe_steps": 20, "probe_lrs": (1e-2,), "probe_modes": ("full",)}


# --------------------------------------------------------------- model
def build(cfg: Config, seed: int):
  # Initialised under jit: one compilation instead of ~100 eager kernels.
  model = nnx.jit(lambda: models.ViT(
      side=8, patch=2, dim=cfg.dim, depth=cfg.depth, heads=cfg.heads,
      mlp_dim=cfg.mlp_dim, num_classes=10, dropout_rate=cfg.dropout,
      scale=cfg.cosface_scale, margin=cfg.margin, rngs=nnx.Rngs(seed)))()
  apply, params = models.functional(model)
  return (lambda p, x, y, key: apply(p, x, y, key=key)), params


PRETRAIN_BATCH = 64


def make_pretrainer(cfg: Config, forward, npad: int, split=lambda b: b):
  """``(epoch, optimizer)`` of :func:`immunojax.eval.forgetting.
  pretrain_epoch` at this config (AdamW, wd on matrices, cosine over
  ``pretrain_epochs``, batch 64); one compilation serves every
  pre-training set."""
  return forgetting.pretrain_epoch(
      forward, epochs=cfg.pretrain_epochs, learning_rate=cfg.pretrain_lr,
      weight_decay=cfg.weight_decay, batch_size=PRETRAIN_BATCH,
      num_padded=npad, split=split)


def pretrain(cfg, run, ctx, keep, *, loop, desc):
  """Pre-trains from ``ctx["init"]`` on the training images ``keep``
  (indices), a checkpointed loop of epochs."""
  epoch, optimizer = ctx["pretrainer"]
  npad = len(ctx["y_train"])
  idx = jnp.asarray(continual_eval.padded(keep, npad))
  n = jnp.asarray(len(keep), jnp.int32)
  key = jax.random.PRNGKey(cfg.seed + 11)
  state = (ctx["init"], optimizer(n).init(ctx["init"]))
  state = run.loop(loop, state, lambda s, e: epoch(
      s, ctx["x_train"], ctx["y_train"], idx, n, key, jnp.asarray(e)),
      cfg.pretrain_epochs, log_every=5, desc=desc)
  return state[0]


# ------------------------------------------------------------ task runs
def make_runner(cfg: Config, forward, family: str, bs: int, npad: int,
                fpad: int, head_frozen, split=lambda b: b,
                forget: str = "bounded"):
  """:func:`immunojax.eval.forgetting.method_runner` at this config: one
  jitted task run per (family, batch size, padding, forget term)."""
  return forgetting.method_runner(
      forward, family, epochs=cfg.epochs, min_lr=cfg.min_lr,
      weight_decay=cfg.weight_decay, rank=cfg.rank,
      alpha_warmup_epochs=cfg.alpha_warmup_epochs,
      prototype_bound=cfg.prototype_bound, logit_scale=cfg.cosface_scale,
      batch_size=bs, retain_pad=npad, forget_pad=fpad,
      head_frozen=head_frozen, split=split, forget=forget)


# --------------------------------------------------------------- protocol
def _split(seed: int):
  x, y = data.load_digits()
  rng = np.random.default_rng(seed)
  tr, te = [], []
  for c in range(10):
    idx = rng.permutation(np.flatnonzero(y == c))
    k = int(round(0.3 * len(idx)))
    te.append(idx[:k])
    tr.append(idx[k:])
  tr, te = np.sort(np.concatenate(tr)), np.sort(np.concatenate(te))
  return x[tr], y[tr], x[te], y[te]


def task_subsets(cfg, y_train, tasks, regime, missing):
  out = []
  for t, task in enumerate(tasks):
    kw = dict(regime=regime, ratio=cfg.ratio, shots=cfg.shots,
              missing=missing, seed=cfg.seed * 1000 + 17 * t)
    out.append((continual.subset(y_train, task.retain, **kw),
                continual.subset(y_train, task.forget, **kw)))
  return out


Evaluator = forgetting.Evaluator


def regime_alpha(cfg, regime: str) -> float:
  """GS-LoRA's group-lasso alpha in ``regime``."""
  return getattr(cfg, f"alpha_{regime}")


def regime_forget(cfg, regime: str) -> str:
  """The forget term every method trains in ``regime``."""
  return getattr(cfg, f"forget_{regime}")


def coefficients(cfg, method, regime, t, forget=None):
  """Task ``t``'s coefficients of ``method`` in ``regime``; the bound is
  ``forget``'s (default: the regime's forget term)."""
  beta = (cfg.beta_few_shot if regime == "few_shot" else cfg.beta_ratio)[t]
  forget = forget or regime_forget(cfg, regime)
  bound = (cfg.bound_each if forget == "bounded_each"
           else cfg.bound) * cfg.cosface_scale / 64.0
  return forgetting.coefficients(
      method, beta=beta, bound=bound, lr=cfg.lr, baseline_lr=cfg.baseline_lr,
      retrain_lr=cfg.retrain_lr, alpha=regime_alpha(cfg, regime),
      released_alpha=cfg.released_alpha,
      prototype_weight=cfg.prototype_weight, pull_weight=cfg.pull_weight,
      l2_weight=cfg.l2_weight, ewc_weight=cfg.ewc_weight,
      init_a=math.sqrt(50.0) if (t > 0 and cfg.reinit_a == "code")
      else math.sqrt(5.0))


def run_method(cfg, run, ctx, regime, method, *, variant=None, prefix=""):
  """The continual protocol for one method: a checkpointed loop over tasks
  (state: the merged weights, and the weights after task 1).

  ``variant``: ``(base_method, coefficient_overrides, forget)`` runs a
  variant of a method under the name ``method``; ``prefix`` names its loop
  (e.g. a seed's)."""
  base, overrides, forget = variant or (method, {},
                                        regime_forget(cfg, regime))
  family = forgetting.family(base)
  bs = cfg.few_shot_batch if regime == "few_shot" else cfg.batch_size
  subsets = ctx["subsets"][regime]
  npad = max(len(r) for r, _ in ctx["all_subsets"][bs])
  fpad = max(len(f) for _, f in ctx["all_subsets"][bs])
  if (family, bs, forget) not in ctx["runners"]:
    ctx["runners"][family, bs, forget] = make_runner(
        cfg, ctx["forward"], family, bs, npad, fpad, ctx["head_frozen"],
        run.split_batch, forget)
  runner = ctx["runners"][family, bs, forget]
  ev, tasks = ctx["evaluator"], ctx["tasks"]
  x, y = ctx["x_train"], ctx["y_train"]

  def step(state, t):
    t0 = time.perf_counter()
    retain_idx, forget_idx = subsets[t]
    start = ctx["init"] if base == "retrain" else state["params"]
    task = continual_eval.task_indices(retain_idx, forget_idx,
                                       retain_pad=npad, forget_pad=fpad)
    coeffs = {**coefficients(cfg, base, regime, t, forget),
              **{k: jnp.asarray(v, jnp.float32) for k, v in overrides.items()}}
    out = runner(start, x, y, task, coeffs,
                 jax.random.PRNGKey(cfg.seed * 7919 + 31 * t + 5))
    params = out["params"]
    correct = ev.correct(params)
    scores = continual_eval.task_metrics(
        correct, ev.y, tasks[t], pretrained_acc_f=ctx["pre"][t]["acc_f"],
        missing=ctx["missing"] if regime == "missing" else ())
    acc = {k: v for k, v in scores._asdict().items()
           if k != "acc_m" or regime == "missing"}
    metrics = {**acc, **{k: float(v) for k, v in out["final"].items()}}
    if "group_norms" in out:
      norms = np.asarray(out["group_norms"])
      metrics["group_norms"] = norms
      metrics["zeroed_groups"] = int(np.sum(np.asarray(
          gs.zeroed(norms, cfg.zero_rtol))))
    new = {"params": params,
           "first": params if t == 0 else state["first"]}
    metrics["forget_class_acc"] = {
        str(c): ev.accuracy(correct, [c]) for c in tasks[t].forget}
    metrics["wall_seconds"] = time.perf_counter() - t0
    return new, metrics

  loop = f"{prefix}{regime}/{method}"
  state = run.loop(loop, {"params": ctx["pretrained"],
                          "first": ctx["pretrained"]},
                   step, cfg.num_tasks, log_every=1,
                   desc=f"{regime}: {method}")
  recs = run.records(loop)
  keys = ("acc_r", "acc_f", "acc_o", "h_mean") + (
      ("acc_m",) if regime == "missing" else ())
  result = {k: [r.get(k) for r in recs] for k in keys}
  result["loss"] = [r.get("loss") for r in recs]
  result["forget_ce"] = [r.get("forget_ce") for r in recs]   # last epoch
  result["forget_class_acc"] = [r.get("forget_class_acc") for r in recs]
  if family == "lora":
    result["group_norms"] = [r["group_norms"] for r in recs]
    result["zeroed_groups"] = [r["zeroed_groups"] for r in recs]
  else:
    result["zeroed_groups"] = None
  result["trainable_share"] = ctx["share"][family if base != "retrain"
                                           else "retrain"]
  result["wall_seconds"] = float(sum(r["wall_seconds"] for r in recs))
  run.print(f"[{regime}] {method}: H " + ", ".join(
      _rundir.fmt(h) for h in result["h_mean"]) + " | Acc_r " + ", ".join(
      _rundir.fmt(a) for a in result["acc_r"]) + " | Acc_f " + ", ".join(
      _rundir.fmt(a) for a in result["acc_f"]))
  return result, state["first"]


# ------------------------------------------------------------ relearning
def probe_target(cfg: Config, ctx: dict, seed: int) -> attacks.Target:
  """The relearning probe's target: ``probe_shots`` images of every class to
  train on; the metric is margin-on accuracy on task 1's forgotten classes'
  test images, ``[validation, test]`` (stratified halves: the attacker and
  checkpoint are chosen on one, read on the other)."""
  forward, ev = ctx["forward"], ctx["evaluator"]
  idx = relearning.few_shot_indices(np.asarray(ctx["y_train"]),
                                    cfg.probe_shots, classes=range(10),
                                    seed=seed + 404)
  forgot = np.flatnonzero(np.isin(ev.y, list(ctx["tasks"][0].forget)))
  val, test = (forgot[h] for h in relearning.validation_halves(
      ev.y[forgot], seed + 405))

  def acc(p, rows):
    x, y = ev.x[rows], jnp.asarray(ev.y[rows])
    return models.accuracy(forward(p, x, y, None)[0], y)

  return attacks.Target(
      loss_fn=lambda p, b: losses.cross_entropy(
          forward(p, b[0], b[1], None)[0], b[1]),
      metric_fn=lambda p: jnp.stack([acc(p, val), acc(p, test)]),
      train_data=(ctx["x_train"][idx], ctx["y_train"][idx]), head=("^head$",),
      lora_config=lora.LoraConfig(r=cfg.rank, lora_alpha=float(cfg.rank),
                                  target_modules=(
                                      r"blocks/\d+/(fc1|fc2|qkv|out)/kernel",)))


def relearning_probe(cfg, run, ctx, starts):
  """Fine-tune each start on ``probe_shots`` images of every class
  (:func:`immunojax.eval.relearning.relearning_probe` on
  :func:`probe_target`: attacker and checkpoint chosen on a validation half
  of task 1's forgotten classes' test images, read on the other half)."""
  target = probe_target(cfg, ctx, cfg.seed)
  run.print(f"relearning probe: {len(cfg.probe_lrs) * len(cfg.probe_modes)} "
            f"attacks x {len(starts)} starts, {cfg.probe_shots} shots of "
            "each class")
  curves, result = relearning.relearning_probe(
      starts, target, learning_rates=cfg.probe_lrs, modes=cfg.probe_modes,
      steps=cfg.probe_steps,
      batch_size=min(32, len(target.train_data[1])),
      threshold=cfg.probe_threshold, attack_map=run.grid_map())
  run.write_json("relearning_curves.json", _plots.curves_json(curves))
  _plots.attack_curves(run, curves, "relearning",
                       ylabel="task-1 forgotten classes, test half",
                       title="relearning probe")
  return result


# ------------------------------------------------------------ experiment
def setup(cfg: Config, run: _runner.Run, *, prefix: str = "") -> dict:
  """Data, model, class order and tasks, the pre-trained model and its
  per-task accuracies, subsets per regime: what every method's run shares
  (``prefix`` names the pre-training loop, e.g. a seed's)."""
  x_train, y_train, x_test, y_test = _split(cfg.seed)
  forward, init = build(cfg, cfg.seed)
  ctx = {"forward": forward, "init": init,
         "x_train": jnp.asarray(x_train), "y_train": jnp.asarray(y_train),
         "pretrainer": make_pretrainer(cfg, forward, len(y_train),
                                       run.split_batch)}
  order = continual.class_order(10, cfg.seed + 1337)
  tasks = continual.tasks(order, first_retained=cfg.first_retained,
                          per_task=cfg.per_task, num_tasks=cfg.num_tasks)
  missing = tuple(order[:cfg.missing_classes])
  pretrained = pretrain(cfg, run, ctx, np.arange(len(y_train)),
                        loop=f"{prefix}pretrain",
                        desc="pre-training (all classes)")
  ev = Evaluator(forward, x_test, y_test)
  correct = ev.correct(pretrained)
  pre = [{"acc_r": ev.accuracy(correct, t.retain),
          "acc_f": ev.accuracy(correct, t.forget)} for t in tasks]
  pre_all = ev.accuracy(correct, range(10))
  run.print(f"pre-trained test accuracy (margin on) {pre_all:.2f}%")
  n_lora = sum(a.size + b.size for a, b in
               ((v["a"], v["b"]) for v in lora.init(
                   init, lora.LoraConfig(r=cfg.rank, target_modules=FFN),
                   key=jax.random.PRNGKey(0)).values()))
  n_all = sum(p.size for p in jax.tree_util.tree_leaves(init))
  head_frozen = jax.tree_util.tree_map_with_path(
      lambda p, _: masks.path_string(p) != "head", init)
  n_head = init["head"].size
  share = {"lora": 100.0 * n_lora / n_all,
           "full": 100.0 * (n_all - n_head) / n_all,
           "retrain": 100.0 * (n_all - n_head) / n_all}
  subsets = {r: task_subsets(cfg, y_train, tasks, r, missing)
             for r in cfg.regimes}
  all_subsets: dict[int, list] = {}
  for r in cfg.regimes:
    bs = cfg.few_shot_batch if r == "few_shot" else cfg.batch_size
    all_subsets.setdefault(bs, []).extend(subsets[r])
  ctx.update({"pretrained": pretrained, "evaluator": ev, "tasks": tasks,
              "missing": missing, "pre": pre, "pre_all": pre_all,
              "order": order, "subsets": subsets,
              "all_subsets": all_subsets, "runners": {},
              "head_frozen": head_frozen, "share": share})
  return ctx


def never_saw(cfg: Config, run: _runner.Run, ctx: dict, *,
              prefix: str = ""):
  """The reference pre-trained without task 1's forgotten classes."""
  keep = np.flatnonzero(~np.isin(np.asarray(ctx["y_train"]),
                                 ctx["tasks"][0].forget))
  return pretrain(cfg, run, ctx, keep, loop=f"{prefix}pretrain_never_saw",
                  desc="pre-training without task 1's classes")


def experiment(cfg: Config, run: _runner.Run) -> dict:
  ctx = setup(cfg, run)
  tasks, missing, order = ctx["tasks"], ctx["missing"], ctx["order"]
  pretrained, pre, pre_all = ctx["pretrained"], ctx["pre"], ctx["pre_all"]
  results: dict[str, dict] = {}
  firsts = {}
  for regime in cfg.regimes:
    methods = list(cfg.methods)
    if regime == "ratio" and "gs_lora" in methods:
      methods.append("gs_lora_released_alpha")
    for m in methods:
      res, first = run_method(cfg, run, ctx, regime, m)
      results.setdefault(m, {})[regime] = res
      if regime == cfg.regimes[0]:
        firsts[m] = first
  starts = {"never_saw": never_saw(cfg, run, ctx), "original": pretrained}
  starts.update({m: firsts[m] for m in ("gs_lora", "gs_lora_pp")
                 if m in firsts})
  probe = relearning_probe(cfg, run, ctx, starts)
  out = {"pretrained": {"test_accuracy": pre_all, "per_task": pre},
         "class_order": order, "missing_classes": list(missing),
         "tasks": [t._asdict() for t in tasks], "methods": results,
         "relearning": probe, "paper": PAPER,
         "protocol": {"eval": "top-1 with the CosFace margin on (the "
                      "released code's convention)", "regime_of_probe":
                      cfg.regimes[0]}}
  out["targets"] = targets(cfg, out)
  out["claims"] = claims(out)
  out["notes"] = DEVIATIONS + findings(cfg, out)
  _figures(cfg, run, out)
  _plot_tasks(cfg, run, out)
  _plot_groups(cfg, run, out)
  for k, v in out["targets"].items():
    run.print(f"  target {k}: "
              f"{'n/a' if v is None else 'met' if v else 'MISSED'}")
  return out


DEVIATIONS = [
    "Deviation: accuracy is top-1 with the CosFace margin on (the released "
    "code's convention).",
    "Deviation: alpha chosen per regime by experiments.gs_lora_regimes "
    "(the released 1e-4 runs beside it in the ratio regime); in the "
    "missing-class regime the forget bound is on every example's CE "
    "(bounded_each, BND 25): the released bound on the batch mean is met by "
    "one forgotten class alone there; GS-LoRA++ push term lambda_f 0.5, "
    "BND_pro 1.0 (released values are for 512-d face features).",
    "Deviation: baselines train GS-LoRA's forget loss on all weights "
    "but the head (the paper relabels forgotten images and replays); "
    "retraining starts fresh with its random head frozen.",
    "Deviation: stratified ratio subsets, seeded numpy class order, padded "
    "batches with zero weights."]


def findings(cfg, out) -> list[str]:
  """Sentences for results that contradict the paper or a target."""
  notes = []
  res = out["methods"]
  for regime in cfg.regimes:
    gl = res.get("gs_lora", {}).get(regime)
    if gl is None:
      continue
    for t, (z, f, ce) in enumerate(zip(gl["zeroed_groups"], gl["acc_f"],
                                       gl["forget_ce"])):
      if f > 1.0:
        bound = float(coefficients(cfg, "gs_lora", regime, t)["bound"])
        notes.append(
            f"{regime}, task {t + 1}: GS-LoRA did not forget (Acc_f "
            f"{f:.1f}%; last-epoch forget CE {ce:.1f} < BND {bound:g}) with "
            f"{z} of {cfg.depth} groups zeroed at alpha "
            f"{regime_alpha(cfg, regime):g}: the group lasso held the "
            "adapters small before the forget loss had done its work in this "
            "task's steps (the paper reports Acc_f <= 0.1% in every task).")
  rl = out["relearning"]["best_attack_curve"]
  if "gs_lora" in rl and "never_saw" in rl:
    steps = out["relearning"]["steps"]
    faster = [(s, g, n) for s, g, n in zip(steps[1:], rl["gs_lora"][1:],
                                           rl["never_saw"][1:])
              if g is not None and n is not None and g > n]
    if faster:
      s, g, n = faster[0]
      notes.append(
          f"Relearning: the classes GS-LoRA forgot come back faster than a "
          f"model that never saw them learns them (step {s}: {g:.2f} vs "
          f"{n:.2f} test-half accuracy, the probe attacker chosen on the "
          "validation half): at this scale the "
          "forgetting is partly hiding, the opposite of the target.")
  fs = res.get("gs_lora", {}).get("few_shot")
  fpp = res.get("gs_lora_pp", {}).get("few_shot")
  if fs and fpp and fpp["acc_r"][0] <= fs["acc_r"][0]:
    notes.append(
        f"Few-shot task 1: GS-LoRA++ kept {fpp['acc_r'][0]:.2f}% retained "
        f"accuracy against GS-LoRA's {fs['acc_r'][0]:.2f}%: the prototype "
        "term did not raise it here (the spec's exploratory run had 92.17 vs "
        "88.71; the paper's own few-shot block has GS-LoRA++ below GS-LoRA "
        "on Acc_r, 68.25 vs 72.85, with far lower Acc_f).")
  return notes


def targets(cfg, out) -> dict:
  res, pre = out["methods"], out["pretrained"]["per_task"]
  t = {}
  gl = res.get("gs_lora", {}).get("ratio")
  if gl is not None:
    t["ratio: Acc_f <= 1% and Acc_o <= 1% after every task"] = all(
        f <= 1.0 and (o is None or o <= 1.0)
        for f, o in zip(gl["acc_f"], gl["acc_o"]))
    t["ratio: Acc_r within 2 points of pre-trained every task"] = all(
        a >= p["acc_r"] - 2.0 for a, p in zip(gl["acc_r"], pre))
    others = [m for m in res if m not in ("gs_lora", "gs_lora_pp",
                                           "gs_lora_released_alpha")
              and "ratio" in res[m]]
    t["ratio: GS-LoRA H above every baseline's, every task"] = all(
        h > max(res[m]["ratio"]["h_mean"][i] for m in others)
        for i, h in enumerate(gl["h_mean"])) if others else None
    rel = res.get("gs_lora_released_alpha", {}).get("ratio")
    if rel is not None:
      groups = cfg.depth
      t["sparsity: >= half the groups zero in some task (tuned alpha)"] = any(
          z >= groups / 2 for z in gl["zeroed_groups"])
      t["sparsity: H within 1 point of the released alpha, every task"] = all(
          abs(a - b) <= 1.0 for a, b in zip(gl["h_mean"], rel["h_mean"]))
    t["trainable share <= 5%"] = gl["trainable_share"] <= 5.0
  fs = res.get("gs_lora", {}).get("few_shot")
  fpp = res.get("gs_lora_pp", {}).get("few_shot")
  if fs is not None and fpp is not None:
    # The paper's direction is lower Acc_f (its few-shot block has GS-LoRA++
    # *below* GS-LoRA on Acc_r); gs_lora_regimes tests it on 3 seeds in a
    # setting hard enough for GS-LoRA to leave classes recognisable.
    t["few-shot: GS-LoRA++ Acc_f not above GS-LoRA's on task 1"] = \
        fpp["acc_f"][0] <= fs["acc_f"][0]
  curves = out["relearning"]["best_attack_curve"]
  if "gs_lora" in curves:
    t["relearning: GS-LoRA's forgotten classes return no faster than "
      "never-saw, every evaluation"] = all(
        g <= n + 1e-9 for g, n in zip(curves["gs_lora"][1:],
                                      curves["never_saw"][1:]))
  return t


def claims(out) -> list[dict]:
  """The T-PAMI paper's continual-forgetting claims, graded on this run's
  targets (one seed; ``gs_lora_regimes`` has them on three)."""
  t, res = out["targets"], out["methods"]
  pre = out["pretrained"]["per_task"]
  gl = res.get("gs_lora", {}).get("ratio")
  if gl is None:
    return [_claims.claim("GS-LoRA continual forgetting (Table 3)",
                          _claims.UNMEASURED, "the ratio regime not run", "—")]
  n = _claims.num
  gap = [a - p["acc_r"] for a, p in zip(gl["acc_r"], pre)]
  others = [m for m in res if m not in ("gs_lora", "gs_lora_pp",
                                         "gs_lora_released_alpha")
            and "ratio" in res[m]]
  best = [max(res[m]["ratio"]["h_mean"][i] for m in others)
          for i in range(len(gl["h_mean"]))] if others else []
  result = [
      _claims.graded(
          "GS-LoRA forgets each task's classes and keeps the retained ones, "
          "task after task (Table 3)",
          {"Acc_f and Acc_o ≤ 1 % after every task": t.get(
              "ratio: Acc_f <= 1% and Acc_o <= 1% after every task"),
           "Acc_r within 2 points of the pre-trained model's, every task":
           t.get("ratio: Acc_r within 2 points of pre-trained every task")},
          figure=f"worst-task Acc_f {n(max(gl['acc_f']))} %; Acc_r − "
          f"pre-trained {', '.join(f'{g:+.1f}' for g in gap)} points per "
          "task (ratio regime, one seed)"),
      _claims.graded(
          "GS-LoRA has the highest H-mean of the continual-forgetting "
          "methods (Table 3)",
          {"H above every baseline's, every task": t.get(
              "ratio: GS-LoRA H above every baseline's, every task")},
          figure="H per task " + ", ".join(
              f"{n(h)} vs best baseline {n(b)}"
              for h, b in zip(gl["h_mean"], best)) + " (one seed)"
          if best else "no baseline run")]
  key = "few-shot: GS-LoRA++ Acc_f not above GS-LoRA's on task 1"
  result.append(_claims.graded(
      "With few shots, GS-LoRA++'s prototype terms forget at least as "
      "well as GS-LoRA (Table 2's few-shot block)",
      {"GS-LoRA++ Acc_f not above GS-LoRA's on task 1": t.get(key)},
      figure=f"task-1 Acc_f GS-LoRA++ "
      f"{n(res['gs_lora_pp']['few_shot']['acc_f'][0])} % vs GS-LoRA "
      f"{n(res['gs_lora']['few_shot']['acc_f'][0])} % (one seed)"
      if key in t else "the few-shot regime or GS-LoRA++ not run"))
  return result


def _figures(cfg, run, out):
  res = out["methods"]
  gl = res.get("gs_lora", {}).get(cfg.regimes[0])
  if gl is None:
    return
  r0 = cfg.regimes[0]
  note = (f"paper: Face Transformer, CASIA-100 10% data, T-PAMI Table 3; "
          f"ours: ViT {cfg.depth}x{cfg.dim}, digits {r0} regime, margin-on "
          "top-1")
  run.figure("GS-LoRA H-mean, task 1 (%)", gl["h_mean"][0], PAPER["h_task1"],
             note=note)
  run.figure("GS-LoRA Acc_r, task 1 (%)", gl["acc_r"][0],
             PAPER["acc_r_task1"], note=note)
  run.figure("GS-LoRA Acc_f, task 1 (%)", gl["acc_f"][0],
             PAPER["acc_f_task1"], note=note)
  run.figure(f"GS-LoRA H-mean, task {cfg.num_tasks} (%)", gl["h_mean"][-1],
             PAPER["h_task4"] if cfg.num_tasks == 4 else None, note=note)
  run.figure("GS-LoRA trainable share (%)", gl["trainable_share"],
             PAPER["trainable_share"],
             note=f"paper: rank 8 on a 19.2M-parameter Face Transformer; "
             f"ours: rank {cfg.rank}")
  run.figure("GS-LoRA zeroed groups per task (tuned alpha)",
             ", ".join(map(str, gl["zeroed_groups"])),
             note=f"alpha {regime_alpha(cfg, r0):g} after "
             f"{cfg.alpha_warmup_epochs} "
             f"warm-up epochs; zero = norm < {cfg.zero_rtol:g} x max")
  fs = res.get("gs_lora", {}).get("few_shot")
  fpp = res.get("gs_lora_pp", {}).get("few_shot")
  if fs is not None and fpp is not None:
    n = "paper: T-PAMI Table 3 few-shot block, task 100-20; ours: 4-shot digits"
    run.figure("few-shot Acc_r task 1, GS-LoRA (%)", fs["acc_r"][0],
               PAPER["few_shot_acc_r_task1_gs_lora"], note=n)
    run.figure("few-shot Acc_r task 1, GS-LoRA++ (%)", fpp["acc_r"][0],
               PAPER["few_shot_acc_r_task1_gs_lora_pp"], note=n)
  rl = out["relearning"]
  for s, v in rl["steps_to_threshold"].items():
    run.figure(f"relearning: steps to {rl['threshold']:.0%} on task-1 "
               f"forgotten classes, {s}", v,
               note="the probe's attacker (Adam; full / LoRA) and checkpoint "
               "chosen on a validation half of those test images, read on "
               "the other; None: never reached")


def _plot_tasks(cfg, run, out):
  res = out["methods"]
  regimes = [r for r in cfg.regimes]
  fig, axes = run.new_figure(nrows=2, ncols=len(regimes),
                             figsize=(4.5 * len(regimes), 7), squeeze=False)
  x = np.arange(1, cfg.num_tasks + 1)
  for j, r in enumerate(regimes):
    for m, per in res.items():
      if r not in per:
        continue
      st = _plots.style(m)
      if m == "retrain":
        st["label"] = "retrain (never saw the forgotten classes)"
      else:
        st["ls"] = "-" if m in LORA_FAMILY else "--"
      for i, key in enumerate(("h_mean", "acc_r")):
        axes[i][j].plot(x, [np.nan if v is None else v for v in per[r][key]],
                        marker="o", ms=3, **st)
    for i, key in enumerate(("H-mean (%)", "Acc_r (%)")):
      axes[i][j].set(title=f"{r}", xlabel="task", ylabel=key, xticks=x)
      axes[i][j].grid(alpha=0.3)
  axes[0][0].legend(fontsize=7)
  _plots.claim_title(fig, out["claims"][0]["claim"])
  run.save_figure(fig, "tasks")


def _plot_groups(cfg, run, out):
  rows = [(m, r, per[r]["group_norms"]) for m, per in out["methods"].items()
          for r in per if per[r].get("group_norms") is not None
          and m in ("gs_lora", "gs_lora_released_alpha")]
  if not rows:
    return
  fig, axes = run.new_figure(ncols=len(rows), figsize=(3.2 * len(rows), 3.2),
                             squeeze=False)
  for ax, (m, r, norms) in zip(axes[0], rows):
    arr = np.asarray(norms, float)
    im = ax.imshow(arr.T, aspect="auto", cmap="viridis", origin="lower")
    ax.set(title=f"{m}\n{r}", xlabel="task", ylabel="block",
           xticks=range(arr.shape[0]),
           xticklabels=range(1, arr.shape[0] + 1))
    ax.title.set_fontsize(8)
    fig.colorbar(im, ax=ax, fraction=0.05)
  run.save_figure(fig, "group_norms")


main = _cli.entry_point("gs_lora_digits", Config, experiment, quick=QUICK,
                        description=__doc__.splitlines()[0], x64=False)

if __name__ == "__main__":
  raise SystemExit(main())
