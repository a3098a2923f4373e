"""Small Flax NNX networks and a bridge from modules to pure functions.

The core works on parameter pytrees; :func:`functional` turns any NNX module
into ``apply(params, *args)`` plus its parameters as a plain nested dict, so
``finetune``, ``lora`` and the attack harness never see module objects.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx


def functional(module: nnx.Module, method: str = "__call__"
               ) -> tuple[Callable, dict]:
  """``(apply, params)``: ``apply(params, *args)`` calls ``module.method``
  (default the module itself) with ``params`` (a pure dict of its
  ``nnx.Param`` values); other state (e.g. batch statistics) is frozen at its
  current value."""
  graphdef, param_state, rest = nnx.split(module, nnx.Param, ...)
  params = nnx.to_pure_dict(param_state)

  def apply(p, *args, **kwargs):
    state = jax.tree_util.tree_map(lambda a: a, param_state)  # fresh copy
    nnx.replace_by_pure_dict(state, p)
    return getattr(nnx.merge(graphdef, state, rest), method)(*args, **kwargs)

  return apply, params


class MLP(nnx.Module):
  """``x -> [dense -> act]* -> head``; the last layer is named ``head``."""

  def __init__(self, sizes: Sequence[int], *, rngs: nnx.Rngs,
               activation: Callable = jax.nn.relu):
    if len(sizes) < 2:
      raise ValueError(f"MLP needs at least (in, out) sizes, got {sizes}")
    self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs)
                            for a, b in zip(sizes[:-2], sizes[1:-1])])
    self.head = nnx.Linear(sizes[-2], sizes[-1], rngs=rngs)
    self.activation = activation

  def features(self, x):
    for layer in self.layers:
      x = self.activation(layer(x))
    return x

  def __call__(self, x):
    return self.head(self.features(x))


def mlp_size(sizes: Sequence[int]) -> int:
  """Number of parameters of ``MLP(sizes)`` (kernels and biases)."""
  return sum((a + 1) * b for a, b in zip(sizes[:-1], sizes[1:]))


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return jnp.mean(jnp.argmax(logits, axis=-1) == labels)
