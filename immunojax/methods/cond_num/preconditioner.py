"""Algorithm 1's ``K^-1`` preconditioning of the extractor's gradient
(Theorem 4.3: it keeps the Hessian's eigenvectors and moves one eigenvalue at
a time)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from immunojax import _checks, spectral

PRECONDITIONERS = ("pinv", "ridge", "none")
SIDES = ("left", "right")


def preconditioner(k_mat: jax.Array, *, kind: str = "pinv",
                   ridge: float = 1.0) -> jax.Array:
  """The matrix ``P`` standing for ``K^-1`` in Algorithm 1.

  ``"pinv"``: the Moore-Penrose inverse (rank-aware, the library's one rank
  rule; ``K`` is singular on the house-price data and on any batch with
  ``N < D``); ``"ridge"``: ``(K + ridge I)^-1`` (the released code's
  choice); ``"none"``: ``I``.
  """
  _checks.check_choice(kind, PRECONDITIONERS, "preconditioner")
  _checks.check_symmetric(k_mat, "K")
  _checks.check_finite(k_mat, "K")
  d = k_mat.shape[0]
  if kind == "none":
    return jnp.eye(d, dtype=k_mat.dtype)
  if kind == "ridge":
    if ridge <= 0:
      raise ValueError(f"ridge must be > 0, got {ridge}")
    return jnp.linalg.inv(k_mat + ridge * jnp.eye(d, dtype=k_mat.dtype))
  w, v = jnp.linalg.eigh(k_mat)
  keep = spectral.nonzero(w)
  return (v * jnp.where(keep, 1.0 / jnp.where(keep, w, 1.0), 0.0)) @ v.T


def precondition(grad_theta: jax.Array, p_mat: jax.Array, *,
                 side: str = "left") -> jax.Array:
  """``P grad`` (Algorithm 1) or ``grad P`` (the released code, spec §2.8)."""
  _checks.check_choice(side, SIDES, "precondition_side")
  return p_mat @ grad_theta if side == "left" else grad_theta @ p_mat
