"""Continual forgetting: one task's training run and its metrics.

A task of a class schedule (:func:`immunojax.data.continual.tasks`) forgets
some classes and keeps the rest. :func:`task_runner` trains any per-task
:class:`~immunojax.immunizer.Immunizer` on padded retain / forget index sets
for a number of epochs that follows the sets' (traced) sizes, so one
compilation serves every task and every variant of a method family.
:func:`task_metrics` scores the result as GS-LoRA's papers do: accuracy on
the retained classes (``acc_r``), the forgotten ones (``acc_f``), the ones
forgotten by earlier tasks (``acc_o``), and the H-mean of ``acc_r`` and the
drop in ``acc_f``.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from immunojax.data import padded_batch_positions
from immunojax.immunizer import Immunizer, run_steps

PyTree = Any


def padded(indices: np.ndarray, size: int) -> np.ndarray:
  """``indices`` padded with zeros to ``size`` (int32); the padding carries
  weight 0 in :func:`task_runner`'s batches."""
  indices = np.asarray(indices)
  if len(indices) > size:
    raise ValueError(f"{len(indices)} indices do not fit a pad of {size}")
  return np.concatenate([indices, np.zeros(size - len(indices),
                                           indices.dtype)]).astype(np.int32)


def class_accuracy(correct: np.ndarray, labels: np.ndarray,
                   classes: Sequence[int]) -> float | None:
  """Accuracy in % over the examples whose label is in ``classes`` (None if
  there are none)."""
  sel = np.isin(np.asarray(labels), list(classes))
  return float(100.0 * np.asarray(correct)[sel].mean()) if sel.any() else None


def h_mean(acc_r, acc_f, pretrained_acc_f):
  """GS-LoRA's H-mean: the harmonic mean of ``acc_r`` and the drop
  ``pretrained_acc_f - acc_f`` (0 when either is <= 0); jnp, so it can be
  traced or vmapped over tasks."""
  drop = pretrained_acc_f - acc_f
  denom = acc_r + drop
  return jnp.where((acc_r > 0) & (drop > 0),
                   2 * acc_r * drop / jnp.where(denom > 0, denom, 1.0), 0.0)


class TaskMetrics(NamedTuple):
  """One task's scores, in %: ``acc_o`` None for the first task, ``acc_m``
  (classes retained without training data) None outside that regime."""
  acc_r: float | None
  acc_f: float | None
  acc_o: float | None
  h_mean: float
  acc_m: float | None = None


def task_metrics(correct: np.ndarray, labels: np.ndarray, task, *,
                 pretrained_acc_f: float,
                 missing: Sequence[int] = ()) -> TaskMetrics:
  """Scores after a task from per-example correctness on a test set.

  Args:
    correct: ``(N,)`` bools, the model's prediction is right.
    labels: ``(N,)`` test labels.
    task: a :class:`immunojax.data.continual.Task` (retain, forget, old).
    pretrained_acc_f: the pre-trained model's ``acc_f`` on this task's
      forgotten classes (the H-mean's reference).
    missing: retained classes without training data (``acc_m``).
  """
  acc_r = class_accuracy(correct, labels, task.retain)
  acc_f = class_accuracy(correct, labels, task.forget)
  return TaskMetrics(
      acc_r, acc_f,
      class_accuracy(correct, labels, task.old) if task.old else None,
      float(h_mean(acc_r, acc_f, pretrained_acc_f)),
      class_accuracy(correct, labels, missing) if missing else None)


Build = Callable[..., tuple[Immunizer, Callable[[PyTree], dict]]]


def task_runner(build: Build, *, epochs: int, batch_size: int,
                retain_pad: int, forget_pad: int,
                split: Callable = lambda b: b) -> Callable:
  """One jitted run of a forgetting task, for every task of a schedule.

  Each step draws a batch of ``batch_size`` retained and
  ``min(batch_size, forget_pad)`` forgotten examples (reshuffled every
  epoch, the last batch of an epoch ragged with zero weights); an epoch is
  a pass over the retained set; the run lasts ``epochs`` epochs of the
  task's own (traced) size.

  Args:
    build: ``build(start, x, y, task, coeffs, steps_per_epoch) ->
      (immunizer, extras)``: the method for this task (``coeffs`` are its
      traced hyper-parameters; ``steps_per_epoch`` is traced, e.g. for a
      schedule), and ``extras(state) -> dict`` of outputs besides the
      parameters (e.g. group norms).
    epochs: epochs per task.
    batch_size: retained examples per step.
    retain_pad, forget_pad: static sizes of the padded index sets.
    split: applied to every batch inside the program (e.g.
      ``run.split_batch``: data parallel over a mesh).

  Returns:
    ``run(start, x, y, task, coeffs, key) -> {"params", "final", **extras}``
    with ``task = {"retain_idx", "n_retain", "forget_idx", "n_forget"}``
    (padded int32 indices into ``x``/``y`` and their true lengths) and
    ``final`` the metrics averaged over the last epoch.
  """
  max_steps = epochs * -(-retain_pad // batch_size)
  bs_f = min(batch_size, forget_pad)   # a small forget set is one batch

  @jax.jit
  def run(start, x, y, task, coeffs, key):
    n_r, n_f = task["n_retain"], task["n_forget"]
    spe = (n_r + batch_size - 1) // batch_size
    spe_f = (n_f + bs_f - 1) // bs_f
    total = epochs * spe
    k_init, k_r, k_f, k_step = jax.random.split(key, 4)
    imm, extras = build(start, x, y, task, coeffs, spe)
    state = imm.init(start, k_init)

    def batch(t):
      ir, wr = padded_batch_positions(k_r, n_r, retain_pad, batch_size, t,
                                      spe)
      jf, wf = padded_batch_positions(k_f, n_f, forget_pad, bs_f, t, spe_f)
      ir, jf = task["retain_idx"][ir], task["forget_idx"][jf]
      return split({"retain": (x[ir], y[ir], wr),
                    "forget": (x[jf], y[jf], wf)})

    state, metrics = run_steps(imm.update, state, batch, k_step,
                               steps=total, max_steps=max_steps)
    t = jnp.arange(max_steps)
    last = (t >= total - spe) & (t < total)
    final = jax.tree_util.tree_map(
        lambda m: jnp.sum(jnp.where(last, m, 0.0)) / spe, metrics)
    return {"params": imm.params(state), "final": final, **extras(state)}

  return run


def task_indices(retain: np.ndarray, forget: np.ndarray, *, retain_pad: int,
                 forget_pad: int) -> dict:
  """The ``task`` argument of :func:`task_runner`'s ``run``."""
  return {"retain_idx": jnp.asarray(padded(retain, retain_pad)),
          "n_retain": jnp.asarray(len(retain), jnp.int32),
          "forget_idx": jnp.asarray(padded(forget, forget_pad)),
          "n_forget": jnp.asarray(len(forget), jnp.int32)}
