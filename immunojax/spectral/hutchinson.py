"""Hutchinson's trace estimator (no Krylov basis: one matvec a probe)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from immunojax import _checks
from immunojax.spectral.lanczos import Matvec


def hutchinson_trace(matvec: Matvec, dim: int, *, key: jax.Array,
                     num_probes: int = 10, dtype=None) -> jax.Array:
  """Hutchinson's estimator ``mean_p z_p^T A z_p`` with Rademacher ``z``."""
  dim = _checks.check_positive_int(dim, "dim")
  num_probes = _checks.check_positive_int(num_probes, "num_probes")
  z = jax.random.rademacher(key, (num_probes, dim), dtype or jnp.zeros(()).dtype)
  return jnp.mean(jax.vmap(lambda v: jnp.vdot(v, matvec(v)))(z))
