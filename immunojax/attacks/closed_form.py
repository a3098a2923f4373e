"""Closed-form attackers on linear probes: what ill-conditioning can and
cannot stop.

``least_squares_probe`` is what an exact solver (one Newton step) recovers
whatever the conditioning; ``exact_line_search_gd`` is the condition-number
paper's Fig. 1 protocol, whose speed is governed by ``kappa``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from immunojax import _checks, spectral


def least_squares_probe(features: jax.Array, targets: jax.Array, *,
                        rtol: float | None = None) -> jax.Array:
  """Minimum-norm least-squares head: what a Newton step (or any exact
  solver) recovers in one step, whatever the conditioning.

  Singular values of ``F`` below ``rtol * s_max`` count as zero; the default
  ``sqrt(D * eps)`` is the numerical rank rule of
  :func:`immunojax.spectral.condition_number` applied to ``H = F^T F``
  (eigenvalues below ``D * eps * lambda_max``), so the attacker and the
  condition number see the same spectrum. (``jnp.linalg.pinv``'s default
  keeps round-off directions whose coefficients then swamp ``w*``.)
  """
  if jnp.ndim(features) != 2:
    raise ValueError(f"features must be 2-D, got shape {jnp.shape(features)}")
  _checks.check_finite(features, "features")
  d = features.shape[1]
  if rtol is None:
    rtol = float(np.sqrt(spectral.rank_rtol(d, features.dtype)))
  u, s, vt = jnp.linalg.svd(features, full_matrices=False)
  keep = s > rtol * s[0]
  inv = jnp.where(keep, 1.0 / jnp.where(keep, s, 1.0), 0.0)
  return vt.T @ (inv[:, None] * (u.T @ targets))


class LineSearchCurve(NamedTuple):
  """``norm_ratio[t] = ||w_t - w*||^2 / ||w_0 - w*||^2`` and the loss."""
  norm_ratio: jax.Array
  loss: jax.Array
  w: jax.Array


def exact_line_search_gd(features: jax.Array, targets: jax.Array,
                         num_steps: int, *, w0: jax.Array | None = None
                         ) -> LineSearchCurve:
  """Steepest descent with exact line search on ``0.5 ||F w - y||^2``.

  The condition-number paper's Fig. 1 protocol: step ``alpha = g^T g /
  g^T H g`` with ``H = F^T F`` (applied matrix-free), ``w_0 = 0`` by default
  and ``w*`` the minimum-norm solution, so null-space components play no part.
  Convergence is governed by ``kappa(H)`` on the row space.
  """
  num_steps = _checks.check_positive_int(num_steps, "num_steps")
  y = targets if jnp.ndim(targets) == 2 else targets[:, None]
  w_star = least_squares_probe(features, y)
  w = jnp.zeros_like(w_star) if w0 is None else w0.reshape(w_star.shape)
  loss = lambda w: 0.5 * jnp.sum((features @ w - y) ** 2)
  d0 = jnp.sum((w - w_star) ** 2)

  def step(w, _):
    g = features.T @ (features @ w - y)
    hg = features.T @ (features @ g)
    gg = jnp.sum(g * g)
    alpha = gg / jnp.maximum(jnp.sum(g * hg), jnp.finfo(g.dtype).tiny)
    w = w - jnp.where(gg > 0, alpha, 0.0) * g
    return w, (jnp.sum((w - w_star) ** 2) / d0, loss(w))

  loss0 = loss(w)
  w, (ratio, losses) = jax.lax.scan(step, w, None, length=num_steps)
  return LineSearchCurve(jnp.concatenate([jnp.ones(1, ratio.dtype), ratio]),
                         jnp.concatenate([loss0[None], losses]), w)
