"""Condition-number immunization: theorems, Algorithm 1, the method factories,
RIR and the house-price data."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from immunojax import spectral
from immunojax.methods import cond_num as cond


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
  problem = cond.linear_problem(f, f, f[:, 0])
  with pytest.raises(ValueError, match="unknown method"):
    cond.linear.by_name("sophon", problem, lambda_h=1.0,
                        optimizer=optax.sgd(0.1))
  with pytest.raises(ValueError, match="unknown option"):
    cond.linear.by_name("cond_num", problem, lambda_h=1.0, lambda_p=1.0,
                        lamda_h=2.0, optimizer=optax.sgd(0.1))
  with pytest.raises(ValueError, match="harmful labels"):
    cond.linear.probe_ascent(cond.linear_problem(f, f), lambda_h=1.0,
                             optimizer=optax.sgd(0.1))


def _toy(seed=1, n=30, d=5):
  rng = np.random.default_rng(seed)
  xp, xh = (jnp.asarray(rng.normal(size=(n, d)) * np.geomspace(1, 0.2, d))
            for _ in range(2))
  yp, yh = (jnp.asarray(rng.normal(size=n)) for _ in range(2))
  return xp, yp, xh, yh


def _log_kappas(theta, xp, xh):
  k = lambda x: float(spectral.log_condition_number(spectral.gram(x @ theta)))
  return k(xp), k(xh)


@pytest.mark.parametrize("method", sorted(cond.linear.METHODS))
def test_every_linear_method_moves_kappa_its_way(method):
  xp, yp, xh, yh = _toy()
  imm = cond.linear.by_name(method, cond.linear_problem(xp, xh, yh),
                            lambda_p=1.0, lambda_h=1.0, inner_steps=3,
                            optimizer=optax.sgd(0.01))
  state = imm.init(cond.init_params(5), jax.random.PRNGKey(0))
  step = jax.jit(imm.update)
  losses = []
  for t in range(40):
    state, metrics = step(state, (xp, yp), jax.random.PRNGKey(t))
    losses.append(float(metrics["task_loss"]))
  theta = imm.params(state)["theta"]
  before_p, before_h = _log_kappas(jnp.eye(5), xp, xh)
  after_p, after_h = _log_kappas(theta, xp, xh)
  assert losses[-1] < losses[0]                      # the task is learned
  if method in ("cond_num", "r_ill_only", "opt_kappa"):
    assert after_h > before_h + 0.05                 # (i) > 1
  if method in ("cond_num", "opt_kappa"):
    assert after_p < before_p - 0.05                 # (ii) < 1
  if method == "probe_ascent":
    assert "harmful_loss_after_probe" in metrics
  np.testing.assert_allclose(float(metrics["log_kappa_h"]), after_h, rtol=0.05)


def _reference_algorithm_1(xp, yp, xh, steps, eta, lam_p, lam_h):
  """Algorithm 1 in numpy from the paper's formulas: full-batch GD on
  ||X theta omega - y||^2 / N, Thm 4.2 closed-form gradients, K^+
  preconditioning, unit-norm regularizer directions."""
  xp, yp, xh = (np.asarray(a) for a in (xp, yp, xh))
  d = xp.shape[1]
  kp, kh = xp.T @ xp, xh.T @ xh
  pp, ph = np.linalg.pinv(kp), np.linalg.pinv(kh)
  theta, omega = np.eye(d), np.zeros((d, 1))
  unit = lambda g: g / np.linalg.norm(g)
  for _ in range(steps):
    r = xp @ theta @ omega - yp[:, None]
    g_theta = 2 * xp.T @ r @ omega.T / len(r)
    g_omega = 2 * theta.T @ xp.T @ r / len(r)
    h = theta.T @ kh @ theta
    w, v = np.linalg.eigh(h)
    g = np.sum(w ** 2) / (2 * d) - 0.5 * w[0] ** 2
    ill = 2 * kh @ theta @ (w[0] * np.outer(v[:, 0], v[:, 0]) - h / d) / g ** 2
    h = theta.T @ kp @ theta
    w, v = np.linalg.eigh(h)
    well = 2 * kp @ theta @ (w[-1] * np.outer(v[:, -1], v[:, -1]) - h / d)
    theta, omega = (theta - eta * (g_theta + lam_h * unit(ph @ ill)
                                   + lam_p * unit(pp @ well)),
                    omega - eta * g_omega)
  return theta


def test_algorithm_1_full_run_matches_an_independent_reference():
  # Two tasks whose inputs weigh complementary axes (the paper's Prop. 3.2:
  # immunization needs tasks that differ): a full 200-step run must land
  # where a numpy transcription of Algorithm 1 lands, and succeed strongly.
  rng = np.random.default_rng(3)
  xp = jnp.asarray(rng.normal(size=(40, 4)) * [1.0, 1.0, 0.3, 0.3])
  xh = jnp.asarray(rng.normal(size=(40, 4)) * [0.3, 0.3, 1.0, 1.0])
  yp = jnp.asarray(rng.normal(size=40))
  imm = cond.linear.cond_num(cond.linear_problem(xp, xh), lambda_p=1.0,
                             lambda_h=1.0, optimizer=optax.sgd(0.01),
                             track_kappa=False)
  state = imm.init(cond.init_params(4), jax.random.PRNGKey(0))
  step = jax.jit(imm.update)
  for t in range(200):
    state, _ = step(state, (xp, yp), None)
  theta = np.asarray(imm.params(state)["theta"])
  ref = _reference_algorithm_1(xp, yp, xh, 200, 0.01, 1.0, 1.0)
  # 200 steps through eigendecompositions amplify rounding: XLA's codegen
  # level moves the last digits (6e-6 relative at -O0, which the suite
  # uses); an algorithmic slip would differ at the percent level.
  np.testing.assert_allclose(theta, ref, rtol=2e-5, atol=1e-8)
  r = cond.relative_immunization_ratio(xp @ theta, xh @ theta, xp, xh)
  k = lambda x: np.linalg.cond(np.asarray(x).T @ np.asarray(x))
  expected_i = k(xh @ ref) / k(xh)
  expected_ii = k(xp @ ref) / k(xp)
  np.testing.assert_allclose(float(r.kappa_ratio_harmful), expected_i, rtol=2e-5)
  np.testing.assert_allclose(float(r.kappa_ratio_pretrain), expected_ii,
                             rtol=2e-5)
  assert expected_i > 15 and expected_ii < 0.2    # about 19.7 and 0.135
  assert bool(cond.succeeds(r.kappa_ratio_harmful, r.kappa_ratio_pretrain,
                            strong=True))


def test_deep_methods_raise_kappa_of_harmful_features_and_freeze_the_rest():
  rng = np.random.default_rng(4)
  params = {"body": jnp.asarray(np.eye(6) + 0.1 * rng.normal(size=(6, 6))),
            "head": jnp.asarray(0.1 * rng.normal(size=(6, 3)))}
  feats = lambda p, x: jnp.tanh(x @ p["body"])
  xp = jnp.asarray(rng.normal(size=(32, 6)))
  yp = jnp.asarray(rng.integers(0, 3, 32))
  xh = jnp.asarray(rng.normal(size=(32, 6)))
  task = lambda p, b: -jnp.mean(jax.nn.log_softmax(feats(p, b[0]) @ p["head"])[
      jnp.arange(32), b[1]])
  kappa_h = lambda p: float(spectral.condition_number(
      spectral.gram_eigenvalues(feats(p, xh))))
  # label_kappa raises another kappa and needs labels: its own test below.
  for name in sorted(set(cond.deep.METHODS) - {"label_kappa"}):
    imm = cond.deep.by_name(name, features_fn=feats, task_loss=task,
                            lambda_p=1.0, lambda_h=1.0,
                            optimizer=optax.sgd(0.05), trainable="body")
    state = imm.init(params, jax.random.PRNGKey(0))
    step = jax.jit(imm.update)
    for _ in range(30):
      state, m = step(state, ((xp, yp), xh), None)
    out = imm.params(state)
    np.testing.assert_array_equal(out["head"], params["head"])   # frozen
    assert kappa_h(out) > 1.5 * kappa_h(params), name
    assert np.isfinite(float(m["task_loss"]))


def test_rir_identity_and_groups_use_a_frozen_reference():
  rng = np.random.default_rng(2)
  xp, xh = (jnp.asarray(rng.normal(size=(60, 8))) for _ in range(2))
  r = cond.relative_immunization_ratio(xp, xh, xp, xh)
  assert float(r.rir) == pytest.approx(1.0)
  theta = jnp.diag(jnp.geomspace(1.0, 1e-2, 8))
  same = cond.rir_over_groups(lambda x: x @ theta, lambda x: x @ theta, xp, xh,
                              key=jax.random.PRNGKey(0), num_groups=4,
                              group_size=20)
  assert same["rir"] == {"pinv": pytest.approx(1.0),
                         "official": pytest.approx(1.0)}
  diff = cond.rir_over_groups(lambda x: x @ theta, lambda x: x, xp, xh,
                              key=jax.random.PRNGKey(0), num_groups=4,
                              group_size=20)
  # theta scales the inputs' axes by 1 .. 1e-2, so kappa(F^T F) grows ~1e4.
  assert 1e3 < diff["kappa_ratio_harmful"]["pinv"] < 1e5
  assert diff["num_groups"] == 4
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


@pytest.mark.parametrize("method", sorted(cond.linear.METHODS))
def test_balanced_lambdas_match_the_task_gradient_norm(method):
  """The paper's rule: after weighting, each raw regularizer direction has
  the task gradient's norm at t = 0 (times the ratio for D_P)."""
  xp, yp, xh, yh = _toy()
  problem = cond.linear_problem(xp, xh, yh)
  params = {"theta": jnp.eye(5) + 0.1 * jnp.asarray(
      np.random.default_rng(0).normal(size=(5, 5))),
            "omega": jnp.ones((5, 1))}
  lam = cond.linear.balanced_lambdas(method, problem, params, (xp, yp),
                                     ratio=3.0, inner_steps=3)
  task = optax.tree.norm(jax.grad(cond.linear.regression_loss, (0, 1))(
      params["theta"], params["omega"], xp, yp[:, None]))
  terms = cond.linear.method_terms(method, problem, inner_steps=3)
  assert set(lam) == {f"lambda_{j}" for j in terms}
  for j, term in terms.items():
    got = lam[f"lambda_{j}"] * jnp.linalg.norm(term(params["theta"])[0])
    np.testing.assert_allclose(got, task * (3.0 if j == "p" else 1.0),
                               rtol=1e-10)


def test_method_terms_are_the_factories_directions():
  """normalize=False with weights 1: the update equals the task gradient
  plus the sum of the raw terms (so balanced_lambdas weighs what trains)."""
  xp, yp, xh, yh = _toy()
  problem = cond.linear_problem(xp, xh, yh)
  imm = cond.linear.cond_num(problem, lambda_p=1.0, lambda_h=1.0,
                             optimizer=optax.sgd(1.0), normalize=False,
                             track_kappa=False)
  params = cond.init_params(5)
  state = imm.init(params, jax.random.PRNGKey(0))
  new, _ = imm.update(state, (xp, yp), jax.random.PRNGKey(0))
  terms = cond.linear.method_terms("cond_num", problem)
  g_task = jax.grad(cond.linear.regression_loss)(
      params["theta"], params["omega"], xp, yp[:, None])
  want = params["theta"] - (g_task + terms["h"](params["theta"])[0]
                            + terms["p"](params["theta"])[0])
  np.testing.assert_allclose(imm.params(new)["theta"], want, rtol=1e-10)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_label_gram_has_the_projected_gram_spectrum(seed):
  rng = np.random.default_rng(seed)
  f = jnp.asarray(rng.normal(size=(40, 7)))
  y = jnp.asarray(rng.integers(0, 4, size=40))
  small = cond.deep.label_gram(f, y, 5)            # class 4 absent: zero row
  onehot = np.eye(5)[np.asarray(y)][:, :4]
  proj = onehot @ np.linalg.inv(onehot.T @ onehot) @ onehot.T
  big = np.asarray(f).T @ proj @ np.asarray(f)
  w_small = np.sort(np.linalg.eigvalsh(np.asarray(small)))[-4:]
  w_big = np.sort(np.linalg.eigvalsh(big))[-4:]
  np.testing.assert_allclose(w_small, w_big, rtol=1e-9)
  assert abs(float(np.linalg.eigvalsh(np.asarray(small))[0])) < 1e-9


def test_label_kappa_needs_labels_and_raises_the_label_kappa():
  from immunojax import models  # noqa: PLC0415
  from flax import nnx  # noqa: PLC0415
  rng = np.random.default_rng(0)
  model = models.MLP((6, 8, 8, 3), rngs=nnx.Rngs(0))
  apply, params = models.functional(model)
  feats, _ = models.functional(model, "features")
  params = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), params)
  xp, xh = (jnp.asarray(rng.normal(size=(30, 6))) for _ in range(2))
  yp, yh = (jnp.asarray(rng.integers(0, 3, size=30)) for _ in range(2))
  from immunojax import losses  # noqa: PLC0415
  # The harmful term alone (no task loss, lambda_P = 0): unit steps of 0.05.
  task = lambda p, b: 0.0 * losses.cross_entropy(apply(p, b[0]), b[1])
  imm = cond.deep.label_kappa(features_fn=feats, task_loss=task, lambda_p=0.0,
                              lambda_h=0.05, num_classes=3,
                              optimizer=optax.sgd(1.0))
  state = imm.init(params, jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match="harmful labels"):
    imm.update(state, ((xp, yp), xh), jax.random.PRNGKey(0))

  def log_kappa_y(p):
    f = feats(p, xh)
    top = spectral.pinv().of_features(f).sigma_max
    return float(jnp.log(top) - jnp.log(
        spectral.pinv()(cond.deep.label_gram(f, yh, 3)).sigma_min))

  step = jax.jit(imm.update)
  before = log_kappa_y(params)
  for _ in range(20):
    state, _ = step(state, ((xp, yp), (xh, yh)), jax.random.PRNGKey(0))
  assert log_kappa_y(imm.params(state)) > before + 0.1
