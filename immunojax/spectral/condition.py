"""Condition numbers of symmetric (PSD) matrices: the estimator is a value.

Configure an estimator once and pass it around (matfree style); it maps a
symmetric matrix, or its eigenvalues, to the :class:`Extremes` a condition
number is made of:

``pinv()`` (the default)
  ``kappa = sigma_max / sigma_min`` over the numerically non-zero spectrum:
  ``|lambda_i| > rtol * sigma_max`` with ``rtol = D * eps`` by default
  (:func:`rank_rtol`). This is the paper's definition ``||S|| ||S^+||``
  (Eq. 1) and is what a rank-deficient Gram means.

``official()``
  The released code's estimator: eigenvalues of ``S + shift * I`` in float64,
  ``sigma_min`` = smallest of them above ``shift`` (1e-6). On a rank-deficient
  Gram, round-off lets null eigenvalues pass the filter, so ``kappa`` becomes
  roughly ``sigma_max / shift`` (spec cond_num.md §2.9, §3.2). Use it only to
  reproduce published numbers; it needs float64 input.

``estimator(name)`` builds either from its name (for command lines and
configs). Both are differentiable without NaNs on degenerate spectra (see
:mod:`immunojax.spectral.dense`).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Union

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


def rank_rtol(dim: int, dtype) -> float:
  """The one numerical-rank rule of the library: ``D * eps``.

  An eigenvalue of a ``D x D`` symmetric matrix counts as non-zero when
  ``|lambda| > rank_rtol(D, dtype) * max |lambda|`` (numpy's ``matrix_rank``
  rule). Singular values of a factor ``F`` of ``S = F^T F`` use the square
  root of it.
  """
  return int(dim) * float(np.finfo(dtype).eps)


def nonzero(w: jax.Array, *, rtol: float | None = None) -> jax.Array:
  """Boolean mask of the numerically non-zero entries of a spectrum ``w``.

  Not differentiated (a rank is a constant for autodiff).
  """
  a = jnp.abs(jax.lax.stop_gradient(w))
  rtol = rank_rtol(a.shape[-1], a.dtype) if rtol is None else rtol
  return a > rtol * jnp.max(a, axis=-1, keepdims=True)


@dataclasses.dataclass(frozen=True)
class Estimator:
  """A configured condition-number estimator: ``estimator(x) -> Extremes``.

  Frozen and hashable, so it can be a static argument of ``jax.jit`` and a
  field of a method's configuration. Build it with :func:`pinv`,
  :func:`official` or :func:`estimator`.

  Attributes:
    name: ``"pinv"`` or ``"official"``.
    rtol: ``pinv`` only: relative cut-off for a non-zero eigenvalue
      (default :func:`rank_rtol`).
    shift: ``official`` only: the diagonal shift and absolute filter.
  """
  name: str = "pinv"
  rtol: float | None = None
  shift: float = OFFICIAL_SHIFT

  def __post_init__(self):
    _checks.check_choice(self.name, ESTIMATORS, "estimator")

  def __call__(self, x: jax.Array) -> Extremes:
    w = _spectrum(x, self.name, self.shift)
    if self.name == "official":
      s = w
      keep = jax.lax.stop_gradient(s) > self.shift
    else:
      s = jnp.abs(w)
      keep = nonzero(s, rtol=self.rtol)
    sigma_max = jnp.max(s)
    sigma_min = jnp.min(jnp.where(keep, s, jnp.inf))
    return Extremes(sigma_min, sigma_max, jnp.sum(keep))

  def of_features(self, features: jax.Array) -> Extremes:
    """Extremes of ``F^T F`` for an ``(N, D)`` feature matrix.

    ``pinv`` uses the smaller of the two Grams (same non-zero spectrum);
    ``official`` needs the ``D x D`` Gram itself, because its shift acts on
    every one of the ``D`` eigenvalues, the ``D - N`` exact zeros included.
    """
    from immunojax.spectral.probe import gram  # noqa: PLC0415 - no cycle
    return self(gram(features, small=self.name != "official"))


EstimatorLike = Union[Estimator, str]


def pinv(*, rtol: float | None = None) -> Estimator:
  """The rank-aware estimator (the paper's ``||S|| ||S^+||``)."""
  return Estimator("pinv", rtol=rtol)


def official(*, shift: float = OFFICIAL_SHIFT) -> Estimator:
  """The released code's estimator (float64 only; see module docstring)."""
  return Estimator("official", shift=shift)


def estimator(name: EstimatorLike = "pinv") -> Estimator:
  """An :class:`Estimator` from its name (or the estimator itself)."""
  return name if isinstance(name, Estimator) else Estimator(name)


_estimator_value = estimator   # shadowed by the keyword argument below


def _spectrum(x, name: str, shift: float):
  ndim = jnp.ndim(x)
  if ndim not in (1, 2):
    raise ValueError(
        "expected a symmetric matrix (2-D) or its eigenvalues (1-D), got "
        f"shape {jnp.shape(x)}")
  _checks.check_float(x, "input")
  if jnp.size(x) == 0:
    raise ValueError(f"input is empty (shape {jnp.shape(x)}): a condition "
                     "number needs at least one eigenvalue")
  if name == "official" and jnp.result_type(x) != jnp.float64:
    raise ValueError(
        "the 'official' estimator is defined in float64 and its result "
        "depends on round-off; pass float64 input (enable x64 with "
        "`jax.config.update('jax_enable_x64', True)` or `with "
        f"jax.enable_x64(True):`), got {jnp.result_type(x)}")
  _checks.check_finite(x, "input")
  if ndim == 1:
    w = jnp.asarray(x)
    return w + shift if name == "official" else w
  if name == "official":
    _checks.check_symmetric(x, "matrix")
    x = x + shift * jnp.eye(x.shape[0], dtype=x.dtype)
  return _eigenvalues(x)


def spectrum_extremes(x: jax.Array, *, estimator: EstimatorLike = "pinv"
                      ) -> Extremes:
  """The ``sigma_min``, ``sigma_max`` and rank a condition number uses.

  Args:
    x: symmetric ``(D, D)`` matrix, or its ``(D,)`` eigenvalues.
    estimator: an :class:`Estimator` (or its name).

  Returns:
    :class:`Extremes`. ``sigma_min`` is ``inf`` for the zero matrix.
  """
  return _estimator_value(estimator)(x)


def condition_number(x: jax.Array, *, estimator: EstimatorLike = "pinv"
                     ) -> jax.Array:
  """``kappa = sigma_max / sigma_min`` of a symmetric matrix or its spectrum.

  Args: as :func:`spectrum_extremes`.

  Returns:
    Scalar condition number (``inf`` for the zero matrix, which has no
    non-zero singular value: ``kappa >= 1`` always).
  """
  e = spectrum_extremes(x, estimator=estimator)
  return jnp.where(e.rank > 0, e.sigma_max / e.sigma_min, jnp.inf)


def log_condition_number(x: jax.Array, *, estimator: EstimatorLike = "pinv"
                         ) -> jax.Array:
  """``log sigma_max - log sigma_min``; differentiable, the training target.

  Args: as :func:`spectrum_extremes`.
  """
  e = spectrum_extremes(x, estimator=estimator)
  return jnp.where(e.rank > 0, jnp.log(e.sigma_max) - jnp.log(e.sigma_min),
                   jnp.inf)


def numerical_rank(x: jax.Array, *, rtol: float | None = None) -> jax.Array:
  """Number of eigenvalues with ``|lambda| > rtol * max|lambda|``."""
  return pinv(rtol=rtol)(x).rank

