"""Unified Concept Editing (UCE): the closed-form erasure MIMA's re-learning
setting starts from (spec ``imma_mima.md`` §2.4, ``mima_utils/erase.py``).

Each cross-attention key/value projection is edited so that erase keys map
to the guide's output (e.g. the empty prompt's) while preserve keys keep
their outputs::

  W <- (lam W0 + s_e sum_i (W0 g_i) k_i^T + s_p sum_j (W0 k_j) k_j^T)
       (lam I + s_e sum_i k_i k_i^T + s_p sum_j k_j k_j^T)^-1

Here in Flax's layout (``K = W^T``, keys as rows).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp

from immunojax import masks
from immunojax.methods.imma.merge import KV_KERNELS

PyTree = Any


def uce_kernel(kernel: jax.Array, erase_keys: jax.Array,
               guide_keys: jax.Array, preserve_keys: jax.Array, *,
               lam: float = 0.5, erase_scale: float = 1.0,
               preserve_scale: float | None = None) -> jax.Array:
  """UCE on one kernel ``(d, d_out)``.

  Args:
    erase_keys: ``(e, d)`` keys whose outputs are replaced.
    guide_keys: ``(e, d)`` their targets' keys (``v*_i = g_i K0``).
    preserve_keys: ``(p, d)`` keys whose outputs are kept.
    lam: the weight of staying at ``K0`` (0.5 as released).
    erase_scale: ``s_e`` (1 as released).
    preserve_scale: ``s_p``; default ``max(0.1, 1 / p)`` as released.
  """
  if erase_keys.shape != guide_keys.shape:
    raise ValueError(f"erase keys {erase_keys.shape} and guide keys "
                     f"{guide_keys.shape} must match row for row")
  d = kernel.shape[0]
  s_p = (max(0.1, 1.0 / max(preserve_keys.shape[0], 1))
         if preserve_scale is None else preserve_scale)
  m = (lam * jnp.eye(d, dtype=kernel.dtype)
       + erase_scale * erase_keys.T @ erase_keys
       + s_p * preserve_keys.T @ preserve_keys)
  rhs = (lam * kernel + erase_scale * erase_keys.T @ (guide_keys @ kernel)
         + s_p * preserve_keys.T @ (preserve_keys @ kernel))
  return jnp.linalg.solve(m, rhs)


def erase_concepts(params: PyTree, erase_keys, guide_keys, preserve_keys, *,
                   kernels: Sequence[str] = KV_KERNELS, **uce_options
                   ) -> PyTree:
  """:func:`uce_kernel` on every leaf ``kernels`` names (default the
  cross-attention key/value kernels); other leaves are unchanged."""
  mask = masks.mask_from_patterns(params, tuple(kernels))
  e, g, p = (jnp.asarray(k) for k in (erase_keys, guide_keys, preserve_keys))
  return jax.tree_util.tree_map(
      lambda m, w: uce_kernel(w, e.astype(w.dtype), g.astype(w.dtype),
                              p.astype(w.dtype), **uce_options) if m else w,
      mask, params)
