"""Symmetric Lanczos, fixed number of steps, on flat vectors.

Takes ``matvec: (D,) -> (D,)`` (e.g. :func:`hvp`) and a static dimension,
runs inside ``jit`` (``lax.fori_loop``), and is ``vmap``-able over keys. Power
iteration, SLQ and Hutchinson live in modules of their own.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from immunojax import _checks

Matvec = Callable[[jax.Array], jax.Array]


class LanczosResult(NamedTuple):
  """Output of :func:`lanczos`.

  Attributes:
    ritz_values: ``(k,)`` eigenvalues of the tridiagonal ``T``, ascending.
    residuals: ``(k,)`` bounds ``|beta_k s_{k,i}| = ||A y_i - theta_i y_i||``
      for unit Ritz vectors ``y_i`` (exact in exact arithmetic).
    alphas: ``(k,)`` diagonal of ``T``.
    betas: ``(k,)`` off-diagonal of ``T``; ``betas[k-1]`` is the residual norm.
    first_components: ``(k,)`` first entries of ``T``'s eigenvectors (the
      Gauss quadrature weights are their squares).
    ritz_vectors: ``(k, D)`` unit Ritz vectors (rows), or None.
  """
  ritz_values: jax.Array
  residuals: jax.Array
  alphas: jax.Array
  betas: jax.Array
  first_components: jax.Array
  ritz_vectors: jax.Array | None


def _check_sizes(dim, num_steps):
  dim = _checks.check_positive_int(dim, "dim")
  num_steps = _checks.check_positive_int(num_steps, "num_steps")
  if num_steps > dim:
    raise ValueError(
        f"num_steps={num_steps} exceeds dim={dim}: a Krylov space of a "
        f"{dim}-dimensional operator has at most {dim} directions")
  return dim, num_steps


def _unit(v):
  n = jnp.linalg.norm(v)
  return v / jnp.where(n > 0, n, 1), n


_BLOCK = 8


def _project_prefix(basis, w, num_filled):
  """One block-modified Gram-Schmidt sweep against ``basis[:num_filled]``.

  Only the filled rows are read (blocks of ``_BLOCK`` via dynamic slices), so
  step ``i`` of Lanczos costs ``O(i D)`` and the whole run half of a sweep
  over the full basis. Rows beyond ``num_filled`` are zero, so a partially
  filled last block is harmless.
  """
  num_blocks = (num_filled + _BLOCK - 1) // _BLOCK

  def body(b, w):
    rows = jax.lax.dynamic_slice_in_dim(basis, b * _BLOCK, _BLOCK, axis=0)
    return w - (rows @ w) @ rows

  return jax.lax.fori_loop(0, num_blocks, body, w)


def _reorthogonalize(basis, w, num_filled):
  """Project out the basis; a second sweep only if the first removed a lot.

  The DGKS criterion ("twice is enough"): repeat when the norm fell below
  ``1/sqrt(2)`` of its value, i.e. when cancellation may have left error.
  """
  before = jnp.linalg.norm(w)
  w = _project_prefix(basis, w, num_filled)
  return jax.lax.cond(jnp.linalg.norm(w) < 0.7071 * before,
                      lambda w: _project_prefix(basis, w, num_filled),
                      lambda w: w, w)


def lanczos(matvec: Matvec, dim: int, num_steps: int, *,
            key: jax.Array | None = None,
            initial_vector: jax.Array | None = None,
            reorthogonalize: bool = True,
            return_vectors: bool = False,
            dtype=None) -> LanczosResult:
  """Symmetric Lanczos tridiagonalisation and Ritz pairs.

  Args:
    matvec: symmetric linear operator on ``(dim,)`` vectors.
    dim: size of the operator.
    num_steps: Krylov depth ``k`` (number of matvecs), ``1 <= k <= dim``.
    key: PRNG key for the normal start vector (and for restarts after an
      invariant subspace is found). Required.
    initial_vector: optional start vector (normalised here); overrides the
      random one. ``key`` still seeds restarts.
    reorthogonalize: full re-orthogonalisation against all previous vectors
      after the three-term recurrence: one block Gram-Schmidt sweep over the
      filled part of the basis, a second one only when the first cancelled
      (DGKS). Costs ``O(k D)`` memory and about ``2 i D`` flops at step ``i``;
      without it, extreme Ritz values still converge but spurious copies
      appear in the interior.
    return_vectors: also return the ``(k, D)`` Ritz vectors.
    dtype: dtype of the Krylov basis; default the start vector's, or the
      default float dtype.

  Returns:
    :class:`LanczosResult`.

  Differentiation: forward mode works; reverse mode does not (the sweeps
  over the filled basis are loops of data-dependent length). Differentiate
  the dense path (:func:`immunojax.spectral.eigenvalues`) or use
  :func:`immunojax.spectral.top_hessian_eigenvalue` (``d lambda = v^T dH v``).

  This is the fixed-step, flat-vector layer. For "the top eigenvalue to a
  tolerance", with a certified bound, pytree operators and bounded memory,
  use :func:`immunojax.spectral.top_eigenvalues`.
  """
  dim, num_steps = _check_sizes(dim, num_steps)
  if key is None:
    raise ValueError("lanczos needs a PRNG `key` (start vector and restarts)")
  if initial_vector is None:
    v0 = jax.random.normal(key, (dim,), dtype or jnp.zeros(()).dtype)
  else:
    if jnp.shape(initial_vector) != (dim,):
      raise ValueError(f"initial_vector must have shape ({dim},), got "
                       f"{jnp.shape(initial_vector)}")
    v0 = jnp.asarray(initial_vector, dtype)
    if _checks.is_concrete(v0) and not bool(jnp.any(v0 != 0)):
      raise ValueError("initial_vector is zero: a Krylov space needs a "
                       "non-zero start vector")
  dtype = v0.dtype
  eps = float(np.finfo(dtype).eps)
  v0, _ = _unit(v0)
  k = num_steps
  basis = jnp.zeros((k + 1 + _BLOCK, dim), dtype).at[0].set(v0)
  alphas = jnp.zeros((k,), dtype)
  betas = jnp.zeros((k,), dtype)

  def body(i, carry):
    basis, alphas, betas = carry
    q = basis[i]
    w = matvec(q)
    scale = jnp.linalg.norm(w)
    alpha = jnp.vdot(q, w)
    prev = jnp.where(i > 0, betas[jnp.maximum(i - 1, 0)], 0.0)
    w = w - alpha * q - prev * basis[jnp.maximum(i - 1, 0)]
    if reorthogonalize:
      w = _reorthogonalize(basis, w, i + 1)
    w, beta = _unit(w)
    # Breakdown: the Krylov space is invariant. Continue with a fresh random
    # direction orthogonal to it; T gets a zero off-diagonal (block diagonal).
    broke = beta <= jnp.sqrt(eps) * jnp.maximum(scale, jnp.finfo(dtype).tiny)

    def fresh(_):
      r = jax.random.normal(jax.random.fold_in(key, i + 1), (dim,), dtype)
      r = _project_prefix(basis, _project_prefix(basis, r, i + 1), i + 1)
      return _unit(r)[0]

    q_next = jax.lax.cond(broke, fresh, lambda _: w, None)
    beta = jnp.where(broke, 0.0, beta)
    # dynamic_update_index_in_dim, not .at[].set: a scatter's out-of-bounds
    # guard is a select over the whole basis (a full pass every step).
    return (jax.lax.dynamic_update_index_in_dim(basis, q_next, i + 1, 0),
            alphas.at[i].set(alpha),
            betas.at[i].set(beta))

  basis, alphas, betas = jax.lax.fori_loop(0, k, body, (basis, alphas, betas))
  tri = (jnp.diag(alphas) + jnp.diag(betas[:-1], 1) + jnp.diag(betas[:-1], -1))
  theta, s = jnp.linalg.eigh(tri)
  residuals = jnp.abs(betas[-1] * s[-1, :])
  vectors = s.T @ basis[:k] if return_vectors else None
  if _checks.is_concrete(alphas):
    bad = np.flatnonzero(~np.isfinite(np.asarray(alphas) + np.asarray(betas)))
    if bad.size:
      raise FloatingPointError(
          f"lanczos: the matvec returned NaN/Inf at step {int(bad[0])}; check "
          "the operator (e.g. a diverged model's Hessian)")
  return LanczosResult(theta, residuals, alphas, betas, s[0, :], vectors)


def extreme_eigenvalues(matvec: Matvec, dim: int, num_steps: int, *,
                        key: jax.Array, reorthogonalize: bool = True):
  """``(lambda_min, lambda_max)`` estimates from ``num_steps`` Lanczos steps.

  Lanczos Ritz values are interlaced inside the spectrum, so these are an
  upper bound on ``lambda_min`` and a lower bound on ``lambda_max``.
  """
  res = lanczos(matvec, dim, num_steps, key=key,
                reorthogonalize=reorthogonalize)
  return res.ritz_values[0], res.ritz_values[-1]
