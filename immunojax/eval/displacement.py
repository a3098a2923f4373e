"""How far an attacker moves a model: the check that a simulated attacker
(a bilevel method's lower level, SOPHON's environments) is as strong as the
attacker it is evaluated against. A lower level that moves the parameters a
hundredth as far as the evaluated attack makes the hypergradient
``-grad L(theta) + O(alpha)``: the bilevel part cannot matter."""

from __future__ import annotations

from typing import Any, Callable

import jax
import optax

from immunojax.finetune import finetune

PyTree = Any


def displacement(params: PyTree, loss_fn: Callable[[PyTree, Any], jax.Array],
                 optimizer: optax.GradientTransformation, batches, *,
                 trainable=None) -> jax.Array:
  """``||theta_K - theta_0||_2`` over every leaf after fine-tuning.

  Args:
    params: the starting model ``theta_0`` (any pytree).
    loss_fn: ``loss_fn(params, batch) -> scalar`` (or ``(scalar, aux)``).
    optimizer: the attacker's optax optimizer.
    batches: ``K`` batches stacked along a leading axis (as
      :func:`immunojax.finetune.finetune` takes them).
    trainable: which leaves move (a bool pytree mask or regex patterns over
      ``a/b/c`` paths); None: all of them.

  Returns:
    The Euclidean norm of the change of all leaves (frozen ones add 0), a
    scalar of the parameters' dtype.
  """
  res = finetune(params, loss_fn, optimizer, batches, trainable=trainable,
                 check_finite=False)
  return optax.tree.norm(jax.tree_util.tree_map(
      lambda a, b: a - b, res.params, params))
