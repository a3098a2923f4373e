"""GS-LoRA's alpha and forget term per data regime, and GS-LoRA++ where the
paper says it helps: a few-shot setting hard enough that GS-LoRA leaves
forgotten classes recognisable.

Part 1 (alpha per regime): the continual protocol of
:mod:`experiments.gs_lora_digits` (four tasks) for alpha in ``--alphas``
and each forget term in ``--forgets`` (the released bound on the
batch-mean CE, ``bounded``; ours on every example's CE, ``bounded_each``
with ``--bound-each``) in each regime (ratio, 4-shot, missing classes),
3 seeds. The chosen setting of a regime: among those whose mean Acc_f is
<= 1 % after every task, the ones whose mean H (over tasks, then seeds) is
within 2 sd of the best (no difference); of those the released forget term
if it is there, then the largest alpha (the most group sparsity). When none
reaches 1 %, the lowest worst-task Acc_f (and the report says so).
gs_lora_digits' defaults (``--alpha-<regime>``, ``--forget-<regime>``) are
these choices. Per-class Acc_f and zeroed groups are kept for every run.

Part 2 (GS-LoRA++ in the hard setting): ``--hard-shots`` images of each
class, a smaller beta, fewer epochs, and the prototype push bound BND_pro
above the prototype KL the forget loss reaches alone; GS-LoRA against
GS-LoRA++ over the four tasks, 3 seeds. The paper's direction (GS-LoRA++
lowers Acc_f; T-PAMI Table 3, few-shot block: 14.29 -> 0.15 on task 1) is
the target, scored with the sd in view (a difference inside 2 sd is "no
difference"). Both run at the few-shot regime's alpha and forget term.

  python -m experiments.gs_lora_regimes
"""

from __future__ import annotations

import dataclasses

import numpy as np

from experiments import _claims, _cli, _config, _options, _reports, _runner
from experiments import gs_lora_digits as gsd

PAPER_FEW_SHOT_ACC_F = {"gs_lora": 14.29, "gs_lora_pp": 0.15}   # task 1, %


@dataclasses.dataclass(frozen=True)
class Config(_options.Seeds, gsd.Config):
  alphas: tuple[float, ...] = (0.01, 0.1, 1.0)
  forgets: tuple[gsd.ForgetTerm, ...] = ("bounded", "bounded_each")
  hard_shots: int = 2
  hard_epochs: int = 30
  hard_beta: tuple[float, ...] = (0.1, 0.1, 0.1, 0.1)
  hard_prototype_bound: float = 3.0

  def __post_init__(self):
    super().__post_init__()
    _config.require(self, positive=("alphas", "forgets", "hard_shots",
                                    "hard_epochs",
                                    "hard_beta", "hard_prototype_bound"))
    if len(self.hard_beta) < self.num_tasks:
      raise ValueError(f"--hard-beta needs one beta per task "
                       f"({self.num_tasks}), got {len(self.hard_beta)}")


QUICK = {**gsd.QUICK, "pretrain_epochs": 8, "epochs": 4, "hard_epochs": 3,
         "seeds": (0, 1), "alphas": (1.0,), "regimes": ("ratio",)}

KEYS = ("acc_r", "acc_f", "h_mean", "zeroed_groups", "forget_class_acc")


def one_seed(cfg: Config, run: _runner.Run, seed: int) -> dict:
  c = dataclasses.replace(cfg, seed=seed)
  prefix = f"seed{seed}/"
  ctx = gsd.setup(c, run, prefix=prefix)
  sweep = {}
  for regime in c.regimes:
    for forget in c.forgets:
      bound = (c.bound_each if forget == "bounded_each" else c.bound) \
          * c.cosface_scale / 64.0
      for a in c.alphas:
        name = f"gs_lora_{'each_' if forget == 'bounded_each' else ''}" \
            f"alpha{a:g}"
        res, _ = gsd.run_method(
            c, run, ctx, regime, name,
            variant=("gs_lora", {"alpha": a, "bound": bound}, forget),
            prefix=prefix)
        sweep.setdefault(regime, {}).setdefault(forget, {})[f"{a:g}"] = {
            k: res[k] for k in KEYS}
  # The hard few-shot setting: its own subsets, betas, epochs and BND_pro.
  h = dataclasses.replace(c, shots=c.hard_shots, epochs=c.hard_epochs,
                          beta_few_shot=c.hard_beta,
                          prototype_bound=c.hard_prototype_bound)
  y = np.asarray(ctx["y_train"])
  hard_ctx = {**ctx, "runners": {}, "subsets": {
      **ctx["subsets"], "few_shot": gsd.task_subsets(
          h, y, ctx["tasks"], "few_shot", ctx["missing"])}}
  hard_ctx["all_subsets"] = {
      h.few_shot_batch: hard_ctx["subsets"]["few_shot"]
      + ctx["all_subsets"].get(h.few_shot_batch, [])}
  hard = {}
  for m in ("gs_lora", "gs_lora_pp"):
    res, _ = gsd.run_method(h, run, hard_ctx, "few_shot", m,
                            prefix=prefix + "hard/")
    hard[m] = {k: res[k] for k in KEYS}
  return {"sweep": sweep, "hard": hard,
          "pretrained": [p["acc_r"] for p in ctx["pre"]]}


def _mean_sd(rows) -> dict:
  a = np.asarray(rows, float)
  return {"mean": np.mean(a, 0).tolist(), "sd": np.std(a, 0, ddof=1).tolist()}


def choose_setting(sweep: dict) -> tuple[str, str, str]:
  """``(forget, alpha, rule)`` from ``{forget: {alpha: {"acc_f": {"mean":
  per task}, "h_overall": {"mean", "sd"}}}}``.

  Among the settings whose mean Acc_f is <= 1 % after every task, those
  whose overall H is within 2 sd (the larger of the two) of the best one's
  are no different; of those the released term ``"bounded"`` if present,
  then the largest alpha. If no setting reaches 1 %, the lowest worst-task
  Acc_f.
  """
  rows = {(f, a): r for f, by_a in sweep.items() for a, r in by_a.items()}
  ok = {k: r for k, r in rows.items() if max(r["acc_f"]["mean"]) <= 1.0}
  if not ok:
    f, a = min(rows, key=lambda k: max(rows[k]["acc_f"]["mean"]))
    return f, a, ("no setting reaches Acc_f <= 1 % after every task: the "
                  "lowest worst-task Acc_f")
  h = lambda k: ok[k]["h_overall"]
  best = max(ok, key=lambda k: h(k)["mean"])
  tied = [k for k in ok if h(best)["mean"] - h(k)["mean"]
          <= 2 * max(h(best)["sd"], h(k)["sd"])]
  f, a = max(tied, key=lambda k: (k[0] == "bounded", float(k[1])))
  return f, a, ("Acc_f <= 1 % after every task and H no different from the "
                "best (2 sd); then the released forget term, then the "
                "largest alpha")


def aggregate(cfg: Config, per_seed: list[dict]) -> dict:
  sweep, chosen = {}, {}
  for regime, by_forget in per_seed[0]["sweep"].items():
    sweep[regime] = {}
    for forget, by_alpha in by_forget.items():
      sweep[regime][forget] = {}
      for a in by_alpha:
        rows = [r["sweep"][regime][forget][a] for r in per_seed]
        cell = {k: _mean_sd([x[k] for x in rows])
                for k in ("acc_r", "acc_f", "h_mean", "zeroed_groups")}
        cell["h_overall"] = _mean_sd([np.mean(x["h_mean"]) for x in rows])
        cell["forget_class_acc"] = [x["forget_class_acc"] for x in rows]
        sweep[regime][forget][a] = cell
    forget, alpha, rule = choose_setting(sweep[regime])
    drop = [np.asarray(r["sweep"][regime][forget][alpha]["acc_r"])
            - np.asarray(r["pretrained"]) for r in per_seed]
    chosen[regime] = {"alpha": float(alpha), "forget": forget, "rule": rule,
                      "acc_r_minus_pretrained": _mean_sd(drop)}
  hard = {m: {k: _mean_sd([r["hard"][m][k] for r in per_seed])
              for k in ("acc_r", "acc_f", "h_mean")}
          for m in per_seed[0]["hard"]}
  return {"alpha_sweep": sweep, "alpha_by_regime": chosen,
          "few_shot_hard": hard}


def targets(agg: dict) -> dict:
  """Issue 28's per-regime targets at the chosen setting (means over
  seeds): Acc_f <= 1 % after every task; in the ratio regime also Acc_r
  within 2 points of the pre-trained model's after every task; in the hard
  few-shot setting GS-LoRA++ below GS-LoRA by more than 2 sd wherever
  GS-LoRA leaves more than 5 %."""
  out = {}
  for regime, ch in agg["alpha_by_regime"].items():
    row = agg["alpha_sweep"][regime][ch["forget"]][f"{ch['alpha']:g}"]
    out[f"{regime}: Acc_f <= 1 % after every task (chosen setting)"] = \
        max(row["acc_f"]["mean"]) <= 1.0
    if regime == "ratio":
      out["ratio: Acc_r within 2 points of pre-trained after every task"] = \
          min(ch["acc_r_minus_pretrained"]["mean"]) >= -2.0
  hv = agg["hard_verdict"]
  out["hard few-shot: GS-LoRA++ Acc_f below GS-LoRA's by > 2 sd on every "
      "task where GS-LoRA leaves > 5 %"] = any(hv["gs_lora_leaves_over_5"]) \
      and all(v == "lower" for v, over in zip(hv["per_task"],
                                              hv["gs_lora_leaves_over_5"])
              if over)
  return out


def claims(agg: dict) -> list[dict]:
  """The paper's forgetting claims across regimes and its few-shot
  GS-LoRA++ claim, graded on this run's targets (3 seeds)."""
  t = agg["targets"]
  worst = {}
  for regime, ch in agg["alpha_by_regime"].items():
    row = agg["alpha_sweep"][regime][ch["forget"]][f"{ch['alpha']:g}"]
    worst[regime] = (f"{regime} {max(row['acc_f']['mean']):.2f} % "
                     f"({ch['forget']}, α {ch['alpha']:g})")
  hard = agg["few_shot_hard"]
  key = next(k for k in t if k.startswith("hard few-shot"))
  return [
      _claims.graded(
          "GS-LoRA forgets the requested classes task after task with all "
          "replay data, with few shots and with classes missing from the "
          "replay data, keeping the retained ones (Tables 3, 5)",
          {k.replace(" (chosen setting)", ""): v for k, v in t.items()
           if not k.startswith("hard few-shot")},
          figure="worst-task Acc_f at the chosen setting: "
          + "; ".join(worst.values()) + " (mean over seeds)"),
      _claims.graded(
          "With few shots GS-LoRA++ forgets better than GS-LoRA "
          "(Table 3's few-shot block)",
          {"GS-LoRA++ Acc_f lower by > 2 sd wherever GS-LoRA leaves > 5 %":
           t[key]},
          figure="Acc_f per task GS-LoRA " + ", ".join(
              _fmt(m, s_) for m, s_ in zip(hard["gs_lora"]["acc_f"]["mean"],
                                           hard["gs_lora"]["acc_f"]["sd"]))
          + " vs GS-LoRA++ " + ", ".join(
              _fmt(m, s_) for m, s_ in zip(
                  hard["gs_lora_pp"]["acc_f"]["mean"],
                  hard["gs_lora_pp"]["acc_f"]["sd"])) + " %")]


def hard_verdict(hard: dict) -> dict:
  """Per task: GS-LoRA++'s Acc_f below GS-LoRA's by more than 2 sd (the
  larger of the two sds), "no difference" inside it, or "above"."""
  g, p = hard["gs_lora"]["acc_f"], hard["gs_lora_pp"]["acc_f"]
  out = []
  for gm, gs_, pm, ps in zip(g["mean"], g["sd"], p["mean"], p["sd"]):
    band = 2 * max(gs_, ps)
    out.append("lower" if gm - pm > band else
               "higher" if pm - gm > band else "no difference")
  return {"per_task": out,
          "gs_lora_leaves_over_5": [m > 5.0 for m in g["mean"]]}


def _fmt(mean, sd) -> str:
  return f"{mean:.2f} ± {sd:.2f}"


def notes(cfg: Config, agg: dict) -> list[str]:
  out = []
  for regime, ch in agg["alpha_by_regime"].items():
    line = "; ".join(
        f"{f} alpha {a}: Acc_f {max(v['acc_f']['mean']):.2f} (worst task), "
        f"H {_fmt(v['h_overall']['mean'], v['h_overall']['sd'])}, zeroed "
        f"{np.mean(v['zeroed_groups']['mean']):.1f}/{cfg.depth}"
        for f, by_a in agg["alpha_sweep"][regime].items()
        for a, v in by_a.items())
    d = ch["acc_r_minus_pretrained"]
    out.append(f"{regime}: chosen {ch['forget']}, alpha {ch['alpha']:g} "
               f"({ch['rule']}); Acc_r minus the pre-trained model's per "
               "task " + ", ".join(_fmt(m, s_) for m, s_ in zip(d["mean"],
                                                                 d["sd"]))
               + f". {line}.")
    ours = (cfg.regime_forget(regime), cfg.regime_alpha(regime))
    if ours != (ch["forget"], ch["alpha"]):
      out.append(f"{regime}: gs_lora_digits' defaults ({ours[0]}, alpha "
                 f"{ours[1]:g}) are not this run's choice.")
  hv = agg["hard_verdict"]
  hard = agg["few_shot_hard"]
  out.append(
      f"Hard few-shot ({cfg.hard_shots} shots, beta {cfg.hard_beta[0]:g}, "
      f"{cfg.hard_epochs} epochs, BND_pro {cfg.hard_prototype_bound:g}): "
      "Acc_f per task GS-LoRA " + ", ".join(
          _fmt(m, s) for m, s in zip(hard["gs_lora"]["acc_f"]["mean"],
                                     hard["gs_lora"]["acc_f"]["sd"]))
      + " vs GS-LoRA++ " + ", ".join(
          _fmt(m, s) for m, s in zip(hard["gs_lora_pp"]["acc_f"]["mean"],
                                     hard["gs_lora_pp"]["acc_f"]["sd"]))
      + f": GS-LoRA++ {', '.join(hv['per_task'])} (the paper: lower).")
  if not any(hv["gs_lora_leaves_over_5"]):
    out.append("GS-LoRA already forgets (Acc_f <= 5 % after every task) in "
               "this setting: there is nothing for GS-LoRA++ to improve.")
  return out


def _plot(cfg: Config, run: _runner.Run, agg: dict) -> None:
  regimes = list(agg["alpha_sweep"])
  fig, axes = run.new_figure(ncols=len(regimes) + 1,
                             figsize=(4.3 * (len(regimes) + 1), 3.6),
                             squeeze=False)
  x = np.arange(1, cfg.num_tasks + 1)
  for ax, regime in zip(axes[0], regimes):
    for f, by_a in agg["alpha_sweep"][regime].items():
      for a, v in by_a.items():
        ax.errorbar(x, v["acc_f"]["mean"], yerr=v["acc_f"]["sd"],
                    marker="o" if f == "bounded" else "s", capsize=3,
                    ls="-" if f == "bounded" else "--",
                    label=f"{f}, alpha {a}")
    ax.axhline(1.0, color="gray", ls=":", label="1 % (target)")
    ax.set(title=f"{regime}: Acc_f by alpha and forget term", xlabel="task",
           ylabel="Acc_f (%)", xticks=x)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
  ax = axes[0][-1]
  for m, v in agg["few_shot_hard"].items():
    ax.errorbar(x, v["acc_f"]["mean"], yerr=v["acc_f"]["sd"], marker="o",
                capsize=3, label=m)
  ax.set(title=f"hard few-shot ({cfg.hard_shots} shots): does GS-LoRA++ "
         "lower Acc_f?", xlabel="task", ylabel="Acc_f (%)", xticks=x)
  ax.title.set_fontsize(9)
  ax.legend(fontsize=7)
  ax.grid(alpha=0.3)
  run.save_figure(fig, "regimes")


def experiment(cfg: Config, run: _runner.Run) -> dict:
  per_seed = [one_seed(cfg, run, s) for s in cfg.seeds]
  agg = aggregate(cfg, per_seed)
  agg["hard_verdict"] = hard_verdict(agg["few_shot_hard"])
  agg["notes"] = notes(cfg, agg)
  for regime, ch in agg["alpha_by_regime"].items():
    run.figure(f"chosen alpha, {regime}", ch["alpha"], note=ch["rule"])
    run.figure(f"chosen forget term, {regime}", ch["forget"],
               note=ch["rule"])
  agg["targets"] = targets(agg)
  agg["claims"] = claims(agg)
  _reports.print_targets(run, agg["targets"])
  hard = agg["few_shot_hard"]
  for m in hard:
    run.figure(f"hard few-shot Acc_f task 1, {m} (%)",
               _fmt(hard[m]["acc_f"]["mean"][0], hard[m]["acc_f"]["sd"][0]),
               PAPER_FEW_SHOT_ACC_F[m],
               note="paper: T-PAMI Table 3 few-shot block, task 100-20 "
               f"(faces); ours: {cfg.hard_shots}-shot digits, mean ± sd "
               f"over {len(cfg.seeds)} seeds")
  for line in agg["notes"]:
    run.print("  " + line)
  _plot(cfg, run, agg)
  agg["per_seed"] = per_seed
  return agg


main = _cli.entry_point("gs_lora_regimes", Config, experiment, quick=QUICK,
                        description=__doc__.splitlines()[0], x64=False)

if __name__ == "__main__":
  raise SystemExit(main())
