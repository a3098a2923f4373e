"""Operators on parameter pytrees with explicit parameters (matfree style).

A *matvec* here is ``matvec(v, *params) -> same pytree as v``: the operator's
data (a model's parameters, a batch) are arguments, not a closure, so solvers
can linearise it, differentiate through ``params`` and jit it once for many
parameter values. :func:`hessian_matvec` builds the Hessian-vector product of
a loss this way. The flat-vector API (:func:`immunojax.spectral.hvp`,
:func:`immunojax.spectral.lanczos`) stays as a layer for dense-matrix users.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

PyTree = Any
TreeMatvec = Callable[..., PyTree]


def hessian_matvec(loss_fn: Callable[..., jax.Array]) -> TreeMatvec:
  """Hessian-vector product of ``loss_fn`` as ``matvec(v, params, *args)``.

  Forward-over-reverse on the parameter pytree itself (no flattening inside
  the model's autodiff). Solvers in :mod:`immunojax.spectral.eigensolver`
  linearise it once in ``v`` so the forward and backward passes at ``params``
  are not recomputed for every product.

  Args:
    loss_fn: scalar ``loss_fn(params, *args)``.

  Returns:
    ``matvec(v, params, *args)``: ``H(params, *args) v`` with ``v`` shaped
    like ``params``; differentiable in ``params`` and ``args``.
  """
  def matvec(v, params, *args):
    grad = lambda p: jax.grad(loss_fn)(p, *args)
    return jax.jvp(grad, (params,), (v,))[1]

  return matvec


def tree_vdot(a: PyTree, b: PyTree) -> jax.Array:
  """``sum_leaves <a, b>`` accumulated in the wider of the two dtypes."""
  parts = [jnp.vdot(x, y) for x, y in zip(jax.tree_util.tree_leaves(a),
                                          jax.tree_util.tree_leaves(b))]
  return sum(parts[1:], parts[0])


def random_vector(key: jax.Array, like: PyTree) -> PyTree:
  """A standard normal pytree shaped and typed like ``like`` (a start vector)."""
  leaves, treedef = jax.tree_util.tree_flatten(like)
  keys = jax.random.split(key, len(leaves))
  return jax.tree_util.tree_unflatten(treedef, [
      jax.random.normal(k, jnp.shape(x), jnp.result_type(x))
      for k, x in zip(keys, leaves)])
