"""IMMA and MIMA: immunization against adaptation as a bilevel program.

Upper level: raise the adaptation loss ``L`` on the immunized parameters
``S^u``. Lower level: the attacker's adaptation, one per concept, on its
parameter set ``S^l``; MIMA fuses the concept copies with a
:class:`~immunojax.methods.imma.merge.Merge` before the upper loss::

  max_{theta in S^u}  sum_n L(x^u_n; Merge({theta'_n}))  [- lam L(prior)]
  s.t. theta'_n = argmin_{theta in S^l} L(x^l_n; theta)

Two ways to approximate it (spec ``imma_mima.md`` §2.2 and §2.4):

* ``"unrolled"`` (the paper's Algorithm 1, default): each update copies
  ``theta``, runs ``K`` steps of the lower level per concept with the
  core's :func:`~immunojax.modes.adapt` (vmapped over concepts; plain SGD
  as in the paper, or any ``inner_optimizer`` -- e.g. the attacker's Adam),
  merges the copies, and differentiates the upper loss through the merge
  and the inner steps (second order; ``first_order=True`` stops the inner
  gradients, FOMAML-style). The upper loss is read after the ``K``-th step
  (the paper) or averaged over the merged models after steps ``0..K``
  (``upper_at="every_step"``, as SOPHON scores every step). Only ``S^u`` is
  written back.
* ``"alternating"`` (the released scripts): persistent, first order. Each
  update takes ``K`` lower steps on the *live* model (the merged leaves get
  ``Merge(theta, {theta - alpha g_n})``, the rest of ``S^l`` one
  ``inner_optimizer`` step with the concept-mean gradient), then one upper
  step on the live model. :func:`released` is the base model with ``S^u``
  from the live one (what the IMMA scripts save).

IMMA is MIMA with one concept and no merge (:func:`imma`); ``max`` (IMMA's
``--max``) ascends the loss with no lower level (:func:`max_ascent`).

Batches: ``update(state, batch, key)`` takes ``batch = {"lower": L,
"upper": U}`` and optionally ``"prior"``: ``L`` leaves ``(N, K, ...)`` (N
concepts, K inner steps, each step one batch for ``loss_fn``), ``U`` leaves
``(N, ...)``, ``prior`` one batch (utility, e.g. non-target data) whose loss
is *descended* with weight ``prior_weight``.
"""

from __future__ import annotations

from typing import Any, Callable, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from immunojax import _checks, masks, modes
from immunojax.immunizer import Immunizer, descend
from immunojax.optimizers import make_optimizer
from immunojax.methods.imma.merge import Merge, single
from immunojax.parallel.collectives import pmean

PyTree = Any
SCHEMES = ("unrolled", "alternating")
Scheme = Literal["unrolled", "alternating"]
PRIOR_AT = ("adapted", "released")
PriorAt = Literal["adapted", "released"]
UPPER_AT = ("final", "every_step")
UpperAt = Literal["final", "every_step"]


def _upper_loss(loss_fn, params, batch, prior_weight, ascent_bound=None,
                prior_params=None):
  """``-mean_n L(upper_n) + prior_weight * L(prior)`` and its parts; with
  ``ascent_bound`` B each concept's term is ``min(L_n, B)`` (the ascent
  stops at B: ``ReLU(B - L_n) - B``). The prior is read at
  ``prior_params`` (default ``params``)."""
  per_concept = jax.vmap(lambda b: loss_fn(params, b))(batch["upper"])
  inst = jnp.mean(per_concept)
  total = -(inst if ascent_bound is None
            else jnp.mean(jnp.minimum(per_concept, ascent_bound)))
  metrics = {"upper_loss": inst}
  if "prior" in batch:
    prior = loss_fn(params if prior_params is None else prior_params,
                    batch["prior"])
    total = total + prior_weight * prior
    metrics["prior_loss"] = prior
  return total, metrics


def max_ascent(loss_fn: Callable[[PyTree, Any], jax.Array], *,
               upper, optimizer: optax.GradientTransformation,
               prior_weight: float = 1.0,
               ascent_bound: float | None = None,
               axis_name: str | None = None) -> Immunizer:
  """Direct maximisation (IMMA's ``--max`` baseline): ascend the concept
  loss on ``S^u`` with no simulated attacker. Uses ``batch["upper"]`` (and
  ``"prior"``); a ``"lower"`` entry is ignored.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar`` (the adaptation loss).
    upper: ``S^u``: a bool mask or regex pattern(s).
    optimizer: the upper optimizer (as released: clip 1.0 then AdamW).
    prior_weight: weight of the descended prior loss.
    ascent_bound: stop ascending a concept's loss at this value (None:
      unbounded, as released).
    axis_name: average gradients over this named axis.
  """
  _check_bound(ascent_bound)

  def direction(params, batch, key):
    del key
    (_, metrics), g = jax.value_and_grad(
        lambda p: _upper_loss(loss_fn, p, batch, prior_weight, ascent_bound),
        has_aux=True)(params)
    return g, metrics

  return descend(direction, optimizer, trainable=upper, axis_name=axis_name)


def _check_bound(ascent_bound):
  if ascent_bound is not None and not ascent_bound > 0:
    raise ValueError(f"ascent_bound must be > 0 (or None), got "
                     f"{ascent_bound}")


class AlternatingState(NamedTuple):
  """The released scheme's state: the frozen base, the live model both
  levels move, and the two optimizer states."""
  base: PyTree
  params: PyTree
  inner_state: PyTree
  upper_state: PyTree


def released(state: AlternatingState, upper_mask: PyTree) -> PyTree:
  """The base model with the ``S^u`` leaves of the live one."""
  return jax.tree_util.tree_map(lambda m, b, p: p if m else b, upper_mask,
                                state.base, state.params)


def mima(loss_fn: Callable[[PyTree, Any], jax.Array], *, merge: Merge,
         upper, lower: modes.AttackerMode, inner_lr: float,
         optimizer: optax.GradientTransformation,
         inner_optimizer=None,
         scheme: Scheme = "unrolled", first_order: bool = False,
         prior_weight: float = 1.0, ascent_bound: float | None = None,
         prior_at: PriorAt = "adapted", upper_at: UpperAt = "final",
         remat: bool | str = False,
         axis_name: str | None = None,
         concept_map: Callable = jax.vmap) -> Immunizer:
  """MIMA (or IMMA with ``merge=single()``) as an Immunizer.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar``: the adaptation loss (the
      epsilon-prediction MSE), used by both levels.
    merge: how the per-concept copies become one model.
    upper: ``S^u``, a bool mask or regex pattern(s) over parameter paths.
    lower: the simulated attacker's :class:`~immunojax.modes.AttackerMode`
      (``S^l``); ``"alternating"`` needs one that moves the parameters
      themselves (``full`` / ``masked`` / ``head``), not adapters.
    inner_lr: ``alpha``, the lower level's rate (both schemes use it for the
      copies the merge sees).
    optimizer: the upper optimizer on ``S^u`` (as released: clip 1.0, AdamW
      with weight decay 1e-2).
    inner_optimizer: ``"unrolled"``: the simulated attacker's optimizer for
      the ``K`` unrolled steps, any value
      :func:`immunojax.optimizers.make_optimizer` takes, at ``inner_lr``
      (default plain SGD, the paper; ``"adam"`` simulates an Adam attacker --
      for second order prefer :func:`inner_optimizer` ``("adam")``, whose
      derivative stays finite where a gradient is exactly 0).
      ``"alternating"``: the persistent optax optimizer of the unmerged
      ``S^l`` leaves (default AdamW(inner_lr, wd 1e-2), as released).
    scheme: ``"unrolled"`` (the paper) or ``"alternating"`` (the code).
    first_order: ``"unrolled"`` only: stop gradients through the inner
      gradients.
    prior_weight: weight of the descended prior loss (0: the paper's pure
      objective).
    ascent_bound: ``B``: each concept's ascended loss counts up to ``B``
      only (``ReLU(B - L) - B``), so the ascent cannot grow without bound
      and trade the prior away (None: unbounded, as released).
    prior_at: ``"unrolled"`` only: where the prior loss is read --
      ``"adapted"`` (the merged, adapted model, as the paper writes the
      objective) or ``"released"`` (the parameters being trained, the
      model a user receives: the adapted copies cannot hide a released
      model that lost the prior).
    upper_at: ``"unrolled"`` only: where the ascended loss is read --
      ``"final"`` (after the ``K``-th inner step, the paper) or
      ``"every_step"`` (the mean over the merged models after steps
      ``0..K``: a model that is protected only after exactly ``K`` steps,
      or only before any, scores badly).
    remat: passed to the inner fine-tuning (``"unrolled"``).
    axis_name: every batch's rows are spread over this named axis: the
      lower level's and the upper level's gradients are averaged over it,
      so an update equals the one-device update (``loss_fn`` must be a
      mean over its batch's examples).
    concept_map: how the per-concept adaptations are mapped: ``jax.vmap``
      (default), or :func:`immunojax.parallel.sharded_vmap` to spread the
      concepts over devices (same result).
  """
  _checks.check_choice(scheme, SCHEMES, "scheme")
  _check_bound(ascent_bound)
  _checks.check_choice(prior_at, PRIOR_AT, "prior_at")
  _checks.check_choice(upper_at, UPPER_AT, "upper_at")
  if not inner_lr >= 0:
    raise ValueError(f"inner_lr must be >= 0, got {inner_lr}")
  if scheme == "unrolled":
    inner = lower_optimizer(inner_optimizer, inner_lr)
    return _unrolled(loss_fn, merge, upper, lower, inner, optimizer,
                     first_order, prior_weight, ascent_bound, prior_at,
                     upper_at, remat, axis_name, concept_map)
  if lower.name not in ("full", "masked", "head"):
    raise ValueError(f"scheme 'alternating' moves the live parameters; lower "
                     f"mode {lower.name!r} trains separate adapters (use "
                     "scheme 'unrolled', or a masked lower level)")
  if prior_at != "adapted":
    raise ValueError("prior_at='released' applies to scheme 'unrolled' only "
                     "(the alternating scheme reads it at the live model)")
  if upper_at != "final":
    raise ValueError("upper_at='every_step' applies to scheme 'unrolled' "
                     "only (the alternating scheme reads the upper loss once, "
                     "after its lower steps)")
  if first_order is not False or remat is not False:
    raise ValueError("first_order and remat apply to scheme 'unrolled' only "
                     "(the alternating scheme is first order)")
  return _alternating(loss_fn, merge, upper, lower, inner_lr,
                      optimizer, inner_optimizer or optax.adamw(
                          inner_lr, weight_decay=1e-2), prior_weight,
                      ascent_bound, axis_name, concept_map)


def imma(loss_fn: Callable[[PyTree, Any], jax.Array], **options
         ) -> Immunizer:
  """IMMA: :func:`mima` with one concept and no merge (``batch["lower"]``
  and ``batch["upper"]`` have a leading axis of 1). For several concepts
  pooled into one lower level (the ``imma_joint`` baseline), sample each
  batch from the union of their data."""
  if "merge" in options:
    raise ValueError("imma takes no merge (it is mima with merge=single())")
  return mima(loss_fn, merge=single(), **options)


def inner_optimizer(name: str):
  """The unrolled lower level's optimizer by name, for ``inner_optimizer``:
  None (plain SGD, the paper) for ``"sgd"``; for ``"adam"`` Adam with
  ``eps_root`` 1e-16, whose derivative stays finite where a gradient is
  exactly 0 (second order); any other name as it is."""
  if name == "sgd":
    return None
  if name == "adam":
    return lambda lr: optax.adam(lr, eps_root=1e-16)
  return name


def lower_optimizer(inner_optimizer, inner_lr) -> optax.GradientTransformation:
  """The unrolled lower level's transformation at ``inner_lr``: plain SGD
  (the paper) when ``inner_optimizer`` is None, else
  :func:`immunojax.optimizers.make_optimizer` of it -- the simulated
  attacker :func:`mima` unrolls, for whoever measures it."""
  return (optax.sgd(inner_lr) if inner_optimizer is None
          else make_optimizer(inner_optimizer, inner_lr))


def _unrolled(loss_fn, merge, upper, lower, inner, optimizer, first_order,
              prior_weight, ascent_bound, prior_at, upper_at, remat,
              axis_name, concept_map):
  # every_step: the model after each inner step (steps 0..K) comes back as
  # the fine-tuning's evaluations, leaves (K + 1, ...) per concept.
  trace = ({"eval_fn": lambda q: q, "eval_every": 1}
           if upper_at == "every_step" else {})

  def direction(params, batch, key):
    n = jax.tree_util.tree_leaves(batch["lower"])[0].shape[0]

    def objective(p):
      def adapt_one(b, k):
        return modes.adapt(lower, p, loss_fn, inner, b, key=k,
                           first_order=first_order, remat=remat,
                           axis_name=axis_name, check_finite=False, **trace)
      res = concept_map(adapt_one)(batch["lower"], jax.random.split(key, n))

      def upper_loss(copies):            # copies: leaves (N, ...)
        return _upper_loss(loss_fn, merge.apply(p, copies), batch,
                           prior_weight, ascent_bound,
                           p if prior_at == "released" else None)

      if upper_at == "final":
        total, metrics = upper_loss(res.params)
      else:
        steps_first = jax.tree_util.tree_map(
            lambda a: jnp.swapaxes(a, 0, 1), res.evals)
        totals, per_step = jax.lax.map(upper_loss, steps_first)
        total = jnp.mean(totals)
        metrics = jax.tree_util.tree_map(jnp.mean, per_step)
      return total, {"inner_loss": jnp.mean(res.metrics["loss"]), **metrics}

    (_, metrics), g = jax.value_and_grad(objective, has_aux=True)(params)
    return g, metrics

  return descend(direction, optimizer, trainable=upper, axis_name=axis_name)


def _alternating(loss_fn, merge, upper, lower, inner_lr, optimizer,
                 inner_optimizer, prior_weight, ascent_bound, axis_name,
                 concept_map):
  def sets(params):
    lower_mask = lower.prepare(params, jax.random.PRNGKey(0)).mask
    if lower_mask is None:
      lower_mask = jax.tree_util.tree_map(lambda _: True, params)
    merged = (masks.mask_from_patterns(params, merge.merged) if merge.merged
              else jax.tree_util.tree_map(lambda _: False, params))
    rest = jax.tree_util.tree_map(lambda l, m: l and not m, lower_mask,
                                  merged)
    merged = jax.tree_util.tree_map(lambda l, m: l and m, lower_mask, merged)
    return masks.resolve(upper, params), merged, rest

  def init(params, key):
    del key
    upper_mask, _, rest = sets(params)
    return AlternatingState(params, params,
                            masks.only(inner_optimizer, rest).init(params),
                            masks.only(optimizer, upper_mask).init(params))

  def update(state, batch, key):
    del key
    upper_mask, merged_mask, rest = sets(state.params)
    inner = masks.only(inner_optimizer, rest)
    outer = masks.only(optimizer, upper_mask)

    def lower_step(carry, b):              # b: leaves (N, ...)
      p, s = carry
      losses, g = pmean(concept_map(jax.value_and_grad(loss_fn),
                                    in_axes=(None, 0))(p, b), axis_name)
      copies = jax.tree_util.tree_map(lambda w, gn: w[None] - inner_lr * gn,
                                      p, g)
      fused = merge.apply(p, copies)
      p = jax.tree_util.tree_map(lambda m, w, f: f if m else w, merged_mask,
                                 p, fused)
      u, s = inner.update(jax.tree_util.tree_map(
          lambda gn: jnp.mean(gn, axis=0), g), s, p)
      return (optax.apply_updates(p, u), s), jnp.mean(losses)

    steps_first = jax.tree_util.tree_map(lambda a: jnp.swapaxes(a, 0, 1),
                                         batch["lower"])
    (params, inner_state), inner_losses = jax.lax.scan(
        lower_step, (state.params, state.inner_state), steps_first)
    (_, metrics), g = pmean(jax.value_and_grad(
        lambda p: _upper_loss(loss_fn, p, batch, prior_weight, ascent_bound),
        has_aux=True)(params), axis_name)
    u, upper_state = outer.update(g, state.upper_state, params)
    params = optax.apply_updates(params, u)
    return (AlternatingState(state.base, params, inner_state, upper_state),
            {"inner_loss": jnp.mean(inner_losses), **metrics})

  def params_of(state):
    return released(state, masks.resolve(upper, state.params))

  return Immunizer(init, update, params_of)
