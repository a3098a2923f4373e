"""Extreme eigenpairs to a requested tolerance, with a certified error bound.

:func:`eigenpairs` (and its spellings :func:`top_eigenvalues`,
:func:`bottom_eigenvalues`, :func:`condition_number_bounds`) runs Lanczos with
full reorthogonalisation inside ``lax.while_loop`` and stops as soon as every
wanted Ritz value meets ``tol`` -- the user gives an accuracy, not a number of
steps. The operator is a pytree matvec with explicit parameters,
``matvec(v, *params)`` (see :mod:`immunojax.spectral.operators`); the Krylov
basis is stored leaf by leaf in ``basis_dtype``, so no product flattens its
vector (see :mod:`immunojax.spectral._tree_basis` for the measured reasons).

**The certificate.** After the loop each wanted Ritz vector ``y`` is formed
and multiplied once more: ``rho = y'Ay / y'y`` and ``r = ||Ay - rho y||/||y||``
are computed explicitly, not taken from the recurrence. For a symmetric ``A``
an eigenvalue lies in ``[rho - r, rho + r]`` (rigorous, up to the rounding of
that last product). Where the gap is resolved -- ``g = min_j |rho - theta_j| -
r_j > r`` over the other Ritz values ``theta_j`` (explicit residuals for the
next pair, Ritz estimates beyond), and the nearest of them has converged to a
tenth of its distance -- the Kato-Temple bound ``r^2 / g`` applies and is
usually far tighter. ``bounds = max(min(r, r^2/g), floor)``.

**The rounding floor.** No bound is smaller than the rounding of the
arithmetic it rests on: ``floor = ROUNDING_FACTOR * (eps_p + sqrt(D) eps_b)
* (|rho| + ||A||~)``, with ``eps_p`` the machine epsilon of the products'
dtype (float32 for a float32 network's HVP, whatever the basis), ``eps_b``
the basis dtype's (the Rayleigh quotient is a length-``D`` dot product in
it) and ``||A||~`` the largest ``|theta|`` among the Ritz values (a lower
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

**Mixed precision.** Products run in the dtype of ``v0``'s leaves (a float32
network's HVP stays float32); the basis, the reorthogonalisation and the
projected matrix run in ``basis_dtype`` (default: float64 when x64 is on).
The certificate then bounds the eigenvalues of the operator *as computed in
float32*: it differs from the exact-arithmetic Hessian by the HVP's rounding,
about ``1e-7 * ||A||`` times a model-dependent factor, and no bound below that
floor is meaningful (the residual of a float32 product cannot fall below it
either, so ``tol`` under ~1e-6 may not be met). ``benchmarks/spectrum.py``
measures the floor (``mixed_precision_floor_relative_bound``: the tightest
bound a float32 network reaches when asked for 1e-10) and the distance of the
float32 operator's top eigenvalue from the float64 one.

**Fast and float64-certified.** ``iteration_dtype=jnp.float32`` on a
float64 operator runs the Lanczos products in float32 and only the
certificate's few products in float64; with ``basis_dtype=jnp.float32`` the
basis work halves too. The answer is certified for the float64 operator
(``benchmarks/peers.py``: 1.33M parameters, 3.5 s against 8.8 s for
all-float64, the same certified 3e-8).

**Memory: restarted (default) versus full.** By default the basis holds
``basis_size = max(20, 2 * wanted + 2)`` vectors and the solver thick-restarts
(Wu-Simon; Krylov-Schur in the symmetric case): when the basis is full it
keeps the ``num_keep`` Ritz vectors nearest the wanted end(s) and the
residual direction and goes on, so memory is about ``(basis_size + 1 +
num_keep) D`` whatever ``max_steps`` is. ``basis_size >= max_steps`` gives
full reorthogonalisation without restarts: ``max_steps + 1`` vectors
allocated up front (1.33M float64 parameters x 151 = 1.6 GB). The full basis
needs the fewest products, which matters when a product is expensive and
``max_steps * D`` fits with room to spare; otherwise keep the default -- at
1M parameters it was also the faster one (each step's reorthogonalisation
reads a short basis, and no gigabyte is allocated and touched first).
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from immunojax import _checks
from immunojax.spectral import _tree_basis as tb
from immunojax.spectral.operators import TreeMatvec

PyTree = Any
WHICH = ("top", "bottom", "both")
CRITERIA = ("value", "vector")
DEFAULT_BASIS = 20
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


class Eigenpairs(NamedTuple):
  """Output of :func:`eigenpairs`.

  Attributes:
    values: ``(k,)`` Rayleigh quotients of the returned vectors: ``top``
      descending, ``bottom`` ascending, ``both`` the ``k`` bottom ones
      ascending then the ``k`` top ones descending (``(2k,)``).
    vectors: pytree like ``v0`` whose leaves carry a leading ``k`` axis (unit
      Ritz vectors, in the widest float: the certificate's dtype).
    bounds: ``(k,)`` certified absolute error bounds, ``min(r, r^2/gap)``.
    residuals: ``(k,)`` explicit residual norms ``||A y - rho y||``.
    gaps: ``(k,)`` the gap used by the quadratic bound (``<= residual`` where
      unresolved, then ``bounds == residuals``).
    converged: whether every ``bounds <= tol * |values|`` (``residuals``
      under ``criterion="vector"``).
    num_matvecs: products used, the certificate's included.
    num_restarts: thick restarts performed.
  """
  values: jax.Array
  vectors: PyTree
  bounds: jax.Array
  residuals: jax.Array
  gaps: jax.Array
  converged: jax.Array
  num_matvecs: jax.Array
  num_restarts: jax.Array

  @property
  def relative_bounds(self) -> jax.Array:
    return self.bounds / jnp.abs(self.values)


class ConditionNumberBounds(NamedTuple):
  """Output of :func:`condition_number_bounds`: ``lower <= kappa <= upper``.

  ``relative_error = upper / lower - 1``; ``kappa`` is the point estimate
  (Rayleigh quotients' ratio, equal to ``lower``).
  """
  kappa: jax.Array
  lower: jax.Array
  upper: jax.Array
  relative_error: jax.Array
  converged: jax.Array
  pairs: Eigenpairs


class _State(NamedTuple):
  basis: tuple          # chunks of rows, see _tree_basis (m + 1 rows)
  q: PyTree             # row j (the next vector to multiply)
  q_prev: PyTree        # row j - 1
  proj: jax.Array       # (m, m) projected matrix V' A V
  beta: jax.Array       # coupling of the last filled vector to basis[j]
  j: jax.Array          # filled vectors = columns of proj in use
  steps: jax.Array
  restarts: jax.Array
  done: jax.Array
  stop: jax.Array       # breakdown or non-finite product


def _orthogonalize(basis, w, n, before):
  """Project out ``basis[:n]``; a second sweep when the first cancelled
  (DGKS: the norm fell below ``1/sqrt(2)`` of ``before``). Returns ``w`` and
  its norm."""
  w, _ = tb.project(basis, w, n)
  after = tb.norm(w)
  # A zero-length second sweep rather than lax.cond: a cond would take the
  # basis as an operand, and XLA copies it (a full pass over the basis).
  again = after < 0.7071 * before
  w, removed = tb.project(basis, w, jnp.where(again, n, 0))
  # The second sweep removes little (the first left ``w`` orthogonal up to
  # rounding), so Pythagoras gives its norm without another pass over w.
  return w, jnp.sqrt(jnp.maximum(after * after - removed, 0))


def _ritz(proj, beta, n, which):
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


def _order(theta, real, which, k):
  """Indices of the wanted pairs (and of the next ``k + 1``-th per end)."""
  up = jnp.argsort(jnp.where(real, theta, jnp.inf))
  down = jnp.argsort(-jnp.where(real, theta, -jnp.inf))
  if which == "top":
    return down[:k], down[:k + 1]
  if which == "bottom":
    return up[:k], up[:k + 1]
  return (jnp.concatenate([up[:k], down[:k]]),
          jnp.concatenate([up[:k + 1], down[:k + 1]]))


def _floor(values, theta, real, rounding):
  """The rounding floor of each value's bound (see the module docstring);
  ``rounding = eps_p + sqrt(D) eps_b``."""
  norm = jnp.max(jnp.where(real, jnp.abs(theta), 0))
  return ROUNDING_FACTOR * rounding * (jnp.abs(values) + norm)


def _bounds(values, residuals, theta, others_res, real, self_idx,
            rounding):
  """``max(min(r, r^2/g), floor)`` with ``g = min_{j != i, real} |value_i -
  theta_j| - r_j`` and the rounding floor of :func:`_floor`.

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
  return jnp.maximum(bounds, _floor(values, theta, real, rounding)), gaps


def _check_config(k, which, tol, max_steps, basis_size, num_keep, check_every,
                  dim):
  k = _checks.check_positive_int(k, "k")
  _checks.check_choice(which, WHICH, "which")
  if not (isinstance(tol, (int, float)) and math.isfinite(tol) and tol > 0):
    raise ValueError(f"tol must be a positive finite number, got {tol!r}")
  max_steps = _checks.check_positive_int(max_steps, "max_steps")
  check_every = _checks.check_positive_int(check_every, "check_every")
  wanted = 2 * k if which == "both" else k
  if wanted > dim:
    raise ValueError(f"asked for {wanted} eigenpairs of a {dim}-dimensional "
                     "operator")
  if basis_size is None:   # ARPACK's rule of thumb for ncv
    basis_size = max(DEFAULT_BASIS, 2 * wanted + 2)
  m = _checks.check_positive_int(basis_size, "basis_size")
  if m >= min(max_steps, dim):        # the basis never fills: no restart
    if num_keep is not None:
      raise ValueError(
          f"num_keep is the thick-restart size, but basis_size={m} >= "
          f"max_steps={max_steps} never restarts")
    return k, min(max_steps, dim), 0, max_steps, check_every
  if num_keep is None:
    num_keep = max(wanted + 1, m // 2)
  num_keep = _checks.check_positive_int(num_keep, "num_keep")
  if not wanted <= num_keep < m:
    raise ValueError(
        f"thick restart keeps num_keep={num_keep} Ritz vectors of a "
        f"basis_size={m} basis: need {wanted} (the wanted pairs) <= num_keep "
        f"< basis_size")
  return k, m, num_keep, max_steps, check_every


def eigenpairs(matvec: TreeMatvec, v0: PyTree, *params, k: int = 1,
               which: str = "top", tol: float = 1e-6, max_steps: int = 300,
               basis_size: int | None = None, num_keep: int | None = None,
               basis_dtype=None, check_every: int = 1,
               criterion: str = "value",
               linearize: bool = True,
               iteration_dtype=None) -> Eigenpairs:
  """The ``k`` extreme eigenpairs of a symmetric operator, to relative ``tol``.

  Args:
    matvec: ``matvec(v, *params) -> pytree like v``, symmetric and linear in
      ``v`` (e.g. :func:`immunojax.spectral.hessian_matvec`).
    v0: start vector, a pytree of floating arrays (its structure and dtypes
      define the space; e.g. :func:`immunojax.spectral.random_vector`). Need
      not be normalised; must not be zero.
    *params: the operator's explicit arguments, passed to ``matvec``.
    k: eigenpairs wanted per end.
    which: ``"top"`` (largest algebraic), ``"bottom"`` (smallest) or
      ``"both"`` (``k`` of each).
    tol: stop when every wanted Ritz value's estimated bound is
      ``<= tol * |value|``; the returned ``converged`` re-checks this with the
      explicit certificate.
    max_steps: cap on Lanczos steps (products); with the full basis also its
      allocated size.
    basis_size: vectors in the basis; thick restarts when it fills (default
      ``max(20, 2 * wanted + 2)``). ``basis_size >= max_steps`` (or ``>=``
      the dimension) runs full reorthogonalisation without restarts. See the
      module docstring for when to use which.
    num_keep: Ritz vectors kept at a restart (default
      ``max(wanted + 1, basis_size // 2)``).
    basis_dtype: dtype of the basis, the reorthogonalisation and the
      projected matrix (default: the widest enabled float, float64 under
      x64). Products still run in the leaves' dtypes, and the certificate
      (Rayleigh quotients, residuals) in the widest float whatever this
      is: ``float32`` halves the memory traffic of each step (at 1.33M
      parameters 16 against 33 ms of basis work per step) and the
      certificate keeps its float64 floor.
    criterion: ``"value"`` stops when the eigenvalue bound ``min(r, r^2/g)``
      meets ``tol``; ``"vector"`` when the residual ``r`` itself does, which
      bounds the eigenvector's angle by ``r / g`` -- what anything computed
      from the vectors (a gradient through ``v^T dH v``) needs. ``"vector"``
      takes more steps: ``r^2/g`` shrinks twice as fast as ``r``.
    check_every: test convergence every this many steps (each test is an
      eigendecomposition of the ``(m, m)`` projected matrix: 4 ms at
      ``m = 150``; raise it when products are cheaper than that).
    linearize: linearise ``matvec`` in ``v`` once (``jax.linearize``), so work
      that depends only on ``params`` -- a Hessian's forward and backward
      pass -- is done once, not per product. Turn off for matvecs JAX cannot
      linearise (callbacks).
    iteration_dtype: run the Lanczos products in this dtype (e.g. float32
      for a float64 operator: ``v0``'s floating leaves and the floating
      arguments in ``params`` are cast), while the certificate's products
      stay in ``v0``'s dtype. The Ritz vector converges on the cheaper
      operator; its Rayleigh quotient and residual are then computed on the
      real one, so ``bounds`` certify the eigenvalues of the operator as
      given (the difference between the two operators enters the residual,
      and ``r^2/g`` squares it). Default None: iterate in ``v0``'s dtype.

  Returns:
    :class:`Eigenpairs`; jit-able (``k``, ``which`` and sizes are static).
    Eager calls raise ``FloatingPointError`` when a product is not finite;
    under ``jit`` the values are NaN and ``converged`` is False.
  """
  if basis_dtype is None:
    basis_dtype = jnp.zeros((), float).dtype   # float64 under x64
  dtype = jnp.dtype(basis_dtype)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(f"basis_dtype must be floating point, got {dtype}")
  leaves = jax.tree_util.tree_leaves(v0)
  if not leaves:
    raise ValueError("v0 has no leaves: it defines the operator's space")
  for x in leaves:
    if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
      raise TypeError(f"v0's leaves must be floating point, got "
                      f"{jnp.result_type(x)}")
  dim = int(sum(np.prod(jnp.shape(x), dtype=int) for x in leaves))
  k, m, keep, max_steps, check_every = _check_config(
      k, which, tol, max_steps, basis_size, num_keep, check_every, dim)
  _checks.check_choice(criterion, CRITERIA, "criterion")
  if iteration_dtype is not None:
    iteration_dtype = np.dtype(iteration_dtype)
    if not jnp.issubdtype(iteration_dtype, jnp.floating):
      raise TypeError(f"iteration_dtype must be floating point, got "
                      f"{iteration_dtype}")
  if all(_checks.is_concrete(x) for x in leaves):   # numpy: no compiles
    host = [np.asarray(x) for x in leaves]
    if not all(np.all(np.isfinite(x)) for x in host):
      raise ValueError("v0 contains NaN or Inf")
    if not any(np.any(x != 0) for x in host):
      raise ValueError("v0 is zero: a Krylov space needs a non-zero start")
  config = _Config(k=k, which=which, tol=float(tol), max_steps=max_steps,
                   m=m, keep=keep, check_every=check_every,
                   by_residual=criterion == "vector",
                   linearize=bool(linearize), dtype=np.dtype(dtype),
                   iteration_dtype=iteration_dtype)
  pairs = _solve(matvec, config, v0, params)
  if _checks.is_concrete(pairs.values) and not bool(
      np.all(np.isfinite(np.asarray(pairs.values)))):
    raise FloatingPointError(
        "eigenpairs: the matvec returned NaN/Inf; check the operator (e.g. a "
        "diverged model's Hessian)")
  return pairs


class _Config(NamedTuple):
  k: int
  which: str
  tol: float
  max_steps: int
  m: int
  keep: int
  check_every: int
  by_residual: bool
  linearize: bool
  dtype: Any
  iteration_dtype: Any = None


def _cast_floats(tree, dtype):
  """Floating leaves of ``tree`` as ``dtype`` (others as they are)."""
  return tb.tmap(lambda x: x.astype(dtype) if jnp.issubdtype(
      jnp.result_type(x), jnp.floating) else x, tree)


def _operator(matvec, v0, params, linearize):
  """``v -> matvec(v, *params)``, linearised once when asked."""
  if linearize:
    return jax.linearize(lambda v: matvec(v, *params), v0)[1]
  return lambda v: matvec(v, *params)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _solve(matvec, config, v0, params):
  """The solver proper, compiled once per (matvec, config) and shapes: an
  eager call then runs one program instead of dispatching op by op."""
  (k, which, tol, max_steps, m, keep, check_every, by_residual, linearize,
   dtype, iteration_dtype) = config
  eps = float(np.finfo(dtype).eps)
  dim = sum(int(np.prod(jnp.shape(x))) for x in jax.tree_util.tree_leaves(v0))
  # The certificate: products in v0's dtype, its Rayleigh quotients and
  # residuals in the widest float (whatever the basis is stored in).
  cert_dtype = np.dtype(jnp.promote_types(dtype, jnp.zeros((), float).dtype))
  rounding = (max(float(np.finfo(jnp.result_type(x)).eps)
                  for x in jax.tree_util.tree_leaves(v0))
              + math.sqrt(dim) * float(np.finfo(cert_dtype).eps))
  start = tb.tmap(lambda x: jnp.asarray(x).astype(dtype), v0)
  start = tb.scale(start, 1 / tb.norm(start))
  certify_op = _operator(matvec, v0, params, linearize)
  if iteration_dtype is None:
    v_it, iterate_op = v0, certify_op
  else:
    v_it = _cast_floats(v0, iteration_dtype)
    iterate_op = _operator(matvec, v_it, _cast_floats(params, iteration_dtype),
                           linearize)

  def product(op, like, out_dtype):
    def apply(v):
      """The product in ``like``'s dtypes, returned in ``out_dtype``."""
      return tb.tmap(lambda x: x.astype(out_dtype), op(tb.cast(v, like)))
    return apply

  apply = product(iterate_op, v_it, dtype)

  wanted = 2 * k if which == "both" else k

  def ritz_test(proj, beta, n):
    theta, _, real, est = _ritz(proj, beta, n, which)
    idx, _ = _order(theta, real, which, k)
    bounds, _ = _bounds(theta[idx], est[idx], theta, est, real, idx,
                        rounding)
    ok = jnp.all((est[idx] if by_residual else bounds)
                 <= tol * jnp.abs(theta[idx]))
    return ok & (jnp.sum(real) >= wanted)

  def step(state):
    j = state.j
    q = state.q
    w = apply(q)
    alpha = tb.dot(q, w)
    prev = jnp.maximum(j - 1, 0)
    coupling = jnp.where(j > 0, state.proj[prev, jnp.minimum(j, m - 1)], 0)
    w = tb.axpy(-alpha, q, tb.axpy(-coupling, state.q_prev, w))
    before = tb.norm(w)
    w, beta = _orthogonalize(state.basis, w, j + 1, before)
    # ||A q|| from its parts (q, q_prev orthonormal): no pass over w.
    scale = jnp.sqrt(alpha * alpha + coupling * coupling + before * before)
    broke = beta <= jnp.sqrt(eps) * jnp.maximum(scale, jnp.finfo(dtype).tiny)
    bad = ~jnp.isfinite(alpha) | ~jnp.isfinite(beta)
    beta = jnp.where(broke | bad, 0, beta)
    nxt = tb.scale(w, jnp.where(broke | bad, 0, 1 / jnp.where(beta > 0, beta, 1)))
    proj = state.proj.at[j, j].set(alpha)
    after = jnp.minimum(j + 1, m - 1)
    link = jnp.where(j + 1 < m, beta, 0)
    proj = proj.at[after, j].add(link).at[j, after].add(
        jnp.where(after != j, link, 0))
    return state._replace(basis=tb.set_row(state.basis, j + 1, nxt),
                          q=nxt, q_prev=q, proj=proj, beta=beta, j=j + 1, steps=state.steps + 1,
                          stop=broke | bad)

  def restart(state):
    theta, s, real, _ = _ritz(state.proj, state.beta, state.j, which)
    if which == "both":
      up = jnp.argsort(jnp.where(real, theta, jnp.inf))
      down = jnp.argsort(-jnp.where(real, theta, -jnp.inf))
      lo = keep // 2
      picked = jnp.concatenate([up[:lo], down[:keep - lo]])
    else:
      picked, _ = _order(theta, real, which, keep)
    kept = tb.combine(s[:, picked], state.basis)          # leaves (keep, ...)
    basis = jax.lax.fori_loop(0, keep, lambda i, b: tb.set_row(b, i, tb.tmap(
        lambda x: jax.lax.dynamic_index_in_dim(x, i, 0, keepdims=False),
        kept)), state.basis)
    basis = tb.set_row(basis, keep, state.q)   # row m: the residual direction
    arrow = state.beta * s[m - 1, picked]
    proj = jnp.zeros_like(state.proj)
    proj = proj.at[jnp.arange(keep), jnp.arange(keep)].set(theta[picked])
    proj = proj.at[keep, :keep].set(arrow).at[:keep, keep].set(arrow)
    return state._replace(basis=basis, q_prev=tb.tmap(lambda x: x[keep - 1],
                                                      kept),
                          proj=proj, j=jnp.asarray(keep),
                          restarts=state.restarts + 1)

  def body(state):
    state = step(state)
    check = ((state.steps % check_every == 0) | (state.j == m) | state.stop
             | (state.steps >= max_steps))
    done = jax.lax.cond(check, ritz_test, lambda *_: jnp.asarray(False),
                        state.proj, state.beta, state.j)
    state = state._replace(done=done)
    if keep:
      go_on = (state.j == m) & ~done & ~state.stop & (state.steps < max_steps)
      state = jax.lax.cond(go_on, restart, lambda s: s, state)
    return state

  def cond(state):
    return (~state.done & ~state.stop & (state.steps < max_steps)
            & (state.j < m))

  init = _State(
      basis=tb.set_row(tb.zeros(m + 1, v0, dtype), 0, start),
      q=start, q_prev=tb.scale(start, 0),
      proj=jnp.zeros((m, m), dtype), beta=jnp.zeros((), dtype),
      j=jnp.asarray(0), steps=jnp.asarray(0), restarts=jnp.asarray(0),
      done=jnp.asarray(False), stop=jnp.asarray(False))
  state = jax.lax.while_loop(cond, body, init)
  linearizations = (0 if not linearize else
                    1 if iteration_dtype is None else 2)
  return _certify(state, product(certify_op, v0, cert_dtype), which, k, tol,
                  linearizations, by_residual, rounding, cert_dtype)


def _certify(state, apply, which, k, tol, linearizations, by_residual,
             rounding, cert_dtype):
  """Explicit residuals of the wanted pairs and their next neighbours, in
  ``cert_dtype`` (the Ritz vectors are formed in the basis dtype, then
  every figure about them is computed in ``cert_dtype``)."""
  theta, s, real, est = _ritz(state.proj, state.beta, state.j, which)
  wanted_idx, near_idx = _order(theta, real, which, k)
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
  pick = _positions(which, k)
  values, residuals = rho[pick], res[pick]
  bounds, gaps = _bounds(values, residuals, theta, est, real, wanted_idx,
                         rounding)
  converged = (jnp.all((residuals if by_residual else bounds)
                       <= tol * jnp.abs(values))
               & jnp.all(jnp.isfinite(values))
               & (jnp.sum(real) >= wanted_idx.shape[0]))
  unit = 1 / jnp.sqrt(norms2[pick])
  vectors = tb.tmap(lambda y: y[pick] * unit.reshape((-1,) + (1,) * (y.ndim - 1)),
                    ys)
  matvecs = state.steps + norms2.shape[0] + linearizations
  return Eigenpairs(values, vectors, bounds, residuals, gaps, converged,
                    matvecs, state.restarts)


def _positions(which, k):
  """Rows of the ``near`` selection that are wanted pairs."""
  if which == "both":
    return np.concatenate([np.arange(k), k + 1 + np.arange(k)])
  return np.arange(k)


def top_eigenvalues(matvec: TreeMatvec, v0: PyTree, *params,
                    **options) -> Eigenpairs:
  """The ``k`` largest eigenpairs with certified bounds: ``eigenpairs(...,
  which="top")``; see :func:`eigenpairs` for the options."""
  return eigenpairs(matvec, v0, *params, which="top", **options)


def bottom_eigenvalues(matvec: TreeMatvec, v0: PyTree, *params,
                       **options) -> Eigenpairs:
  """The ``k`` smallest eigenpairs with certified bounds: ``eigenpairs(...,
  which="bottom")``."""
  return eigenpairs(matvec, v0, *params, which="bottom", **options)


def condition_number_bounds(matvec: TreeMatvec, v0: PyTree, *params,
                            tol: float = 1e-6,
                            **options) -> ConditionNumberBounds:
  """``kappa = lambda_max / lambda_min`` of a positive definite operator,
  certified to relative ``tol``.

  One Lanczos run with ``which="both"``; each end is solved to ``tol / 3`` so
  that ``upper / lower - 1 <= tol`` once both are certified. The bounds use
  ``rho_max <= lambda_max <= rho_max + b_max`` and ``rho_min - b_min <=
  lambda_min <= rho_min``. Eager calls raise ``ValueError`` when the
  smallest Rayleigh quotient is not positive (the operator is not positive
  definite -- a rank-deficient Gram's ``kappa`` is taken over its non-zero
  spectrum: use :func:`immunojax.spectral.condition_number` there). Whenever
  positive definiteness is not certified (``rho_min - b_min <= 0``; under
  ``jit`` this includes an indefinite operator, which cannot raise there),
  ``kappa`` and ``lower`` are NaN, ``upper`` and ``relative_error`` are
  ``inf`` and ``converged`` is False.
  """
  pairs = eigenpairs(matvec, v0, *params, k=1, which="both", tol=tol / 3,
                     **options)
  lo_val, hi_val = pairs.values[0], pairs.values[1]
  lo_b, hi_b = pairs.bounds[0], pairs.bounds[1]
  if _checks.is_concrete(lo_val) and float(lo_val) <= 0:
    raise ValueError(
        f"condition_number_bounds: the smallest eigenvalue is about "
        f"{float(lo_val):.3g} <= 0; kappa = lambda_max / lambda_min needs a "
        "positive definite operator")
  floor = lo_val - lo_b
  definite = floor > 0
  lower = jnp.where(definite, hi_val / jnp.where(definite, lo_val, 1),
                    jnp.nan)
  upper = jnp.where(definite, (hi_val + hi_b) / jnp.where(definite, floor, 1),
                    jnp.inf)
  rel = jnp.where(definite, upper / lower - 1, jnp.inf)
  return ConditionNumberBounds(lower, lower, upper, rel,
                               definite & (rel <= tol), pairs)
