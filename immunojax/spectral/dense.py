"""Exact symmetric eigenvalues with gradients that survive degenerate spectra.

``jnp.linalg.eigh``'s derivative divides by eigenvalue gaps, which are zero on
the rank-deficient Grams that immunization produces (jax-ml/jax#669). We take
eigenvectors from ``eigh(stop_gradient(S))`` and let gradients flow through the
Rayleigh quotients ``v_i^T S v_i``: the derivative of eigenvalue ``i`` is then
exactly ``v_i v_i^T`` (the closed forms of the condition-number paper), and no
eigenvector derivative, hence no gap, ever enters.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from immunojax import _checks


def _eigh_rayleigh(matrix: jax.Array):
  w, v = jnp.linalg.eigh(jax.lax.stop_gradient(matrix))
  rayleigh = jnp.einsum("ij,ik,kj->j", v, matrix, v)
  # Forward value: eigh's eigenvalues exactly; gradient: the Rayleigh quotient.
  w = w + (rayleigh - jax.lax.stop_gradient(rayleigh))
  return w, v


def _check_matrix(matrix, symmetry_rtol):
  _checks.check_square(matrix, "matrix")
  _checks.check_float(matrix, "matrix")
  if jnp.shape(matrix)[0] == 0:
    raise ValueError("matrix is 0 x 0: it has no eigenvalues")
  _checks.check_symmetric(matrix, "matrix", symmetry_rtol)
  _checks.check_finite(matrix, "matrix")


def eigenvalues(matrix: jax.Array, *, symmetry_rtol: float | None = None
                ) -> jax.Array:
  """Eigenvalues of a symmetric matrix, ascending, differentiable.

  Args:
    matrix: ``(D, D)`` symmetric array.
    symmetry_rtol: tolerance of the symmetry check, relative to ``max |S|``
      (default ``sqrt(eps)`` of the dtype).

  Returns:
    ``(D,)`` eigenvalues in ascending order, in the matrix's dtype.

  Raises:
    ValueError: non-square, non-symmetric or non-finite input.
  """
  _check_matrix(matrix, symmetry_rtol)
  return _eigh_rayleigh(matrix)[0]


def eigh(matrix: jax.Array, *, symmetry_rtol: float | None = None):
  """Eigenvalues (differentiable as in :func:`eigenvalues`) and eigenvectors.

  The eigenvectors are constants for autodiff (they come from the
  stop-gradient matrix).

  Returns:
    ``(w, v)``: ``(D,)`` ascending eigenvalues and ``(D, D)`` eigenvectors in
    columns.
  """
  _check_matrix(matrix, symmetry_rtol)
  return _eigh_rayleigh(matrix)
