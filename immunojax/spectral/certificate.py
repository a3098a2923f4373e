"""The certificate of :func:`immunojax.spectral.eigenpairs`: error bounds
from explicit residuals, gaps and the rounding of the arithmetic.

**The certificate.** After the loop each wanted Ritz vector ``y`` is formed
and multiplied once more: ``rho = y'Ay / y'y`` and ``r = ||Ay - rho y||/||y||``
are computed explicitly, not taken from the recurrence. For a symmetric ``A``
an eigenvalue lies in ``[rho - r, rho + r]`` (rigorous, up to the rounding of
that last product). Where the gap is resolved -- ``g = min_j |rho - theta_j| -
r_j`` over the other Ritz values ``theta_j`` (explicit residuals for the
next pair, Ritz estimates beyond) is at least ``GAP_RESIDUAL_RATIO`` times
``r`` and the nearest of them has converged to ``NEIGHBOUR_FRACTION`` of its
distance -- the Kato-Temple bound ``r^2 / g`` applies and is usually far
tighter. ``bounds = max(min(r, r^2/g), floor)``.

**The rounding floor.** No bound is smaller than the rounding of the
arithmetic it rests on: ``floor = ROUNDING_FACTOR * (eps_p + sqrt(D) eps_b)
* (|rho| + ||A||~)``, with ``eps_p`` the machine epsilon of the products'
dtype (float32 for a float32 network's HVP, whatever the basis), ``eps_b``
that of the certificate's arithmetic, the widest enabled float (the
Rayleigh quotient is a length-``D`` dot product in it) and ``||A||~`` the largest ``|theta|`` among the Ritz values (a lower
estimate of ``||A||``). Without it the ``r^2/g`` bound reaches 1e-30 where
the Rayleigh quotient itself is only good to a few ulps, and ``|lambda -
value| <= bound`` fails against a dense ``eigvalsh`` (itself off by ~10
ulps of ``||A||`` at ``D`` ~ 100). For float32 products the floor is about
``1e-6 * |rho|`` at the top of the spectrum; a ``tol`` below ``floor /
|value|`` cannot be met, and ``converged`` is then False.

What is and is not certified. The residual bound is rigorous: *an*
eigenvalue lies within ``r`` of ``rho``. The gap bound assumes that no
eigenvalue the Krylov space has not yet resolved lies within the gap -- every
Krylov eigensolver assumes this; extreme eigenvalues converge first, so once
the neighbour has converged it usually holds. It fails on clusters narrower
than the residual: on a 120 x 120 matrix whose top four eigenvalues are
``2 - {1e-3, 1e-4, 1e-5, 0}``, ``tol=1e-6`` stopped on a mixture of the
cluster's vectors, 5e-4 below ``lambda_max``, in 19 of 20 starts (the
residual bound, ~1e-3, still held); on well-separated, geometric and uniform
spectra the bound held in all 180 converged runs we tried. Where clusters are
possible, ask for ``criterion="vector"`` (stop on the residual) and read
``residuals``. Last, a Ritz value is always *inside* the spectrum (``rho <=
lambda_max``, rigorous); that the eigenvalue it approximates *is*
``lambda_max`` assumes the start vector is not orthogonal to its eigenvector
(probability zero from a random start).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from immunojax.spectral import _tree_basis as tb

# A gap counts once the nearest other Ritz value has converged to this share
# of its distance. 0.1 stopped ~8 steps later than 0.25 on a 1.33M-parameter
# MLP Hessian (74 against 67 products); on 720 states of 36 random operators
# (six spectrum families, 3..60 steps) the states 0.25 certified to 1e-6 were
# wrong only where the top is a cluster no Krylov method resolves in time
# (lambda_1 - lambda_2 = 1e-5: 17 states; four within 1e-3: 1) or lambda_2
# had not appeared yet (1 state, also wrong under 0.1).
NEIGHBOUR_FRACTION = 0.25
# ... and once the gap is this many residuals wide: the quadratic bound is
# then at most 1/20 of the residual one (so little is lost before), and a
# Ritz vector still mixing two eigenvectors (4 steps on eigenvalues 2.0 and
# 1.96: residual ~0.05, gap ~0.5, error 0.02) does not claim r^2/g = 0.0045.
GAP_RESIDUAL_RATIO = 20.0
# The floor on every bound, in units of (eps_p + sqrt(D) eps_b) * (|value| +
# ||A||~): covers the few ulps a Rayleigh quotient of rounded products is
# off; checked against dense eigvalsh on 20 random operators, float64 and
# float32 products (tests/test_eigensolver.py). Float32 products leave no
# room above it: 4 puts the floor at ~1e-6 relative at the top.
ROUNDING_FACTOR = 4.0


def ritz(proj, beta, n, which):
  """Ritz pairs of ``proj[:n, :n]`` in a static ``(m, m)`` array.

  Unused rows and columns are decoupled with a diagonal pad outside the wanted
  end (``top``/``bottom``) or at the mean diagonal (``both``); a pair is real
  when its eigenvector lives on the first ``n`` coordinates.
  """
  m = proj.shape[0]
  idx = jnp.arange(m)
  used = idx < n
  block = jnp.where(used[:, None] & used[None, :], proj, 0)
  radius = jnp.max(jnp.sum(jnp.abs(block), axis=1)) + 1
  diag = jnp.diagonal(block)
  pad = {"top": -2 * radius, "bottom": 2 * radius,
         "both": jnp.sum(diag) / n}[which]
  block = block + jnp.diag(jnp.where(used, 0, pad))
  theta, s = jnp.linalg.eigh(block)
  real = jnp.sum(jnp.where(used[:, None], s * s, 0), axis=0) > 0.5
  s = jnp.where(used[:, None], s, 0)   # no leakage onto stale basis rows
  estimates = jnp.abs(beta * s[n - 1, :])
  return theta, s, real, estimates


def order(theta, real, which, k):
  """Indices of the wanted pairs (and of the next ``k + 1``-th per end)."""
  up = jnp.argsort(jnp.where(real, theta, jnp.inf))
  down = jnp.argsort(-jnp.where(real, theta, -jnp.inf))
  if which == "top":
    return down[:k], down[:k + 1]
  if which == "bottom":
    return up[:k], up[:k + 1]
  return (jnp.concatenate([up[:k], down[:k]]),
          jnp.concatenate([up[:k + 1], down[:k + 1]]))


def floor(values, theta, real, rounding):
  """The rounding floor of each value's bound (see the module docstring);
  ``rounding = eps_p + sqrt(D) eps_b``."""
  norm = jnp.max(jnp.where(real, jnp.abs(theta), 0))
  return ROUNDING_FACTOR * rounding * (jnp.abs(values) + norm)


def value_bounds(values, residuals, theta, others_res, real, self_idx,
                 rounding):
  """``max(min(r, r^2/g), floor)`` with ``g = min_{j != i, real} |value_i -
  theta_j| - r_j`` and the rounding floor of :func:`floor`.

  The gap counts as resolved only when ``g > r`` and the nearest other Ritz
  value has itself converged to ``NEIGHBOUR_FRACTION`` of its distance: early
  on, an eigenvalue the Krylov space has not yet seen can sit inside a gap
  measured from unconverged Ritz values (after 4 steps on a matrix with
  eigenvalues 2.0 and 1.96 the quadratic bound claimed 0.0045 for an error of
  0.02; the residual bound held).
  """
  sep = jnp.abs(values[:, None] - theta[None, :])
  mask = real[None, :] & (jnp.arange(theta.shape[0])[None, :]
                          != self_idx[:, None])
  gaps = jnp.min(jnp.where(mask, sep - others_res[None, :], jnp.inf), axis=1)
  nearest = jnp.argmin(jnp.where(mask, sep, jnp.inf), axis=1)
  settled = others_res[nearest] <= NEIGHBOUR_FRACTION * sep[
      jnp.arange(values.shape[0]), nearest]
  resolved = (jnp.isfinite(gaps) & (gaps > GAP_RESIDUAL_RATIO * residuals)
              & settled)
  quad = residuals ** 2 / jnp.where(resolved, gaps, 1)
  bounds = jnp.where(resolved, jnp.minimum(residuals, quad), residuals)
  return jnp.maximum(bounds, floor(values, theta, real, rounding)), gaps


def certify(state, apply, which, k, tol, linearizations, by_residual,
            rounding, cert_dtype):
  """The fields of an :class:`~immunojax.spectral.Eigenpairs`: explicit residuals of the wanted pairs and their next neighbours, in
  ``cert_dtype`` (the Ritz vectors are formed in the basis dtype, then
  every figure about them is computed in ``cert_dtype``)."""
  theta, s, real, est = ritz(state.proj, state.beta, state.j, which)
  wanted_idx, near_idx = order(theta, real, which, k)
  ys = tb.tmap(lambda y: y.astype(cert_dtype),
               tb.combine(s[:, near_idx], state.basis))   # leaves (q, ...)
  ays = jax.lax.map(apply, ys)
  per_row = lambda f: jax.vmap(f)(ys, ays)
  norms2 = per_row(lambda y, ay: tb.dot(y, y))
  norms2 = jnp.where(norms2 > 0, norms2, 1)   # a pad pair (too few real ones)
  rho = per_row(lambda y, ay: tb.dot(y, ay)) / norms2
  res = jax.vmap(lambda y, ay, r: tb.norm(tb.axpy(-r, y, ay)))(
      ys, ays, rho) / jnp.sqrt(norms2)
  # The explicit figures replace the Ritz estimates where we have them.
  theta = theta.astype(cert_dtype).at[near_idx].set(rho)
  est = est.astype(cert_dtype).at[near_idx].set(res)
  pick = positions(which, k)
  values, residuals = rho[pick], res[pick]
  bounds, gaps = value_bounds(values, residuals, theta, est, real,
                              wanted_idx, rounding)
  converged = (jnp.all((residuals if by_residual else bounds)
                       <= tol * jnp.abs(values))
               & jnp.all(jnp.isfinite(values))
               & (jnp.sum(real) >= wanted_idx.shape[0]))
  unit = 1 / jnp.sqrt(norms2[pick])
  vectors = tb.tmap(lambda y: y[pick] * unit.reshape((-1,) + (1,) * (y.ndim - 1)),
                    ys)
  matvecs = state.steps + norms2.shape[0] + linearizations
  return (values, vectors, bounds, residuals, gaps, converged, matvecs,
          state.restarts)


def positions(which, k):
  """Rows of the ``near`` selection that are wanted pairs."""
  if which == "both":
    return np.concatenate([np.arange(k), k + 1 + np.arange(k)])
  return np.arange(k)
