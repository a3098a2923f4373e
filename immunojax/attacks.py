"""Attack harness: fine-tune a model with a grid of attackers, measure recovery.

Every attack is a full fine-tuning run through :func:`immunojax.finetune`.
Attacks that share (optimizer, batch size, mode, steps) run as one jitted call
``vmap``-ed over learning rates and seeds. For linear probes two closed-form
attackers (least squares, i.e. one Newton step; and gradient descent with
exact line search) show what ill-conditioning can and cannot stop.
"""

from __future__ import annotations

import itertools
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from immunojax import _checks, lora, masks
from immunojax.data import batch_indices
from immunojax.finetune import finetune, masked_optimizer

PyTree = Any

OPTIMIZERS: dict[str, Callable[..., optax.GradientTransformation]] = {
    "sgd": optax.sgd,
    "momentum": lambda learning_rate: optax.sgd(learning_rate, momentum=0.9),
    "nesterov": lambda learning_rate: optax.sgd(learning_rate, momentum=0.9,
                                                nesterov=True),
    "adam": optax.adam,
    "adamw": optax.adamw,
    "rmsprop": optax.rmsprop,
    "adagrad": optax.adagrad,
    "adadelta": optax.adadelta,
}
MODES = ("full", "head", "reinit_head", "lora")


def make_optimizer(name: str, learning_rate) -> optax.GradientTransformation:
  """An optax optimizer whose learning rate may be a traced value."""
  _checks.check_choice(name, OPTIMIZERS, "optimizer")
  return optax.inject_hyperparams(OPTIMIZERS[name])(learning_rate=learning_rate)


class Attack(NamedTuple):
  optimizer: str
  learning_rate: float
  batch_size: int
  mode: str
  steps: int
  seed: int = 0

  @property
  def label(self) -> str:
    return (f"{self.optimizer} lr={self.learning_rate:g} bs={self.batch_size} "
            f"{self.mode} seed={self.seed}")


def grid(*, optimizers: Sequence[str], learning_rates: Sequence[float],
         batch_sizes: Sequence[int] = (32,), modes: Sequence[str] = ("full",),
         steps: Sequence[int] = (100,), seeds: Sequence[int] = (0,)
         ) -> list[Attack]:
  """The Cartesian product of the given axes, validated."""
  for o in optimizers:
    _checks.check_choice(o, OPTIMIZERS, "optimizer")
  for m in modes:
    _checks.check_choice(m, MODES, "mode")
  return [Attack(*a) for a in itertools.product(
      optimizers, learning_rates, batch_sizes, modes, steps, seeds)]


class Target(NamedTuple):
  """What the attacker fine-tunes and how it is scored.

  Attributes:
    loss_fn: ``loss_fn(params, batch) -> scalar`` on the attacker's data.
    metric_fn: ``metric_fn(params) -> scalar`` on held-out data (e.g. the
      harmful task's test accuracy).
    train_data: pytree of arrays with a leading example axis.
    head: regex(es) naming the head parameters (modes head / reinit_head).
    lora_config: adapters for mode ``lora``.
    higher_is_better: for the attacker (accuracy: True; loss: False).
  """
  loss_fn: Callable
  metric_fn: Callable
  train_data: PyTree
  head: tuple[str, ...] = ("head",)
  lora_config: lora.LoraConfig = lora.LoraConfig()
  higher_is_better: bool = True


def _reinit(params, mask, key):
  leaves, tree = jax.tree_util.tree_flatten(params)
  mleaves = jax.tree_util.tree_leaves(mask)
  out = []
  for i, (x, m) in enumerate(zip(leaves, mleaves)):
    if not m:
      out.append(x)
    elif jnp.ndim(x) >= 2:
      out.append(jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype)
                 / jnp.sqrt(x.shape[0]))
    else:
      out.append(jnp.zeros_like(x))
  return jax.tree_util.tree_unflatten(tree, out)


def _prepare(mode, params, target: Target, key):
  """(trainable params, trainable mask, to_model(trainable) -> full params)."""
  if mode == "full":
    return params, None, lambda p: p
  head = masks.mask_from_patterns(params, target.head)
  if mode == "head":
    return params, head, lambda p: p
  if mode == "reinit_head":
    return _reinit(params, head, key), None, lambda p: p
  adapters = lora.init(params, target.lora_config, key=key)
  return adapters, None, lambda a: lora.merge(params, a, target.lora_config)


def _group_fn(target: Target, optimizer: str, batch_size: int, mode: str,
              steps: int, eval_every: int):
  """One compiled ``(lrs, seeds, params, train_data) -> curves`` per group,
  reused for every start point."""
  n = jax.tree_util.tree_leaves(target.train_data)[0].shape[0]
  num_evals = steps // eval_every

  # Parameters and data are arguments, not closures: closed-over arrays
  # would be compiled in as constants, once per start point.
  def one(lr, seed, params, train_data):
    key = jax.random.PRNGKey(seed)
    init_key, data_key = jax.random.split(key)
    trainable, mask, to_model = _prepare(mode, params, target, init_key)
    loss = lambda p, b: target.loss_fn(to_model(p), b)
    opt = make_optimizer(optimizer, lr)
    idx = jax.vmap(lambda t: batch_indices(data_key, n, batch_size, t))(
        jnp.arange(steps))
    idx = idx.reshape(num_evals, eval_every, batch_size)
    first = target.metric_fn(to_model(trainable))
    opt_state = masked_optimizer(opt, mask).init(trainable)

    def chunk(carry, chunk_idx):
      p, s = carry
      batches = jax.tree_util.tree_map(lambda a: a[chunk_idx], train_data)
      res = finetune(p, loss, opt, batches, trainable=mask, opt_state=s,
                     check_finite=False)
      return (res.params, res.opt_state), (target.metric_fn(to_model(res.params)),
                                           res.metrics["loss"][-1])

    _, (metric, last_loss) = jax.lax.scan(chunk, (trainable, opt_state), idx)
    return jnp.concatenate([first[None], metric]), last_loss

  return jax.jit(jax.vmap(one, in_axes=(0, 0, None, None)))


class AttackCurves(NamedTuple):
  """Per start point: ``metric[a, e]`` of attack ``a`` after ``steps[e]``."""
  attacks: list[Attack]
  steps: dict[str, np.ndarray]
  metric: dict[str, np.ndarray]
  final_loss: dict[str, np.ndarray]


def run_attacks(attacks: Sequence[Attack], start_points: dict[str, PyTree],
                target: Target, *, eval_every: int = 10) -> AttackCurves:
  """Runs every attack from every start point (e.g. protected / original /
  scratch) and records the held-out metric every ``eval_every`` steps.

  Attacks are grouped by (optimizer, batch size, mode, steps); each group is
  one jitted call vmapped over its learning rates and seeds. Curves of
  attacks with different step budgets are padded with NaN.
  """
  if not attacks:
    raise ValueError("no attacks given")
  for a in attacks:
    _checks.check_choice(a.optimizer, OPTIMIZERS, "optimizer")
    _checks.check_choice(a.mode, MODES, "mode")
    if a.steps % eval_every:
      raise ValueError(f"attack steps {a.steps} is not a multiple of "
                       f"eval_every={eval_every}")
  longest = max(a.steps for a in attacks)
  steps_axis = np.arange(0, longest + 1, eval_every)
  metric, final_loss, steps = {}, {}, {}
  groups: dict[tuple, list[int]] = {}
  for i, a in enumerate(attacks):
    groups.setdefault((a.optimizer, a.batch_size, a.mode, a.steps), []).append(i)
  for name in start_points:
    metric[name] = np.full((len(attacks), len(steps_axis)), np.nan)
    final_loss[name] = np.full((len(attacks),), np.nan)
    steps[name] = steps_axis
  for (opt, bs, mode, k), members in groups.items():
    fn = _group_fn(target, opt, bs, mode, k, eval_every)
    lrs = jnp.asarray([attacks[i].learning_rate for i in members])
    seeds = jnp.asarray([attacks[i].seed for i in members])
    for name, params in start_points.items():
      curves, losses = (np.asarray(a) for a in fn(lrs, seeds, params,
                                                  target.train_data))
      for j, i in enumerate(members):
        metric[name][i, :curves.shape[1]] = curves[j]
        final_loss[name][i] = losses[j, -1]
  return AttackCurves(list(attacks), steps, metric, final_loss)


def summarize(curves: AttackCurves, *, threshold: float | None = None,
              higher_is_better: bool = True, scratch: str | None = "scratch",
              budgets: Sequence[int] | None = None) -> dict:
  """Worst case for the defender per budget, steps to threshold, overhead.

  Returns a JSON-able dict keyed by start point with
  ``best_metric_within_budget`` (the strongest attacker's metric using at
  most that many steps), ``best_attack`` per budget, ``steps_to_threshold``
  (fewest steps any attacker needed; None if none did) and, when a
  ``scratch`` start point exists, ``finetune_overhead_vs_scratch`` (SOPHON's
  measure: steps to threshold from this start / from scratch).
  """
  sign = 1.0 if higher_is_better else -1.0
  out = {}
  for name, m in curves.metric.items():
    steps = curves.steps[name]
    budgets_ = list(budgets or sorted({a.steps for a in curves.attacks}))
    per_budget = {}
    for b in budgets_:
      cols = steps <= b
      vals = np.where(np.isnan(m[:, cols]), -np.inf, sign * m[:, cols])
      best = np.max(vals, axis=1)
      i = int(np.argmax(best))
      per_budget[str(b)] = {"metric": float(sign * best[i]),
                            "attack": curves.attacks[i].label}
    entry = {"within_budget": per_budget}
    if threshold is not None:
      reached = sign * m >= sign * threshold
      first = [int(steps[np.argmax(r)]) if r.any() else None for r in reached]
      hits = [f for f in first if f is not None]
      entry["steps_to_threshold"] = min(hits) if hits else None
      entry["attacks_reaching_threshold"] = len(hits)
    out[name] = entry
  if threshold is not None and scratch in out:
    base = out[scratch]["steps_to_threshold"]
    for name, entry in out.items():
      s = entry["steps_to_threshold"]
      entry["finetune_overhead_vs_scratch"] = (
          None if s is None or base in (None, 0) else s / base)
  return out


# ------------------------------------------------- closed-form probe attacks
def least_squares_probe(features: jax.Array, targets: jax.Array, *,
                        rtol: float | None = None) -> jax.Array:
  """Minimum-norm least-squares head: what a Newton step (or any exact
  solver) recovers in one step, whatever the conditioning.

  Singular values of ``F`` below ``rtol * s_max`` count as zero; the default
  ``sqrt(D * eps)`` is the numerical rank rule of
  :func:`immunojax.spectral.condition_number` applied to ``H = F^T F``
  (eigenvalues below ``D * eps * lambda_max``), so the attacker and the
  condition number see the same spectrum. (``jnp.linalg.pinv``'s default
  keeps round-off directions whose coefficients then swamp ``w*``.)
  """
  if jnp.ndim(features) != 2:
    raise ValueError(f"features must be 2-D, got shape {jnp.shape(features)}")
  _checks.check_finite(features, "features")
  d = features.shape[1]
  if rtol is None:
    rtol = float(np.sqrt(d * np.finfo(features.dtype).eps))
  u, s, vt = jnp.linalg.svd(features, full_matrices=False)
  keep = s > rtol * s[0]
  inv = jnp.where(keep, 1.0 / jnp.where(keep, s, 1.0), 0.0)
  return vt.T @ (inv[:, None] * (u.T @ targets))


class LineSearchCurve(NamedTuple):
  """``norm_ratio[t] = ||w_t - w*||^2 / ||w_0 - w*||^2`` and the loss."""
  norm_ratio: jax.Array
  loss: jax.Array
  w: jax.Array


def exact_line_search_gd(features: jax.Array, targets: jax.Array,
                         num_steps: int, *, w0: jax.Array | None = None
                         ) -> LineSearchCurve:
  """Steepest descent with exact line search on ``0.5 ||F w - y||^2``.

  The condition-number paper's Fig. 1 protocol: step ``alpha = g^T g /
  g^T H g`` with ``H = F^T F`` (applied matrix-free), ``w_0 = 0`` by default
  and ``w*`` the minimum-norm solution, so null-space components play no part.
  Convergence is governed by ``kappa(H)`` on the row space.
  """
  num_steps = _checks.check_positive_int(num_steps, "num_steps")
  y = targets if jnp.ndim(targets) == 2 else targets[:, None]
  w_star = least_squares_probe(features, y)
  w = jnp.zeros_like(w_star) if w0 is None else w0.reshape(w_star.shape)
  loss = lambda w: 0.5 * jnp.sum((features @ w - y) ** 2)
  d0 = jnp.sum((w - w_star) ** 2)

  def step(w, _):
    g = features.T @ (features @ w - y)
    hg = features.T @ (features @ g)
    gg = jnp.sum(g * g)
    alpha = gg / jnp.maximum(jnp.sum(g * hg), jnp.finfo(g.dtype).tiny)
    w = w - jnp.where(gg > 0, alpha, 0.0) * g
    return w, (jnp.sum((w - w_star) ** 2) / d0, loss(w))

  loss0 = loss(w)
  w, (ratio, losses) = jax.lax.scan(step, w, None, length=num_steps)
  return LineSearchCurve(jnp.concatenate([jnp.ones(1, ratio.dtype), ratio]),
                         jnp.concatenate([loss0[None], losses]), w)
