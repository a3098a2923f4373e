"""GS-LoRA's continual-forgetting protocol: pre-training, each method's task
run, and the baselines' coefficients, as functions of a model.

:mod:`immunojax.eval.continual` runs one forgetting task for any per-task
:class:`~immunojax.immunizer.Immunizer` and scores it; this module supplies
what GS-LoRA's papers (Zhao et al., CVPR 2024 / T-PAMI) compare on it:

* :func:`pretrain_epoch`: one epoch of AdamW with a cosine schedule on
  (CosFace) cross-entropy over a padded index subset -- one compilation
  serves the full training set and a "never saw" subset alike.
* :func:`method_runner`: the jitted task run of a method *family*:
  ``"lora"`` (GS-LoRA, GS-LoRA++ and plain LoRA on the FFN kernels, one
  program whose coefficients pick the member) or ``"full"`` (fine-tuning
  every weight but the head under the same forget loss: the forget-only,
  L2 and EWC baselines and retraining).
* :func:`coefficients`: the traced coefficients that turn a family into a
  method (``lora`` is GS-LoRA with ``alpha = 0``; ``l2`` and ``ewc`` are
  anchored fine-tuning; ``retrain`` has no forget loss).
* :class:`Evaluator`: correctness per test example (the model's own
  ``forward`` decides the convention, e.g. the CosFace margin on).
* :func:`task_step` and :func:`task_results`: the protocol's loop over
  tasks (each task's run and scores) and a method's per-task lists;
  :func:`trainable_share`: what each family trains.

``forward(params, x, y, key) -> (logits, features)`` is the model's
interface throughout (``y``/``key`` may be None at evaluation).
"""

from __future__ import annotations

import math
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from immunojax import lora, losses, masks
from immunojax.data import padded_batch_positions
from immunojax.eval import continual
from immunojax.methods import gs_lora as gs

LORA_FAMILY = ("gs_lora", "gs_lora_pp", "lora", "gs_lora_released_alpha")
FULL_FAMILY = ("finetune", "l2", "ewc", "retrain")
FFN = (r"blocks/\d+/fc[12]/kernel",)


def matrices(params):
  """The weight-decay mask: True on every leaf with at least two axes."""
  return jax.tree_util.tree_map(lambda p: jnp.ndim(p) >= 2, params)


def family(method: str) -> str:
  """``"lora"`` or ``"full"``: which :func:`method_runner` runs ``method``."""
  if method in LORA_FAMILY:
    return "lora"
  if method in FULL_FAMILY:
    return "full"
  raise ValueError(f"unknown method {method!r}; expected one of "
                   f"{LORA_FAMILY + FULL_FAMILY}")


def pretrain_epoch(forward: Callable, *, epochs: int, learning_rate: float,
                   weight_decay: float, batch_size: int, num_padded: int,
                   split: Callable = lambda b: b):
  """One epoch of supervised pre-training over a padded index subset.

  AdamW (weight decay on matrices only) with a cosine schedule over
  ``epochs`` epochs of the subset's full batches, on cross-entropy of
  ``forward``'s logits (dropout keyed per step).

  Args:
    forward: ``forward(params, x, y, key) -> (logits, features)``.
    epochs: epochs the schedule spans.
    learning_rate: peak rate.
    weight_decay: AdamW's decay on matrices.
    batch_size: examples per step (the last partial batch is dropped).
    num_padded: static length of the padded index arrays.
    split: applied to every batch inside the program (data parallelism).

  Returns:
    ``(epoch, optimizer)``: ``epoch(state, x, y, idx, n, key, e) -> (state,
    {"loss"})`` runs epoch ``e`` over the first ``n`` of the padded indices
    ``idx`` (``state = (params, opt_state)``); ``optimizer(n)`` is the
    schedule's optax transformation for a subset of ``n`` examples (its
    ``init`` makes the start state).
  """
  bs = batch_size

  def optimizer(n):
    spe = n // bs      # full batches only
    total = epochs * spe
    return optax.adamw(lambda c: learning_rate * 0.5 * (
        1 + jnp.cos(jnp.pi * jnp.minimum(c, total) / total)),
        weight_decay=weight_decay, mask=matrices)

  def loss(p, x, y, key):
    return losses.cross_entropy(forward(p, x, y, key)[0], y)

  @jax.jit
  def epoch(state, x, y, idx, n, key, e):
    spe = n // bs
    opt = optimizer(n)

    def body(state, t):
      def step(st):
        params, opt_state = st
        j, _ = padded_batch_positions(key, n, num_padded, bs, e * spe + t,
                                      spe)
        b = idx[j]
        xb, yb = split((x[b], y[b]))
        value, g = jax.value_and_grad(loss)(
            params, xb, yb, jax.random.fold_in(key, 10 ** 6 + e * spe + t))
        u, opt_state = opt.update(g, opt_state, params)
        return ((optax.apply_updates(params, u), opt_state),
                value.astype(jnp.float32))
      return jax.lax.cond(t < spe, step,
                          lambda st: (st, jnp.zeros((), jnp.float32)), state)

    state, values = jax.lax.scan(body, state, jnp.arange(num_padded // bs))
    return state, {"loss": jnp.sum(values) / spe}

  return epoch, optimizer


def method_runner(forward: Callable, family: str, *, epochs: int,
                  min_lr: float, weight_decay: float, rank: int,
                  alpha_warmup_epochs: int, prototype_bound: float,
                  logit_scale: float, batch_size: int, retain_pad: int,
                  forget_pad: int, head_frozen, num_classes: int = 10,
                  target_modules: Sequence[str] = FFN,
                  split: Callable = lambda b: b,
                  forget: str = "bounded") -> Callable:
  """One jitted task run of a method family
  (:func:`immunojax.eval.continual.task_runner`); every task and every
  method of the family reuses its compilation.

  Each task trains for ``epochs`` epochs with AdamW (weight decay on
  matrices) and a cosine schedule from the coefficients' ``lr`` down to
  ``min_lr``. The ``"lora"`` family is :func:`immunojax.methods.gs_lora.
  gs_lora` on ``target_modules`` with class prototypes of the task's start
  model (over its retained and forgotten examples); ``"full"`` is
  :func:`~immunojax.methods.gs_lora.finetune_forget` on every leaf where
  ``head_frozen`` is True, with a diagonal Fisher computed only when the
  ``fisher`` coefficient is positive (L2's importance is all ones).

  Args:
    forward: ``forward(params, x, y, key) -> (logits, features)``.
    family: ``"lora"`` or ``"full"`` (see :func:`family`).
    epochs, min_lr, weight_decay: the task's optimisation.
    rank: LoRA rank (``"lora"``).
    alpha_warmup_epochs: epochs before the group lasso starts.
    prototype_bound: GS-LoRA++'s push bound.
    logit_scale: the CosFace scale the forget terms divide by.
    batch_size, retain_pad, forget_pad, split: as in ``task_runner``.
    head_frozen: pytree of bools like the parameters, False on the head.
    num_classes: prototypes computed (``"lora"``).
    forget: the forget term (see :func:`~immunojax.methods.gs_lora.gs_lora`).

  Returns:
    ``run(start, x, y, task, coeffs, key)`` of ``task_runner``; ``coeffs``
    from :func:`coefficients` (``"bound"`` is the forget term's BND); the
    ``"lora"`` family's output carries ``group_norms``.
  """
  if family not in ("lora", "full"):
    raise ValueError(f"family must be 'lora' or 'full', got {family!r}")

  def build(start, x, y, task, coeffs, spe):
    bound = coeffs["bound"]
    def schedule(count):
      e = jnp.minimum(count // spe, epochs)
      return min_lr + 0.5 * (coeffs["lr"] - min_lr) * (
          1 + jnp.cos(jnp.pi * e / epochs))
    opt = optax.adamw(schedule, b1=0.9, b2=0.999, eps=1e-8,
                      weight_decay=weight_decay, mask=matrices)
    n_r, n_f = task["n_retain"], task["n_forget"]
    if family == "lora":
      both = jnp.concatenate([task["retain_idx"], task["forget_idx"]])
      w = jnp.concatenate([jnp.arange(retain_pad) < n_r,
                           jnp.arange(forget_pad) < n_f]).astype(jnp.float32)
      prototypes = gs.class_prototypes(
          lambda xx: forward(start, xx, None, None)[1], x[both], y[both], w,
          num_classes)
      config = lora.LoraConfig(r=rank, lora_alpha=1.0,
                               target_modules=tuple(target_modules),
                               init_a=coeffs["init_a"])
      imm = gs.gs_lora(forward, lora_config=config, optimizer=opt,
                       alpha=coeffs["alpha"],
                       alpha_warmup_steps=alpha_warmup_epochs * spe,
                       beta=coeffs["beta"], bound=bound,
                       prototypes=prototypes,
                       prototype_weight=coeffs["prototype_weight"],
                       prototype_bound=prototype_bound,
                       pull_weight=coeffs["pull_weight"], forget=forget,
                       logit_scale=logit_scale)
      return imm, lambda st: {"group_norms": gs.group_norms(st.adapters)}
    ri = task["retain_idx"]
    wr = (jnp.arange(ri.shape[0]) < n_r).astype(jnp.float32)
    # EWC's Fisher, computed only when it is used (L2: all ones).
    importance = jax.lax.cond(
        coeffs["fisher"] > 0,
        lambda: gs.diagonal_fisher(forward, start, x[ri], y[ri], wr),
        lambda: jax.tree_util.tree_map(jnp.ones_like, start))
    imm = gs.finetune_forget(forward, optimizer=opt, trainable=head_frozen,
                             beta=coeffs["beta"], bound=bound,
                             anchor_weight=coeffs["anchor_weight"],
                             importance=importance, forget=forget,
                             logit_scale=logit_scale)
    return imm, lambda st: {}

  return continual.task_runner(build, epochs=epochs, batch_size=batch_size,
                               retain_pad=retain_pad, forget_pad=forget_pad,
                               split=split)


def coefficients(method: str, *, beta: float, bound: float, lr: float,
                 baseline_lr: float, retrain_lr: float, alpha: float,
                 released_alpha: float, prototype_weight: float,
                 pull_weight: float, l2_weight: float, ewc_weight: float,
                 init_a: float = math.sqrt(5.0)) -> dict:
  """The traced coefficients of ``method`` for one task (float32 scalars).

  Args:
    method: one of :data:`LORA_FAMILY` or :data:`FULL_FAMILY`.
    beta: the forget term's weight this task.
    bound: the forget term's BND.
    lr: the LoRA family's rate; ``baseline_lr`` the full family's,
      ``retrain_lr`` retraining's.
    alpha: GS-LoRA's group-lasso weight (``released_alpha`` for
      ``gs_lora_released_alpha``; ``lora`` has 0).
    prototype_weight, pull_weight: GS-LoRA++'s prototype terms.
    l2_weight, ewc_weight: the anchored baselines' weights.
    init_a: LoRA A's kaiming ``a`` (``sqrt(5)``: peft's; the released code
      re-initialises later tasks with ``sqrt(50)``).
  """
  family(method)
  lora_co = {"lr": lr, "beta": beta, "bound": bound, "init_a": init_a,
             "alpha": alpha, "prototype_weight": 0.0, "pull_weight": 0.0}
  full = {"lr": baseline_lr, "beta": beta, "bound": bound,
          "anchor_weight": 0.0, "fisher": 0.0}
  table = {
      "gs_lora": lora_co,
      "gs_lora_released_alpha": {**lora_co, "alpha": released_alpha},
      "gs_lora_pp": {**lora_co, "prototype_weight": prototype_weight,
                     "pull_weight": pull_weight},
      "lora": {**lora_co, "alpha": 0.0},
      "finetune": full,
      "l2": {**full, "anchor_weight": l2_weight},
      "ewc": {**full, "anchor_weight": ewc_weight, "fisher": 1.0},
      "retrain": {**full, "lr": retrain_lr, "beta": 0.0}}
  return {k: jnp.asarray(v, jnp.float32) for k, v in table[method].items()}


class Evaluator:
  """Correctness of each test example under ``forward``'s own convention
  (GS-LoRA's released code: the CosFace margin on, so the true class must
  win by the margin)."""

  def __init__(self, forward: Callable, x_test, y_test):
    self.x, self.y = jnp.asarray(x_test), np.asarray(y_test)
    self._pred = jax.jit(lambda p, x, y: jnp.argmax(
        forward(p, x, y, None)[0], -1))

  def correct(self, params) -> np.ndarray:
    """``(num_test,)`` bools."""
    return np.asarray(self._pred(params, self.x, jnp.asarray(self.y))) \
        == self.y

  def accuracy(self, correct: np.ndarray, classes) -> float | None:
    """Accuracy in % over ``classes`` (None when none is in the test set)."""
    return continual.class_accuracy(correct, self.y, classes)

  def task_scores(self, params, tasks) -> tuple[list[dict], float | None]:
    """``params``' ``acc_r`` and ``acc_f`` on each task's classes, and its
    accuracy over every class of the schedule (e.g. a pre-trained model's
    references)."""
    correct = self.correct(params)
    every = tasks[0].retain + tasks[0].forget + tasks[0].old
    return ([{"acc_r": self.accuracy(correct, t.retain),
              "acc_f": self.accuracy(correct, t.forget)} for t in tasks],
            self.accuracy(correct, every))


def trainable_share(init, *, rank: int) -> tuple[dict, object]:
  """The share (%) of ``init``'s parameters each family trains (``lora``:
  rank-``rank`` factors on :data:`FFN`; ``full`` and ``retrain``: all but
  the head), and the frozen-head mask (True where trained)."""
  factors = lora.init(init, lora.LoraConfig(r=rank, target_modules=FFN),
                      key=jax.random.PRNGKey(0))
  n_lora = sum(v["a"].size + v["b"].size for v in factors.values())
  n_all = sum(p.size for p in jax.tree_util.tree_leaves(init))
  head_frozen = jax.tree_util.tree_map_with_path(
      lambda p, _: masks.path_string(p) != "head", init)
  n_head = init["head"].size
  return ({"lora": 100.0 * n_lora / n_all,
           "full": 100.0 * (n_all - n_head) / n_all,
           "retrain": 100.0 * (n_all - n_head) / n_all}, head_frozen)


def task_step(runner: Callable, x, y, *, evaluator: "Evaluator", tasks,
              subsets, coefficients: Callable, key: Callable,
              pretrained_acc_f: Sequence[float], retain_pad: int,
              forget_pad: int, zero_rtol: float, missing=None,
              restart_from=None) -> Callable:
  """``step(state, t)`` of the continual protocol, for a loop over tasks.

  Task ``t`` runs ``runner`` (:func:`method_runner`) on ``subsets[t]``
  (retain and forget indices into ``x``, ``y``) from ``state["params"]``
  (or from ``restart_from`` each task: retraining), with
  ``coefficients(t)`` and ``key(t)``, and scores the result on
  ``evaluator``'s test set (:func:`immunojax.eval.continual.task_metrics`
  against ``pretrained_acc_f[t]``).

  Args:
    missing: the classes without training data (the missing-class regime:
      Acc_m is scored); None elsewhere.
    zero_rtol: a group counts as zeroed below this share of the largest
      group norm (LoRA family).

  Returns:
    ``step(state, t) -> (state, metrics)`` with state ``{"params",
    "first"}`` (the weights after task 1 kept) and metrics: the task's
    accuracies, the runner's final losses, ``group_norms`` and
    ``zeroed_groups`` (LoRA family), ``forget_class_acc`` per forgotten
    class and ``wall_seconds``.
  """
  def step(state, t):
    t0 = time.perf_counter()
    retain_idx, forget_idx = subsets[t]
    start = state["params"] if restart_from is None else restart_from
    task = continual.task_indices(retain_idx, forget_idx,
                                  retain_pad=retain_pad, forget_pad=forget_pad)
    out = runner(start, x, y, task, coefficients(t), key(t))
    params = out["params"]
    correct = evaluator.correct(params)
    scores = continual.task_metrics(
        correct, evaluator.y, tasks[t], pretrained_acc_f=pretrained_acc_f[t],
        missing=() if missing is None else missing)
    acc = {k: v for k, v in scores._asdict().items()
           if k != "acc_m" or missing is not None}
    metrics = {**acc, **{k: float(v) for k, v in out["final"].items()}}
    if "group_norms" in out:
      norms = np.asarray(out["group_norms"])
      metrics["group_norms"] = norms
      metrics["zeroed_groups"] = int(np.sum(np.asarray(
          gs.zeroed(norms, zero_rtol))))
    new = {"params": params,
           "first": params if t == 0 else state["first"]}
    metrics["forget_class_acc"] = {
        str(c): evaluator.accuracy(correct, [c]) for c in tasks[t].forget}
    metrics["wall_seconds"] = time.perf_counter() - t0
    return new, metrics
  return step


def task_results(records: Sequence[dict], *, missing: bool, lora_family: bool,
                 trainable_share: float) -> dict:
  """One method's per-task lists from :func:`task_step`'s ``records``:
  ``acc_r``, ``acc_f``, ``acc_o``, ``h_mean`` (and ``acc_m`` when
  ``missing``), the last epoch's ``loss`` and ``forget_ce``,
  ``forget_class_acc``, ``group_norms`` and ``zeroed_groups`` (LoRA family;
  ``zeroed_groups`` None otherwise), ``trainable_share`` and the summed
  ``wall_seconds``."""
  keys = ("acc_r", "acc_f", "acc_o", "h_mean") + (
      ("acc_m",) if missing else ())
  result = {k: [r.get(k) for r in records] for k in keys}
  for k in ("loss", "forget_ce", "forget_class_acc"):
    result[k] = [r.get(k) for r in records]
  if lora_family:
    result["group_norms"] = [r["group_norms"] for r in records]
    result["zeroed_groups"] = [r["zeroed_groups"] for r in records]
  else:
    result["zeroed_groups"] = None
  result["trainable_share"] = trainable_share
  result["wall_seconds"] = float(sum(r["wall_seconds"] for r in records))
  return result
