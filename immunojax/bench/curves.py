"""From the attack harness to the table's inputs.

:func:`start_curves` concatenates one start point's harness curves over
several attacker data sizes into a :class:`~immunojax.bench.table.
StartCurves`; :func:`confirm` re-runs, for each budget, the attack that the
validation split chose on fresh seeds (the table reads those, not the
selected run itself, so the selection cannot flatter the defense).

The harness metric is a vector per checkpoint: ``nv`` validation
correctness values, then the test examples' correctness, then the utility
(e.g. the benign accuracy) last.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import jax
import numpy as np

from immunojax import attacks
from immunojax.bench import metrics
from immunojax.bench.table import Confirmed, StartCurves


def start_curves(grid: Mapping[str, Sequence[attacks.Attack]],
                 curves: Mapping[str, attacks.AttackCurves], name: str,
                 nv: int) -> StartCurves:
  """Start ``name``'s curves, every data size's attacks in ``grid`` order
  (labels tagged ``[size]``); ``confirmed`` empty (see :func:`confirm`).

  Args:
    grid: ``{size: [Attack]}`` as run.
    curves: ``{size: AttackCurves}`` from :func:`immunojax.attacks.
      run_attacks` over those attacks.
    name: the start point.
    nv: how many leading metric entries are the validation split's.
  """
  parts = {k: [] for k in ("labels", "modes", "lr", "opt", "val", "test",
                           "util", "div")}
  for size, attack_list in grid.items():
    c = curves[size]
    m = c.metric[name]
    parts["labels"] += [f"{a.label} [{size}]" for a in attack_list]
    parts["modes"] += [a.mode for a in attack_list]
    parts["opt"] += [a.optimizer_name for a in attack_list]
    parts["lr"] += [np.nan if a.learning_rate is None else a.learning_rate
                    for a in attack_list]
    parts["val"].append(m[:, :, :nv].mean(-1))
    parts["test"].append(m[:, :, nv:-1])
    parts["util"].append(m[:, :, -1])
    parts["div"].append(c.diverged[name])
  steps = curves[next(iter(curves))].steps[name]
  return StartCurves(
      steps=np.asarray(steps), labels=parts["labels"], modes=parts["modes"],
      learning_rates=np.asarray(parts["lr"], float),
      optimizers=parts["opt"], val=np.concatenate(parts["val"]),
      test=np.concatenate(parts["test"]),
      utility=np.concatenate(parts["util"]),
      diverged=np.concatenate(parts["div"]), confirmed={})


def confirm(start_params, sc: StartCurves, *,
            grid: Mapping[str, Sequence[attacks.Attack]],
            targets: Mapping[str, attacks.Target], budgets: Sequence[int],
            seeds: int, nv: int, modes: Sequence[str] | None = None,
            eval_every: int = 10,
            attack_map: Callable = jax.vmap) -> StartCurves:
  """``sc`` with, per budget, the validation-selected attack re-run from
  ``start_params`` on ``seeds`` fresh seeds (1000, 1001, ...) and read at
  the selected checkpoint (non-finite reruns left out; a budget with no
  selection or no finite rerun is left out).

  Args:
    start_params: the start point's parameters.
    sc: its curves (:func:`start_curves`; ``modes``: ``sc`` holds only
      these modes' attacks, as :meth:`StartCurves.only` leaves them).
    grid, targets: ``{size: [Attack]}`` and ``{size: Target}`` as run.
    budgets: step budgets of the table.
    seeds: fresh seeds per confirmation.
    nv: validation entries at the front of the metric.
    eval_every, attack_map: as in :func:`immunojax.attacks.run_attacks`.
  """
  flat = [(size, a) for size, lst in grid.items() for a in lst
          if modes is None or a.mode in modes]
  cache, out = {}, {}
  for b in budgets:
    pick = metrics.select(sc.val, sc.steps, b)
    if pick is None:
      continue
    a_i, e_i = pick
    if a_i not in cache:
      size, attack = flat[a_i]
      reruns = [attack._replace(seed=1000 + s) for s in range(seeds)]
      c = attacks.run_attacks(reruns, {"x": start_params}, targets[size],
                              eval_every=eval_every, attack_map=attack_map)
      cache[a_i] = c.metric["x"]
    m = cache[a_i][:, e_i]
    ok = np.all(np.isfinite(m), axis=-1)
    if not ok.any():
      continue
    out[b] = Confirmed(sc.labels[a_i], int(sc.steps[e_i]),
                       m[ok, nv:-1].mean(0), float(m[ok, -1].mean()),
                       int(ok.sum()))
  return sc._replace(confirmed=out)
