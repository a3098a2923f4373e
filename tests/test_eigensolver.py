"""Certified eigensolver and the differentiable top eigenvalue, against dense
``eigh`` / ``jax.hessian`` oracles (float64)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from immunojax import losses, models, spectral


def matrix_with_spectrum(eigs, seed=0):
  rng = np.random.default_rng(seed)
  q, _ = np.linalg.qr(rng.normal(size=(len(eigs), len(eigs))))
  return jnp.asarray((q * np.asarray(eigs)) @ q.T)


def dense_matvec(v, a):
  return a @ v


# A gap of 2% at the top and bottom, a bulk in between.
EIGS = np.concatenate([[0.05, 0.051], np.linspace(0.1, 1.0, 76), [1.96, 2.0]])


@pytest.mark.parametrize("which", ["top", "bottom"])
@pytest.mark.parametrize("k,basis_size", [(1, 80), (1, None), (2, 12)])
def test_eigenpairs_match_dense_and_the_bound_holds(which, k, basis_size):
  a = matrix_with_spectrum(EIGS)
  v0 = jnp.asarray(np.random.default_rng(1).normal(size=len(EIGS)))
  res = spectral.eigenpairs(dense_matvec, v0, a, k=k, which=which, tol=1e-9,
                            max_steps=80, basis_size=basis_size)
  exact = np.sort(EIGS)[::-1][:k] if which == "top" else np.sort(EIGS)[:k]
  err = np.abs(np.asarray(res.values) - exact)
  assert bool(res.converged)
  assert np.all(err <= np.asarray(res.bounds) * (1 + 1e-6) + 1e-15)
  assert np.all(np.asarray(res.relative_bounds) <= 1e-9)
  if basis_size == 80:   # >= max_steps: full reorthogonalisation
    assert int(res.num_restarts) == 0
  if basis_size == 12:   # two pairs need more than 12 vectors: restarts
    assert int(res.num_restarts) > 0
  # Unit Ritz vectors with the residual the result claims.
  for i in range(k):
    y = res.vectors[i]
    np.testing.assert_allclose(float(jnp.linalg.norm(y)), 1.0, rtol=1e-10)
    r = float(jnp.linalg.norm(a @ y - res.values[i] * y))
    np.testing.assert_allclose(r, float(res.residuals[i]), rtol=1e-6,
                               atol=1e-13)


def test_unconverged_run_says_so_and_its_bound_still_holds():
  a = matrix_with_spectrum(EIGS)
  v0 = jnp.ones(len(EIGS))
  res = spectral.top_eigenvalues(dense_matvec, v0, a, tol=1e-12, max_steps=4)
  assert not bool(res.converged)
  assert int(res.num_matvecs) == 4 + 2 + 1
  assert abs(float(res.values[0]) - EIGS.max()) <= float(res.bounds[0])
  # A Ritz value never exceeds the top eigenvalue.
  assert float(res.values[0]) <= EIGS.max() + 1e-12


def test_residual_bound_is_rigorous_even_before_convergence():
  # Some eigenvalue lies within the explicit residual of each value, at any
  # depth, whatever the start; and a top Ritz value never exceeds lambda_max.
  a = matrix_with_spectrum(np.geomspace(1e-6, 1.0, 80), seed=3)
  eigs = np.linalg.eigvalsh(np.asarray(a))
  solve = jax.jit(jax.vmap(lambda v: spectral.top_eigenvalues(
      dense_matvec, v, a, k=2, tol=1e-14, max_steps=6), in_axes=0))
  res = solve(jax.random.normal(jax.random.PRNGKey(0), (8, 80)))
  values, residuals = np.asarray(res.values), np.asarray(res.residuals)
  nearest = np.min(np.abs(values[..., None] - eigs), axis=-1)
  assert not np.any(np.asarray(res.converged))
  assert np.all(nearest <= residuals * (1 + 1e-9) + 1e-15)
  assert np.all(values[:, 0] <= eigs[-1] + 1e-12)


def test_condition_number_bounds_contain_kappa_and_refuse_indefinite():
  a = matrix_with_spectrum(EIGS, seed=2)
  v0 = jnp.ones(len(EIGS))
  c = spectral.condition_number_bounds(dense_matvec, v0, a, tol=1e-6,
                                       max_steps=80)
  kappa = EIGS.max() / EIGS.min()
  assert bool(c.converged) and float(c.relative_error) <= 1e-6
  assert float(c.lower) <= kappa * (1 + 1e-12)
  assert float(c.upper) >= kappa * (1 - 1e-12)
  with pytest.raises(ValueError, match="positive definite"):
    spectral.condition_number_bounds(dense_matvec, v0, a - 0.5 * jnp.eye(80),
                                     max_steps=80)


def test_condition_number_bounds_under_jit_say_not_definite():
  """Under jit an indefinite operator cannot raise: kappa is NaN and
  converged False (not kappa < 0 with relative_error -inf)."""
  a = matrix_with_spectrum(EIGS, seed=2)
  v0 = jnp.ones(len(EIGS))
  f = jax.jit(lambda m: spectral.condition_number_bounds(
      dense_matvec, v0, m, tol=1e-6, max_steps=80))
  bad = f(a - 0.5 * jnp.eye(80))
  assert not bool(bad.converged) and np.isnan(float(bad.kappa))
  assert np.isinf(float(bad.relative_error)) and np.isinf(float(bad.upper))
  good = f(a)
  assert bool(good.converged)
  np.testing.assert_allclose(float(good.kappa), EIGS.max() / EIGS.min(),
                             rtol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
def test_the_readme_sentence_holds_against_dense_eigvalsh(dtype):
  """``|lambda - value| <= bound`` for every returned pair, lambda from a
  dense float64 ``eigvalsh`` of the operator as stored, on 20 random
  operators (uniform, geometric, indefinite, separated top), asked for a
  tolerance at the rounding floor (where the r^2/gap bound alone went to
  1e-30)."""
  n = 60
  solve = jax.jit(lambda a, v, which: spectral.eigenpairs(
      lambda x, m: m @ x, v, a, k=2, which=which,
      tol=1e-12 if dtype == jnp.float64 else 2e-6, max_steps=120),
      static_argnums=2)
  worst = 0.0
  for seed in range(20):
    rng = np.random.default_rng(seed)
    eigs = [rng.uniform(0.1, 10, n), np.geomspace(1e-3, 5.6, n),
            3 * rng.normal(size=n),
            np.concatenate([[5.6, 5.0], rng.uniform(0, 1, n - 2)])][seed % 4]
    a = matrix_with_spectrum(eigs, seed=seed).astype(dtype)
    exact = np.linalg.eigvalsh(np.asarray(a, np.float64))
    v0 = jnp.asarray(rng.normal(size=n), dtype)
    for which, want in (("top", exact[::-1][:2]), ("bottom", exact[:2])):
      res = solve(a, v0, which)
      err = np.abs(np.asarray(res.values, np.float64) - want)
      worst = max(worst, float(np.max(err / np.asarray(res.bounds))))
  assert worst <= 1.0, worst


def small_mlp(dtype=jnp.float64, seed=0):
  apply, params = models.functional(models.MLP(
      [4, 6, 3], rngs=nnx.Rngs(seed), activation=jnp.tanh))
  params = jax.tree_util.tree_map(lambda p: p.astype(dtype), params)
  kx, ky = jax.random.split(jax.random.PRNGKey(seed + 10))
  x = jax.random.normal(kx, (16, 4), jnp.float64).astype(dtype)
  y = jax.random.randint(ky, (16,), 0, 3)
  return (lambda p, x, y: losses.cross_entropy(apply(p, x), y)), params, x, y


def test_pytree_hessian_operator_float64_and_mixed_precision():
  loss, params, x, y = small_mlp()
  exact = float(jax.jit(lambda p: jnp.linalg.eigvalsh(
      spectral.hessian_matrix(loss, p, x, y))[-1])(params))
  mv = spectral.hessian_matvec(loss)
  v0 = spectral.random_vector(jax.random.PRNGKey(0), params)
  res = jax.jit(lambda v, p: spectral.top_eigenvalues(
      mv, v, p, x, y, tol=1e-10, max_steps=51))(v0, params)
  assert bool(res.converged)
  assert abs(float(res.values[0]) - exact) <= float(res.bounds[0]) + 1e-15
  assert jax.tree_util.tree_structure(res.vectors) == \
      jax.tree_util.tree_structure(params)
  # float32 products, float64 basis: the vectors stay float64, the
  # certificate bounds the float32 operator, which sits within ~1e-6 of the
  # float64 one on this net.
  to32 = lambda t: jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), t)
  res32 = spectral.top_eigenvalues(mv, to32(v0), to32(params), to32(x), y,
                                   tol=1e-6, max_steps=51)
  assert res32.values.dtype == jnp.float64
  assert all(leaf.dtype == jnp.float64
             for leaf in jax.tree_util.tree_leaves(res32.vectors))
  assert float(res32.relative_bounds[0]) <= 1e-6
  assert abs(float(res32.values[0]) - exact) / exact <= 1e-5


@pytest.mark.parametrize("seed", [0, 1])
def test_top_hessian_eigenvalue_gradient_matches_dense_finite_differences(seed):
  loss, params, x, y = small_mlp(seed=seed)
  fn = spectral.top_hessian_eigenvalue(loss, tol=1e-10, max_steps=51)
  v0 = spectral.random_vector(jax.random.PRNGKey(seed), params)
  grads = jax.jit(jax.grad(fn, argnums=(1, 2)))(v0, params, x, y)

  def dense(p, x):
    return jnp.linalg.eigvalsh(spectral.hessian_matrix(loss, p, x, y))[-1]

  dense = jax.jit(dense)
  np.testing.assert_allclose(float(fn(v0, params, x, y)),
                             float(dense(params, x)), rtol=1e-12)
  h = 1e-5
  for i, key in enumerate(jax.random.split(jax.random.PRNGKey(seed + 5), 2)):
    d = spectral.random_vector(key, params)
    shift = lambda s: jax.tree_util.tree_map(lambda p, q: p + s * q, params, d)
    fd = (dense(shift(h), x) - dense(shift(-h), x)) / (2 * h)
    ours = spectral.tree_vdot(grads[0], d)
    np.testing.assert_allclose(float(ours), float(fd), rtol=1e-6, atol=1e-9,
                               err_msg=f"direction {i}")
  # Through the data as well.
  dx = jax.random.normal(jax.random.PRNGKey(seed + 7), x.shape)
  fd = (dense(params, x + h * dx) - dense(params, x - h * dx)) / (2 * h)
  np.testing.assert_allclose(float(jnp.vdot(grads[1], dx)), float(fd),
                             rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("case,error,match", [
    ("zero_start", ValueError, "zero"),
    ("which", ValueError, "which"),
    ("keep_without_restart", ValueError, "never restarts"),
    ("keep_too_large", ValueError, "num_keep"),
    ("too_many", ValueError, "eigenpairs"),
    ("tol", ValueError, "tol"),
    ("int_start", TypeError, "floating"),
    ("nan_operator", FloatingPointError, "NaN"),
])
def test_bad_input_is_named(case, error, match):
  a = jnp.eye(5) * jnp.arange(1.0, 6.0)
  v = jnp.ones(5)
  calls = {
      "zero_start": lambda: spectral.top_eigenvalues(dense_matvec, v * 0, a),
      "which": lambda: spectral.eigenpairs(dense_matvec, v, a, which="mid"),
      "keep_without_restart": lambda: spectral.top_eigenvalues(
          dense_matvec, v, a, max_steps=5, basis_size=5, num_keep=2),
      "keep_too_large": lambda: spectral.top_eigenvalues(
          dense_matvec, v, a, basis_size=4, num_keep=4),
      "too_many": lambda: spectral.top_eigenvalues(dense_matvec, v, a, k=6),
      "tol": lambda: spectral.top_eigenvalues(dense_matvec, v, a, tol=0.0),
      "int_start": lambda: spectral.top_eigenvalues(
          dense_matvec, jnp.ones(5, int), a),
      "nan_operator": lambda: spectral.top_eigenvalues(
          dense_matvec, v, a.at[0, 0].set(jnp.nan)),
  }
  with pytest.raises(error, match=match):
    calls[case]()


@pytest.mark.parametrize("tol", [1e-6, 1e-10])
def test_stops_within_a_fifth_of_the_first_step_that_certifies(tol):
  """On a known spectrum: the solver stops at most 1.2x the steps after
  which its own certificate (computed by running exactly that many steps)
  first meets ``tol``."""
  a = matrix_with_spectrum(EIGS, seed=3)
  v0 = jnp.asarray(np.random.default_rng(4).normal(size=len(EIGS)))
  run = jax.jit(lambda m, v, s, t: spectral.top_eigenvalues(
      dense_matvec, v, m, tol=t, max_steps=s), static_argnums=(2, 3))
  res = run(a, v0, 80, tol)
  assert bool(res.converged)
  steps = int(res.num_matvecs) - 3          # the certificate's 2 + linearize
  early = int(steps / 1.2)
  for s in range(max(2, early - 2), early + 1):
    before = run(a, v0, s, 1e-300)          # exactly s steps, then certify
    assert float(before.relative_bounds[0]) > tol, (s, steps)


@pytest.mark.parametrize("precision, want", [("highest", "HIGHEST"),
                                             (None, None)])
def test_products_are_traced_at_the_certificates_precision(precision, want):
  """float32 products must mean IEEE float32 on every backend (TF32 on
  NVIDIA GPUs is not the operator the certificate bounds): every dot of
  the traced solver carries the requested precision."""
  a = jax.random.normal(jax.random.PRNGKey(0), (6, 6), jnp.float32)
  a = a @ a.T
  v0 = jnp.ones((6,), jnp.float32)
  from immunojax.spectral import eigensolver
  text = str(jax.make_jaxpr(lambda v: eigensolver.top_eigenvalues(
      lambda x: a @ x, v, tol=1e-4, max_steps=6,
      precision=precision).values)(v0))
  dots = text.count("dot_general[")
  highest = text.count("precision=(Precision.HIGHEST, Precision.HIGHEST)")
  assert dots > 0
  assert highest == (dots if want else 0), (dots, highest)
  with pytest.raises(ValueError, match="precision"):
    eigensolver.top_eigenvalues(lambda x: a @ x, v0, precision="tf32")
