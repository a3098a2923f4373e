"""The GS-LoRA experiments' report: gs_lora_digits' deviations from the
papers, findings (results that contradict a paper or a target), targets,
claims graded, figures (the paper's numbers read from ``summary.paper``)
and two plots (per-task metrics, group norms); gs_lora_relearning's
curves."""

from __future__ import annotations

import numpy as np

from experiments import _claims, _plots, _reports
from immunojax.eval.forgetting import LORA_FAMILY


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


def task_line(regime: str, method: str, result: dict) -> str:
  """One method's per-task H, Acc_r and Acc_f, for the log."""
  return f"[{regime}] {method}: " + " | ".join(
      f"{name} " + ", ".join(_reports.fmt(v) for v in result[key])
      for name, key in (("H", "h_mean"), ("Acc_r", "acc_r"),
                        ("Acc_f", "acc_f")))


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
        bound = cfg.forget_bound(cfg.regime_forget(regime))
        notes.append(
            f"{regime}, task {t + 1}: GS-LoRA did not forget (Acc_f "
            f"{f:.1f}%; last-epoch forget CE {ce:.1f} < BND {bound:g}) with "
            f"{z} of {cfg.depth} groups zeroed at alpha "
            f"{cfg.regime_alpha(regime):g}: the group lasso held the "
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


def figures(cfg, run, out):
  res = out["methods"]
  gl = res.get("gs_lora", {}).get(cfg.regimes[0])
  if gl is None:
    return
  r0 = cfg.regimes[0]
  note = (f"paper: Face Transformer, CASIA-100 10% data, T-PAMI Table 3; "
          f"ours: ViT {cfg.depth}x{cfg.dim}, digits {r0} regime, margin-on "
          "top-1")
  run.figure("GS-LoRA H-mean, task 1 (%)", gl["h_mean"][0], out["paper"]["h_task1"],
             note=note)
  run.figure("GS-LoRA Acc_r, task 1 (%)", gl["acc_r"][0],
             out["paper"]["acc_r_task1"], note=note)
  run.figure("GS-LoRA Acc_f, task 1 (%)", gl["acc_f"][0],
             out["paper"]["acc_f_task1"], note=note)
  run.figure(f"GS-LoRA H-mean, task {cfg.num_tasks} (%)", gl["h_mean"][-1],
             out["paper"]["h_task4"] if cfg.num_tasks == 4 else None, note=note)
  run.figure("GS-LoRA trainable share (%)", gl["trainable_share"],
             out["paper"]["trainable_share"],
             note=f"paper: rank 8 on a 19.2M-parameter Face Transformer; "
             f"ours: rank {cfg.rank}")
  run.figure("GS-LoRA zeroed groups per task (tuned alpha)",
             ", ".join(map(str, gl["zeroed_groups"])),
             note=f"alpha {cfg.regime_alpha(r0):g} after "
             f"{cfg.alpha_warmup_epochs} "
             f"warm-up epochs; zero = norm < {cfg.zero_rtol:g} x max")
  fs = res.get("gs_lora", {}).get("few_shot")
  fpp = res.get("gs_lora_pp", {}).get("few_shot")
  if fs is not None and fpp is not None:
    n = "paper: T-PAMI Table 3 few-shot block, task 100-20; ours: 4-shot digits"
    run.figure("few-shot Acc_r task 1, GS-LoRA (%)", fs["acc_r"][0],
               out["paper"]["few_shot_acc_r_task1_gs_lora"], note=n)
    run.figure("few-shot Acc_r task 1, GS-LoRA++ (%)", fpp["acc_r"][0],
               out["paper"]["few_shot_acc_r_task1_gs_lora_pp"], note=n)
  rl = out["relearning"]
  for s, v in rl["steps_to_threshold"].items():
    run.figure(f"relearning: steps to {rl['threshold']:.0%} on task-1 "
               f"forgotten classes, {s}", v,
               note="the probe's attacker (Adam; full / LoRA) and checkpoint "
               "chosen on a validation half of those test images, read on "
               "the other; None: never reached")


def plot_tasks(cfg, run, out):
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


def plot_groups(cfg, run, out):
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


def plot_relearning(cfg, run, agg: dict, *, references, ours) -> None:
  """gs_lora_relearning's curves: one panel per probe mode, the
  ``references`` in their own style, ``ours`` bold."""
  modes = cfg.probes
  fig, axes = run.new_figure(ncols=len(modes), figsize=(4.6 * len(modes), 4),
                             sharey=True, squeeze=False)
  steps = agg["steps"]
  import matplotlib  # noqa: PLC0415 (after new_figure chose the backend)
  cmap = matplotlib.colormaps["tab20"]
  colours = {s: cmap(i % 20) for i, s in enumerate(
      s for s in agg["relearning"] if s not in references)}
  for ax, mode in zip(axes[0], modes):
    for s, per in agg["relearning"].items():
      c = per[mode]["curve"]
      style = (_plots.style(s) if s in references else
               {"color": colours[s], "lw": 2 if s in ours else 1, "label": s})
      if s == "gs_lora":
        style["color"] = _plots.METHOD_COLORS["gs_lora"]
      ax.plot(steps, c["mean"], **style)
    ax.set(title=f"{mode} probe (Adam, {cfg.probe_shots} shots/class)",
           xlabel="attack step",
           ylim=(-0.02, 1.02))
    ax.grid(alpha=0.3)
  axes[0][0].set_ylabel("forgotten classes, test accuracy\n(rate chosen on "
                        "validation; mean over seeds)")
  axes[0][-1].legend(fontsize=7, loc="lower right")
  _plots.claim_title(fig, agg["claims"][0]["claim"])
  run.save_figure(fig, "relearning")
