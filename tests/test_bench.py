"""immunojax.bench on synthetic curves: the metrics, the validation rule,
the registries."""

import numpy as np
import pytest

from immunojax import bench
from immunojax.bench import metrics, table as bt

STEPS = np.array([0, 10, 30, 100, 300])
BUDGETS = (30, 300)


def start(levels, *, modes=("full", "probe"), n=40, seed=0, val=None):
  """Curves of two attacks whose per-example correctness has the given
  mean level per checkpoint (``levels``: (attacks, checkpoints))."""
  levels = np.asarray(levels, float)
  rng = np.random.default_rng(seed)
  test = (rng.random(levels.shape + (n,)) < levels[..., None]).astype(float)
  # the same examples right in every start: exact means, paired bootstrap
  test = np.sort(test, -1)[..., ::-1] if seed < 0 else test
  return bt.StartCurves(
      steps=STEPS, labels=[f"a{i}" for i in range(len(levels))],
      modes=list(modes), learning_rates=np.array([0.01, 0.1]),
      optimizers=["adam", "adam"],
      val=levels if val is None else np.asarray(val, float), test=test,
      utility=np.full(levels.shape, 0.9),
      diverged=np.zeros(len(levels), bool), confirmed={})


def exact(levels):
  """Per-example correctness with exactly the level's share right."""
  levels = np.asarray(levels, float)
  n = 40
  test = (np.arange(n)[None, None, :] < np.round(levels[..., None] * n)
          ).astype(float)
  base = start(levels)
  return base._replace(test=test)


U_LEVELS = [[0.9, 1.0, 1.0, 1.0, 1.0], [0.9, 0.95, 1.0, 1.0, 1.0]]
N_LEVELS = [[0.0, 0.2, 0.5, 0.7, 0.8], [0.0, 0.1, 0.4, 0.6, 0.7]]
S_LEVELS = [[0.0, 0.1, 0.2, 0.4, 0.6], [0.0, 0.1, 0.2, 0.3, 0.5]]


def refs():
  return bt.References(exact(U_LEVELS), exact(N_LEVELS), exact(S_LEVELS))


def test_rho_is_zero_at_never_trained_and_one_at_undefended():
  r = refs()
  rows = bt.table([("as_N", exact(N_LEVELS)), ("as_U", exact(U_LEVELS))], r,
                  BUDGETS)
  for b in map(str, BUDGETS):
    assert rows["as_N"]["rho"][b]["value"] == pytest.approx(0.0)
    assert rows["as_U"]["rho"][b]["value"] == pytest.approx(1.0)
  assert rows["as_N"]["nra"]["value"] == pytest.approx(0.0)
  assert rows["as_U"]["nra"]["value"] == pytest.approx(1.0)
  # sigma: against scratch; the defended model equal to N is above S here
  assert rows["as_N"]["sigma"]["300"]["value"] > 0
  lo, hi = rows["as_U"]["rho"]["300"]["ci"]
  assert lo <= 1.0 <= hi


def test_rho_is_undefined_where_u_and_n_agree():
  r = bt.References(exact(U_LEVELS), exact(U_LEVELS), exact(S_LEVELS))
  row = bt.row(exact(N_LEVELS), r, BUDGETS)
  assert np.isnan(row["rho"]["300"]["value"])
  assert metrics.normalized(0.5, 0.52, 0.5) != metrics.normalized(
      0.5, 0.52, 0.5)                                      # NaN: "—"
  assert metrics.verdict((np.nan, np.nan)) == "—"
  assert metrics.verdict((0.8, 1.1)) == "≈ undefended"
  assert metrics.verdict((-0.1, 0.2)) == "≈ never trained"
  assert metrics.verdict((-0.5, -0.2)) == "beyond data filtering"


def test_steps_to_threshold_are_right_censored():
  r = refs()
  slow = exact([[0.0, 0.1, 0.2, 0.3, 0.4], [0.0, 0.0, 0.1, 0.2, 0.3]])
  row = bt.row(slow, r, BUDGETS)
  assert row["steps_to_threshold"]["steps"] == "> 300"
  assert row["steps_to_threshold"]["overhead_vs_N"] is None
  fast = bt.row(exact(U_LEVELS), r, BUDGETS)["steps_to_threshold"]
  assert fast["steps"] == 0 and fast["threshold"] == pytest.approx(0.9)
  assert metrics.first_reach([0.1, 0.5, np.nan], STEPS[:3], 0.4) == 10
  assert metrics.first_reach([0.1, np.nan, 0.2], STEPS[:3], 0.4) is None


def test_nan_curves_are_no_data_points():
  r = refs()
  dead = exact(U_LEVELS)._replace(val=np.full((2, 5), np.nan),
                                  diverged=np.ones(2, bool))
  row = bt.row(dead, r, BUDGETS)
  assert row["worst_case"]["300"]["value"] is None
  assert row["rho"]["300"]["value"] is None and row["diverged"] == 2
  assert metrics.select(np.full((2, 5), np.nan), STEPS, 300) is None
  half = np.array([[np.nan] * 5, [0.1, 0.2, 0.3, 0.4, 0.5]])
  assert metrics.select(half, STEPS, 300) == (1, 4)
  assert metrics.effort([np.nan, np.nan]) is None


def test_validation_selection_never_reads_the_test_split():
  """Poison the test split (a perfect score on attack 0 everywhere): the
  chosen attack is the one validation prefers, and the table reports the
  test value of that attack; only the upper bound sees the poison."""
  val = np.array([[0.0, 0.1, 0.2, 0.3, 0.4], [0.0, 0.3, 0.5, 0.7, 0.9]])
  s = exact(N_LEVELS)._replace(val=val)
  before = metrics.select(s.val, s.steps, 300)
  poisoned = s.test.copy()
  poisoned[0, 1:] = 1.0     # (step 0 is the same model for every attack)
  s2 = s._replace(test=poisoned)
  assert metrics.select(s2.val, s2.steps, 300) == before == (1, 4)
  w = bt.row(s2, refs(), BUDGETS)["worst_case"]["300"]
  assert w["attack"] == "a1" and w["value"] == pytest.approx(0.7)
  assert w["upper_bound"] == 1.0
  curve = metrics.selected_curve(s2.val, s2.test_mean, STEPS)
  np.testing.assert_allclose(curve, [0.0, 0.1, 0.4, 0.6, 0.7])


def test_confirmed_runs_replace_the_grid_value_and_claims_filter_modes():
  s = exact(N_LEVELS)
  ex = np.r_[np.ones(10), np.zeros(30)]
  s = s._replace(confirmed={300: bt.Confirmed("a1", 300, ex, 0.8, 3)})
  w = bt.row(s, refs(), BUDGETS)["worst_case"]
  assert w["300"]["value"] == pytest.approx(0.25) and w["300"]["seeds"] == 3
  assert w["30"]["seeds"] == 1
  only = s.only(["probe"])
  assert only.labels == ["a1"] and only.confirmed == {}


def test_duplicates_are_refused_everywhere():
  r = refs()
  with pytest.raises(ValueError, match="named twice"):
    bt.table([("x", exact(N_LEVELS)), ("x", exact(U_LEVELS))], r, BUDGETS)
  with pytest.raises(ValueError, match="registered twice"):
    bt.aggregate("rho")(lambda s, refs, b: 0)
  with pytest.raises(ValueError, match="registered twice"):
    bench.defenses.defense("sophon", family="x", claim=(), knob="k",
                           knobs=(1.0,), native="x")(lambda *a, **k: [])


def test_effort_bootstrap_and_grid_edge():
  # one good configuration among n: expected tries (n + 1) / 2
  finals = [0.1] * 9 + [1.0]
  assert metrics.effort(finals, orderings=20000) == pytest.approx(5.5,
                                                                  abs=0.1)
  ex = np.r_[np.ones(30), np.zeros(10)]
  lo, hi = metrics.bootstrap(lambda m: m, [ex])
  assert lo < 0.75 < hi
  with pytest.raises(ValueError, match="same examples"):
    metrics.bootstrap(lambda a, b: a, [ex, ex[:5]])
  row = bt.row(exact(U_LEVELS), refs(), BUDGETS)
  assert row["grid_edge"] is True         # lr 0.01 is the adam minimum
  assert metrics.log_area([1, 1, 1], [0, 10, 100]) == pytest.approx(1.0)


# ------------------------------------------------ from the harness (curves)
def _harness_problem():
  import jax
  import jax.numpy as jnp
  from immunojax import attacks
  x = jax.random.normal(jax.random.PRNGKey(0), (24, 3))
  y = (x[:, 0] > 0).astype(jnp.int32)
  xv, yv, xt, yt = x[:4], y[:4], x[4:10], y[4:10]

  def metric(p, e):          # nv = 4 validation rows, 6 test rows, utility
    right = lambda a, b: (jnp.argmax(a @ p, -1) == b).astype(jnp.float32)
    return jnp.concatenate([right(xv, yv), right(xt, yt),
                            jnp.mean(right(xt, yt))[None]])

  target = attacks.Target(
      loss_fn=lambda p, b: jnp.mean(
          -jax.nn.log_softmax(b[0] @ p)[jnp.arange(b[1].shape[0]), b[1]]),
      metric_fn=metric, train_data=(x[10:], y[10:]), eval_data=())
  grid = {"small": attacks.grid(optimizers=("sgd",),
                                learning_rates=(0.01, 1.0), modes=("full",),
                                batch_sizes=(4,), steps=(20,)),
          "big": attacks.grid(optimizers=("adam",), learning_rates=(0.1,),
                              modes=("full",), batch_sizes=(8,),
                              steps=(20,))}
  targets = {"small": target, "big": target}
  return grid, targets, jnp.zeros((3, 2))


def test_start_curves_and_confirm_read_the_harness_as_written():
  from immunojax import attacks
  from immunojax.bench import curves as bc
  grid, targets, p0 = _harness_problem()
  runs = {s: attacks.run_attacks(grid[s], {"x": p0}, targets[s],
                                 eval_every=10) for s in grid}
  sc = bc.start_curves(grid, runs, "x", nv=4)
  assert sc.labels == [f"{a.label} [small]" for a in grid["small"]] + [
      f"{a.label} [big]" for a in grid["big"]]
  m = np.concatenate([runs["small"].metric["x"], runs["big"].metric["x"]])
  np.testing.assert_allclose(sc.val, m[:, :, :4].mean(-1))
  np.testing.assert_allclose(sc.test, m[:, :, 4:-1])
  np.testing.assert_allclose(sc.utility, m[:, :, -1])
  assert sc.steps.tolist() == [0, 10, 20] and sc.confirmed == {}
  done = bc.confirm(p0, sc, grid=grid, targets=targets, budgets=(10, 20),
                    seeds=2, nv=4)
  flat = grid["small"] + grid["big"]
  for b in (10, 20):
    a_i, e_i = metrics.select(sc.val, sc.steps, b)
    c = done.confirmed[b]
    assert c.attack == sc.labels[a_i] and c.step == sc.steps[e_i]
    assert c.seeds == 2
    size = "small" if a_i < len(grid["small"]) else "big"
    rerun = attacks.run_attacks(
        [flat[a_i]._replace(seed=1000 + s) for s in range(2)], {"x": p0},
        targets[size], eval_every=10).metric["x"][:, e_i]
    np.testing.assert_allclose(c.examples, rerun[:, 4:-1].mean(0))
    assert c.utility == pytest.approx(float(rerun[:, -1].mean()))
