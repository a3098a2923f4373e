"""Stochastic Lanczos quadrature: traces of matrix functions, spectral densities."""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from immunojax import _checks
from immunojax.spectral.lanczos import Matvec, _check_sizes, lanczos


class SpectralQuadrature(NamedTuple):
  """Gauss quadrature of the spectral measure, one row per probe.

  ``nodes[p]`` are Ritz values and ``weights[p]`` the squared first components
  of T's eigenvectors; each row of weights sums to 1.
  """
  nodes: jax.Array
  weights: jax.Array
  dim: int


def stochastic_lanczos_quadrature(matvec: Matvec, dim: int, num_steps: int, *,
                                  key: jax.Array, num_probes: int = 10,
                                  reorthogonalize: bool = True,
                                  dtype=None) -> SpectralQuadrature:
  """Stochastic Lanczos quadrature with Rademacher probes.

  Returns nodes and weights of ``num_probes`` independent Gauss quadratures;
  feed them to :func:`quadrature_trace` (``tr f(A)``, e.g. the Hutchinson
  trace for ``f = id``) or :func:`spectral_density`.
  """
  dim, num_steps = _check_sizes(dim, num_steps)
  num_probes = _checks.check_positive_int(num_probes, "num_probes")
  dtype = dtype or jnp.zeros(()).dtype
  keys = jax.random.split(key, num_probes)

  def one(k):
    z = jax.random.rademacher(jax.random.fold_in(k, 0), (dim,), dtype)
    r = lanczos(matvec, dim, num_steps, key=k, initial_vector=z,
                reorthogonalize=reorthogonalize)
    return r.ritz_values, r.first_components ** 2

  nodes, weights = jax.vmap(one)(keys)
  return SpectralQuadrature(nodes, weights, dim)


def quadrature_trace(quadrature: SpectralQuadrature,
                     fn: Callable[[jax.Array], jax.Array] = lambda x: x
                     ) -> jax.Array:
  """Estimate ``tr f(A) = dim * E_probe[sum_j w_j f(theta_j)]``."""
  per_probe = jnp.sum(quadrature.weights * fn(quadrature.nodes), axis=-1)
  return quadrature.dim * jnp.mean(per_probe)


def spectral_density(quadrature: SpectralQuadrature, grid: jax.Array, *,
                     sigma: float) -> jax.Array:
  """Gaussian-smoothed spectral density on ``grid`` (integrates to ~1)."""
  diff = grid[:, None, None] - quadrature.nodes[None]
  kernel = jnp.exp(-0.5 * (diff / sigma) ** 2) / (sigma * jnp.sqrt(2 * jnp.pi))
  return jnp.sum(kernel * quadrature.weights[None], axis=-1).mean(axis=-1)
