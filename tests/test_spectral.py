"""Spectral core against numpy/scipy and autodiff oracles (float64)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.sparse.linalg as spla
from jax.test_util import check_grads

from immunojax import spectral


def matrix_with_spectrum(eigs, seed=0):
  rng = np.random.default_rng(seed)
  q, _ = np.linalg.qr(rng.normal(size=(len(eigs), len(eigs))))
  return jnp.asarray((q * np.asarray(eigs)) @ q.T)


SPECTRA = {
    "separated": np.linspace(1.0, 50.0, 40),
    "clustered": np.concatenate([np.full(20, 1.0) + 1e-9 * np.arange(20),
                                 np.full(20, 3.0)]),
    "kappa_1e10": np.geomspace(1e-10, 1.0, 40),
}


@pytest.mark.parametrize("name", SPECTRA)
def test_eigenvalues_match_numpy(name):
  a = matrix_with_spectrum(SPECTRA[name])
  ours = np.asarray(spectral.eigenvalues(a))
  ref = np.linalg.eigvalsh(np.asarray(a))
  np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-10 * np.max(np.abs(ref)))


@pytest.mark.parametrize("name", SPECTRA)
def test_condition_number_known_spectrum(name):
  eigs = SPECTRA[name]
  a = matrix_with_spectrum(eigs)
  kappa = float(spectral.condition_number(a))
  expected = eigs.max() / eigs.min()
  # kappa(A) is only determined to ~ kappa * eps by the matrix entries.
  np.testing.assert_allclose(kappa, expected, rtol=max(1e-10, expected * 1e-15))
  np.testing.assert_allclose(float(spectral.condition_number(jnp.asarray(eigs))),
                             expected, rtol=1e-14)
  np.testing.assert_allclose(float(spectral.log_condition_number(a)),
                             np.log(expected), rtol=1e-6)


def test_rank_deficient_gram_is_rank_aware():
  rng = np.random.default_rng(3)
  f = rng.normal(size=(12, 30)) * np.geomspace(1, 1e-2, 30)
  g = spectral.gram(jnp.asarray(f))
  s = np.linalg.svd(f, compute_uv=False) ** 2
  ext = spectral.spectrum_extremes(g)
  assert int(ext.rank) == 12
  np.testing.assert_allclose(float(spectral.condition_number(g)),
                             s.max() / s.min(), rtol=1e-8)
  # The small Gram has the same non-zero spectrum.
  np.testing.assert_allclose(np.asarray(spectral.gram_eigenvalues(jnp.asarray(f))),
                             np.sort(s), rtol=1e-9)


def test_official_estimator_is_shift_artifact_on_rank_deficient_gram():
  rng = np.random.default_rng(4)
  f = rng.normal(size=(20, 60))
  g = spectral.gram(jnp.asarray(f))
  smax = np.linalg.eigvalsh(np.asarray(g)).max()
  official = float(spectral.condition_number(g, estimator="official"))
  pinv = float(spectral.condition_number(g))
  # Null eigenvalues become ~shift: kappa ~ sigma_max / 1e-6, not the pinv one.
  assert official > 1e3 * pinv
  np.testing.assert_allclose(official, (smax + 1e-6) / 1e-6, rtol=0.5)
  # On a well-conditioned full-rank matrix the two agree.
  a = matrix_with_spectrum(np.linspace(1, 10, 8))
  np.testing.assert_allclose(
      float(spectral.condition_number(a, estimator="official")),
      float(spectral.condition_number(a)), rtol=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_log_condition_number_gradient_vs_finite_differences(seed):
  rng = np.random.default_rng(seed)
  f = jnp.asarray(rng.normal(size=(15, 6)))
  fn = lambda x: spectral.log_condition_number(x.T @ x)
  check_grads(fn, (f,), order=1, modes=["rev"], eps=1e-6, atol=1e-7, rtol=1e-6)
  # Closed form: d log kappa / dS = v1 v1^T / s1 - vk vk^T / sk.
  s = f.T @ f
  w, v = np.linalg.eigh(np.asarray(s))
  expected = np.outer(v[:, -1], v[:, -1]) / w[-1] - np.outer(v[:, 0], v[:, 0]) / w[0]
  got = jax.grad(spectral.log_condition_number)(s)
  np.testing.assert_allclose(np.asarray(got), expected, atol=1e-9)


def test_gradient_finite_on_degenerate_rank_deficient_gram():
  rng = np.random.default_rng(5)
  f = jnp.asarray(rng.normal(size=(5, 20)))  # 15 exactly-zero eigenvalues
  g = jax.grad(lambda x: spectral.log_condition_number(x.T @ x))(f)
  assert np.all(np.isfinite(np.asarray(g)))
  check_grads(lambda x: spectral.log_condition_number(x.T @ x), (f,), order=1,
              modes=["rev"], eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("reorth", [True, False])
@pytest.mark.parametrize("name", ["separated", "kappa_1e10"])
def test_lanczos_extremes(name, reorth):
  eigs = SPECTRA[name]
  a = matrix_with_spectrum(eigs)
  res = spectral.lanczos(lambda v: a @ v, 40, 40, key=jax.random.PRNGKey(0),
                         reorthogonalize=reorth)
  np.testing.assert_allclose(float(res.ritz_values[-1]), eigs.max(), rtol=1e-8)
  if reorth:  # full depth with full reorthogonalisation: the whole spectrum
    np.testing.assert_allclose(np.asarray(res.ritz_values), np.sort(eigs),
                               rtol=0, atol=1e-10 * eigs.max())


def test_lanczos_converges_before_full_depth_and_residuals_bound_error():
  rng = np.random.default_rng(7)
  eigs = np.concatenate([rng.uniform(0, 1, 995), [3.0, 4.0, 5.0, 6.0, 8.0]])
  a = matrix_with_spectrum(eigs, seed=1)
  res = spectral.lanczos(lambda v: a @ v, 1000, 60, key=jax.random.PRNGKey(1),
                         return_vectors=True)
  np.testing.assert_allclose(float(res.ritz_values[-1]), 8.0, rtol=1e-8)
  y = res.ritz_vectors[-1]
  true_res = float(jnp.linalg.norm(a @ y - res.ritz_values[-1] * y))
  np.testing.assert_allclose(true_res, float(res.residuals[-1]), atol=1e-8)
  lo, hi = spectral.extreme_eigenvalues(lambda v: a @ v, 1000, 60,
                                        key=jax.random.PRNGKey(1))
  assert float(lo) >= eigs.min() - 1e-12 and float(hi) <= 8.0 + 1e-12


def test_lanczos_breakdown_on_low_rank_operator_stays_finite():
  rng = np.random.default_rng(2)
  f = rng.normal(size=(3, 10))
  g = jnp.asarray(f.T @ f)  # rank 3: the Krylov space is invariant after 3
  res = spectral.lanczos(lambda v: g @ v, 10, 10, key=jax.random.PRNGKey(0))
  assert np.all(np.isfinite(np.asarray(res.ritz_values)))
  np.testing.assert_allclose(np.asarray(res.ritz_values),
                             np.linalg.eigvalsh(np.asarray(g)), atol=1e-10)


def test_lanczos_agrees_with_scipy_eigsh():
  a = matrix_with_spectrum(np.linspace(-3.0, 7.0, 200), seed=9)
  op = spla.LinearOperator((200, 200), matvec=lambda v: np.asarray(a @ v),
                           dtype=np.float64)
  ref = spla.eigsh(op, k=1, which="LA", tol=1e-12)[0][0]
  res = spectral.lanczos(lambda v: a @ v, 200, 80, key=jax.random.PRNGKey(3))
  np.testing.assert_allclose(float(res.ritz_values[-1]), ref, rtol=1e-10)


def test_power_iteration_matches_dominant_eigenvalue():
  eigs = np.concatenate([np.linspace(0.1, 1, 49), [2.0]])
  a = matrix_with_spectrum(eigs)
  r = spectral.power_iteration(lambda v: a @ v, 50, key=jax.random.PRNGKey(0),
                               tol=1e-14)
  assert bool(r.converged)
  np.testing.assert_allclose(float(r.eigenvalue), 2.0, rtol=1e-10)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_slq_trace_and_weights(seed):
  eigs = np.random.default_rng(seed).uniform(0.5, 4.0, 300)
  a = matrix_with_spectrum(eigs, seed=seed)
  mv = lambda v: a @ v
  quad = spectral.stochastic_lanczos_quadrature(
      mv, 300, 30, key=jax.random.PRNGKey(seed), num_probes=64)
  np.testing.assert_allclose(np.asarray(quad.weights.sum(-1)), 1.0, atol=1e-12)
  # Hutchinson variance for Rademacher probes: 2 * ||A||_F^2 offdiag / P.
  est = float(spectral.quadrature_trace(quad))
  assert abs(est - eigs.sum()) / eigs.sum() < 0.05
  # log-det (SLQ's main use): same tolerance.
  logdet = float(spectral.quadrature_trace(quad, jnp.log))
  assert abs(logdet - np.log(eigs).sum()) / abs(np.log(eigs).sum()) < 0.05
  hutch = float(spectral.hutchinson_trace(mv, 300, key=jax.random.PRNGKey(seed),
                                          num_probes=64))
  assert abs(hutch - eigs.sum()) / eigs.sum() < 0.05


def test_slq_full_depth_is_exact_per_probe():
  eigs = np.linspace(1, 5, 12)
  a = matrix_with_spectrum(eigs)
  quad = spectral.stochastic_lanczos_quadrature(
      lambda v: a @ v, 12, 12, key=jax.random.PRNGKey(0), num_probes=3)
  # For each probe z (unit), sum_j w_j f(theta_j) = z^T f(A) z exactly.
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  for p, k in enumerate(keys):
    z = np.array(jax.random.rademacher(jax.random.fold_in(k, 0), (12,),
                                         jnp.float64))
    z /= np.linalg.norm(z)
    w, v = np.linalg.eigh(np.asarray(a))
    exact = z @ (v * np.exp(w)) @ v.T @ z
    got = float(jnp.sum(quad.weights[p] * jnp.exp(quad.nodes[p])))
    np.testing.assert_allclose(got, exact, rtol=1e-10)
  grid = jnp.linspace(-2, 8, 2001)
  dens = spectral.spectral_density(quad, grid, sigma=0.1)
  np.testing.assert_allclose(float(jnp.trapezoid(dens, grid)), 1.0, atol=1e-6)


def mlp_loss(params, x, y):
  h = jnp.tanh(x @ params["w1"] + params["b1"])
  return jnp.mean((h @ params["w2"] - y) ** 2)


def test_hessian_matrix_equals_hvp_on_basis():
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
  params = {"w1": jax.random.normal(k1, (4, 6)), "b1": jnp.zeros(6),
            "w2": jax.random.normal(k2, (6, 2))}
  x = jax.random.normal(k3, (16, 4))
  y = jnp.ones((16, 2))
  h = spectral.hessian_matrix(mlp_loss, params, x, y)
  d = spectral.num_params(params)
  assert h.shape == (d, d)
  mv = spectral.hvp(mlp_loss, params, x, y)
  cols = jax.vmap(mv)(jnp.eye(d))
  np.testing.assert_allclose(np.asarray(cols), np.asarray(h), atol=1e-12)
  np.testing.assert_allclose(np.asarray(h), np.asarray(h).T, atol=1e-12)


def test_mse_probe_hessian_closed_form():
  f = jax.random.normal(jax.random.PRNGKey(0), (20, 5))
  y = jax.random.normal(jax.random.PRNGKey(1), (20, 3))
  w = jnp.zeros((5, 3))
  auto = spectral.hessian_matrix(spectral.mse_probe_loss, w, f, y)
  np.testing.assert_allclose(np.asarray(spectral.mse_probe_hessian(f, 3)),
                             np.asarray(auto), atol=1e-12)
  auto1 = spectral.hessian_matrix(spectral.mse_probe_loss, jnp.zeros((5, 1)),
                                  f, y[:, :1])
  np.testing.assert_allclose(np.asarray(spectral.gram(f)), np.asarray(auto1),
                             atol=1e-12)


def test_softmax_probe_hessian_closed_form():
  f = jax.random.normal(jax.random.PRNGKey(0), (30, 4))
  labels = jax.random.randint(jax.random.PRNGKey(1), (30,), 0, 3)
  w = 0.3 * jax.random.normal(jax.random.PRNGKey(2), (4, 3))
  auto = spectral.hessian_matrix(spectral.softmax_probe_loss, w, f, labels)
  np.testing.assert_allclose(np.asarray(spectral.softmax_probe_hessian(w, f)),
                             np.asarray(auto), atol=1e-12)


def test_lanczos_under_jit_and_vmap_over_keys():
  a = matrix_with_spectrum(np.linspace(1, 9, 30))

  @jax.jit
  def top(key):
    return spectral.lanczos(lambda v: a @ v, 30, 20, key=key).ritz_values[-1]

  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  tops = jax.vmap(top)(keys)
  eager = [spectral.lanczos(lambda v: a @ v, 30, 20, key=k).ritz_values[-1]
           for k in keys]
  np.testing.assert_allclose(np.asarray(tops), np.asarray(eager), rtol=1e-12)
  np.testing.assert_allclose(np.asarray(tops), 9.0, rtol=1e-5)


# ---------------------------------------------------------------- bad input
BAD = {
    "non_square": (lambda: spectral.condition_number(jnp.ones((3, 4))),
                   "square"),
    "non_symmetric": (lambda: spectral.eigenvalues(
        jnp.array([[1.0, 2.0], [0.0, 1.0]])), "not symmetric"),
    "nan": (lambda: spectral.condition_number(
        jnp.array([[1.0, jnp.nan], [jnp.nan, 1.0]])), "non-finite"),
    "inf_eigs": (lambda: spectral.condition_number(jnp.array([1.0, jnp.inf])),
                 "non-finite"),
    "unknown_estimator": (lambda: spectral.condition_number(
        jnp.eye(2), estimator="svd"), "unknown estimator"),
    "steps_gt_dim": (lambda: spectral.lanczos(
        lambda v: v, 5, 6, key=jax.random.PRNGKey(0)), "exceeds dim"),
    "no_key": (lambda: spectral.lanczos(lambda v: v, 5, 3), "PRNG"),
    "rank3": (lambda: spectral.condition_number(jnp.ones((2, 2, 2))),
              "2-D"),
    "features_1d": (lambda: spectral.gram(jnp.ones(3)), "2-D"),
    "official_float32": (lambda: spectral.condition_number(
        jnp.eye(3, dtype=jnp.float32), estimator="official"), "float64"),
    "nonscalar_loss": (lambda: spectral.hessian_matrix(
        lambda p: p * 2, jnp.ones(3)), "scalar"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_raises_named_error(case):
  fn, message = BAD[case]
  with pytest.raises(ValueError, match=message):
    fn()


def test_estimator_is_a_configured_hashable_value():
  rng = np.random.default_rng(5)
  f = jnp.asarray(rng.normal(size=(6, 9)))            # rank 6 of 9
  pinv, official = spectral.pinv(), spectral.official()
  assert spectral.estimator("pinv") == pinv and hash(pinv) == hash(spectral.pinv())
  w = np.linalg.eigvalsh(np.asarray(f @ f.T))
  e = pinv.of_features(f)                             # the 6 x 6 Gram
  np.testing.assert_allclose([e.sigma_min, e.sigma_max], [w[0], w[-1]], rtol=1e-10)
  assert int(e.rank) == 6
  # official sees the 9 x 9 Gram, shift and all: three null eigenvalues pass.
  o = official.of_features(f)
  assert float(o.sigma_max / o.sigma_min) > 1e5 * float(e.sigma_max / e.sigma_min)
  # A value is a static jit argument, and a tighter rtol keeps more rank.
  kappa = jax.jit(lambda x, est: spectral.condition_number(x, estimator=est),
                  static_argnums=1)
  np.testing.assert_allclose(kappa(f.T @ f, pinv), w[-1] / w[0], rtol=1e-8)
  assert int(spectral.pinv(rtol=0.0)(f.T @ f).rank) > 6
  with pytest.raises(ValueError, match="unknown estimator"):
    spectral.Estimator("svd")


def test_one_rank_rule_everywhere():
  from immunojax.attacks import least_squares_probe
  from immunojax.methods.cond_num import preconditioner
  rng = np.random.default_rng(6)
  f = rng.normal(size=(30, 8)) @ np.diag([1, 1, 1, 1, 1, 1, 1e-9, 0.0])
  s = jnp.asarray(f.T @ f)
  keep = np.asarray(spectral.nonzero(jnp.linalg.eigvalsh(s)))
  assert keep.sum() == int(spectral.numerical_rank(s)) == 6
  p = preconditioner(s)                                       # rank-6 pinv
  assert np.linalg.matrix_rank(np.asarray(p), tol=1e-8) == 6
  w = least_squares_probe(jnp.asarray(f), jnp.ones((30, 1)))
  assert abs(float(w[6, 0])) < 1e-6                           # cut direction
  assert spectral.rank_rtol(8, np.float64) == 8 * np.finfo(np.float64).eps
