"""Dominant eigenpair by power iteration (the baseline Lanczos is measured against)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from immunojax import _checks
from immunojax.spectral.lanczos import Matvec, _unit


class PowerIterationResult(NamedTuple):
  """Output of :func:`power_iteration`.

  Attributes:
    eigenvalue: Rayleigh quotient of the final vector (the dominant
      eigenvalue, i.e. the one of largest magnitude).
    eigenvector: ``(D,)`` unit vector.
    num_steps: matvecs used.
    converged: whether the relative change fell below ``tol``.
  """
  eigenvalue: jax.Array
  eigenvector: jax.Array
  num_steps: jax.Array
  converged: jax.Array


def power_iteration(matvec: Matvec, dim: int, *, key: jax.Array,
                    max_steps: int = 1000, tol: float = 1e-10,
                    dtype=None) -> PowerIterationResult:
  """Dominant eigenpair by power iteration with a relative-change stop.

  Stops when ``|lambda_t - lambda_{t-1}| <= tol |lambda_t|`` or after
  ``max_steps`` matvecs. Convergence is geometric with ratio
  ``|lambda_2 / lambda_1|``, so it can be slow where Lanczos is not.
  Uses ``lax.while_loop``: forward-mode only.
  """
  dim = _checks.check_positive_int(dim, "dim")
  max_steps = _checks.check_positive_int(max_steps, "max_steps")
  v, _ = _unit(jax.random.normal(key, (dim,), dtype or jnp.zeros(()).dtype))
  w = matvec(v)
  lam = jnp.vdot(v, w)

  def cond(c):
    _, _, _, step, done = c
    return (step < max_steps) & ~done

  def body(c):
    _, w, lam, step, _ = c
    v, _ = _unit(w)
    w = matvec(v)
    new = jnp.vdot(v, w)
    done = jnp.abs(new - lam) <= tol * jnp.abs(new)
    return v, w, new, step + 1, done

  v, _, lam, step, done = jax.lax.while_loop(
      cond, body, (v, w, lam, jnp.asarray(1), jnp.asarray(False)))
  return PowerIterationResult(lam, v, step, done)
