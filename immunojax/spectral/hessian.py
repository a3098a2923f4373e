"""Dense Hessians and Hessian-vector products of scalar losses over pytrees.

Both functions flatten the parameter pytree with ``ravel_pytree``; the
matrix-free routines in :mod:`immunojax.spectral.lanczos` act on the same flat
vector space, so ``hessian_matrix(f, p) @ v == hvp(f, p)(v)``.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from immunojax import _checks

PyTree = Any
Matvec = Callable[[jax.Array], jax.Array]


def _flat_loss(loss_fn: Callable[..., jax.Array], params: PyTree, args):
  flat, unravel = ravel_pytree(params)

  def f(x):
    value = loss_fn(unravel(x), *args)
    if isinstance(value, tuple):
      raise ValueError(
          "loss_fn returned a tuple (a (loss, aux) pair?); the Hessian needs "
          "a scalar loss: pass `lambda *a: loss_fn(*a)[0]`")
    if jnp.ndim(value) != 0:
      raise ValueError(
          f"loss_fn must return a scalar, got shape {jnp.shape(value)}")
    return value

  return f, flat


def hessian_matrix(loss_fn: Callable[..., jax.Array], params: PyTree,
                   *args) -> jax.Array:
  """Dense Hessian of ``loss_fn(params, *args)`` w.r.t. the flattened params.

  Args:
    loss_fn: scalar function ``loss_fn(params, *args)``.
    params: any pytree of arrays; it is flattened with ``ravel_pytree``.
    *args: extra arguments passed through to ``loss_fn`` (data, labels, ...).

  Returns:
    A ``(D, D)`` array, ``D`` the total number of parameters, in the dtype of
    the flattened parameters. Memory is ``O(D^2)``: use :func:`hvp` and
    Lanczos beyond a few thousand parameters.
  """
  f, flat = _flat_loss(loss_fn, params, args)
  _checks.check_float(flat, "params")
  return jax.hessian(f)(flat)


def hvp(loss_fn: Callable[..., jax.Array], params: PyTree, *args) -> Matvec:
  """Hessian-vector-product closure of ``loss_fn`` at ``params``.

  Forward-over-reverse: the gradient is linearised once (``jax.linearize``),
  so each call costs one JVP through the backward pass and no re-run of the
  forward pass.

  Args:
    loss_fn: scalar function ``loss_fn(params, *args)``.
    params: pytree at which the Hessian is taken.
    *args: extra arguments passed through to ``loss_fn``.

  Returns:
    ``matvec(v) -> H v`` acting on flat vectors of shape ``(D,)``.
  """
  f, flat = _flat_loss(loss_fn, params, args)
  _checks.check_float(flat, "params")
  _, linear = jax.linearize(jax.grad(f), flat)
  return linear


def num_params(params: PyTree) -> int:
  """Total number of scalars in a parameter pytree."""
  return int(sum(jnp.size(x) for x in jax.tree_util.tree_leaves(params)))
