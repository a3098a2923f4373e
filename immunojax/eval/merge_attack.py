"""The attack a merge layer is for: adapt one copy of a model per concept,
then merge the copies (Custom Diffusion's recipe, MIMA's threat model).

:func:`merged_attack` fine-tunes a start model separately on each concept's
data -- the same batches, seed and attacker as the harness's per-concept
attack (:func:`immunojax.attacks.run_attacks`), so each copy's trajectory
is the one that attack follows -- and at every checkpoint merges the ``N``
copies with a merge rule (e.g. MIMA's closed-form phi*,
:func:`immunojax.methods.imma.concept_merge`) and scores the merged model.
A defense trained against averaging can then be read against the merge an
attacker would really use.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from immunojax import modes
from immunojax.data import batch_indices, take

PyTree = Any


def merged_attack(start: PyTree, *, attacker: modes.AttackerMode,
                  loss_fn: Callable[[PyTree, Any], jax.Array],
                  optimizer: optax.GradientTransformation,
                  train_data: PyTree, batch_size: int, steps: int,
                  eval_every: int,
                  merge: Callable[[PyTree, PyTree], PyTree],
                  metric_fn: Callable[[PyTree], PyTree],
                  seed: int = 0) -> PyTree:
  """The metric of the merged model along ``N`` per-concept attacks.

  Args:
    start: the attacked model's parameters.
    attacker: what each copy trains (e.g. ``modes.masked`` on the
      cross-attention key/value kernels).
    loss_fn: ``loss_fn(params, batch) -> scalar``.
    optimizer: the attacker's optax optimizer (one per copy).
    train_data: leaves ``(N, n, ...)``: concept ``i``'s ``n`` training rows.
    batch_size, steps, eval_every: the attack's budget; ``eval_every``
      divides ``steps``.
    merge: ``merge(start, adapted) -> params`` with ``adapted`` the copies
      stacked on a leading axis of ``N`` (a
      :class:`~immunojax.methods.imma.Merge`'s ``apply``).
    metric_fn: ``metric_fn(params) -> pytree`` of the merged model.
    seed: the attack seed; with the harness's conventions (``init, data =
      split(PRNGKey(seed))``) every copy draws what the harness's attack on
      that concept alone draws.

  Returns:
    ``metric_fn``'s output stacked over the ``steps // eval_every + 1``
    checkpoints (the first is the merge of ``N`` unchanged copies); NaN
    from the first checkpoint whose merged parameters are not finite.
  """
  if steps % eval_every:
    raise ValueError(f"eval_every={eval_every} does not divide the {steps} "
                     "attack steps")
  init_key, data_key = jax.random.split(jax.random.PRNGKey(seed))

  def one(data):
    n = jax.tree_util.tree_leaves(data)[0].shape[0]
    idx = jax.vmap(lambda t: batch_indices(data_key, n, batch_size, t))(
        jnp.arange(steps))
    res = modes.adapt(attacker, start, loss_fn, optimizer, take(data, idx),
                      key=init_key, eval_fn=lambda p: p,
                      eval_every=eval_every, check_finite=False)
    return res.evals                       # leaves (checkpoints, ...)

  copies = jax.vmap(one)(train_data)       # leaves (N, checkpoints, ...)
  checkpoints = steps // eval_every + 1

  def at(e):
    merged = merge(start, jax.tree_util.tree_map(lambda a: a[:, e], copies))
    finite = jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x)) for x in
                                  jax.tree_util.tree_leaves(merged)]))
    return metric_fn(merged), finite

  metric, finite = jax.lax.map(at, jnp.arange(checkpoints))
  # As the harness does: a diverged model's metric is no data point (NaN
  # logits score as chance accuracy), NaN from the first non-finite merge.
  finite = jnp.cumprod(finite.astype(jnp.int32)).astype(bool)
  return jax.tree_util.tree_map(lambda m: jnp.where(
      finite.reshape(finite.shape + (1,) * (m.ndim - 1)), m, jnp.nan),
      metric)
