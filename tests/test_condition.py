"""Condition-number immunization: theorems, estimators, metrics, data."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from immunojax import spectral
from immunojax.methods import condition as cond


def random_theta_k(seed, d=6, n=20):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, d)) * np.geomspace(1, 0.1, d)
  theta = np.eye(d) + 0.3 * rng.normal(size=(d, d))
  return jnp.asarray(theta), jnp.asarray(x.T @ x)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_thm_4_2_closed_form_gradients_match_autodiff(seed):
  theta, k = random_theta_k(seed)
  h = lambda t: t.T @ k @ t
  auto_well = jax.grad(lambda t: cond.r_well(h(t)))(theta)
  auto_ill = jax.grad(lambda t: cond.r_ill(h(t)))(theta)
  np.testing.assert_allclose(cond.r_well_grad_theta(theta, k), auto_well,
                             rtol=1e-7, atol=1e-9 * float(jnp.abs(auto_well).max()))
  np.testing.assert_allclose(cond.r_ill_grad_theta(theta, k), auto_ill,
                             rtol=1e-7, atol=1e-9 * float(jnp.abs(auto_ill).max()))
  # ... and finite differences.
  from jax.test_util import check_grads
  check_grads(lambda t: cond.r_ill(h(t)), (theta,), order=1, modes=["rev"],
              eps=1e-6, rtol=1e-5)


def test_r_ill_is_rank_aware_and_satisfies_thm_4_1_bounds():
  rng = np.random.default_rng(0)
  f = jnp.asarray(rng.normal(size=(4, 9)))           # rank 4 of 9
  s = f.T @ f
  w = np.linalg.eigvalsh(np.asarray(s))[-4:]
  expected = 1 / (np.sum(w ** 2) / 8 - 0.5 * w[0] ** 2)
  np.testing.assert_allclose(float(cond.r_ill(s)), expected, rtol=1e-10)
  np.testing.assert_allclose(float(cond.r_ill_features(f)), expected, rtol=1e-10)
  np.testing.assert_allclose(float(cond.r_well_features(f)),
                             float(cond.r_well(s)), rtol=1e-10)
  kappa = w[-1] / w[0]
  r = float(cond.r_ill(s))
  assert r >= 0
  assert 1 / np.log(kappa) <= w[-1] ** 2 * r                 # Thm 4.1 (2)
  assert 2 * 4 / (3 * (kappa ** 2 - 1) * w[0] ** 2) <= r <= \
      2 * 4 / ((kappa ** 2 - 1) * w[0] ** 2)                  # App. B.2
  assert np.isfinite(np.asarray(jax.grad(lambda x: cond.r_ill_features(x))(f))).all()


@pytest.mark.parametrize("which", ["well", "ill"])
def test_preconditioned_step_is_2_theta_m_and_keeps_eigenvectors(which):
  theta, k = random_theta_k(5)
  p = cond.preconditioner(k)
  grad = cond.r_well_grad_theta if which == "well" else cond.r_ill_grad_theta
  h = theta.T @ k @ theta
  w, v = np.linalg.eigh(np.asarray(h))
  if which == "well":
    m = w[-1] * np.outer(v[:, -1], v[:, -1]) - np.asarray(h) / 6
  else:
    g = np.sum(w ** 2) / 12 - 0.5 * w[0] ** 2
    m = (w[0] * np.outer(v[:, 0], v[:, 0]) - np.asarray(h) / 6) / g ** 2
  np.testing.assert_allclose(cond.precondition(grad(theta, k), p),
                             2 * np.asarray(theta) @ m, rtol=1e-8, atol=1e-12)
  eta = 1e-3 / np.abs(m).max()
  theta2 = theta - eta * cond.precondition(grad(theta, k), p)
  w2, v2 = np.linalg.eigh(np.asarray(theta2.T @ k @ theta2))
  np.testing.assert_allclose(np.abs(v2.T @ v), np.eye(6), atol=1e-6)
  # sigma_i <- sigma_i (1 - 2 eta m_i)^2, m_i the eigenvalues of M.
  mi = np.diag(v.T @ m @ v)
  np.testing.assert_allclose(w2, np.sort(w * (1 - 2 * eta * mi) ** 2), rtol=1e-8)


def test_preconditioned_descent_moves_kappa_monotonically_and_code_side_differs():
  theta, k = random_theta_k(7)
  p = cond.preconditioner(k)
  kap = lambda t: float(spectral.condition_number(t.T @ k @ t))
  for grad, sign in ((cond.r_well_grad_theta, -1), (cond.r_ill_grad_theta, +1)):
    t, history = theta, [kap(theta)]
    for _ in range(200):
      d = cond.precondition(grad(t, k), p)
      t = t - 1e-3 * d / jnp.linalg.norm(d)
      history.append(kap(t))
    assert np.all(sign * np.diff(history) > 0), grad.__name__
  g = cond.r_well_grad_theta(theta, k)
  left, right = (cond.precondition(g, p, side=s) for s in ("left", "right"))
  assert float(jnp.linalg.norm(left - right) / jnp.linalg.norm(left)) > 0.1


def test_preconditioner_kinds_and_errors():
  f = jnp.asarray(np.random.default_rng(0).normal(size=(3, 5)))
  k = f.T @ f                                              # singular
  p = cond.preconditioner(k)
  np.testing.assert_allclose(k @ p @ k, k, atol=1e-10)      # pseudo-inverse
  np.testing.assert_allclose(cond.preconditioner(k, kind="ridge", ridge=2.0),
                             np.linalg.inv(np.asarray(k) + 2 * np.eye(5)), rtol=1e-10)
  with pytest.raises(ValueError, match="unknown preconditioner"):
    cond.preconditioner(k, kind="cholesky")
  with pytest.raises(ValueError, match="ridge"):
    cond.preconditioner(k, kind="ridge", ridge=0.0)
  with pytest.raises(ValueError, match="unknown method"):
    cond.linear_data(f, f, f[:, 0], cond.LinearConfig(method="sophon"))


@pytest.mark.parametrize("method", cond.METHODS)
def test_linear_step_runs_for_every_method(method):
  rng = np.random.default_rng(1)
  xp, xh = (jnp.asarray(rng.normal(size=(30, 5))) for _ in range(2))
  yp, yh = (jnp.asarray(rng.normal(size=30)) for _ in range(2))
  cfg = cond.LinearConfig(method=method, inner_steps=3)
  data = cond.linear_data(xp, xh, yh, cfg)
  state = {"theta": jnp.eye(5), "omega": jnp.zeros((5, 1))}
  step = jax.jit(lambda s: cond.linear_step(s, (xp, yp), data, cfg))
  for _ in range(3):
    state, metrics = step(state)
  assert np.isfinite(np.asarray(state["theta"])).all()
  assert np.isfinite(float(metrics["task_loss"]))


def test_rir_identity_and_groups_use_a_frozen_reference():
  rng = np.random.default_rng(2)
  xp, xh = (jnp.asarray(rng.normal(size=(60, 8))) for _ in range(2))
  r = cond.relative_immunization_ratio(xp, xh, xp, xh)
  assert float(r.rir) == pytest.approx(1.0)
  theta = jnp.diag(jnp.geomspace(1.0, 1e-2, 8))
  same = cond.rir_over_groups(lambda x: x @ theta, lambda x: x @ theta, xp, xh,
                              key=jax.random.PRNGKey(0), num_groups=4,
                              group_size=20)
  assert same["rir"] == pytest.approx(1.0)
  diff = cond.rir_over_groups(lambda x: x @ theta, lambda x: x, xp, xh,
                              key=jax.random.PRNGKey(0), num_groups=4,
                              group_size=20)
  assert diff["kappa_ratio_harmful"] > 10 and diff["num_groups"] == 4
  with pytest.raises(ValueError, match="group_size"):
    cond.rir_over_groups(lambda x: x, lambda x: x, xp, xh,
                         key=jax.random.PRNGKey(0), group_size=100)


def test_house_price_split_and_identity_baselines(house_price_dir):
  import pandas as pd
  from immunojax.data.house_price import load_house_price
  frame = pd.read_csv(house_price_dir / "train.csv")
  assert (frame.MSZoning != "RL").sum() == 309 and (frame.MSZoning == "RL").sum() == 1151
  hp = load_house_price(house_price_dir)
  assert hp.xp_train.shape == hp.xh_train.shape == (200, 79)
  assert hp.xp_test.shape == (100, 79)
  assert hp.feature_names[0] == "Id" and "LotArea" not in hp.feature_names
  assert "SalePrice" not in hp.feature_names and len(hp.feature_names) == 79
  kp = spectral.gram(jnp.asarray(hp.xp_train, jnp.float64))
  kh = spectral.gram(jnp.asarray(hp.xh_train, jnp.float64))
  # Spec §5.1 / §6.3 check 3.
  assert int(spectral.numerical_rank(kp)) == 74 == int(spectral.numerical_rank(kh))
  assert float(spectral.condition_number(kp)) == pytest.approx(7.7e3, rel=0.02)
  assert float(spectral.condition_number(kh)) == pytest.approx(2.1e5, rel=0.02)
  assert float(spectral.condition_number(kp, estimator="official")) == \
      pytest.approx(1.8e9, rel=0.05)
  assert float(spectral.condition_number(kh, estimator="official")) == \
      pytest.approx(2.0e9, rel=0.05)


def test_house_price_missing_file_is_named(tmp_path):
  from immunojax.data.house_price import load_house_price
  with pytest.raises(FileNotFoundError, match="train.csv"):
    load_house_price(tmp_path)
