"""Reading attack curves: the strongest attacker (chosen on a validation
split, or the test-chosen upper bound), steps to a threshold, the gap to a
reference, and seed statistics with the "no difference" rule.

Pure numpy over :class:`immunojax.attacks.AttackCurves` (or plain arrays):
experiments, the cross-defense table and users read curves the same way.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def best_curve(metric: np.ndarray, *, higher_is_better: bool = True
               ) -> np.ndarray:
  """The strongest attacker at every checkpoint: ``metric[a, e]`` reduced
  over attacks ``a`` (NaN -- diverged or past an attack's budget -- skipped;
  NaN where every attack is).

  Args:
    metric: ``(attacks, checkpoints)``, e.g. ``AttackCurves.metric[start]``.
    higher_is_better: for the attacker (accuracy: True; a loss: False).
  """
  m = np.asarray(metric, float)
  if m.ndim != 2:
    raise ValueError(f"best_curve needs (attacks, checkpoints), got shape "
                     f"{m.shape}")
  with np.errstate(all="ignore"):
    import warnings  # noqa: PLC0415
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", RuntimeWarning)   # all-NaN columns
      return np.nanmax(m, 0) if higher_is_better else np.nanmin(m, 0)


def select(val: np.ndarray, steps: Sequence[int], budget: int
           ) -> tuple[int, int] | None:
  """The attack and checkpoint with the highest validation value within
  ``budget`` steps (NaN -- a diverged attack -- never chosen), or None.

  Args:
    val: ``(attacks, checkpoints)`` validation metric.
  """
  v = np.where((np.asarray(steps) <= budget)[None, :], np.asarray(val, float),
               np.nan)
  if not np.isfinite(v).any():
    return None
  a, e = np.unravel_index(np.nanargmax(v), v.shape)
  return int(a), int(e)


def selected_curve(val: np.ndarray, test: np.ndarray,
                   steps: Sequence[int]) -> np.ndarray:
  """The worst-case curve an unbiased attacker reaches: at each checkpoint
  ``b``, the test value of the attack and checkpoint :func:`select` chooses
  on validation within ``b`` steps (NaN where nothing is finite)."""
  out = np.full(len(steps), np.nan)
  for e, b in enumerate(steps):
    pick = select(val, steps, b)
    if pick is not None:
      out[e] = np.asarray(test, float)[pick]
  return out


def steps_to_threshold(steps: Sequence[int], curve: Sequence[float],
                       threshold: float, *, higher_is_better: bool = True
                       ) -> int | None:
  """The first step whose value reaches ``threshold`` (``>=``; ``<=`` when
  lower is better), or None if none does (NaN never reaches)."""
  c = np.asarray(curve, float)
  with np.errstate(invalid="ignore"):
    hit = np.flatnonzero(c >= threshold if higher_is_better
                         else c <= threshold)
  return int(np.asarray(steps)[hit[0]]) if hit.size else None


def gap_ratio(reference: Sequence[float], curve: Sequence[float]
              ) -> np.ndarray:
  """IMMA's similarity gap ratio per checkpoint, in %:
  ``(M_ref - M) / M_ref * 100`` (NaN where ``M_ref`` is 0)."""
  ref, cur = np.asarray(reference, float), np.asarray(curve, float)
  with np.errstate(divide="ignore", invalid="ignore"):
    return np.where(ref != 0, (ref - cur) / ref * 100.0, np.nan)


def mean_std(values: Sequence) -> dict:
  """Mean and (population) standard deviation over seeds of scalars or
  equal-length curves; None entries (e.g. a threshold never reached) are
  left out and counted.

  Returns:
    ``{"mean", "std", "reached", "of"}`` (lists for curves; mean and std
    None when no value is given).
  """
  vals = [v for v in values if v is not None]
  if not vals:
    return {"mean": None, "std": None, "reached": 0, "of": len(values)}
  a = np.asarray(vals, float)
  return {"mean": a.mean(0).tolist(), "std": a.std(0).tolist(),
          "reached": len(vals), "of": len(values)}


def differs(a: dict, b: dict, *, sd: float = 2.0) -> bool | None:
  """Whether two :func:`mean_std` scalars differ by more than ``sd``
  standard deviations (the larger of the two; a difference inside it is
  "no difference"). None when either has no mean."""
  if a.get("mean") is None or b.get("mean") is None:
    return None
  spread = max(float(a.get("std") or 0.0), float(b.get("std") or 0.0))
  return abs(float(a["mean"]) - float(b["mean"])) > sd * spread
