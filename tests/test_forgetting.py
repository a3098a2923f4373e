"""immunojax.eval.forgetting: GS-LoRA's continual protocol against hand
computations."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from immunojax.data import padded_batch_positions
from immunojax.eval import continual, forgetting

HYPER = dict(beta=0.2, bound=7.0, lr=1e-2, baseline_lr=1e-4,
             retrain_lr=3e-4, alpha=0.5, released_alpha=1e-4,
             prototype_weight=0.3, pull_weight=0.1, l2_weight=0.7,
             ewc_weight=9.0)


def test_coefficients_turn_a_family_into_each_method():
  c = {m: forgetting.coefficients(m, **HYPER)
       for m in forgetting.LORA_FAMILY + forgetting.FULL_FAMILY}
  f = lambda m, k: float(c[m][k])
  assert f("gs_lora", "alpha") == 0.5 and f("lora", "alpha") == 0.0
  assert f("gs_lora_released_alpha", "alpha") == pytest.approx(1e-4)
  assert f("gs_lora", "prototype_weight") == 0.0
  assert f("gs_lora_pp", "prototype_weight") == pytest.approx(0.3)
  assert f("gs_lora_pp", "pull_weight") == pytest.approx(0.1)
  assert f("gs_lora", "init_a") == pytest.approx(math.sqrt(5.0))
  assert f("finetune", "anchor_weight") == 0.0 and f("finetune", "fisher") == 0
  assert f("l2", "anchor_weight") == pytest.approx(0.7)
  assert f("l2", "fisher") == 0.0
  assert f("ewc", "anchor_weight") == 9.0 and f("ewc", "fisher") == 1.0
  assert f("retrain", "beta") == 0.0
  assert f("retrain", "lr") == pytest.approx(3e-4)
  assert f("finetune", "lr") == pytest.approx(1e-4)
  assert all(f(m, "bound") == 7.0 for m in c)
  assert all(v.dtype == jnp.float32 for co in c.values() for v in co.values())
  assert {forgetting.family(m) for m in forgetting.LORA_FAMILY} == {"lora"}
  assert {forgetting.family(m) for m in forgetting.FULL_FAMILY} == {"full"}
  with pytest.raises(ValueError, match="unknown method 'sgd'"):
    forgetting.coefficients("sgd", **HYPER)


def _linear(p, x, y, key):
  h = jnp.tanh(x @ p["blocks"]["0"]["fc1"]["kernel"])
  h = h @ p["blocks"]["0"]["fc2"]["kernel"]
  return h @ p["head"], h


def _params(key, d=4, k=3):
  a, b, c = jax.random.split(key, 3)
  return {"blocks": {"0": {"fc1": {"kernel": jax.random.normal(a, (d, 6))},
                           "fc2": {"kernel": jax.random.normal(b, (6, 5))}}},
          "head": 0.5 * jax.random.normal(c, (5, k))}


def test_pretrain_epoch_equals_hand_written_adamw_over_the_subset():
  """Two epochs over the first 10 of 16 padded indices, batch 4: two full
  batches an epoch (the partial one dropped), AdamW with the cosine
  schedule over the subset's steps, weight decay on matrices only."""
  x = jax.random.normal(jax.random.PRNGKey(0), (16, 4))
  y = jnp.arange(16) % 3
  p0 = _params(jax.random.PRNGKey(1))
  p0 = {**p0, "bias": jnp.ones(3)}
  fwd = lambda p, xx, yy, key: (_linear(p, xx, yy, key)[0] + p["bias"], None)
  epoch, optimizer = forgetting.pretrain_epoch(
      fwd, epochs=2, learning_rate=0.1, weight_decay=0.05, batch_size=4,
      num_padded=16)
  idx = jnp.asarray(continual.padded(np.arange(10)[::-1], 16))
  n, key = jnp.asarray(10, jnp.int32), jax.random.PRNGKey(2)
  state = (p0, optimizer(n).init(p0))
  for e in range(2):
    state, out = epoch(state, x, y, idx, n, key, jnp.asarray(e))
  # By hand: the same positions, 2 x 2 steps, the schedule written out.
  total = 4
  opt = optax.adamw(lambda c: 0.1 * 0.5 * (1 + jnp.cos(jnp.pi * c / total)),
                    weight_decay=0.05, mask=lambda p: jax.tree_util.tree_map(
                        lambda a: a.ndim >= 2, p))
  p, s, values = p0, opt.init(p0), []
  loss = lambda p, xb, yb: -jnp.mean(jax.nn.log_softmax(
      fwd(p, xb, yb, None)[0])[jnp.arange(len(yb)), yb])
  for t in range(4):
    j, _ = padded_batch_positions(key, n, 16, 4, t, 2)
    b = idx[j]
    v, g = jax.value_and_grad(loss)(p, x[b], y[b])
    u, s = opt.update(g, s, p)
    p = optax.apply_updates(p, u)
    values.append(v)
  chex_close = lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5,
                                                       atol=1e-6)
  jax.tree_util.tree_map(chex_close, state[0], p)
  np.testing.assert_allclose(out["loss"], np.mean(values[2:]), rtol=1e-5)
  assert not np.allclose(state[0]["bias"], p0["bias"])   # trained, no decay


@pytest.mark.parametrize("family", ["lora", "full"])
def test_method_runner_trains_its_family_and_never_the_frozen_head(family):
  x = jax.random.normal(jax.random.PRNGKey(3), (24, 4))
  y = jnp.arange(24) % 3
  start = _params(jax.random.PRNGKey(4))
  head_frozen = jax.tree_util.tree_map_with_path(
      lambda path, _: path[0].key != "head", start)
  run = forgetting.method_runner(
      _linear, family, epochs=2, min_lr=1e-5, weight_decay=0.05, rank=2,
      alpha_warmup_epochs=1, prototype_bound=1.0, logit_scale=1.0,
      batch_size=4, retain_pad=16, forget_pad=8, head_frozen=head_frozen,
      num_classes=3)
  task = continual.task_indices(np.flatnonzero(np.asarray(y) != 2),
                                np.flatnonzero(np.asarray(y) == 2),
                                retain_pad=16, forget_pad=8)
  method = "gs_lora" if family == "lora" else "ewc"
  co = forgetting.coefficients(method, **{**HYPER, "lr": 1e-2,
                                          "baseline_lr": 1e-2})
  out = run(start, x, y, task, co, jax.random.PRNGKey(5))
  np.testing.assert_array_equal(out["params"]["head"], start["head"])
  moved = [not np.allclose(a, b) for a, b in zip(
      jax.tree_util.tree_leaves(out["params"]["blocks"]),
      jax.tree_util.tree_leaves(start["blocks"]))]
  assert all(moved)           # LoRA on both FFN kernels / full on both
  assert np.isfinite(float(out["final"]["loss"]))
  if family == "lora":
    assert out["group_norms"].shape == (1,)     # one block: one group
    assert float(out["group_norms"][0]) > 0
  else:
    assert "group_norms" not in out
  with pytest.raises(ValueError, match="family must be"):
    forgetting.method_runner(
        _linear, "sgd", epochs=1, min_lr=0.0, weight_decay=0.0, rank=1,
        alpha_warmup_epochs=0, prototype_bound=1.0, logit_scale=1.0,
        batch_size=4, retain_pad=4, forget_pad=4, head_frozen=head_frozen)


def test_evaluator_scores_known_predictions():
  x = jnp.eye(4)
  y = np.array([0, 1, 2, 1])
  fwd = lambda p, xx, yy, key: (xx @ p, None)
  ev = forgetting.Evaluator(fwd, x, y)
  w = jnp.eye(4)[:, :3]                # predicts 0, 1, 2, 0
  np.testing.assert_array_equal(ev.correct(w), [True, True, True, False])
  assert ev.accuracy(ev.correct(w), [1]) == 50.0
  assert ev.accuracy(ev.correct(w), [0, 2]) == 100.0
  assert ev.accuracy(ev.correct(w), [7]) is None
  from immunojax.data.continual import Task
  tasks = [Task(retain=(0, 1), forget=(2,), old=(3,)),
           Task(retain=(0,), forget=(1,), old=(2, 3))]
  per_task, overall = ev.task_scores(w, tasks)     # correct: 0, 1, 2 / not 1
  assert per_task == [{"acc_r": pytest.approx(200 / 3), "acc_f": 100.0},
                      {"acc_r": 100.0, "acc_f": 50.0}]
  assert overall == 75.0


def test_task_step_chains_tasks_scores_them_and_task_results_lists_them():
  from immunojax.data.continual import Task
  x_test = jnp.eye(4)
  y_test = np.array([0, 1, 2, 3])
  ev = forgetting.Evaluator(lambda p, xx, yy, key: (xx @ p, None), x_test,
                            y_test)
  seen = []

  def runner(start, x, y, task, coeffs, key):
    seen.append((np.asarray(start).copy(), float(coeffs["beta"]),
                 int(key[1]), np.asarray(task["retain_idx"]).tolist()))
    # each task forgets its class: its diagonal entry turns negative
    c = int(coeffs["forget_class"])
    return {"params": start.at[c, c].set(-1.0),
            "final": {"loss": jnp.asarray(0.5 * c)},
            "group_norms": jnp.asarray([1.0, 1e-9])}

  tasks = [Task((1, 2, 3), (0,), ()), Task((2, 3), (1,), (0,))]
  subsets = [(np.array([1, 2]), np.array([0])),
             (np.array([2]), np.array([3]))]
  kw = dict(evaluator=ev, tasks=tasks, subsets=subsets,
            coefficients=lambda t: {"beta": jnp.asarray(0.1 * t),
                                    "forget_class": jnp.asarray(t)},
            key=lambda t: jax.random.PRNGKey(100 + t),
            pretrained_acc_f=[100.0, 100.0], retain_pad=3, forget_pad=2,
            zero_rtol=1e-3)
  step = forgetting.task_step(runner, None, None, **kw)
  w0 = jnp.eye(4)
  state, recs = {"params": w0, "first": w0}, []
  for t in range(2):
    state, m = step(state, t)
    recs.append(m)
  np.testing.assert_array_equal(seen[1][0], np.diag([-1.0, 1, 1, 1]))  # chain
  assert [s[1] for s in seen] == [0.0, pytest.approx(0.1)]
  assert [s[2] for s in seen] == [100, 101]
  assert seen[0][3][:2] == [1, 2]
  np.testing.assert_array_equal(state["first"], np.diag([-1.0, 1, 1, 1]))
  assert recs[0]["acc_f"] == 0.0 and recs[0]["acc_r"] == 100.0
  assert recs[1]["acc_o"] == 0.0 and "acc_m" not in recs[1]
  assert recs[1]["forget_class_acc"] == {"1": 0.0}
  assert recs[0]["zeroed_groups"] == 1 and recs[1]["loss"] == 0.5
  # retraining restarts every task; the missing regime scores Acc_m
  seen.clear()
  step = forgetting.task_step(runner, None, None, restart_from=w0,
                              missing=(3,), **kw)
  s1, m1 = step(step({"params": w0, "first": w0}, 0)[0], 1)
  np.testing.assert_array_equal(seen[1][0], w0)
  assert m1["acc_m"] == 100.0 and m1["acc_r"] == 100.0
  res = forgetting.task_results(recs, missing=False, lora_family=True,
                                trainable_share=1.5)
  assert res["acc_f"] == [0.0, 0.0] and res["loss"] == [0.0, 0.5]
  assert res["zeroed_groups"] == [1, 1] and res["trainable_share"] == 1.5
  assert res["wall_seconds"] == pytest.approx(
      sum(r["wall_seconds"] for r in recs))
  assert "acc_m" not in res
  full = forgetting.task_results([m1], missing=True, lora_family=False,
                                 trainable_share=90.0)
  assert full["acc_m"] == [100.0] and full["zeroed_groups"] is None


def test_trainable_share_counts_lora_factors_and_freezes_the_head():
  p = _params(jax.random.PRNGKey(0))
  share, frozen = forgetting.trainable_share(p, rank=2)
  n_all = 4 * 6 + 6 * 5 + 5 * 3
  assert share["lora"] == pytest.approx(100.0 * ((4 + 6) * 2 + (6 + 5) * 2)
                                        / n_all)
  assert share["full"] == share["retrain"] == pytest.approx(
      100.0 * (n_all - 15) / n_all)
  assert not bool(frozen["head"])
  assert all(bool(v) for v in jax.tree_util.tree_leaves(frozen["blocks"]))
