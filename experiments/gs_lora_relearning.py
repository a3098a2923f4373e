"""How deep is GS-LoRA's forgetting: relearning probes against a model that
never saw the classes, and forget objectives that aim at "never saw".

Task 1 of the digits protocol (ratio regime: 10% of each class; two classes
forgotten) from :mod:`experiments.gs_lora_digits`, on 3 seeds (each seed
draws the split, the initialization, the class order and the batches).
Starts: the original model, one pre-trained without the forgotten classes
(never saw), the paper's baselines (finetune / L2 / EWC with the bounded
forget loss, retraining), GS-LoRA and GS-LoRA++ as released (BND 105), and
ours: the bound ablated (BND 25, and BND = log 10, the CE of a uniform
prediction), and three objectives aimed at "never saw" rather than the
antipode of the head row (:data:`immunojax.losses.FORGET_OBJECTIVES`):
``orthogonal`` (forgotten embeddings orthogonal to every head row),
``runner_up`` (the forgotten images taught the original model's prediction
with their class removed) and ``collapse`` (their features pulled onto the
prototype of that runner-up class). The BND, orthogonal and collapse
variants run at ``--ours-alpha``: at the tuned alpha = 1 the group lasso
shrinks the adapters of a weaker or satisfied term back towards zero.

Every start is then taught back on 4 images of every class by the attack
harness: probes head-only (a fresh head or the model's own, on frozen
features), reinit_head + full, full and LoRA (Adam at two rates); the
attacker is chosen on a validation half of the forgotten classes' test
images at every budget and scored on the other half. The depth metric is a
least-squares linear probe on frozen features (all training images) scored
on the forgotten classes. rho = (D - N) / (U - N) at 50 steps (U the
original, N never saw; "-" where U - N < 0.05).

  python -m experiments.gs_lora_relearning
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import numpy as np

from experiments import (_claims, _cli, _config, _gs_lora_report, _options,
                         _runner)
from experiments import gs_lora_digits as gsd
from immunojax import attacks
from immunojax.eval import probes as eval_probes
from immunojax.bench import metrics

Probe = Literal["head_only", "reinit_head", "full", "lora"]
# A probe is a family of attacker modes; its rate and mode are chosen
# together on validation. Head-only: a fresh head, or the model's own head,
# trained on frozen features.
PROBE_MODES = {"head_only": ("probe", "head"), "reinit_head": ("reinit_head",),
               "full": ("full",), "lora": ("lora",)}
# name -> (method of gs_lora_digits, coefficient overrides, forget term);
# a bound is given at CosFace scale 64 and scaled with --cosface-scale;
# "ours" as alpha means --ours-alpha.
VARIANTS = {
    "retrain": ("retrain", {}, "bounded"),
    "finetune": ("finetune", {}, "bounded"),
    "l2": ("l2", {}, "bounded"),
    "ewc": ("ewc", {}, "bounded"),
    "gs_lora": ("gs_lora", {}, "bounded"),
    "gs_lora_pp": ("gs_lora_pp", {}, "bounded"),
    "gs_lora_bnd25": ("gs_lora", {"bound": 25.0, "alpha": "ours"},
                      "bounded"),
    "gs_lora_bnd_uniform": ("gs_lora", {"bound": "uniform", "alpha": "ours"},
                            "bounded"),
    "gs_lora_orthogonal": ("gs_lora", {"alpha": "ours"}, "orthogonal"),
    "gs_lora_runner_up": ("gs_lora", {}, "runner_up"),
    "gs_lora_collapse": ("gs_lora", {"alpha": "ours"}, "collapse"),
}
OURS = ("gs_lora_bnd25", "gs_lora_bnd_uniform", "gs_lora_orthogonal",
        "gs_lora_runner_up", "gs_lora_collapse")
REFERENCES = ("original", "never_saw")
Variant = Literal["retrain", "finetune", "l2", "ewc", "gs_lora", "gs_lora_pp",
                  "gs_lora_bnd25", "gs_lora_bnd_uniform",
                  "gs_lora_orthogonal", "gs_lora_runner_up",
                  "gs_lora_collapse"]


@dataclasses.dataclass(frozen=True)
class Config(_options.Seeds, gsd.Config):
  regimes: tuple[gsd.Regime, ...] = ("ratio",)
  num_tasks: int = 1
  variants: tuple[Variant, ...] = tuple(VARIANTS)
  orthogonal_beta: float = dataclasses.field(default=20.0, metadata={
      "help": "weight of the orthogonal forget term (mean squared cosine)"})
  runner_up_beta: float = dataclasses.field(default=1.0, metadata={
      "help": "weight of the runner-up forget term (a cross-entropy)"})
  collapse_beta: float = dataclasses.field(default=10.0, metadata={
      "help": "weight of the collapse forget term (1 - cosine)"})
  ours_alpha: float = dataclasses.field(default=0.01, metadata={
      "help": "alpha of the BND, orthogonal and collapse variants (at "
              "--alpha the group lasso shrinks the adapters of a weaker or "
              "satisfied term back)"})
  probes: tuple[Probe, ...] = ("head_only", "reinit_head", "full", "lora")
  probe_lrs: tuple[float, ...] = (1e-3, 1e-2)
  relearn_step: int = 50

  def __post_init__(self):
    super().__post_init__()
    _config.require(self, positive=("orthogonal_beta", "runner_up_beta",
                                    "collapse_beta", "relearn_step",
                                    "variants", "probes"),
                    nonnegative=("ours_alpha",))
    if self.relearn_step % 10 or self.relearn_step > self.probe_steps:
      raise ValueError(f"--relearn-step {self.relearn_step} must be a "
                       f"multiple of 10 within --probe-steps "
                       f"{self.probe_steps}")


QUICK = {**gsd.QUICK, "pretrain_epochs": 8, "epochs": 4, "seeds": (0, 1),
         "probe_steps": 20, "relearn_step": 20, "probe_lrs": (1e-2,),
         "probes": ("head_only", "full"),
         "variants": ("gs_lora", "gs_lora_collapse")}


def variant(cfg: Config, name: str):
  base, over, forget = VARIANTS[name]
  over = dict(over)
  if over.get("bound") == "uniform":
    over["bound"] = math.log(10.0)     # the CE of a uniform prediction
  elif "bound" in over:
    over["bound"] = over["bound"] * cfg.cosface_scale / 64.0
  if over.get("alpha") == "ours":
    over["alpha"] = cfg.ours_alpha
  over.update({"orthogonal": {"beta": cfg.orthogonal_beta},
               "runner_up": {"beta": cfg.runner_up_beta},
               "collapse": {"beta": cfg.collapse_beta}}.get(forget, {}))
  return base, over, forget


# ------------------------------------------------------------- probes
def linear_probe_accuracy(ctx: dict, params) -> float:
  """Depth: a least-squares head (with bias) on the frozen features of every
  training image, scored (argmax over ten classes) on the forgotten
  classes' test images (:func:`immunojax.eval.probes.
  least_squares_accuracy`)."""
  forward, ev = ctx["forward"], ctx["evaluator"]
  feats = lambda x: forward(params, x, None, None)[1]
  forgot = np.isin(ev.y, list(ctx["tasks"][0].forget))
  return eval_probes.least_squares_accuracy(
      feats(ctx["x_train"]), ctx["y_train"], feats(ev.x[forgot]),
      ev.y[forgot], num_classes=10)


def probe_starts(cfg: Config, run: _runner.Run, ctx: dict, starts: dict,
                 seed: int) -> tuple[dict, list[int]]:
  """Per start and probe: the validation-selected test curve, its value at
  ``relearn_step`` and the steps to 0.5 (None: not within the budget); and
  the evaluated steps."""
  modes = tuple(dict.fromkeys(m for p in cfg.probes for m in PROBE_MODES[p]))
  grid = attacks.grid(optimizers=("adam",), learning_rates=cfg.probe_lrs,
                      batch_sizes=(32,), modes=modes,
                      steps=(cfg.probe_steps,))
  curves = attacks.run_attacks(grid, starts, gsd.probe_target(cfg, ctx, seed),
                               eval_every=10, attack_map=run.grid_map())
  out = {}
  for s in starts:
    steps = curves.steps[s]
    out[s] = {}
    for probe in cfg.probes:
      rows = [i for i, a in enumerate(grid) if a.mode in PROBE_MODES[probe]]
      m = curves.metric[s][rows]
      c = metrics.selected_curve(m[..., 0], m[..., 1], steps)
      at = int(np.flatnonzero(steps == cfg.relearn_step)[0])
      out[s][probe] = {"curve": c.tolist(), "at_step": float(c[at]),
                      "steps_to_50": metrics.first_reach(c, steps, 0.5)}
  return out, [int(v) for v in curves.steps[next(iter(starts))]]


# --------------------------------------------------------------- one seed
def one_seed(cfg: Config, run: _runner.Run, seed: int) -> dict:
  c = dataclasses.replace(cfg, seed=seed)
  prefix = f"seed{seed}/"
  ctx = gsd.setup(c, run, prefix=prefix)
  starts = {"original": ctx["pretrained"],
            "never_saw": gsd.never_saw(c, run, ctx, prefix=prefix)}
  pre = ctx["pre"][0]
  ev = ctx["evaluator"]
  correct = ev.correct(starts["never_saw"])
  task = ctx["tasks"][0]
  scores = {"original": {"acc_r": pre["acc_r"], "acc_f": pre["acc_f"]},
            "never_saw": {"acc_r": ev.accuracy(correct, task.retain),
                          "acc_f": ev.accuracy(correct, task.forget)}}
  for name in cfg.variants:
    res, first = gsd.run_method(c, run, ctx, "ratio", name,
                                variant=variant(c, name), prefix=prefix)
    starts[name] = first
    scores[name] = {k: res[k][0] for k in ("acc_r", "acc_f", "h_mean")}
  depth = {s: linear_probe_accuracy(ctx, p) for s, p in starts.items()}
  probes, steps = probe_starts(c, run, ctx, starts, seed)
  run.print(f"seed {seed}: " + ", ".join(
      f"{s} {probes[s][cfg.probes[0]]['at_step']:.2f}" for s in starts)
      + f" ({cfg.probes[0]} probe at {cfg.relearn_step} steps)")
  return {"scores": scores, "depth": depth, "probes": probes, "steps": steps,
          "pretrained_acc_r": pre["acc_r"]}


# ------------------------------------------------------------ aggregation
def _stat(values) -> dict:
  v = np.asarray([np.nan if x is None else x for x in values], float)
  ok = v[np.isfinite(v)]
  return {"mean": float(ok.mean()) if ok.size else None,
          "sd": float(ok.std(ddof=1)) if ok.size > 1 else None,
          "per_seed": [None if not np.isfinite(x) else float(x) for x in v]}


def aggregate(cfg: Config, per_seed: list[dict]) -> dict:
  starts = list(per_seed[0]["probes"])
  steps = per_seed[0]["steps"]
  at = cfg.relearn_step
  relearn, depth, variants = {}, {}, {}
  for s in starts:
    relearn[s] = {}
    for mode in cfg.probes:
      rows = [r["probes"][s][mode] for r in per_seed]
      rho = [metrics.normalized(r["probes"][s][mode]["at_step"],
                                r["probes"]["original"][mode]["at_step"],
                                r["probes"]["never_saw"][mode]["at_step"])
             for r in per_seed]
      reached = [x["steps_to_50"] for x in rows]
      relearn[s][mode] = {
          "curve": {"mean": np.mean([x["curve"] for x in rows], 0).tolist(),
                    "sd": np.std([x["curve"] for x in rows], 0,
                                 ddof=1).tolist()},
          f"at_{at}": _stat([x["at_step"] for x in rows]),
          "steps_to_50": {**_stat(reached), "censored": sum(
              x is None for x in reached)},
          "rho": _stat(rho)}
    depth[s] = {"linear_probe_accuracy": _stat(
        [r["depth"][s] for r in per_seed])}
    variants[s] = {k: _stat([r["scores"][s].get(k) for r in per_seed])
                   for k in ("acc_f", "acc_r", "h_mean")}
    variants[s]["relearn_50"] = relearn[s][cfg.probes[0]][f"at_{at}"]
  pre = _stat([r["pretrained_acc_r"] for r in per_seed])
  return {"steps": steps, "relearning": relearn, "depth": depth,
          "variants": variants, "pretrained_acc_r": pre}


def target(cfg: Config, agg: dict) -> dict:
  """The issue's target: a variant whose first-probe (head-only) recovery
  at the relearn step is within 0.15 of never-saw's, at Acc_f <= 1 % and
  Acc_r within 2 points of the pre-trained model (means over seeds)."""
  v = agg["variants"]
  never = v["never_saw"]["relearn_50"]["mean"]
  pre = agg["pretrained_acc_r"]["mean"]
  rows = {}
  for s in v:
    if s in REFERENCES:
      continue
    r = v[s]
    rows[s] = (r["acc_f"]["mean"] <= 1.0
               and r["acc_r"]["mean"] >= pre - 2.0
               and abs(r["relearn_50"]["mean"] - never) <= 0.15)
  return {"met_by": [s for s, ok in rows.items() if ok], "per_variant": rows}


def claims(cfg: Config, agg: dict) -> list[dict]:
  """Ours (no paper): is GS-LoRA's forgetting as deep as never having seen
  the classes? Graded per probe at the relearn step (2-sd rule)."""
  at = f"at_{cfg.relearn_step}"
  rel = agg["relearning"]
  std = lambda x: {"mean": x["mean"], "std": x["sd"]}
  checks, figs = {}, []
  for probe in cfg.probes:
    if "gs_lora" not in rel or probe not in rel["gs_lora"]:
      continue
    g, n = rel["gs_lora"][probe][at], rel["never_saw"][probe][at]
    checks[f"{probe}: not above never-saw after {cfg.relearn_step} steps"] = \
        _claims.relation(std(g), std(n)) != "above"
    # steps to 0.5 accuracy, a seed that never gets there counted at the
    # budget + 1
    late = agg["steps"][-1] + 1
    t50 = {s: _stat([late if x is None else x
                     for x in rel[s][probe]["steps_to_50"]["per_seed"]])
           for s in ("gs_lora", "never_saw")}
    checks[f"{probe}: reaches 0.5 no sooner than never-saw"] = \
        _claims.relation(std(t50["gs_lora"]), std(t50["never_saw"])) != \
        "below"
    figs.append(f"{probe} {_fmt(g)} vs never-saw {_fmt(n)}, steps to 0.5 "
                f"{_fmt(t50['gs_lora'], digits=0)} vs "
                f"{_fmt(t50['never_saw'], digits=0)} ({late}: never)")
  met = agg["target"]["met_by"]
  return [
      _claims.graded(
          "No paper (ours): GS-LoRA's forgotten classes come back under "
          "relearning no faster than in a model that never saw them",
          checks, figure="forgotten-class accuracy after "
          f"{cfg.relearn_step} probe steps: " + "; ".join(figs)),
      _claims.graded(
          "No paper (ours): some forget term reaches never-saw's head-only "
          "recovery (within 0.15) at Acc_f ≤ 1 % and Acc_r within 2 points",
          {"a variant meets it": bool(met)},
          figure="met by " + (", ".join(met) if met else "none"))]


def _fmt(st: dict, scale: float = 1.0, digits: int = 2) -> str:
  if st["mean"] is None:
    return "—"
  sd = "" if st["sd"] is None else f" ± {st['sd'] * scale:.{digits}f}"
  return f"{st['mean'] * scale:.{digits}f}{sd}"


def sentences(cfg: Config, agg: dict) -> list[str]:
  """One sentence per start: what its numbers say against the references
  (a difference inside 2 sd is "no difference")."""
  v, at = agg["variants"], cfg.relearn_step
  mode = cfg.probes[0]
  n = v["never_saw"]["relearn_50"]
  u = v["original"]["relearn_50"]
  out = []
  for s, r in v.items():
    if s in REFERENCES:
      continue
    d = r["relearn_50"]
    if r["acc_r"]["mean"] < 50.0:
      out.append(f"{s}: Acc_r {_fmt(r['acc_r'])} %: it did not learn the "
                 "retained classes (margin on), so its relearning row says "
                 "nothing about forgetting.")
      continue
    sd = max(d["sd"] or 0.0, n["sd"] or 0.0)
    closer = ("no different from never-saw" if abs(d["mean"] - n["mean"])
              <= 2 * sd else
              "no different from the original" if abs(
                  d["mean"] - u["mean"]) <= 2 * max(sd, u["sd"] or 0.0)
              else "between never-saw and the original")
    out.append(
        f"{s}: Acc_f {_fmt(r['acc_f'])} %, Acc_r {_fmt(r['acc_r'])} %; the "
        f"{mode} probe brings the forgotten classes to {_fmt(d)} in {at} "
        f"steps (never-saw {_fmt(n)}, original {_fmt(u)}): {closer}; depth "
        f"(linear probe) {_fmt(agg['depth'][s]['linear_probe_accuracy'])}.")
  for probe in cfg.probes[1:]:
    rows = agg["relearning"]
    never = rows["never_saw"][probe][f"at_{at}"]
    learned = [(rows[s][probe][f"at_{at}"]["mean"], s) for s in rows
               if s not in REFERENCES and v[s]["acc_r"]["mean"] >= 50.0]
    if not learned:
      continue
    worst = min(learned)
    out.append(f"{probe} probe: every start that learned the retained "
               f"classes is back to >= {worst[0]:.2f} at {at} steps (lowest: "
               f"{worst[1]}) against never-saw's {_fmt(never)}"
               + (": no forgetting here survives this attacker."
                  if worst[0] - never["mean"] > 2 * (never["sd"] or 0.0)
                  else "."))
  dn = agg["depth"]["never_saw"]["linear_probe_accuracy"]
  lo = min(agg["depth"][s]["linear_probe_accuracy"]["mean"]
           for s in agg["depth"])
  out.append(f"Depth: a linear probe trained on every training image reads "
             f"the forgotten classes from every start at >= {lo:.2f} "
             f"(never saw: {_fmt(dn)}): with enough labels the features of "
             "every model here, including one that never saw the classes, "
             "separate them; what differs is how fast a few shots recover "
             "them.")
  return out


def experiment(cfg: Config, run: _runner.Run) -> dict:
  per_seed = [one_seed(cfg, run, s) for s in cfg.seeds]
  agg = aggregate(cfg, per_seed)
  agg["target"] = target(cfg, agg)
  agg["claims"] = claims(cfg, agg)
  agg["notes"] = sentences(cfg, agg)
  at, mode = cfg.relearn_step, cfg.probes[0]
  for s, r in agg["variants"].items():
    run.figure(f"{s}: {mode} probe at {at} steps (forgotten classes)",
               _fmt(r["relearn_50"]),
               note=f"mean ± sd over {len(cfg.seeds)} seeds; rate chosen on "
               "validation")
    if s not in REFERENCES:
      run.figure(f"{s}: Acc_f / Acc_r (%)",
                 f"{_fmt(r['acc_f'])} / {_fmt(r['acc_r'])}")
    run.figure(f"{s}: linear-probe depth",
               _fmt(agg["depth"][s]["linear_probe_accuracy"]),
               note="least squares on frozen features, all training images")
  met = agg["target"]["met_by"]
  run.print("target (a variant within 0.15 of never-saw at Acc_f <= 1 %, "
            f"Acc_r within 2 points): {'met by ' + ', '.join(met) if met else 'MISSED'}")
  for line in agg["notes"]:
    run.print("  " + line)
  _gs_lora_report.plot_relearning(cfg, run, agg, references=REFERENCES,
                                  ours=OURS)
  agg["per_seed"] = per_seed
  return agg


main = _cli.entry_point("gs_lora_relearning", Config, experiment, quick=QUICK,
                        description=__doc__.splitlines()[0], x64=False)

if __name__ == "__main__":
  raise SystemExit(main())
