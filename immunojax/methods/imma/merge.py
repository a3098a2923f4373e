"""MIMA's Merge layer: several concept-adapted models fused into one.

:func:`phi_star` is the Custom Diffusion constrained least-squares merge
(MIMA's ``composenW.gdupdateWexact``, spec ``imma_mima.md`` §2.3): the merged
projection answers every concept's *target keys* exactly as that concept's
adapted copy does, and stays as close as possible to the pre-adaptation
weight on generic *regularisation keys*. It is differentiable in the
pre-adaptation weight and in every adapted weight.

A :class:`Merge` applies a rule to a whole parameter pytree:
``merge.apply(base, adapted)`` with ``adapted`` the per-concept copies
stacked on a leading axis. :func:`concept_merge` uses ``phi_star`` on the
leaves its patterns name (the cross-attention key/value kernels) and the
per-concept mean elsewhere (what the released code does with the gradients
of the other parameters); :func:`average_merge` averages every leaf (the
``mima_average_merge`` ablation); :func:`single` takes the only copy (IMMA).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from immunojax import masks

PyTree = Any
KV_KERNELS = (r"attn2/to_[kv]/kernel",)


def phi_star(kernel0: jax.Array, kernels: jax.Array, keys: jax.Array,
             reg_keys: jax.Array, *, ridge: float = 0.0) -> jax.Array:
  """The closed-form merge of ``N`` adapted copies of one projection.

  In Flax's layout (``y = c @ K``, ``K: (d, d_out)``) it solves::

    min_K || C_reg (K - K0) ||_F^2   s.t.   C_n K = C_n K_n  for every n

  whose solution is ``K0 + A^-1 C^T (C A^-1 C^T)^-1 (V - C K0)`` with
  ``A = C_reg^T C_reg + ridge I``, ``C`` the stacked target keys and ``V``
  their adapted values (``W* = W0 + E1 E2^-1 D`` of the code, transposed).

  Args:
    kernel0: ``(d, d_out)`` the pre-adaptation kernel (``W0^T``).
    kernels: ``(N, d, d_out)`` the concept-adapted kernels.
    keys: ``(N, t, d)`` target keys of each concept (rows must be distinct
      across concepts; ``N t <= d``).
    reg_keys: ``(m, d)`` regularisation keys (``A`` must be invertible,
      e.g. ``m >= d`` rows of full column rank, or ``ridge > 0``).
    ridge: added to ``A``'s diagonal; 0 is the released code (a small
      value such as ``1e-6 tr(A) / d`` stabilises float32).

  Returns:
    The merged kernel ``(d, d_out)``.
  """
  n, t, d = keys.shape
  c = keys.reshape(n * t, d)
  v = jnp.einsum("ntd,nde->nte", keys, kernels).reshape(n * t, -1)
  a = reg_keys.T @ reg_keys + ridge * jnp.eye(d, dtype=reg_keys.dtype)
  a_inv_ct = jnp.linalg.solve(a, c.T)                      # (d, N t) = D^T
  e2 = c @ a_inv_ct                                        # (N t, N t)
  return kernel0 + a_inv_ct @ jnp.linalg.solve(e2, v - c @ kernel0)


class Merge(NamedTuple):
  """A merge rule. ``apply(base, adapted) -> params`` with ``adapted``
  stacked on a leading concept axis; ``merged`` names (regex) the leaves
  merged jointly (the rest is averaged over concepts)."""
  name: str
  apply: Callable[[PyTree, PyTree], PyTree]
  merged: tuple[str, ...] = ()


def check_keys(keys, reg_keys, *, ridge: float = 0.0) -> None:
  """Raises ValueError when ``phi_star`` would be ill-posed: wrong shapes,
  non-finite keys, more target keys than dimensions, duplicated target
  rows, or a singular ``A`` / ``C A^-1 C^T``."""
  keys, reg_keys = np.asarray(keys, np.float64), np.asarray(reg_keys,
                                                            np.float64)
  if keys.ndim != 3 or reg_keys.ndim != 2 or keys.shape[2] != reg_keys.shape[1]:
    raise ValueError("keys must be (N, t, d) and reg_keys (m, d), got "
                     f"{keys.shape} and {reg_keys.shape}")
  if not (np.all(np.isfinite(keys)) and np.all(np.isfinite(reg_keys))):
    raise ValueError("keys / reg_keys contain NaN or Inf")
  n, t, d = keys.shape
  if n * t > d:
    raise ValueError(f"{n * t} target keys exceed the key dimension {d}: the "
                     "constraints cannot all be met")
  c = keys.reshape(n * t, d)
  a = reg_keys.T @ reg_keys + ridge * np.eye(d)
  cond_a = np.linalg.cond(a)
  if not np.isfinite(cond_a) or cond_a > 1e12:
    raise ValueError(f"the regularisation Gram C_reg^T C_reg is singular "
                     f"(condition number {cond_a:.3g}, {reg_keys.shape[0]} "
                     f"rows for d = {d}); add regularisation keys or a ridge")
  e2 = c @ np.linalg.solve(a, c.T)
  cond_e2 = np.linalg.cond(e2)
  if not np.isfinite(cond_e2) or cond_e2 > 1e12:
    raise ValueError("the target keys are linearly dependent (C A^-1 C^T has "
                     f"condition number {cond_e2:.3g}); remove duplicated "
                     "rows, keeping the first concept's as the code does")


def concept_merge(*, keys, reg_keys, merged: Sequence[str] = KV_KERNELS,
                  ridge: float = 0.0) -> Merge:
  """``phi_star`` on the leaves ``merged`` names, the concept mean elsewhere.

  Args:
    keys: ``(N, t, d)`` target keys per concept (e.g. the concept token's
      row of each concept prompt's embedding).
    reg_keys: ``(m, d)`` regularisation keys (generic caption rows).
    merged: regexes over ``a/b/kernel`` paths; default the cross-attention
      key and value kernels (``attn2.to_k`` / ``attn2.to_v``), as released.
    ridge: see :func:`phi_star`.

  Raises:
    ValueError: see :func:`check_keys`.
  """
  check_keys(keys, reg_keys, ridge=ridge)
  keys, reg_keys = jnp.asarray(keys), jnp.asarray(reg_keys)
  merged = tuple(merged)

  def apply(base, adapted):
    mask = masks.mask_from_patterns(base, merged)
    n = jax.tree_util.tree_leaves(adapted)[0].shape[0]
    if n != keys.shape[0]:
      raise ValueError(f"{n} adapted copies but keys for {keys.shape[0]} "
                       "concepts")
    return jax.tree_util.tree_map(
        lambda m, b, a: phi_star(b, a, keys.astype(b.dtype),
                                 reg_keys.astype(b.dtype), ridge=ridge)
        if m else jnp.mean(a, axis=0), mask, base, adapted)

  return Merge("closed_form", apply, merged)


def average_merge() -> Merge:
  """Every leaf is the mean of the concept copies (no joint solve)."""
  return Merge("average", lambda base, adapted: jax.tree_util.tree_map(
      lambda a: jnp.mean(a, axis=0), adapted))


def single() -> Merge:
  """The one adapted copy, unmerged (IMMA: one concept, no Merge)."""
  def apply(base, adapted):
    n = jax.tree_util.tree_leaves(adapted)[0].shape[0]
    if n != 1:
      raise ValueError(f"merge 'single' takes one concept, got {n}; use "
                       "concept_merge or average_merge")
    return jax.tree_util.tree_map(lambda a: a[0], adapted)
  return Merge("single", apply)
