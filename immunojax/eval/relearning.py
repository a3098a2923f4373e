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
import jax.numpy as jnp
import numpy as np

from immunojax import attacks, lora, losses
from immunojax.eval.continual import padded
from immunojax.eval.curves import best_curve, selected_curve, \
    steps_to_threshold

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


def validation_halves(labels: np.ndarray, seed: int
                      ) -> tuple[np.ndarray, np.ndarray]:
  """Stratified ``(validation, test)`` halves: positions into ``labels``,
  each class split in two at random (``numpy.random.default_rng(seed)``;
  an odd class gives the test half one more)."""
  rng = np.random.default_rng(seed)
  labels = np.asarray(labels)
  val, test = [], []
  for c in np.unique(labels):
    idx = rng.permutation(np.flatnonzero(labels == c))
    val.append(idx[: len(idx) // 2])
    test.append(idx[len(idx) // 2:])
  return np.concatenate(val), np.concatenate(test)


def class_recovery_target(logits: Callable, *, eval_data,
                          classes: Sequence[int], train_data, seed: int,
                          head: Sequence[str] = ("head",),
                          lora_config: lora.LoraConfig = lora.LoraConfig()
                          ) -> attacks.Target:
  """The probe's target for a classifier: cross-entropy on ``train_data``
  (a few images of every class), accuracy on the held-out examples of
  ``classes`` as ``[validation, test]`` (:func:`validation_halves` with
  ``seed``: the attacker and checkpoint are chosen on one, read on the
  other). The halves are the target's ``eval_data``, ``(x, y, keep)`` each,
  padded to a length set by ``eval_data``'s class counts and
  ``len(classes)`` alone, so targets of other seeds or classes share the
  attack's compilation.

  Args:
    logits: ``logits(params, x, y) -> (n, classes)`` (``y`` for a model
      whose logits read the label, e.g. a CosFace margin).
    eval_data: ``(x, y)`` held-out examples (labels as numpy).
    classes: the removed classes the metric reads.
    head, lora_config: the harness's head regexes and LoRA adapters.
  """
  x_ev, y_ev = eval_data
  y_ev = np.asarray(y_ev)
  rows = np.flatnonzero(np.isin(y_ev, list(classes)))
  if not len(rows):
    raise ValueError(f"no held-out example of classes {list(classes)}")
  # The halves travel as the target's eval_data (arguments of the attack's
  # program, not constants compiled into it), each padded with weight-0 rows
  # to the largest half that any len(classes) classes of eval_data give: a
  # loop over seeds, whose classes and halves differ, compiles once.
  counts = np.sort(np.unique(y_ev, return_counts=True)[1])[::-1]
  size = int(((counts[:len(classes)] + 1) // 2).sum())

  def half(idx):
    pad = padded(idx, size)
    return (jnp.asarray(x_ev[pad]), jnp.asarray(y_ev[pad]),
            jnp.arange(size) < len(idx))

  halves = tuple(half(rows[h]) for h in validation_halves(y_ev[rows], seed))

  def metric(p, ev):
    def accuracy(x, y, keep):
      right = (jnp.argmax(logits(p, x, y), axis=-1) == y) & keep
      # times the reciprocal: what XLA makes of a mean over a fixed count
      # (models.accuracy), so the figures stay those of the unpadded mean
      return jnp.sum(right) * (1.0 / jnp.sum(keep))
    return jnp.stack([accuracy(*h) for h in ev])

  return attacks.Target(
      loss_fn=lambda p, b: losses.cross_entropy(logits(p, b[0], b[1]), b[1]),
      metric_fn=metric, train_data=train_data, eval_data=halves,
      head=tuple(head), lora_config=lora_config)


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
      the metric (e.g. accuracy on the removed classes' test images): a
      scalar, or ``[validation, test]`` (e.g. from
      :func:`validation_halves`), where the attacker and checkpoint are
      chosen on validation and read on test (:func:`~immunojax.eval.curves.
      selected_curve`) -- the unbiased worst case.
    learning_rates, modes, optimizer: the attacker grid (an optimizer is
      any value :func:`immunojax.optimizers.optimizer` takes).
    steps: the attack's budget; a multiple of ``eval_every``.
    threshold: "the knowledge is back" (the metric reaching it).

  Returns:
    ``(curves, result)``: the harness's curves, and a JSON-able dict with
    ``steps``, ``best_attack_curve`` (per start, the strongest attacker
    within each evaluated budget: validation-chosen with a ``[validation,
    test]`` metric, else the test maximum), ``selection`` (``"validation"``
    or ``"test"``), ``steps_to_threshold`` (per start, on that curve; None:
    never), ``threshold`` and the ``attacks``' labels.

  Raises:
    ValueError: a metric that is neither a scalar nor ``[validation,
      test]``.
  """
  grid = attacks.grid(optimizers=(optimizer,), learning_rates=learning_rates,
                      batch_sizes=(batch_size,), modes=modes, steps=(steps,))
  curves = attacks.run_attacks(grid, dict(starts), target,
                               eval_every=eval_every, attack_map=attack_map)
  sign = 1.0 if target.higher_is_better else -1.0
  best, selection = {}, None
  for s in starts:
    m, at = np.asarray(curves.metric[s], float), curves.steps[s]
    if m.ndim == 3 and m.shape[-1] == 2:
      selection = "validation"
      c = sign * selected_curve(sign * m[..., 0], sign * m[..., 1], at)
    elif m.ndim == 2:
      selection = "test"
      c = best_curve(m, higher_is_better=target.higher_is_better)
    else:
      raise ValueError(f"relearning_probe needs a scalar or [validation, "
                       f"test] metric; start {s!r} has values of shape "
                       f"{m.shape[2:]}")
    best[s] = [None if not np.isfinite(v) else float(v) for v in c]
  steps_ = [int(v) for v in curves.steps[next(iter(starts))]]
  return curves, {
      "steps": steps_, "best_attack_curve": best, "selection": selection,
      "steps_to_threshold": {s: steps_to_threshold(
          steps_, [np.nan if v is None else v for v in best[s]], threshold,
          higher_is_better=target.higher_is_better) for s in starts},
      "threshold": threshold, "attacks": [a.label for a in grid]}
