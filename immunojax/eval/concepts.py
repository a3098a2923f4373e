"""Multi-concept immunization: the batches a bilevel defense trains on, the
scores it is read by, and the utility-matched choice of its prior weight.

* :func:`concept_sampler`: lower / upper / prior batches for IMMA and MIMA
  (:mod:`immunojax.methods.imma`) from per-concept data, one slot per
  concept or pooled, a pure function of the step.
* :func:`attack_scores`: one attack's curves read per concept -- the worst
  concept at every checkpoint, the selectivity (concept accuracy over the
  accuracy of collateral concepts after the same attack), IMMA's gap
  ratios against the undefended model.
* :func:`over_seeds`: mean and sd over seeds at every checkpoint.
* :func:`matched_weight`: the smallest weight whose utility reaches a
  floor (methods compared at equal utility); :func:`match_utility` trains
  the methods over a grid of weights (a method's larger weights only while
  it is below the floor) and keeps each at its own.
* :func:`immunizers` and :func:`immunize_methods`: the comparison's
  immunizers on one loss, and the order they are trained in.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from immunojax import _checks
from immunojax.eval.curves import gap_ratio, mean_std
from immunojax.methods import imma


def concept_sampler(draw: Callable, key: jax.Array, *, batch: int,
                    lower_steps: int, null_rows: int = 0,
                    null_tokens=None) -> Callable:
  """``sample((data, pools), t)``: the batches of step ``t``.

  ``data`` holds ``"x"`` / ``"tokens"`` ``(C, n, ...)`` (each concept's
  rows) and ``"prior_x"`` / ``"prior_tokens"`` (the utility set). ``pools``
  ``(S, C)``: slot ``s`` of the lower and upper batches draws each row from
  concept ``c`` with probability proportional to ``pools[s, c]`` (the
  identity: one slot per concept, MIMA; a one-hot row: IMMA on that
  concept; a row of ones: IMMA on the pooled concepts), so every variant
  shares one compilation. Rows are drawn with replacement.

  Args:
    draw: ``draw(key, x, tokens) -> batch``: adds the step's noise (e.g. a
      diffusion timestep and epsilon per row).
    key: the run's key; step ``t`` uses ``fold_in(key, t)`` (resuming is
      exact).
    batch: rows per slot and step, and in the prior batch.
    lower_steps: steps of the lower level (its batches carry a step axis).
    null_rows: the first ``null_rows`` prior rows get ``null_tokens`` (the
      unconditional branch classifier-free guidance reads).
    null_tokens: ``(L,)`` token ids of the null prompt.

  Returns:
    ``sample`` with ``{"lower": (S, lower_steps, batch, ...), "upper": (S,
    batch, ...), "prior": (batch, ...)}`` leaves.
  """
  if null_rows and null_tokens is None:
    raise ValueError("null_rows needs null_tokens")
  if not 0 <= null_rows <= batch:
    raise ValueError(f"null_rows must be in [0, batch={batch}], got "
                     f"{null_rows}")

  def sample(data, t):
    d, pools = data
    k = jax.random.fold_in(key, t)
    n = d["x"].shape[1]
    slots = pools.shape[0]

    def slot_batch(kk, steps):
      """``(slots, steps, batch, ...)``; ``steps=None``: no step axis."""
      kc, kr, kn = jax.random.split(kk, 3)
      rows = batch * (steps or 1)
      concept = jax.random.categorical(
          kc, jnp.log(pools)[:, None, :], axis=-1, shape=(slots, rows))
      row = jax.random.randint(kr, (slots, rows), 0, n)
      b = draw(kn, d["x"][concept, row], d["tokens"][concept, row])
      shape = (slots,) if steps is None else (slots, steps)
      return jax.tree_util.tree_map(
          lambda a: a.reshape(shape + (batch,) + a.shape[2:]), b)

    pidx = jax.random.randint(jax.random.fold_in(k, 3), (batch,), 0,
                              d["prior_x"].shape[0])
    prior = draw(jax.random.fold_in(k, 4), d["prior_x"][pidx],
                 d["prior_tokens"][pidx])
    if null_rows:
      prior["tokens"] = prior["tokens"].at[:null_rows].set(null_tokens)
    return {"lower": slot_batch(jax.random.fold_in(k, 1), lower_steps),
            "upper": slot_batch(jax.random.fold_in(k, 2), None),
            "prior": prior}

  return sample


def _ratio(a, b):
  a, b = np.asarray(a, float), np.asarray(b, float)
  with np.errstate(divide="ignore", invalid="ignore"):
    return np.where(b > 0, a / np.where(b > 0, b, 1.0), np.nan)


def attack_scores(curves: np.ndarray, undefended: np.ndarray,
                  collateral: np.ndarray | None, *,
                  concepts: Sequence[str], per_concept: bool) -> dict:
  """One attack on one model, read per concept.

  Args:
    curves: ``(checkpoints, C, 3)``: per concept the sample accuracy, the
      feature similarity to real images and the held-out denoising loss
      (:func:`immunojax.eval.generative.judge_metric`).
    undefended: the same for the undefended model under the same attack.
    collateral: the collateral concepts' mean accuracy after the attack:
      ``(checkpoints, C)`` when each concept was attacked alone (column
      ``k``: after the attack on concept ``k``), ``(checkpoints,)`` for one
      attack on all of them; None: not measured.
    concepts: the C concept names.
    per_concept: whether concept ``k``'s column comes from an attack on
      ``k`` alone.

  Returns:
    ``concept_accuracy`` / ``feature_similarity`` / ``heldout_loss``
    (per concept, per checkpoint), ``worst_concept`` (the highest concept
    accuracy at each checkpoint) and ``worst_concept_accuracy`` (its last
    value), ``collateral_accuracy``, ``selectivity`` (per checkpoint: the
    worst concept accuracy over the collateral accuracy of the same attack;
    None without collateral), ``heldout_loss_gap`` (mean over concepts,
    against the undefended model) and IMMA's mean gap ratios (%) of the
    feature similarity and the concept accuracy.
  """
  arr, wo = np.asarray(curves), np.asarray(undefended)
  if arr.ndim != 3 or arr.shape[1] != len(concepts) or arr.shape != wo.shape:
    raise ValueError(f"curves must be (checkpoints, {len(concepts)}, 3) like "
                     f"undefended, got {arr.shape} and {wo.shape}")
  if collateral is None:
    selectivity = None
  elif per_concept:
    selectivity = np.nanmax(_ratio(arr[:, :, 0], collateral), 1).tolist()
  else:
    selectivity = _ratio(np.nanmax(arr[:, :, 0], 1), collateral).tolist()
  per = lambda j: {k: arr[:, i, j].tolist() for i, k in enumerate(concepts)}
  return {
      "concept_accuracy": per(0),
      "worst_concept_accuracy": float(np.nanmax(arr[-1, :, 0])),
      "worst_concept": np.nanmax(arr[:, :, 0], 1).tolist(),
      "collateral_accuracy": None if collateral is None else (
          np.asarray(collateral).tolist()),
      "selectivity": selectivity,
      "feature_similarity": per(1),
      "heldout_loss": per(2),
      "heldout_loss_gap": np.nanmean(arr[:, :, 2] - wo[:, :, 2],
                                     axis=1).tolist(),
      "mean_sgr_feature_similarity": float(np.nanmean(
          gap_ratio(wo[1:, :, 1], arr[1:, :, 1]))),
      "mean_sgr_concept_accuracy": float(np.nanmean(
          gap_ratio(wo[1:, :, 0], arr[1:, :, 0])))}


def over_seeds(values: Sequence) -> dict | None:
  """``{"mean", "sd", "seeds"}`` of per-seed curves (lists per checkpoint;
  the population sd, 0 with one seed); None when any seed has none."""
  if any(v is None for v in values):
    return None
  ms = mean_std(values)
  return {"mean": ms["mean"], "sd": ms["std"], "seeds": len(values)}


def matched_weight(scores: Mapping[float, float], floor: float
                   ) -> tuple[float, bool]:
  """The smallest weight whose score reaches ``floor`` (``True``), else the
  weight with the highest score (``False``): methods compared at equal
  utility, each paying the least regularisation that buys it."""
  if not scores:
    raise ValueError("no weights to choose from")
  ok = sorted(w for w, s in scores.items() if s >= floor)
  if ok:
    return ok[0], True
  return max(sorted(scores), key=lambda w: scores[w]), False


SWEEPS = ("until_matched", "grid")
# The comparison's methods (:func:`immunize_methods`), in training order.
METHODS = ("none", "max", "imma_sequential", "imma_joint", "mima",
           "mima_average_merge")


def match_utility(train_at: Callable, weights: Sequence[float], *,
                  utility: Callable[[Any], float], floor: float,
                  unweighted: Sequence[str] = ("none",),
                  sweep: str = "until_matched"):
  """Every method kept at its :func:`matched_weight` of ``weights``.

  Args:
    train_at: ``train_at(w, methods) -> ({method: params}, {method:
      seconds})``; ``methods`` names the methods to train at ``w`` (None:
      every method).
    weights: the grid, tried in increasing order; with one weight nothing
      is selected.
    utility: ``utility(params) -> float`` on a selection draw (not the one
      reported).
    floor: the utility every method should keep.
    unweighted: methods the weight does not apply to (kept at the first
      weight, the only one ``until_matched`` trains them at).
    sweep: ``"until_matched"``: after the first weight, a method is trained
      at the next weight only while its utility is below ``floor`` -- the
      same choice as the grid (the smallest weight that reaches the floor,
      else the best of all), with the larger weights skipped where the
      smaller one suffices. ``"grid"``: every method at every weight.

  Returns:
    ``(params, seconds, record)`` per method: the kept parameters, the
    seconds summed over the weights it was trained at, and
    ``{"prior_weight", "selection_matched", "swept"}`` (``swept``: the
    utility at each weight it was trained at; None where nothing was
    selected).
  """
  _checks.check_choice(sweep, SWEEPS, "sweep")
  weights = sorted(weights)
  tried = {}
  todo = None                                # None: every method
  for w in weights:
    params, wall = train_at(w, todo)
    sel = ({m: utility(p) for m, p in params.items()}
           if len(weights) > 1 else None)
    tried[w] = (params, wall, sel)
    if sweep == "until_matched" and sel is not None:
      todo = tuple(m for m, u in sel.items()
                   if m not in unweighted and u < floor)
      if not todo:
        break
  first = tried[weights[0]][0]
  out, walls, record = {}, {}, {}
  for m in first:
    at = [v for v in tried if m in tried[v][0]]
    if len(weights) == 1 or m in unweighted:
      w, ok = weights[0], None
    else:
      w, ok = matched_weight({v: tried[v][2][m] for v in at}, floor)
    out[m] = tried[w][0][m]
    walls[m] = float(sum(tried[v][1][m] for v in at))
    record[m] = {"prior_weight": None if m in unweighted else w,
                 "selection_matched": ok,
                 "swept": None if len(weights) == 1 else {
                     f"{v:g}": tried[v][2][m] for v in at}}
  return out, walls, record


def immunizers(loss_fn: Callable, *, merge: imma.Merge, upper,
               optimizer, prior_weight: float = 1.0,
               ascent_bound: float | None = None, **lower_options) -> dict:
  """The comparison's immunizers of ``loss_fn``: ``max`` (direct ascent on
  ``upper``), ``imma`` (sequential and joint IMMA), ``mima`` (merged by
  ``merge``, e.g. phi*) and ``mima_average_merge``; ``lower_options``
  (``lower``, ``inner_lr``, ``scheme``, ...) go to every bilevel one
  (:func:`immunojax.methods.imma.mima`)."""
  common = dict(upper=upper, optimizer=optimizer, prior_weight=prior_weight,
                ascent_bound=ascent_bound, **lower_options)
  return {"max": imma.max_ascent(loss_fn, upper=upper, optimizer=optimizer,
                                 prior_weight=prior_weight,
                                 ascent_bound=ascent_bound),
          "imma": imma.imma(loss_fn, **common),
          "mima": imma.mima(loss_fn, merge=merge, **common),
          "mima_average_merge": imma.mima(loss_fn, merge=imma.average_merge(),
                                          **common)}


def immunize_methods(fit: Callable, start, *, concepts: Sequence,
                     steps: int, sequential_steps: int,
                     methods: Sequence[str] | None = None):
  """The multi-concept comparison (IMMA / MIMA papers): from ``start``,
  ``max`` (direct ascent, one slot per concept), ``imma_sequential`` (IMMA
  on one concept at a time, chained, ``sequential_steps`` each),
  ``imma_joint`` (IMMA on the pooled concepts, one slot), ``mima`` and
  ``mima_average_merge`` (one slot per concept, merged); ``none`` is
  ``start`` itself.

  Args:
    fit: ``fit(name, which, params, slots, desc, steps) -> params`` trains
      immunizer ``which`` (``max``, ``imma``, ``mima``,
      ``mima_average_merge``) from ``params`` on the slot matrix ``slots``
      (rows: slots, columns: concepts) under the loop name ``name``.
    concepts: the concepts' names (progress descriptions).
    methods: the methods to train (None: all of them, ``none`` included).

  Returns:
    ``(params, seconds)`` per method (a loop's first step compiles).
  """
  c = len(concepts)
  each = jnp.eye(c)
  for m in methods or ():
    _checks.check_choice(m, METHODS, "method")
  want = lambda m: methods is None or m in methods
  out, wall = ({"none": start}, {"none": 0.0}) if want("none") else ({}, {})

  def timed(name, train):
    if not want(name):
      return
    t0 = time.perf_counter()
    out[name] = train()
    wall[name] = time.perf_counter() - t0

  def sequential():
    p = start
    for i in range(c):
      p = fit(f"imma_sequential_{i}", "imma", p, each[i:i + 1],
              f"IMMA on {concepts[i]} ({i + 1}/{c})", sequential_steps)
    return p

  timed("max", lambda: fit("max", "max", start, each, "max (direct ascent)",
                           steps))
  timed("imma_sequential", sequential)
  timed("imma_joint", lambda: fit("imma_joint", "imma", start,
                                  jnp.ones((1, c)),
                                  "IMMA on the pooled concepts", steps))
  for name in ("mima", "mima_average_merge"):
    timed(name, lambda name=name: fit(name, name, start, each,
                                      f"MIMA ({name})", steps))
  return out, wall
