"""Condition numbers of symmetric (PSD) matrices, rank-aware or as released.

Two estimators, chosen by name:

``"pinv"`` (default)
  ``kappa = sigma_max / sigma_min`` over the numerically non-zero spectrum:
  ``|lambda_i| > rtol * sigma_max`` with ``rtol = D * eps`` by default. This is
  the paper's definition ``||S|| ||S^+||`` (Eq. 1) and is what a rank-deficient
  Gram means.

``"official"``
  The released code's estimator: eigenvalues of ``S + shift * I`` in float64,
  ``sigma_min`` = smallest of them above ``shift`` (1e-6). On a rank-deficient
  Gram, round-off lets null eigenvalues pass the filter, so ``kappa`` becomes
  roughly ``sigma_max / shift`` (spec cond_num.md §2.9, §3.2). Use it only to
  reproduce published numbers; it needs float64 input.

Both accept either a symmetric matrix (2-D) or its eigenvalues (1-D), and are
differentiable without NaNs on degenerate spectra (see
:mod:`immunojax.spectral.dense`).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from immunojax import _checks
from immunojax.spectral.dense import eigenvalues as _eigenvalues

ESTIMATORS = ("pinv", "official")
OFFICIAL_SHIFT = 1e-6


class Extremes(NamedTuple):
  """The two ends of the spectrum a condition number is made of.

  Attributes:
    sigma_min: smallest retained singular value (per the estimator).
    sigma_max: largest singular value.
    rank: number of retained singular values (the ``k`` of ``R_ill``).
  """
  sigma_min: jax.Array
  sigma_max: jax.Array
  rank: jax.Array


def _spectrum(x, estimator: str, shift: float):
  ndim = jnp.ndim(x)
  if ndim not in (1, 2):
    raise ValueError(
        "expected a symmetric matrix (2-D) or its eigenvalues (1-D), got "
        f"shape {jnp.shape(x)}")
  if estimator == "official" and jnp.result_type(x) != jnp.float64:
    raise ValueError(
        "the 'official' estimator is defined in float64 and its result "
        "depends on round-off; pass float64 input (enable x64 with "
        "`jax.config.update('jax_enable_x64', True)` or `with "
        f"jax.enable_x64(True):`), got {jnp.result_type(x)}")
  _checks.check_finite(x, "input")
  if ndim == 1:
    w = jnp.asarray(x)
    return w + shift if estimator == "official" else w
  if estimator == "official":
    _checks.check_symmetric(x, "matrix")
    x = x + shift * jnp.eye(x.shape[0], dtype=x.dtype)
  return _eigenvalues(x)


def spectrum_extremes(x: jax.Array, *, estimator: str = "pinv",
                      rtol: float | None = None,
                      shift: float = OFFICIAL_SHIFT) -> Extremes:
  """The ``sigma_min``, ``sigma_max`` and rank a condition number uses.

  Args:
    x: symmetric ``(D, D)`` matrix, or its ``(D,)`` eigenvalues.
    estimator: ``"pinv"`` or ``"official"`` (see module docstring).
    rtol: ``"pinv"`` only: relative cut-off for a non-zero eigenvalue,
      default ``D * eps``.
    shift: ``"official"`` only: the diagonal shift and absolute filter.

  Returns:
    :class:`Extremes`. ``sigma_min`` is ``inf`` for the zero matrix.
  """
  _checks.check_choice(estimator, ESTIMATORS, "estimator")
  w = _spectrum(x, estimator, shift)
  if estimator == "official":
    s = w
    keep = jax.lax.stop_gradient(s) > shift
  else:
    s = jnp.abs(w)
    if rtol is None:
      rtol = s.shape[0] * float(np.finfo(s.dtype).eps)
    top = jax.lax.stop_gradient(jnp.max(s))
    keep = jax.lax.stop_gradient(s) > rtol * top
  sigma_max = jnp.max(s)
  sigma_min = jnp.min(jnp.where(keep, s, jnp.inf))
  return Extremes(sigma_min, sigma_max, jnp.sum(keep))


def condition_number(x: jax.Array, *, estimator: str = "pinv",
                     rtol: float | None = None,
                     shift: float = OFFICIAL_SHIFT) -> jax.Array:
  """``kappa = sigma_max / sigma_min`` of a symmetric matrix or its spectrum.

  Args: as :func:`spectrum_extremes`.

  Returns:
    Scalar condition number (``inf`` for the zero matrix).
  """
  e = spectrum_extremes(x, estimator=estimator, rtol=rtol, shift=shift)
  return e.sigma_max / e.sigma_min


def log_condition_number(x: jax.Array, *, estimator: str = "pinv",
                         rtol: float | None = None,
                         shift: float = OFFICIAL_SHIFT) -> jax.Array:
  """``log sigma_max - log sigma_min``; differentiable, the training target.

  Args: as :func:`spectrum_extremes`.
  """
  e = spectrum_extremes(x, estimator=estimator, rtol=rtol, shift=shift)
  return jnp.log(e.sigma_max) - jnp.log(e.sigma_min)


def numerical_rank(x: jax.Array, *, rtol: float | None = None) -> jax.Array:
  """Number of eigenvalues with ``|lambda| > rtol * max|lambda|``."""
  return spectrum_extremes(x, estimator="pinv", rtol=rtol).rank
