"""How deep is a removal: a relearning probe.

A model that forgot something is fine-tuned on a few examples of every
class (what a user deleting knowledge must fear: the knowledge is taught
back); the probe records how fast the removed classes return, from the
removed model and from references (the original model, one that never saw
the classes). Any attacker grid and any starts; the attack harness runs it.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import jax
import numpy as np

from immunojax import attacks
from immunojax.eval.curves import best_curve

PyTree = object


def few_shot_indices(labels: np.ndarray, shots: int, *,
                     classes: Sequence[int], seed: int) -> np.ndarray:
  """``shots`` random indices of each class in ``classes`` (in that order),
  from ``numpy.random.default_rng(seed)``.

  Raises:
    ValueError: a class has fewer than ``shots`` examples.
  """
  rng = np.random.default_rng(seed)
  labels = np.asarray(labels)
  out = []
  for c in classes:
    members = np.flatnonzero(labels == c)
    if len(members) < shots:
      raise ValueError(f"class {c} has {len(members)} examples, fewer than "
                       f"{shots} shots")
    out.append(rng.permutation(members)[:shots])
  return np.concatenate(out)


def relearning_probe(starts: Mapping[str, PyTree], target: attacks.Target, *,
                     learning_rates: Sequence[float],
                     modes: Sequence[str] = ("full",),
                     steps: int, batch_size: int, threshold: float,
                     optimizer="adam", eval_every: int = 10,
                     attack_map: Callable = jax.vmap
                     ) -> tuple[attacks.AttackCurves, dict]:
  """Teaches every start back with a grid of attackers.

  Args:
    starts: the removed model(s) and references, by name.
    target: what the attacker trains on (a few examples of every class) and
      the metric (e.g. accuracy on the removed classes' test images).
    learning_rates, modes, optimizer: the attacker grid (an optimizer is
      any value :func:`immunojax.optimizers.optimizer` takes).
    steps: the attack's budget; a multiple of ``eval_every``.
    threshold: "the knowledge is back" (the metric reaching it).

  Returns:
    ``(curves, result)``: the harness's curves, and a JSON-able dict with
    ``steps``, ``best_attack_curve`` (per start, the strongest attacker at
    every evaluation), ``steps_to_threshold`` (per start, the fewest steps
    any attacker needed; None: never), ``threshold`` and the ``attacks``'
    labels.
  """
  grid = attacks.grid(optimizers=(optimizer,), learning_rates=learning_rates,
                      batch_sizes=(batch_size,), modes=modes, steps=(steps,))
  curves = attacks.run_attacks(grid, dict(starts), target,
                               eval_every=eval_every, attack_map=attack_map)
  summary = attacks.summarize(curves, threshold=threshold, scratch=None,
                              higher_is_better=target.higher_is_better)
  best = {s: [None if not np.isfinite(v) else float(v) for v in best_curve(
      curves.metric[s], higher_is_better=target.higher_is_better)]
          for s in starts}
  return curves, {
      "steps": [int(s) for s in curves.steps[next(iter(starts))]],
      "best_attack_curve": best,
      "steps_to_threshold": {s: summary[s]["steps_to_threshold"]
                             for s in starts},
      "threshold": threshold, "attacks": [a.label for a in grid]}
