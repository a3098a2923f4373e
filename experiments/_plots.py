"""Plots shared by experiments (matplotlib, Agg)."""

from __future__ import annotations

import numpy as np

from experiments._rundir import jsonable
from immunojax.eval.curves import select


# One look per reference model and one colour per method in every plot: the
# undefended original solid blue, scratch (random init) dashed black, a model
# that never saw the harmful data dotted green, thick and translucent when
# drawn behind a method's curve.
REFERENCES = {
    "original": {"color": "tab:blue", "ls": "-",
                 "label": "original (undefended)"},
    "scratch": {"color": "k", "ls": "--", "label": "scratch (random init)"},
    "never_saw": {"color": "tab:green", "ls": ":",
                  "label": "never saw the harmful data"},
}
ALIASES = {"U": "original", "none": "original", "identity": "original",
           "theta0": "original", "pretrained": "original", "S": "scratch",
           "N": "never_saw", "retrain": "never_saw"}
METHOD_COLORS = {      # one colour per method, unique across experiments
    "sophon": "tab:red",
    "cond_num": "tab:purple", "opt_kappa": "indigo",
    "r_ill_only": "goldenrod", "probe_ascent": "tab:cyan",
    "label_kappa": "tab:brown",
    "gs_lora": "tab:orange", "gs_lora_seq": "darkorange",
    "gs_lora_pp": "saddlebrown",
    "imma": "tab:olive",
    "imma_joint": "teal", "mima": "tab:pink",
    "mima_average_merge": "orchid", "max": "tab:gray",
    "benign_finetune": "slategray", "lora": "gold", "finetune": "dimgray",
    "l2": "lightseagreen", "ewc": "mediumblue",
    "gs_lora_released_alpha": "peru",
}
# Names experiments give one method (drawn in its colour, labelled as named).
METHOD_SYNONYMS = {"protected": "sophon", "imma_sequential": "imma"}


def style(name: str) -> dict:
  """``plot`` keywords for a reference (its fixed colour, line style and
  label) or a method (its colour, solid), by the names experiments use."""
  ref = REFERENCES.get(ALIASES.get(name, name))
  if ref is not None:
    return dict(ref)
  return {"color": METHOD_COLORS.get(METHOD_SYNONYMS.get(name, name),
                                     "silver"), "ls": "-",
          "label": name}


def claim_title(target, text: str, *, width: int | None = None,
                fontsize: int = 9) -> None:
  """Titles a figure (``suptitle``) or an axes with the claim it tests,
  wrapped to ``width`` characters (default: what the figure's width
  holds)."""
  import textwrap  # noqa: PLC0415
  fig = target if hasattr(target, "suptitle") else target.figure
  width = width or max(40, int(fig.get_figwidth() * 80 / fontsize))
  wrapped = textwrap.fill(text, width)
  if hasattr(target, "suptitle"):
    target.suptitle(wrapped, fontsize=fontsize)
  else:
    target.set_title(wrapped, fontsize=fontsize)


def mean_sd_curves(ax, x, curves: dict, curves_sd: dict | None = None,
                   names=None, marker: str = "o") -> None:
  """Mean curves (± sd bands where ``curves_sd`` has them) of ``names``
  (default: every key of ``curves``) in :func:`style`'s looks."""
  for n in names or list(curves):
    st = style(n)
    m = np.asarray(curves[n], float)
    ax.plot(x, m, marker=marker, ms=3, **st)
    if curves_sd is not None and n in curves_sd:
      sd = np.asarray(curves_sd[n], float)
      ax.fill_between(x, m - sd, m + sd, color=st["color"], alpha=0.15)


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
    claim_title(fig, title)
  run.save_figure(fig, name)


def curves_json(curves) -> dict:
  """Per-attack curves as JSON-able lists (null: no finite value)."""
  return {"attacks": [a.as_dict() for a in curves.attacks],
          "steps": {k: v.tolist() for k, v in curves.steps.items()},
          "metric": {k: jsonable(v) for k, v in curves.metric.items()},
          "final_loss": {k: jsonable(v)
                         for k, v in curves.final_loss.items()},
          "diverged": {k: v.tolist() for k, v in curves.diverged.items()}}
