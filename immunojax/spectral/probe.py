"""Closed-form Hessians of linear probes on frozen features.

A linear probe ``h_w(f) = f @ W`` trained on features ``F`` (``N x D``) has a
Hessian that depends on ``F`` only through sums of outer products, so its
spectrum costs one ``min(N, D)``-sized eigendecomposition instead of
``jax.hessian`` over ``D * C`` parameters.

Parameter order: ``W`` has shape ``(D, C)`` and is flattened row-major, so
index ``d * C + c``. This is ``ravel_pytree``'s order, so the matrices below
equal ``hessian_matrix`` of the matching loss exactly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from immunojax import _checks
from immunojax.spectral.dense import eigenvalues


def _check_features(features) -> None:
  if jnp.ndim(features) != 2 or 0 in jnp.shape(features):
    raise ValueError(
        f"features must be a non-empty 2-D (num_samples, dim) array, got "
        f"shape {jnp.shape(features)}")
  _checks.check_float(features, "features")
  _checks.check_finite(features, "features")


def gram(features: jax.Array, *, small: bool = False) -> jax.Array:
  """Gram matrix of a feature matrix.

  Args:
    features: ``(N, D)`` array, one row per sample.
    small: if True and ``N < D``, return the ``N x N`` Gram ``F F^T`` instead
      of ``F^T F``. Both share their non-zero eigenvalues; the small one is
      cheaper to decompose.

  Returns:
    ``F^T F`` of shape ``(D, D)`` (or ``F F^T`` of shape ``(N, N)``).
  """
  _check_features(features)
  n, d = jnp.shape(features)
  if small and n < d:
    return features @ features.T
  return features.T @ features


def gram_eigenvalues(features: jax.Array) -> jax.Array:
  """Eigenvalues of ``F^T F`` from the smaller of the two Grams, ascending.

  Returns ``min(N, D)`` eigenvalues: when ``N < D`` the ``D - N`` exact zeros
  of ``F^T F`` are left out (they carry no information for the rank-aware
  condition number). Differentiable through the Rayleigh-quotient trick of
  :func:`immunojax.spectral.eigenvalues`.
  """
  return eigenvalues(gram(features, small=True))


def mse_probe_loss(w: jax.Array, features: jax.Array,
                   targets: jax.Array) -> jax.Array:
  """``0.5 * ||F W - Y||_F^2``: the paper's l2 linear-probe loss.

  Its Hessian w.r.t. ``W`` is :func:`mse_probe_hessian` (no factor 2).
  """
  return 0.5 * jnp.sum((features @ w - targets) ** 2)


def mse_probe_hessian(features: jax.Array, num_outputs: int = 1) -> jax.Array:
  """Hessian of :func:`mse_probe_loss` w.r.t. a ``(D, C)`` head.

  Returns ``kron(F^T F, I_C)`` of shape ``(D*C, D*C)``; for one output this is
  the Gram matrix itself.
  """
  g = gram(features)
  if num_outputs == 1:
    return g
  return jnp.kron(g, jnp.eye(num_outputs, dtype=g.dtype))


def softmax_probe_loss(w: jax.Array, features: jax.Array,
                       labels: jax.Array) -> jax.Array:
  """Summed softmax cross-entropy of a linear head ``W`` of shape (D, C)."""
  logits = features @ w
  logp = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.sum(jnp.take_along_axis(logp, labels[:, None], axis=-1))


def softmax_probe_hessian(w: jax.Array, features: jax.Array) -> jax.Array:
  """Hessian of :func:`softmax_probe_loss` w.r.t. ``W`` (labels drop out).

  Per sample the Hessian is the Kronecker product
  ``(f_i f_i^T) ⊗ (diag(p_i) - p_i p_i^T)``; the result is their sum, built
  with one einsum in ``O(N D^2 C^2)``.

  Args:
    w: head of shape ``(D, C)``.
    features: ``(N, D)``.

  Returns:
    ``(D*C, D*C)`` Hessian in row-major ``(d, c)`` order.
  """
  _check_features(features)
  if jnp.ndim(w) != 2 or jnp.shape(w)[0] != jnp.shape(features)[1]:
    raise ValueError(
        f"w must have shape (dim, classes) with dim={jnp.shape(features)[1]}, "
        f"got {jnp.shape(w)}")
  d, c = jnp.shape(w)
  p = jax.nn.softmax(features @ w, axis=-1)
  a = jax.vmap(jnp.diag)(p) - p[:, :, None] * p[:, None, :]
  h = jnp.einsum("nd,ne,nab->daeb", features, features, a)
  return h.reshape(d * c, d * c)
