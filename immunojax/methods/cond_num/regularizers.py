"""``R_well`` and ``R_ill``: the condition-number regularizers, and the
closed-form gradients of Theorem 4.2 (spec cond_num.md §2.2-2.4)."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from immunojax import spectral
from immunojax.parallel.collectives import global_sum


def frobenius_sq(s: jax.Array) -> jax.Array:
  return jnp.sum(s * s)


def r_well(s: jax.Array, *, p: int | None = None) -> jax.Array:
  """``R_well(S) = sigma_max^2 / 2 - ||S||_F^2 / (2p)`` (Nenov et al.).

  Non-negative, an upper bound on ``log kappa``; gradient descent on it lowers
  ``kappa``. ``p`` defaults to the dimension of ``S`` (pass ``D`` when ``S``
  is the small ``N x N`` Gram of ``N x D`` features).
  """
  p = s.shape[0] if p is None else p
  top = jnp.max(jnp.abs(spectral.eigenvalues(s)))
  return 0.5 * top ** 2 - frobenius_sq(s) / (2 * p)


def r_ill(s: jax.Array, *, rank=None,
          estimator: spectral.EstimatorLike = "pinv") -> jax.Array:
  """``R_ill(S) = 1 / (||S||_F^2 / (2k) - sigma_min^2 / 2)`` (paper Eq. 12).

  ``k`` = numerical rank and ``sigma_min`` the smallest non-zero singular
  value as the estimator sees them (rank-aware for ``pinv``), unless ``rank``
  says otherwise. Gradient descent on it raises ``kappa`` (Thm 4.1).
  """
  e = spectral.spectrum_extremes(s, estimator=estimator)
  k = jax.lax.stop_gradient(e.rank) if rank is None else rank
  return 1.0 / (frobenius_sq(s) / (2 * k) - 0.5 * e.sigma_min ** 2)


def feature_gram(features: jax.Array, *, small: bool = True,
                 axis_name: str | None = None) -> tuple[jax.Array, int]:
  """The cheaper of ``F^T F`` / ``F F^T`` (same non-zero spectrum) and ``D``.

  With ``axis_name`` the rows of ``F`` are spread over that device axis:
  the Gram is the global ``F^T F = sum_devices F_i^T F_i`` (``D x D``; the
  small one does not split over rows), see
  :func:`immunojax.parallel.global_sum`.
  """
  if axis_name is not None:
    return global_sum(features.T @ features, axis_name), features.shape[1]
  return spectral.gram(features, small=small), features.shape[1]


def r_well_features(features: jax.Array, *,
                    axis_name: str | None = None) -> jax.Array:
  """``R_well(F^T F)`` computed on the smaller Gram (the global one over
  ``axis_name``)."""
  s, d = feature_gram(features, axis_name=axis_name)
  return r_well(s, p=d)


def r_ill_features(features: jax.Array, *,
                   estimator: spectral.EstimatorLike = "pinv",
                   axis_name: str | None = None) -> jax.Array:
  """``R_ill(F^T F)``: on the smaller Gram for ``pinv``; on ``F^T F`` itself
  for ``official``, whose shift acts on all ``D`` eigenvalues (the global
  ``F^T F`` over ``axis_name``)."""
  est = spectral.estimator(estimator)
  s, _ = feature_gram(features, small=est.name != "official",
                      axis_name=axis_name)
  return r_ill(s, estimator=est)


def r_well_grad_theta(theta: jax.Array, k_mat: jax.Array) -> jax.Array:
  """Thm 4.2: ``grad_theta R_well(theta^T K theta)`` in closed form."""
  h = theta.T @ k_mat @ theta
  w, v = jnp.linalg.eigh(h)
  top = v[:, -1]
  return 2 * k_mat @ theta @ (w[-1] * jnp.outer(top, top) - h / h.shape[0])


def r_ill_grad_theta(theta: jax.Array, k_mat: jax.Array, *,
                     rtol: float | None = None) -> jax.Array:
  """Thm 4.2: ``grad_theta R_ill(theta^T K theta)`` in closed form."""
  h = theta.T @ k_mat @ theta
  w, v = jnp.linalg.eigh(h)
  keep = spectral.nonzero(w, rtol=rtol)
  k = jnp.sum(keep)
  i = jnp.argmin(jnp.where(keep, w, jnp.inf))
  vk = v[:, i]
  g = frobenius_sq(h) / (2 * k) - 0.5 * w[i] ** 2
  return 2 * k_mat @ theta @ (w[i] * jnp.outer(vk, vk) - h / k) / g ** 2


def weight(lam: float, normalize: bool) -> Callable:
  """``g -> lam * g / ||g||`` (``normalize``; global norm over the pytree)
  or ``g -> lam * g``: how a regularizer's gradient enters the update.

  Not ``optax.contrib.normalize``: that divides by the norm unguarded, so a
  vanishing regularizer gradient (``grad R_well`` is exactly zero at an
  isotropic ``H``, ``kappa = 1``) would put NaN into the update; here a zero
  gradient stays zero.
  """
  def apply(g):
    if normalize:
      norm = optax.tree.norm(g)
      g = jax.tree_util.tree_map(
          lambda x: x / jnp.maximum(norm, jnp.finfo(x.dtype).tiny), g)
    return jax.tree_util.tree_map(lambda x: lam * x, g)
  return apply
