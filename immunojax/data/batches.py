"""Mini-batches as a pure function of ``(key, step)``.

Because the batch of step ``t`` depends only on the key and ``t``, a saved
step number is a complete data-iterator position: a resumed run sees exactly
the batches an uninterrupted one would.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def batch_indices(key: jax.Array, num_examples: int, batch_size: int,
                  step, *, drop_last: bool = True) -> jax.Array:
  """Indices of the batch at ``step`` of a reshuffled-every-epoch stream.

  Epoch ``e = step // steps_per_epoch`` is a fresh permutation drawn from
  ``fold_in(key, e)``; ``drop_last`` (the only mode, for static shapes) drops
  the ``num_examples % batch_size`` tail of each epoch.

  Returns:
    ``(batch_size,)`` int32 indices; jit-able with a traced ``step``.
  """
  if not drop_last:
    raise ValueError("only drop_last=True is supported (static batch shapes)")
  if not 0 < batch_size <= num_examples:
    raise ValueError(f"batch_size must be in [1, {num_examples}], got "
                     f"{batch_size}")
  per_epoch = num_examples // batch_size
  epoch, pos = step // per_epoch, step % per_epoch
  perm = jax.random.permutation(jax.random.fold_in(key, epoch), num_examples)
  return jax.lax.dynamic_slice_in_dim(perm, pos * batch_size, batch_size)


def padded_batch_positions(key: jax.Array, num_valid, size: int,
                           batch_size: int, step, per_epoch):
  """Positions and weights of batch ``step`` of a reshuffled-every-epoch
  stream over the first ``num_valid`` of ``size`` padded entries.

  Unlike :func:`batch_indices`, ``num_valid`` and ``per_epoch`` may be
  traced (one compilation serves sets of every size up to ``size``) and an
  epoch's last batch may be ragged: its slots past ``num_valid`` get weight 0
  (PyTorch's loader keeps the ragged batch; weighted means make it exact).
  Epoch ``step // per_epoch`` is a permutation drawn from
  ``fold_in(key, epoch)``.

  Returns:
    ``(positions, weights)``: ``(batch_size,)`` int32 positions into the
    padded array and float32 weights (1 real, 0 padding).
  """
  epoch, pos = step // per_epoch, step % per_epoch
  u = jax.random.uniform(jax.random.fold_in(key, epoch), (size,))
  perm = jnp.argsort(jnp.where(jnp.arange(size) < num_valid, u, 2.0))
  slot = pos * batch_size + jnp.arange(batch_size)
  return (perm[jnp.minimum(slot, size - 1)],
          (slot < num_valid).astype(jnp.float32))


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
  return num_examples // batch_size


def take(tree, indices):
  """Gathers rows ``indices`` from every array of a pytree of datasets."""
  return jax.tree_util.tree_map(lambda a: jnp.take(a, indices, axis=0), tree)


def batch_block(key: jax.Array, arrays, batch_size: int, step, count: int):
  """The ``count`` minibatches of steps ``step * count ... + count - 1``,
  stacked: leaves of shape ``(count, batch_size, ...)`` (e.g. the ``K``
  batches of one simulated fine-tuning run)."""
  n = jax.tree_util.tree_leaves(arrays)[0].shape[0]
  idx = jax.vmap(lambda s: batch_indices(key, n, batch_size, s))(
      step * count + jnp.arange(count))
  return take(arrays, idx)


def minibatch(key: jax.Array, arrays, batch_size: int, step):
  """Rows :func:`batch_indices` picks at ``step``, from every array of the
  pytree ``arrays`` (leading example axis shared)."""
  n = jax.tree_util.tree_leaves(arrays)[0].shape[0]
  return take(arrays, batch_indices(key, n, batch_size, step))
