"""The study grid of ``experiments.digit_pairs``: why mean RIR is ~5 and not
~70 (issue "settle the open questions", question 1).

Axes: tasks {paper, code} x budget x lambda_P:lambda_H ratio x direction rule
{normalized (ours), balanced (the paper's un-normalized rule, weights matched
to the task gradient at t = 0)} x optimizer {GD (Alg. 1), Adam (released
code)}, over seeds and a stratified subset of the 90 ordered pairs.

Budget ``m`` multiplies the step the regularizers get, at a fixed number of
steps: for GD both weights (``lambda * m``), for Adam the learning rate
(``adam_lr * m``; Adam's per-coordinate scaling makes the weights set only
the balance between the terms). So ``m`` spans budget = step x steps exactly
as steps would, at 1/m the cost (a 64 x 64 ``eigh`` costs ~0.6 ms on this
CPU, two per pair and step).

One compiled program per (tasks, optimizer, rule): seeds, ratios, budgets and
pairs are ``vmap`` axes. A pair whose parameters turn non-finite is frozen
at its last finite state and counted as diverged (not dropped silently).
"""

from __future__ import annotations

import itertools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from immunojax import data, spectral
from immunojax.methods import cond_num

ESTIMATORS = (spectral.pinv(), spectral.official())


def stratified_pairs(all_pairs, count: int) -> list[tuple[int, int]]:
  """``count`` ordered pairs ``(a, (a + s) % 10)``, shifts ``s`` spread over
  1..9, so each digit appears equally often as D_P and as D_H (for counts
  that are multiples of 10)."""
  if count >= len(all_pairs):
    return list(all_pairs)
  shifts = np.linspace(1, 9, max(count // 10, 1)).round().astype(int)
  pairs = [(a, (a + int(s)) % 10) for s in shifts for a in range(10)]
  return pairs[:count] if count >= 10 else pairs[::10 // count][:count]


def gram_alignment(x_p: jax.Array, x_h: jax.Array) -> jax.Array:
  """``<K_P, K_H>_F / (||K_P||_F ||K_H||_F)``: 1 when the two Grams share
  their eigenvectors and relative spectrum (Prop. 3.2's no-go case), lower
  as their singular vectors turn apart."""
  k_p, k_h = spectral.gram(x_p), spectral.gram(x_h)
  return jnp.sum(k_p * k_h) / (jnp.linalg.norm(k_p) * jnp.linalg.norm(k_h))


class _Setup(NamedTuple):
  """What one (seed, ratio, budget, pair) problem needs besides its data,
  computed once before training: the Grams, their preconditioners and the
  regularizer weights."""
  k_p: jax.Array
  k_h: jax.Array
  p_p: jax.Array
  p_h: jax.Array
  lambda_h: jax.Array
  lambda_p: jax.Array


def _cell_fns(*, rule: str, optimizer: str, batch_size: int,
              learning_rate: float, adam_learning_rate: float,
              lambda_h: float):
  """``(prepare, init, step, evaluate)`` for one pair and cell."""
  normalize = rule == "normalized"

  def prepare(xp, yp, xh, ratio, m):
    problem = cond_num.linear_problem(xp, xh)
    if normalize:
      lam_h, lam_p = lambda_h, ratio * lambda_h
    else:
      lam = cond_num.linear.balanced_lambdas(
          "cond_num", problem, cond_num.init_params(xp.shape[1],
                                                    dtype=xp.dtype),
          (xp, yp), task_loss="bce", ratio=ratio)
      lam_h, lam_p = lam["lambda_h"], lam["lambda_p"]
    if optimizer == "gd":          # the budget scales the weights ...
      lam_h, lam_p = lam_h * m, lam_p * m
    return _Setup(problem.k_p, problem.k_h, problem.p_p, problem.p_h,
                  jnp.asarray(lam_h, xp.dtype), jnp.asarray(lam_p, xp.dtype))

  def immunizer(setup, xh, m):
    opt = (optax.sgd(learning_rate) if optimizer == "gd"
           else optax.adam(adam_learning_rate * m))   # ... or Adam's rate
    problem = cond_num.LinearProblem(setup.k_p, setup.k_h, setup.p_p,
                                     setup.p_h, xh, None)
    return cond_num.linear.cond_num(
        problem, lambda_p=setup.lambda_p, lambda_h=setup.lambda_h,
        optimizer=opt, task_loss="bce", normalize=normalize,
        track_kappa=False)

  def init(setup, xh, m, key):
    params0 = cond_num.init_params(xh.shape[1], dtype=xh.dtype)
    return immunizer(setup, xh, m).init(params0, key), jnp.asarray(False)

  def step(carry, setup, xp, yp, xh, m, key, t):
    state, bad = carry
    new, _ = immunizer(setup, xh, m).update(
        state, data.minibatch(key, (xp, yp), batch_size, t), key)
    ok = jnp.all(jnp.asarray([jnp.all(jnp.isfinite(a)) for a in
                              jax.tree_util.tree_leaves(new)]))
    state = jax.tree_util.tree_map(lambda n, o: jnp.where(ok, n, o), new,
                                   state)
    return state, bad | ~ok

  def evaluate(carry, setup, xp, yp, xh, m):
    state, diverged = carry
    p = immunizer(setup, xh, m).params(state)
    out = {"diverged": diverged, "lambda_h": setup.lambda_h,
           "lambda_p": setup.lambda_p,
           "dp_accuracy": jnp.mean(((xp @ p["theta"] @ p["omega"])[:, 0] > 0)
                                   == (yp > 0.5))}
    for est in ESTIMATORS:
      r = cond_num.relative_immunization_ratio(
          xp @ p["theta"], xh @ p["theta"], xp, xh, estimator=est)
      out[est.name] = {"rir": r.rir, "i": r.kappa_ratio_harmful,
                       "ii": r.kappa_ratio_pretrain}
    return out

  return prepare, init, step, evaluate


# The grid's axes, outermost first, and which of them each kind of argument
# carries: data per (seed, pair), a key per seed, one ratio / budget value,
# per-problem values on every axis, or a value shared by all.
_AXES = ("seeds", "ratios", "budgets", "pairs")
_KINDS = {"data": ("seeds", "pairs"), "key": ("seeds",), "ratio": ("ratios",),
          "budget": ("budgets",), "grid": _AXES, "shared": ()}


def _over_grid(fn, kinds: tuple[str, ...]):
  """``vmap`` of ``fn`` over the grid's four axes; ``kinds[i]`` says which
  axes argument ``i`` carries (a key of ``_KINDS``)."""
  for axis in reversed(_AXES):
    fn = jax.vmap(fn, in_axes=tuple(0 if axis in _KINDS[k] else None
                                    for k in kinds))
  return fn


def run_group(run, name: str, arrays, *, rule: str, optimizer: str, ratios,
              budgets, steps: int, batch_size: int, learning_rate: float,
              adam_learning_rate: float, lambda_h: float, keys) -> dict:
  """All (seed, ratio, budget, pair) problems of one (tasks, optimizer,
  rule), trained together: one jitted step per call, as a loop of ``run``
  (progress bar; the group's results are saved by the caller, so a crashed
  run resumes at the group).

  Args:
    arrays: ``(xp, yp, xh)``, leaves ``(seeds, pairs, N, ...)``.
    keys: ``(seeds,)`` PRNG keys (mini-batch order per seed).

  Returns:
    Numpy leaves of shape ``(seeds, ratios, budgets, pairs)``.
  """
  prepare, init, step, evaluate = _cell_fns(
      rule=rule, optimizer=optimizer, batch_size=batch_size,
      learning_rate=learning_rate, adam_learning_rate=adam_learning_rate,
      lambda_h=lambda_h)
  xp, yp, xh = arrays
  ratios = jnp.asarray(ratios, jnp.float64)
  budgets = jnp.asarray(budgets, jnp.float64)
  setup = jax.jit(_over_grid(prepare, ("data", "data", "data", "ratio",
                                       "budget")))(xp, yp, xh, ratios, budgets)
  carry = jax.jit(_over_grid(init, ("grid", "data", "budget", "key")))(
      setup, xh, budgets, keys)
  step_all = jax.jit(_over_grid(step, ("grid", "grid", "data", "data",
                                       "data", "budget", "key", "shared")))

  def step_fn(c, t):
    c = step_all(c, setup, xp, yp, xh, budgets, keys, jnp.asarray(t))
    return c, {"diverged_problems": jnp.sum(c[1])}

  carry = run.loop(f"grid_{name}", carry, step_fn, steps, log_every=steps,
                   desc=f"grid {name}", checkpoint=False)
  out = jax.jit(_over_grid(evaluate, ("grid", "grid", "data", "data", "data",
                                      "budget")))(carry, setup, xp, yp, xh,
                                                  budgets)
  return jax.tree_util.tree_map(np.asarray, out)


def cell_statistics(res: dict, num_pairs: int) -> dict:
  """Statistics over seeds x pairs of one cell (leaves ``(seeds, pairs)``);
  diverged pairs are counted and left out of the RIR statistics."""
  ok = ~res["diverged"]
  seeds = res["diverged"].shape[0]
  out = {"diverged_pairs": int((~ok).sum()),
         "dp_accuracy": float(np.mean(res["dp_accuracy"][ok])) if ok.any()
         else None,
         "problems": int(ok.size), "pairs": num_pairs, "seeds": seeds}
  for est in ESTIMATORS:
    r, i, ii = (res[est.name][k] for k in ("rir", "i", "ii"))
    if not ok.any():
      out[est.name] = None
      continue
    per_seed_mean = [float(np.mean(r[s][ok[s]])) for s in range(seeds)
                     if ok[s].any()]
    out[est.name] = {
        "mean_rir": float(np.mean(r[ok])),
        "mean_rir_seed_std": float(np.std(per_seed_mean)),
        "median_rir": float(np.median(r[ok])),
        "mean_i": float(np.mean(i[ok])), "mean_ii": float(np.mean(ii[ok])),
        # per seed, averaged: counts out of `pairs`
        "pairs_ii_at_most_1": float(np.sum((ii <= 1) & ok) / seeds),
        "pairs_i_at_least_10": float(np.sum((i >= 10) & ok) / seeds),
        "pairs_strong_success": float(np.sum(
            np.asarray(cond_num.succeeds(i, ii, strong=True)) & ok) / seeds),
    }
  return out


def main_effects(cells: list[dict], factors: tuple[str, ...]) -> dict:
  """For each factor, the spread (max - min over its levels) of the mean over
  all other factors of ``log(mean RIR)`` (pinv): a main-effects reading of
  the grid, in natural-log units."""
  out = {}
  for f in factors:
    levels: dict[Any, list[float]] = {}
    for c in cells:
      if c["pinv"] is not None:
        levels.setdefault(c[f], []).append(np.log(c["pinv"]["mean_rir"]))
    means = {str(k): float(np.mean(v)) for k, v in levels.items()}
    out[f] = {"level_means": means,
              "spread": float(max(means.values()) - min(means.values()))
              if means else None}
  return out


def grid_groups(tasks, optimizers, rules):
  """The (tasks, optimizer, rule) groups, each one compiled program."""
  return list(itertools.product(tasks, optimizers, rules))
