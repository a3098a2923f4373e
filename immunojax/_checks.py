"""Input validation shared by the core.

Shape checks always run. Value checks (NaN/Inf, symmetry) need concrete
arrays, so they run when a public function is called eagerly and are skipped
when it is traced inside a user's ``jax.jit`` (where raising on values is not
possible without ``checkify``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def is_concrete(x) -> bool:
  """True when ``x`` holds values (not an abstract tracer)."""
  return not isinstance(x, jax.core.Tracer)


def check_finite(x, name: str) -> None:
  """Raises ValueError when a concrete array holds NaN or Inf."""
  if is_concrete(x):
    arr = np.asarray(x)
    if not np.all(np.isfinite(arr)):
      bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
      raise ValueError(f"{name} contains {bad} non-finite (NaN or Inf) entries")


def check_square(matrix, name: str = "matrix") -> None:
  """Raises ValueError unless ``matrix`` is a 2-D square array."""
  shape = jnp.shape(matrix)
  if len(shape) != 2 or shape[0] != shape[1]:
    raise ValueError(f"{name} must be a square 2-D array, got shape {shape}")


def check_symmetric(matrix, name: str = "matrix", rtol: float | None = None
                    ) -> None:
  """Raises ValueError when a concrete matrix is not symmetric within rtol.

  The tolerance is relative to the largest absolute entry; the default is
  ``sqrt(eps)`` of the matrix's dtype.
  """
  check_square(matrix, name)
  if not is_concrete(matrix):
    return
  arr = np.asarray(matrix)
  if rtol is None:
    rtol = float(np.sqrt(np.finfo(arr.dtype).eps))
  scale = max(float(np.max(np.abs(arr))) if arr.size else 0.0, np.finfo(
      arr.dtype).tiny)
  asym = float(np.max(np.abs(arr - arr.T))) if arr.size else 0.0
  if asym > rtol * scale:
    raise ValueError(
        f"{name} is not symmetric: max |S - S^T| = {asym:.3e} exceeds "
        f"{rtol:.1e} x max |S| = {rtol * scale:.3e}")


def check_float(x, name: str) -> None:
  """Raises ValueError unless ``x`` has a floating dtype (spectra of integer
  matrices would be computed in a silently promoted dtype)."""
  dtype = jnp.result_type(x)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f"{name} has dtype {dtype}; pass a floating array "
                     "(e.g. x.astype(jnp.float64))")


def check_choice(value: str, choices, name: str) -> None:
  """Raises ValueError naming the option when ``value`` is not allowed."""
  if value not in choices:
    raise ValueError(f"unknown {name} {value!r}; expected one of "
                     f"{sorted(choices)}")


def check_positive_int(value, name: str) -> int:
  if not isinstance(value, (int, np.integer)) or isinstance(value, bool) \
      or value < 1:
    raise ValueError(f"{name} must be a positive integer, got {value!r}")
  return int(value)
