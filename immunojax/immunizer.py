"""The method contract: every immunization method is an :class:`Immunizer`.

optax-style, a method is a keyword-only factory returning a pure pair::

    imm = cond_num.linear(problem, lambda_p=10.0, lambda_h=10.0, ...)
    state = imm.init(params, key)
    state, metrics = jax.jit(imm.update)(state, batch, key)
    params = imm.params(state)

Everything a method needs besides the per-step batch (Grams, harmful sets,
attacker sets, hyper-parameters) goes in at construction; ``update`` is pure
and jit-able, and its ``batch`` is whatever the method consumes per step
(documented by each factory). Factories take an optional ``axis_name``: the
batch's rows are then spread over that named device axis, and the method
keeps its meaning -- every family's ``update`` on N devices equals its
one-device ``update`` on the whole batch (``tests/test_parallel.py``, 8
devices, float64, to 1e-16). Losses that are example means are averaged
(:func:`immunojax.parallel.pmean` of the gradients); quantities that do not
split over examples (Grams, weighted means with padding, a ReLU of a mean)
are formed from global sums first (:func:`immunojax.parallel.global_sum`),
and a gradient is normalised only after it is averaged. A user's loss given
to a method must be a mean over its batch's examples for this to hold.
:func:`immunojax.parallel.per_device` runs such an immunizer under
``shard_map`` (with ``check_vma=False``: JAX's replication checking would
already sum the gradients of replicated parameters, and the ``pmean`` would
count them once per device); ``vmap(..., axis_name=)`` simulates workers.
Without ``axis_name``, :func:`immunojax.parallel.data_parallel` shards by
compiler propagation.

:func:`descend` builds the common case, an optimizer following a direction
(a gradient plus regularizer terms); :func:`supervised` is plain training
(pre-training), an immunizer with no regularizer.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import optax

from immunojax import masks
from immunojax.parallel.collectives import pmean

PyTree = Any


class Immunizer(NamedTuple):
  """``init(params, key) -> state``; ``update(state, batch, key) -> (state,
  metrics)``; ``params(state) -> params`` reads the model back."""
  init: Callable[[PyTree, jax.Array], PyTree]
  update: Callable[[PyTree, Any, jax.Array], tuple[PyTree, dict]]
  params: Callable[[PyTree], PyTree]


class TrainState(NamedTuple):
  """State of an optimizer-driven immunizer."""
  params: PyTree
  opt_state: PyTree


def descend(direction: Callable[[PyTree, Any, jax.Array], tuple[PyTree, dict]],
            optimizer: optax.GradientTransformation, *, trainable=None,
            axis_name: str | None = None) -> Immunizer:
  """An immunizer that feeds ``direction`` to ``optimizer`` each step.

  Args:
    direction: ``direction(params, batch, key) -> (updates_like_grads,
      metrics)``: the descent direction (gradient of the task loss plus any
      regularizer terms) with the params' structure.
    optimizer: an optax transformation (e.g. ``optax.sgd(eta)``: Algorithm
      1's ``theta <- theta - eta * direction``).
    trainable: None, a bool mask pytree or regex pattern(s): the rest is
      frozen (``optax.selective_transform``).
    axis_name: ``lax.pmean`` the direction and metrics over this axis.
  """
  def init(params, key):
    del key
    mask = masks.resolve(trainable, params)
    return TrainState(params, masks.only(optimizer, mask).init(params))

  def update(state, batch, key):
    mask = masks.resolve(trainable, state.params)
    g, metrics = pmean(direction(state.params, batch, key), axis_name)
    u, opt_state = masks.only(optimizer, mask).update(g, state.opt_state,
                                                      state.params)
    return TrainState(optax.apply_updates(state.params, u), opt_state), metrics

  return Immunizer(init, update, lambda state: state.params)


def supervised(loss_fn: Callable[[PyTree, Any], jax.Array],
               optimizer: optax.GradientTransformation, *, trainable=None,
               axis_name: str | None = None) -> Immunizer:
  """Plain training on ``loss_fn(params, batch)`` (pre-training a model).

  ``update``'s metrics are ``{"loss": value}``.
  """
  def direction(params, batch, key):
    del key
    value, g = jax.value_and_grad(loss_fn)(params, batch)
    return g, {"loss": value}

  return descend(direction, optimizer, trainable=trainable,
                 axis_name=axis_name)


def run_steps(update: Callable[[PyTree, Any, jax.Array], tuple[PyTree, dict]],
              state: PyTree, batch_fn: Callable[[jax.Array], Any],
              key: jax.Array, *, steps, max_steps: int
              ) -> tuple[PyTree, dict]:
  """``steps`` updates inside one ``lax.scan`` of static length
  ``max_steps``, so a step count that is traced (a data set's size, an
  epoch count) needs no new compilation.

  Step ``t < steps`` is ``update(state, batch_fn(t), fold_in(key, t))``;
  later iterations pass the state through and log zero metrics.

  Args:
    update: an :class:`Immunizer`'s ``update`` (or any of that shape).
    batch_fn: ``t -> batch`` (e.g. padded positions into a data set).
    steps: how many steps run (may be traced); at most ``max_steps``.

  Returns:
    ``(state, metrics)`` with metrics stacked along a leading
    ``max_steps`` axis.
  """
  shapes = jax.eval_shape(lambda s: update(s, batch_fn(0), key)[1], state)
  zeros = jax.tree_util.tree_map(lambda s: jax.numpy.zeros(s.shape, s.dtype),
                                 shapes)

  def body(state, t):
    return jax.lax.cond(
        t < steps,
        lambda s: update(s, batch_fn(t), jax.random.fold_in(key, t)),
        lambda s: (s, zeros), state)

  return jax.lax.scan(body, state, jax.numpy.arange(max_steps))
