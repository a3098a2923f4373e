"""Plots shared by experiments (matplotlib, Agg)."""

from __future__ import annotations

import numpy as np

from experiments._rundir import jsonable
from immunojax.eval.curves import select


def attack_curves(run, curves, name: str = "attack_curves", *,
                  ylabel: str = "test metric", title: str = "") -> None:
  """One panel per start point: every attack's curve, best one bold (with a
  ``[validation, test]`` metric: test values, the attack validation chose
  over the whole budget bold)."""
  starts = list(curves.metric)
  fig, axes = run.new_figure(ncols=len(starts), figsize=(4.5 * len(starts), 3.6),
                             sharey=True, squeeze=False)
  for ax, start in zip(axes[0], starts):
    m = np.asarray(curves.metric[start], float)
    steps = curves.steps[start]
    val = m[..., 0] if m.ndim == 3 else m
    m = m[..., -1] if m.ndim == 3 else m
    for i, row in enumerate(m):
      ax.plot(steps, row, color="tab:gray", alpha=0.35, lw=0.8,
              label=f"each of the {len(m)} attacks" if i == 0 else None)
    pick = select(val, steps, int(steps[-1]))
    if pick is not None:
      best = pick[0]
      ax.plot(steps, m[best], color="tab:red", lw=2,
              label=f"strongest attack: {curves.attacks[best].label}")
    n_div = int(curves.diverged[start].sum())
    ax.set(title=f"{start} ({len(m)} attacks"
           f"{f', {n_div} diverged' if n_div else ''})", xlabel="attack step")
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
  axes[0][0].set_ylabel(ylabel)
  if title:
    fig.suptitle(title)
  run.save_figure(fig, name)


def curves_json(curves) -> dict:
  """Per-attack curves as JSON-able lists (null: no finite value)."""
  return {"attacks": [a.as_dict() for a in curves.attacks],
          "steps": {k: v.tolist() for k, v in curves.steps.items()},
          "metric": {k: jsonable(v) for k, v in curves.metric.items()},
          "final_loss": {k: jsonable(v)
                         for k, v in curves.final_loss.items()},
          "diverged": {k: v.tolist() for k, v in curves.diverged.items()}}
