"""Collectives over a named device axis that are the identity without one.

Every immunizer built with ``axis_name=`` follows one convention: each
device computes a *local* loss whose mean over the devices is the global
loss, the gradients are :func:`pmean`-ed, and the update is the global one.
An example-mean over an equal share of the batch already is such a local
loss. A quantity that is a *nonlinear* function of sums over examples (a
feature Gram's condition number, a weighted mean with padding, GS-LoRA's
``ReLU(BND - CE_forget)``) is not: it must be formed from the global sums
first. :func:`global_sum` gives the global sum forward and, backward, a
gradient scaled so that the ``pmean`` of the per-device gradients is the
gradient of the global quantity. Normalising a gradient (a nonlinear map)
comes after the ``pmean``.

``None`` for ``axis_name`` makes every function here the identity (kfac-jax's
``pmean_if_pmap``), so methods call them unconditionally.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any


def pmean(tree: PyTree, axis_name: str | None) -> PyTree:
  """``lax.pmean`` over ``axis_name``; the identity for None."""
  return tree if axis_name is None else jax.lax.pmean(tree, axis_name)


def psum(tree: PyTree, axis_name: str | None) -> PyTree:
  """``lax.psum`` over ``axis_name``; the identity for None."""
  return tree if axis_name is None else jax.lax.psum(tree, axis_name)


def axis_size(axis_name: str | None) -> int:
  """Devices along ``axis_name`` (1 for None)."""
  return 1 if axis_name is None else jax.lax.axis_size(axis_name)


def axis_index(axis_name: str | None):
  """This device's position along ``axis_name`` (0 for None)."""
  return 0 if axis_name is None else jax.lax.axis_index(axis_name)


def global_sum(local: PyTree, axis_name: str | None) -> PyTree:
  """The sum of ``local`` over the axis, differentiable under the pmean
  convention.

  Forward: ``psum(local)`` on every device. Backward: ``N * d local``
  (``N`` devices), so that ``pmean`` over the devices of the gradient of
  ``f(global_sum(s))`` is ``f'(S) * sum_i ds_i``, the gradient of the global
  ``f(S)``. No collective is differentiated (the sum sits under
  ``stop_gradient``), so this holds whether or not the ``shard_map`` checks
  replication. The identity for None.
  """
  if axis_name is None:
    return local
  n = jax.lax.axis_size(axis_name)

  def one(x):
    share = n * x
    return share + jax.lax.stop_gradient(jax.lax.psum(x, axis_name) - share)
  return jax.tree_util.tree_map(one, local)


def weighted_mean(values: jax.Array, weights: jax.Array | None,
                  axis_name: str | None) -> jax.Array:
  """``sum w * v / sum w`` over every device's examples (the plain mean
  without weights), under the pmean convention of :func:`global_sum`."""
  if weights is None:
    weights = jnp.ones_like(values)
  total = global_sum(jnp.sum(weights * values), axis_name)
  count = jax.lax.stop_gradient(global_sum(jnp.sum(weights), axis_name))
  return total / jnp.maximum(count, 1e-12)
