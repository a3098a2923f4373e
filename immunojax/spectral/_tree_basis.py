"""A Krylov basis stored leaf by leaf and in chunks of rows.

Two measured choices (1M-parameter MLP, float64, our 2-core CPU):

* **Leaf by leaf**: each chunk is a pytree shaped like the vectors with a
  leading row axis, so a product never flattens or unflattens. Wrapping the
  Hessian-vector product in a flatten/unflatten pair cost +19% to +53% per
  product (+86% when XLA fused the concatenation into the product).
* **In chunks of ``CHUNK`` rows**, each its own array: XLA:CPU copies any
  dynamic or static slice of rows before a matrix-vector product (a sweep over
  20 rows of a 151-row array: 75-125 ms against 23 ms for two separate
  16-row arrays), so a sweep visits whole chunks, skipping unfilled ones with
  ``lax.cond`` (which does not copy its operands). A basis of at most
  ``SINGLE`` rows (a restarted one) is one chunk.

Writing a row must not go through ``lax.cond`` either: a cond that returns
a chunk copies it in its pass-through branch (4 ms per 16-row chunk per step
at 1M parameters). So each chunk of a multi-chunk basis carries one scratch
row after its ``CHUNK`` rows: every step writes the new vector into every
chunk, at its row in the chunk that holds it and at the scratch row in the
others; sweeps never read scratch rows.

A basis is a tuple of chunks; row ``i`` lives in chunk ``i // CHUNK``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any
CHUNK = 16
SINGLE = 64


def tmap(f, *trees):
  return jax.tree_util.tree_map(f, *trees)


def leaves(tree):
  return jax.tree_util.tree_leaves(tree)


def dot(a: PyTree, b: PyTree) -> jax.Array:
  parts = [jnp.vdot(x, y) for x, y in zip(leaves(a), leaves(b))]
  return sum(parts[1:], parts[0])


def norm(a: PyTree) -> jax.Array:
  return jnp.sqrt(dot(a, a))


def scale(a: PyTree, s) -> PyTree:
  return tmap(lambda x: x * s, a)


def axpy(s, x: PyTree, y: PyTree) -> PyTree:
  """``s * x + y``."""
  return tmap(lambda a, b: s * a + b, x, y)


def cast(tree: PyTree, like: PyTree) -> PyTree:
  return tmap(lambda x, t: x.astype(jnp.result_type(t)), tree, like)


def zeros(rows: int, like: PyTree, dtype) -> tuple:
  """A basis of ``rows`` zero rows shaped like ``like``."""
  if rows <= SINGLE:
    sizes = [rows]
  else:   # + 1: the scratch row
    sizes = [min(CHUNK, rows - s) + 1 for s in range(0, rows, CHUNK)]
  return tuple(tmap(lambda x, n=n: jnp.zeros((n,) + jnp.shape(x), dtype), like)
               for n in sizes)


def _size(basis: tuple, c: int) -> int:
  """Rows of chunk ``c`` that hold basis vectors (its scratch row excluded)."""
  n = leaves(basis[c])[0].shape[0]
  return n if len(basis) == 1 else n - 1


def num_rows(basis: tuple) -> int:
  return sum(_size(basis, c) for c in range(len(basis)))


def set_row(basis: tuple, i, v: PyTree) -> tuple:
  """Row ``i`` := ``v``, in place inside a loop (see the module docstring)."""
  out = []
  for c, chunk in enumerate(basis):
    start, size = c * CHUNK, _size(basis, c)
    inside = (i >= start) & (i < start + size)
    at = i - start if len(basis) == 1 else jnp.where(inside, i - start, size)
    # dynamic_update_index_in_dim, not .at[].set: a scatter's out-of-bounds
    # guard is a select over the whole chunk.
    out.append(tmap(lambda b, x: jax.lax.dynamic_update_index_in_dim(
        b, x.astype(b.dtype), at, 0), chunk, v))
  return tuple(out)


def _flat(b):
  return b.reshape(b.shape[0], -1)   # a bitcast: whole arrays only


def project(basis: tuple, w: PyTree, n) -> tuple[PyTree, jax.Array]:
  """One classical Gram-Schmidt sweep of ``w`` against rows ``< n``; also
  returns the sum of the squared coefficients (``||w||^2`` drops by it
  when the rows are orthonormal).

  Chunks wholly at or beyond ``n`` are skipped; rows beyond ``n`` inside a
  visited chunk (zero, or stale after a restart) are masked out.
  """
  removed = jnp.zeros((), leaves(basis[0])[0].dtype)
  for c, chunk in enumerate(basis):
    start = c * CHUNK

    def sweep(args, chunk=chunk, start=start):
      w, removed = args
      coef = sum(_flat(b) @ jnp.ravel(v)
                 for b, v in zip(leaves(chunk), leaves(w)))
      local = jnp.arange(coef.shape[0])
      coef = jnp.where((start + local < n) & (local < _size(basis, c)),
                       coef, 0)
      return (tmap(lambda v, b: v - (coef @ _flat(b)).reshape(v.shape),
                   w, chunk), removed + jnp.sum(coef * coef))

    w, removed = jax.lax.cond(start < n, sweep, lambda a: a, (w, removed))
  return w, removed


def combine(coefs: jax.Array, basis: tuple) -> PyTree:
  """``sum_i coefs[i, c] basis[i]`` for each column ``c`` of ``(m, q)``
  coefficients (``m <= rows``; missing rows count as zero): leaves of shape
  ``(q, *leaf.shape)``.

  One matrix-vector product per column and chunk: XLA:CPU ran the skinny
  ``(q, m) @ (m, D)`` GEMM ~10x slower than ``q`` GEMVs.
  """
  coefs = jnp.pad(coefs, ((0, num_rows(basis) - coefs.shape[0]), (0, 0)))

  def one(col):
    parts = []
    for c, chunk in enumerate(basis):
      s, size = c * CHUNK, _size(basis, c)
      weights = jnp.pad(col[s:s + size], (0, leaves(chunk)[0].shape[0] - size))
      parts.append(tmap(lambda b, w=weights: jnp.tensordot(w, b, axes=1),
                        chunk))
    return tmap(lambda *xs: sum(xs[1:], xs[0]), *parts)

  return jax.lax.map(one, coefs.T)
