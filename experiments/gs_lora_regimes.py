"""GS-LoRA's alpha per data regime, and GS-LoRA++ where the paper says it
helps: a few-shot setting hard enough that GS-LoRA leaves forgotten
classes recognisable.

Part 1 (alpha per regime): the continual protocol of
:mod:`experiments.gs_lora_digits` (four tasks) for alpha in ``--alphas``
in each regime (ratio, 4-shot, missing classes), 3 seeds. The chosen alpha
of a regime is, among those whose mean Acc_f is <= 1 % after every task,
the one with the highest mean H (over tasks and seeds); when none is, the
one with the lowest worst-task Acc_f (and the report says so). Per-class
Acc_f and zeroed groups are kept for every run.

Part 2 (GS-LoRA++ in the hard setting): ``--hard-shots`` images of each
class, a smaller beta, fewer epochs, and the prototype push bound BND_pro
above the prototype KL the forget loss reaches alone; GS-LoRA against
GS-LoRA++ over the four tasks, 3 seeds. The paper's direction (GS-LoRA++
lowers Acc_f; T-PAMI Table 3, few-shot block: 14.29 -> 0.15 on task 1) is
the target, scored with the sd in view (a difference inside 2 sd is "no
difference").

  python -m experiments.gs_lora_regimes
"""

from __future__ import annotations

import dataclasses

import numpy as np

from experiments import _cli, _config, _options, _runner
from experiments import gs_lora_digits as gsd

PAPER_FEW_SHOT_ACC_F = {"gs_lora": 14.29, "gs_lora_pp": 0.15}   # task 1, %


@dataclasses.dataclass(frozen=True)
class Config(_options.Seeds, gsd.Config):
  alphas: tuple[float, ...] = (0.01, 0.1, 1.0)
  hard_shots: int = 2
  hard_epochs: int = 30
  hard_beta: tuple[float, ...] = (0.1, 0.1, 0.1, 0.1)
  hard_prototype_bound: float = 3.0

  def __post_init__(self):
    super().__post_init__()
    _config.require(self, positive=("alphas", "hard_shots", "hard_epochs",
                                    "hard_beta", "hard_prototype_bound"))
    if len(self.hard_beta) < self.num_tasks:
      raise ValueError(f"--hard-beta needs one beta per task "
                       f"({self.num_tasks}), got {len(self.hard_beta)}")


QUICK = {**gsd.QUICK, "pretrain_epochs": 8, "epochs": 4, "hard_epochs": 3,
         "seeds": (0, 1), "alphas": (0.1, 1.0), "regimes": ("ratio",)}

KEYS = ("acc_r", "acc_f", "h_mean", "zeroed_groups", "forget_class_acc")


def one_seed(cfg: Config, run: _runner.Run, seed: int) -> dict:
  c = dataclasses.replace(cfg, seed=seed)
  prefix = f"seed{seed}/"
  ctx = gsd.setup(c, run, prefix=prefix)
  sweep = {}
  for regime in c.regimes:
    for a in c.alphas:
      res, _ = gsd.run_method(c, run, ctx, regime, f"gs_lora_alpha{a:g}",
                              variant=("gs_lora", {"alpha": a}, "bounded"),
                              prefix=prefix)
      sweep.setdefault(regime, {})[f"{a:g}"] = {k: res[k] for k in KEYS}
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


def choose_alpha(per_alpha: dict) -> tuple[str, str]:
  """``(alpha, rule)`` from ``{alpha: {"acc_f": {"mean": per task},
  "h_mean": {"mean": per task}}}``: the highest mean H among the alphas
  whose mean Acc_f is <= 1 % after every task; if none, the lowest
  worst-task Acc_f."""
  ok = {a: r for a, r in per_alpha.items()
        if max(r["acc_f"]["mean"]) <= 1.0}
  if ok:
    return (max(ok, key=lambda a: np.mean(ok[a]["h_mean"]["mean"])),
            "highest mean H among alphas with Acc_f <= 1 % after every task")
  return (min(per_alpha, key=lambda a: max(per_alpha[a]["acc_f"]["mean"])),
          "no alpha reaches Acc_f <= 1 % after every task: the lowest "
          "worst-task Acc_f")


def aggregate(cfg: Config, per_seed: list[dict]) -> dict:
  sweep, chosen = {}, {}
  for regime in per_seed[0]["sweep"]:
    sweep[regime] = {}
    for a in per_seed[0]["sweep"][regime]:
      rows = [r["sweep"][regime][a] for r in per_seed]
      sweep[regime][a] = {k: _mean_sd([x[k] for x in rows])
                          for k in ("acc_r", "acc_f", "h_mean",
                                    "zeroed_groups")}
      sweep[regime][a]["forget_class_acc"] = [x["forget_class_acc"]
                                              for x in rows]
    alpha, rule = choose_alpha(sweep[regime])
    chosen[regime] = {"alpha": float(alpha), "rule": rule}
  hard = {m: {k: _mean_sd([r["hard"][m][k] for r in per_seed])
              for k in ("acc_r", "acc_f", "h_mean")}
          for m in per_seed[0]["hard"]}
  return {"alpha_sweep": sweep, "alpha_by_regime": chosen,
          "few_shot_hard": hard}


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
    r = agg["alpha_sweep"][regime]
    line = "; ".join(
        f"alpha {a}: Acc_f {max(v['acc_f']['mean']):.2f} (worst task), "
        f"H {np.mean(v['h_mean']['mean']):.2f}, zeroed "
        f"{np.mean(v['zeroed_groups']['mean']):.1f}/{cfg.depth}"
        for a, v in r.items())
    out.append(f"{regime}: chosen alpha {ch['alpha']:g} ({ch['rule']}). "
               f"{line}.")
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
    for a, v in agg["alpha_sweep"][regime].items():
      ax.errorbar(x, v["acc_f"]["mean"], yerr=v["acc_f"]["sd"], marker="o",
                  capsize=3, label=f"alpha {a}")
    ax.axhline(1.0, color="gray", ls=":", label="1 % (target)")
    ax.set(title=f"{regime}: Acc_f by alpha", xlabel="task",
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
