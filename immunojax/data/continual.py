"""Continual-forgetting protocols: which classes each task forgets, keeps and
has already forgotten, and the small training subsets a task sees.

Spec ``gs_lora.md`` §1: with a fixed class ``order``, task ``t`` (0-based)
keeps ``order[:N0 - t P]``, forgets ``order[N0 - t P : N0 - t P + P]`` and has
already forgotten ``order[N0 - t P + P:]``. Data regimes (§2.8, §3.3):
``ratio`` (a fraction of each class's training images), ``few_shot`` (``k``
images per class, forgotten and retained alike) and ``missing`` (as ``ratio``,
but the first ``m`` classes of ``order`` keep no training images while they
are still evaluated as retained).
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np

REGIMES = ("ratio", "few_shot", "missing")


class Task(NamedTuple):
  """Class sets of one task (class ids, in ``order``'s order)."""
  retain: tuple[int, ...]
  forget: tuple[int, ...]
  old: tuple[int, ...]


def tasks(order: Sequence[int], *, first_retained: int, per_task: int,
          num_tasks: int) -> list[Task]:
  """The task schedule ``N0 = first_retained``, ``P = per_task``.

  Raises:
    ValueError: the schedule runs out of classes (``N0 - (T - 1) P < 1``) or
      ``N0 + P`` exceeds the number of classes.
  """
  order = [int(c) for c in order]
  if len(set(order)) != len(order):
    raise ValueError(f"class order has repeated classes: {order}")
  if min(first_retained, per_task, num_tasks) < 1:
    raise ValueError("first_retained, per_task and num_tasks must be >= 1")
  if first_retained + per_task > len(order):
    raise ValueError(f"first task needs {first_retained + per_task} classes, "
                     f"the order has {len(order)}")
  if first_retained - (num_tasks - 1) * per_task < 1:
    raise ValueError(f"{num_tasks} tasks of {per_task} classes from "
                     f"{first_retained} retained leave no class to retain")
  out = []
  for t in range(num_tasks):
    cut = first_retained - t * per_task
    out.append(Task(tuple(order[:cut]), tuple(order[cut:cut + per_task]),
                    tuple(order[cut + per_task:])))
  return out


def class_order(num_classes: int, seed: int) -> list[int]:
  """A fixed permutation of ``range(num_classes)`` (numpy, seeded)."""
  return [int(c) for c in np.random.default_rng(seed).permutation(num_classes)]


def subset(labels: np.ndarray, classes: Sequence[int], *, regime: str,
           ratio: float = 0.1, shots: int = 4,
           missing: Sequence[int] = (), seed: int = 0) -> np.ndarray:
  """Indices into ``labels`` of a task's training subset of ``classes``.

  ``ratio``: ``max(1, round(ratio * n_c))`` images of each class (stratified,
  so every class keeps an image; the code draws 10% of the pooled split).
  ``few_shot``: ``shots`` images per class. ``missing``: as ``ratio``, minus
  every class in ``missing``.

  Raises:
    ValueError: unknown regime, a ratio outside (0, 1], or a class with fewer
      images than ``shots``.
  """
  if regime not in REGIMES:
    raise ValueError(f"unknown regime {regime!r}; expected one of "
                     f"{list(REGIMES)}")
  if not 0.0 < ratio <= 1.0:
    raise ValueError(f"ratio must be in (0, 1], got {ratio}")
  rng = np.random.default_rng(seed)
  out = []
  for c in classes:
    if regime == "missing" and c in set(missing):
      continue
    idx = rng.permutation(np.flatnonzero(labels == c))
    if regime == "few_shot":
      if len(idx) < shots:
        raise ValueError(f"class {c} has {len(idx)} images, fewer than "
                         f"{shots} shots")
      k = shots
    else:
      k = max(1, int(round(ratio * len(idx))))
    out.append(idx[:k])
  return np.sort(np.concatenate(out)) if out else np.zeros(0, np.int64)


def task_subsets(labels: np.ndarray, tasks: Sequence[Task], *, regime: str,
                 ratio: float = 0.1, shots: int = 4,
                 missing: Sequence[int] = (), seed: int = 0
                 ) -> list[tuple[np.ndarray, np.ndarray]]:
  """Each task's ``(retain, forget)`` training subsets (:func:`subset` of its
  retained and its forgotten classes); task ``t`` draws both with seed
  ``1000 * seed + 17 * t``."""
  out = []
  for t, task in enumerate(tasks):
    kw = dict(regime=regime, ratio=ratio, shots=shots, missing=missing,
              seed=seed * 1000 + 17 * t)
    out.append((subset(labels, task.retain, **kw),
                subset(labels, task.forget, **kw)))
  return out
