"""digit_pairs' report: the RIR heat maps over the 90 ordered pairs, and
the study grid's figures, findings and plot (its anchor cell, the rank
correlation of per-pair RIR across cells)."""

from __future__ import annotations

import numpy as np

from experiments import _plots


def _cell(cells, **where):
  for c in cells:
    if all(c[k] == v for k, v in where.items()):
      return c
  return None


def _reference_cell(cfg):
  """The grid's anchor: the first listed optimizer and rule, the smallest
  ratio; budgets and tasks vary."""
  return {"optimizer": cfg.grid_optimizers[0], "rule": cfg.grid_rules[0],
          "ratio": min(cfg.grid_ratios)}


def grid_figures(cfg, cells):
  ref = _reference_cell(cfg)
  out = []
  for tasks in cfg.grid_tasks:
    for budget in sorted({min(cfg.grid_budgets), max(cfg.grid_budgets)}):
      c = _cell(cells, tasks=tasks, budget=budget, **ref)
      if c is None or c["pinv"] is None:
        continue
      out.append((f"grid: mean RIR, {tasks} tasks, budget ×{budget:g} "
                  f"({ref['optimizer']}, {ref['rule']}, ratio "
                  f"{ref['ratio']:g})", c["pinv"]["mean_rir"],
                  f"pinv κ; mean over {c['pairs']} pairs × {c['seeds']} "
                  f"seeds, sklearn digits; median "
                  f"{c['pinv']['median_rir']:.3g}, strong success "
                  f"{c['pinv']['pairs_strong_success']:.3g}/{c['pairs']}"))
  best = max((c for c in cells if c["pinv"]),
             key=lambda c: c["pinv"]["mean_rir"], default=None)
  if best:
    out.append(("grid: best cell's mean RIR", best["pinv"]["mean_rir"],
                f"pinv κ; {best['tasks']} tasks, {best['optimizer']}, "
                f"{best['rule']}, ratio {best['ratio']:g}, budget "
                f"×{best['budget']:g}; (ii) ≤ 1 on "
                f"{best['pinv']['pairs_ii_at_most_1']:.3g}/{best['pairs']} "
                "pairs"))
  return out


def _spearman(a, b) -> float:
  ok = np.isfinite(a) & np.isfinite(b)
  if ok.sum() < 3:
    return float("nan")
  ra = np.argsort(np.argsort(a[ok])).astype(float)
  rb = np.argsort(np.argsort(b[ok])).astype(float)
  return float(np.corrcoef(ra, rb)[0, 1])


def grid_findings(cfg, cells, effects, alignment, per_pair) -> list[str]:
  """Sentences computed from the grid (nothing here is fixed text about the
  outcome)."""
  ranked = sorted(((v["spread"], f) for f, v in effects.items()
                   if v["spread"] is not None), reverse=True)
  out = ["Grid: " + "; ".join(
      f"{f} moves mean log RIR by {s:.2f} nats across its levels "
      f"({', '.join(f'{k}: {np.exp(v):.3g}' for k, v in effects[f]['level_means'].items())}"
      " as geometric means of the cell mean RIRs)" for s, f in ranked) + "."]
  if ranked:
    out.append(f"Conclusion of the grid: the largest main effect is "
               f"{ranked[0][1]}" + (f", then {ranked[1][1]}"
                                    if len(ranked) > 1 else "") + ".")
  ref = _reference_cell(cfg)
  top = max(cfg.grid_budgets)
  for tasks in cfg.grid_tasks:
    key = (tasks, ref["optimizer"], ref["rule"], ref["ratio"], top)
    if key in per_pair:
      rho = _spearman(np.log(per_pair[key]),
                      np.asarray(alignment[tasks]["per_pair"]))
      out.append(
          f"Prop. 3.2 check, {tasks} tasks: mean Gram alignment "
          f"cos(K_P, K_H) = {alignment[tasks]['mean']:.3f}; Spearman "
          f"correlation of per-pair log RIR with it = {rho:.2f} "
          f"({ref['optimizer']}, {ref['rule']}, ratio {ref['ratio']:g}, "
          f"budget ×{top:g}).")
  for tasks in cfg.grid_tasks:
    ends = [_cell(cells, tasks=tasks, budget=b, **ref)
            for b in sorted({min(cfg.grid_budgets), top})]
    if all(c is not None and c["pinv"] for c in ends):
      lo, hi = ends[0], ends[-1]
      out.append(
          f"Budget, {tasks} tasks ({ref['optimizer']}, {ref['rule']}, ratio "
          f"{ref['ratio']:g}): from ×{lo['budget']:g} to ×{hi['budget']:g} "
          f"the mean RIR goes {lo['pinv']['mean_rir']:.3g} → "
          f"{hi['pinv']['mean_rir']:.3g}, the median "
          f"{lo['pinv']['median_rir']:.3g} → {hi['pinv']['median_rir']:.3g}, "
          f"pairs with (ii) ≤ 1 {lo['pinv']['pairs_ii_at_most_1']:.3g} → "
          f"{hi['pinv']['pairs_ii_at_most_1']:.3g} of {lo['pairs']}, D_P "
          f"accuracy {lo['dp_accuracy']:.3f} → {hi['dp_accuracy']:.3f}.")
  reach = [c for c in cells if c["pinv"] and c["pinv"]["mean_rir"] >= 70]
  out.append(
      f"{len(reach)} of {len(cells)} grid cells reach the paper's mean RIR "
      "of 70 (pinv κ)" + (": " + "; ".join(
          f"{c['tasks']}/{c['optimizer']}/{c['rule']}/r{c['ratio']:g}/"
          f"×{c['budget']:g} with (ii) ≤ 1 on "
          f"{c['pinv']['pairs_ii_at_most_1']:.3g}/{c['pairs']} pairs"
          for c in reach[:6]) if reach else "") + ".")
  div = sum(c["diverged_pairs"] for c in cells)
  if div:
    out.append(f"{div} (seed, pair) problems diverged across the grid "
               "(frozen at their last finite state, left out of the RIR "
               "statistics, counted per cell as diverged_pairs).")
  return out


def grid_plot(run, cfg, cells, per_pair, alignment):
  fig, axes = run.new_figure(ncols=3, figsize=(15, 4.2))
  colors = {"paper": "tab:blue", "code": "tab:orange"}
  styles = {"normalized": "-", "balanced": "--"}
  markers = {"gd": "o", "adam": "s"}
  ratio0 = min(cfg.grid_ratios)
  for tasks in cfg.grid_tasks:
    for opt in cfg.grid_optimizers:
      for rule in cfg.grid_rules:
        pts = [(c["budget"], c["pinv"]["mean_rir"]) for c in cells
               if c["tasks"] == tasks and c["optimizer"] == opt and
               c["rule"] == rule and c["ratio"] == ratio0 and c["pinv"]]
        if pts:
          xs, ys = zip(*sorted(pts))
          axes[0].plot(xs, ys, ls=styles[rule], marker=markers[opt],
                       color=colors[tasks], label=f"{tasks}, {opt}, {rule}")
  axes[0].axhline(70.04, color="k", lw=0.8, ls=":", label="paper (MNIST)")
  axes[0].set(xscale="log", yscale="log", xlabel="budget multiplier m",
              ylabel="mean RIR (pinv κ)",
              title=f"budget (ratio λ_P:λ_H = {ratio0:g})")
  axes[0].legend(fontsize=6)
  ref = _reference_cell(cfg)
  top = max(cfg.grid_budgets)
  for tasks in cfg.grid_tasks:
    key = (tasks, ref["optimizer"], ref["rule"], ref["ratio"], top)
    if key in per_pair:
      axes[1].scatter(alignment[tasks]["per_pair"], per_pair[key], s=14,
                      color=colors[tasks], label=f"{tasks} tasks")
  axes[1].set(yscale="log", xlabel="Gram alignment cos(K_P, K_H)",
              ylabel="RIR per pair (pinv κ, mean over seeds)",
              title=f"task alignment ({ref['optimizer']}, {ref['rule']}, "
              f"×{top:g})")
  axes[1].legend(fontsize=7)
  for tasks in cfg.grid_tasks:
    for rule in cfg.grid_rules:
      pts = [(c["ratio"], c["pinv"]["pairs_ii_at_most_1"]) for c in cells
             if c["tasks"] == tasks and c["optimizer"] == ref["optimizer"]
             and c["rule"] == rule and c["budget"] == top and c["pinv"]]
      if pts:
        xs, ys = zip(*sorted(pts))
        axes[2].plot(xs, ys, ls=styles[rule], marker="o",
                     color=colors[tasks], label=f"{tasks}, {rule}")
  num_pairs = len(next(iter(alignment.values()))["per_pair"])
  axes[2].set(xscale="log", ylim=(-0.5, num_pairs + 0.5), xlabel="λ_P : λ_H",
              ylabel=f"pairs with (ii) ≤ 1 (of {num_pairs}, mean over seeds)",
              title=f"ratio arm ({ref['optimizer']}, ×{top:g})")
  axes[2].legend(fontsize=7)
  fig.suptitle(f"digit pairs study grid ({len(next(iter(alignment.values()))['per_pair'])} "
               f"pairs × {cfg.grid_seeds} seeds, {cfg.grid_steps} steps, "
               "sklearn digits)")
  run.save_figure(fig, "study_grid")


def heatmaps(run, maps, cfg, title):
  """ln RIR per pair; the colour scale spans the data (centred on 0 = no
  effect only when the data straddle it)."""
  from matplotlib import colors  # noqa: PLC0415
  fig, axes = run.new_figure(ncols=len(maps), figsize=(5.2 * len(maps), 4.8),
                             squeeze=False, constrained_layout=True)
  lo = min(np.nanmin(m) for m in maps.values())
  hi = max(np.nanmax(m) for m in maps.values())
  if lo < 0 < hi:
    norm, cmap = colors.TwoSlopeNorm(0.0, lo, hi), "RdBu_r"
  else:
    norm, cmap = colors.Normalize(lo, hi), "viridis"
  for ax, (name, m) in zip(axes[0], maps.items()):
    im = ax.imshow(m, cmap=cmap, norm=norm)
    for a in range(10):
      for b in range(10):
        if a != b:
          v = m[a, b]
          ax.text(b, a, f"{v:.1f}", ha="center", va="center", fontsize=7,
                  color="white" if norm(v) > 0.75 or norm(v) < 0.25
                  else "black")
    ax.set(title=f"{name}: ln RIR (natural log, pinv κ)",
           xlabel="D_H digit", ylabel="D_P digit", xticks=range(10),
           yticks=range(10))
  fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="ln RIR")
  _plots.claim_title(fig, f"{title} — {cfg.tasks} tasks, sklearn digits; "
                     f"colour scale {lo:.2f} … {hi:.2f}")
  import matplotlib.pyplot as plt  # noqa: PLC0415
  path = run.plot_path("log_rir_heatmaps")
  fig.savefig(path, dpi=130)
  plt.close(fig)
