"""Extreme eigenpairs to a requested tolerance, with a certified error bound.

:func:`eigenpairs` (and its spellings :func:`top_eigenvalues`,
:func:`bottom_eigenvalues`, :func:`condition_number_bounds`) runs Lanczos with
full reorthogonalisation inside ``lax.while_loop`` and stops as soon as every
wanted Ritz value meets ``tol`` -- the user gives an accuracy, not a number of
steps. The operator is a pytree matvec with explicit parameters,
``matvec(v, *params)`` (see :mod:`immunojax.spectral.operators`); the Krylov
basis is stored leaf by leaf in ``basis_dtype``, so no product flattens its
vector (see :mod:`immunojax.spectral._tree_basis` for the measured reasons).

**The certificate** (:mod:`immunojax.spectral.certificate`): each wanted
Ritz value gets an explicit residual, a gap bound where the gap is
resolved, and a floor at the rounding of its arithmetic; see there for what
is and is not certified.

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
from immunojax.spectral import _tree_basis as tb, certificate as cert
from immunojax.spectral.operators import TreeMatvec

PyTree = Any
WHICH = ("top", "bottom", "both")
CRITERIA = ("value", "vector")
DEFAULT_BASIS = 20
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
               iteration_dtype=None,
               precision: str | None = "highest") -> Eigenpairs:
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
    precision: the matmul precision every product is traced under
      (``jax.default_matmul_precision``): ``"highest"`` (default) makes
      float32 products IEEE float32 on every backend -- on NVIDIA GPUs the
      float32 default is TF32 (~10 mantissa bits), a noisy operator the
      certificate does not describe. ``None`` keeps the caller's setting
      (and then the certificate holds only where that is full precision).

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
  if precision not in PRECISIONS:
    raise ValueError(f"precision must be one of {PRECISIONS}, got "
                     f"{precision!r}")
  config = _Config(k=k, which=which, tol=float(tol), max_steps=max_steps,
                   m=m, keep=keep, check_every=check_every,
                   by_residual=criterion == "vector",
                   linearize=bool(linearize), dtype=np.dtype(dtype),
                   iteration_dtype=iteration_dtype, precision=precision)
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
  precision: str | None = "highest"


def _cast_floats(tree, dtype):
  """Floating leaves of ``tree`` as ``dtype`` (others as they are)."""
  return tb.tmap(lambda x: x.astype(dtype) if jnp.issubdtype(
      jnp.result_type(x), jnp.floating) else x, tree)


def _operator(matvec, v0, params, linearize):
  """``v -> matvec(v, *params)``, linearised once when asked."""
  if linearize:
    return jax.linearize(lambda v: matvec(v, *params), v0)[1]
  return lambda v: matvec(v, *params)


PRECISIONS = ("highest", "high", "default", None)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _solve(matvec, config, v0, params):
  """The solver proper, compiled once per (matvec, config) and shapes: an
  eager call then runs one program instead of dispatching op by op. Every
  dot is traced at ``config.precision``."""
  if config.precision is None:
    return _solve_body(matvec, config, v0, params)
  with jax.default_matmul_precision(config.precision):
    return _solve_body(matvec, config, v0, params)


def _solve_body(matvec, config, v0, params):
  (k, which, tol, max_steps, m, keep, check_every, by_residual, linearize,
   dtype, iteration_dtype, _) = config
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
    theta, _, real, est = cert.ritz(proj, beta, n, which)
    idx, _ = cert.order(theta, real, which, k)
    bounds, _ = cert.value_bounds(theta[idx], est[idx], theta, est, real, idx,
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
    theta, s, real, _ = cert.ritz(state.proj, state.beta, state.j, which)
    if which == "both":
      up = jnp.argsort(jnp.where(real, theta, jnp.inf))
      down = jnp.argsort(-jnp.where(real, theta, -jnp.inf))
      lo = keep // 2
      picked = jnp.concatenate([up[:lo], down[:keep - lo]])
    else:
      picked, _ = cert.order(theta, real, which, keep)
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
  return Eigenpairs(*cert.certify(
      state, product(certify_op, v0, cert_dtype), which, k, tol,
      linearizations, by_residual, rounding, cert_dtype))


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
