"""immunojax.eval: every protocol against a hand computation."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from immunojax import attacks, immunizer, modes
from immunojax.data import continual as schedule
from immunojax.eval import (concepts, continual, curves, displacement,
                            generative, merge_attack, probes, references,
                            relearning)


# ------------------------------------------------------------------ curves
def test_best_curve_skips_diverged_attacks_and_threshold_steps():
  m = np.array([[0.1, 0.5, np.nan], [0.2, 0.3, 0.9], [np.nan] * 3])
  np.testing.assert_array_equal(curves.best_curve(m), [0.2, 0.5, 0.9])
  np.testing.assert_array_equal(curves.best_curve(m, higher_is_better=False),
                                [0.1, 0.3, 0.9])
  assert curves.steps_to_threshold([0, 10, 20], [0.2, 0.5, 0.9], 0.5) == 10
  assert curves.steps_to_threshold([0, 10, 20], [0.2, np.nan, 0.4], 0.5) \
      is None
  assert curves.steps_to_threshold([0, 10], [3.0, 1.0], 2.0,
                                   higher_is_better=False) == 10
  with pytest.raises(ValueError, match="attacks, checkpoints"):
    curves.best_curve(np.zeros(3))


def test_gap_ratio_mean_std_and_the_two_sd_rule():
  np.testing.assert_allclose(curves.gap_ratio([0.5, 0.0], [0.25, 0.1]),
                             [50.0, np.nan])
  a = curves.mean_std([0.5, 0.7, None])
  assert a == {"mean": 0.6, "std": pytest.approx(0.1), "reached": 2, "of": 3}
  b = curves.mean_std([0.75, 0.75])
  assert not curves.differs(a, b)          # 0.15 apart, 2 sd = 0.2: inside
  assert curves.differs(a, curves.mean_std([0.9, 0.9]))
  assert curves.differs(a, curves.mean_std([None])) is None
  m = curves.mean_std([np.array([0.0, 1.0]), np.array([2.0, 3.0])])
  assert m["mean"] == [1.0, 2.0] and m["std"] == [1.0, 1.0]


# -------------------------------------------------------------- continual
@pytest.mark.parametrize("acc_r,acc_f,pre,want", [
    (74.16, 0.00, 74.65, 74.40),     # T-PAMI T3 GS-LoRA 100-20
    (61.74, 1.37, 73.80, 66.66),     # T3 L2* 80-20
    (70.61, 3.10, 70.88, 69.17),     # T2 few-shot GS-LoRA++ 100-5
    (85.00, 0.10, 87.40, 86.13)])    # T4 GS-LoRA 100-20
def test_h_mean_matches_the_paper_tables(acc_r, acc_f, pre, want):
  assert abs(float(continual.h_mean(acc_r, acc_f, pre)) - want) < 0.01


def test_task_metrics_of_known_correctness():
  task = schedule.Task(retain=(0, 1), forget=(2,), old=(3,))
  labels = np.array([0, 0, 1, 1, 2, 2, 3, 3, 4])
  correct = np.array([1, 1, 1, 0, 0, 0, 1, 0, 1], bool)
  m = continual.task_metrics(correct, labels, task, pretrained_acc_f=80.0,
                             missing=(1,))
  assert m.acc_r == 75.0 and m.acc_f == 0.0 and m.acc_o == 50.0
  assert m.acc_m == 50.0
  assert m.h_mean == pytest.approx(2 * 75 * 80 / 155, rel=1e-6)
  first = schedule.Task(retain=(0,), forget=(2,), old=())
  m = continual.task_metrics(correct, labels, first, pretrained_acc_f=0.0)
  assert m.acc_o is None and m.acc_m is None and m.h_mean == 0.0
  assert continual.class_accuracy(correct, labels, (7,)) is None


def test_task_runner_equals_a_hand_written_loop():
  """Full batches, one epoch of plain SGD on a retain loss: the runner's
  steps, batches and last-epoch mean match a Python loop."""
  x = jax.random.normal(jax.random.PRNGKey(0), (24, 3))
  y = jnp.arange(24) % 3
  loss = lambda w, b: jnp.sum(b["retain"][2] * jnp.sum(
      (b["retain"][0] @ w - 1.0) ** 2, -1)) / jnp.sum(b["retain"][2])

  def build(start, x, y, task, coeffs, spe):
    imm = immunizer.supervised(loss, optax.sgd(coeffs["lr"]))
    return imm, lambda st: {}

  run = continual.task_runner(build, epochs=2, batch_size=4, retain_pad=16,
                              forget_pad=4)
  task = continual.task_indices(np.arange(8), np.arange(8, 10),
                                retain_pad=16, forget_pad=4)
  w0 = jnp.zeros((3, 2))
  key = jax.random.PRNGKey(1)
  out = run(w0, x, y, task, {"lr": jnp.float32(0.1)}, key)
  # The same steps by hand: 2 epochs x 2 batches of the 8 retained rows.
  _, k_r, _, _ = jax.random.split(key, 4)
  w, losses = w0, []
  from immunojax.data import padded_batch_positions
  for t in range(4):
    pos, wt = padded_batch_positions(k_r, 8, 16, 4, t, 2)
    idx = task["retain_idx"][pos]
    b = {"retain": (x[idx], y[idx], wt)}
    value, g = jax.value_and_grad(loss)(w, b)
    w = w - 0.1 * g
    losses.append(value)
  np.testing.assert_allclose(out["params"], w, rtol=1e-6)
  np.testing.assert_allclose(out["final"]["loss"], np.mean(losses[2:]),
                             rtol=1e-6)
  with pytest.raises(ValueError, match="do not fit"):
    continual.padded(np.arange(5), 4)


# -------------------------------------------------------------- relearning
def test_relearning_probe_curve_equals_a_hand_computed_attack():
  """One SGD attacker on a linear model: the probe's best curve is the
  accuracy after each evaluated step of plain SGD on the same batches."""
  labels = np.array([0, 1, 2] * 6)
  idx = relearning.few_shot_indices(labels, 2, classes=(0, 1, 2), seed=3)
  assert sorted(labels[idx].tolist()) == [0, 0, 1, 1, 2, 2]
  with pytest.raises(ValueError, match="fewer than"):
    relearning.few_shot_indices(labels, 7, classes=(0,), seed=0)
  x = jax.random.normal(jax.random.PRNGKey(0), (18, 4))
  xt, yt = x[idx], jnp.asarray(labels[idx])
  loss = lambda p, b: optax.softmax_cross_entropy_with_integer_labels(
      b[0] @ p["w"], b[1]).mean()
  metric = lambda p: jnp.mean(jnp.argmax(x @ p["w"], -1) == labels)
  target = attacks.Target(loss_fn=loss, metric_fn=metric, train_data=(xt, yt))
  start = {"w": jnp.zeros((4, 3))}
  _, res = relearning.relearning_probe(
      {"removed": start}, target, learning_rates=(0.5,), optimizer="sgd",
      steps=20, batch_size=6, threshold=0.9, eval_every=10)
  # By hand: batch size 6 of 6 examples is the full set every step.
  w, accs = start, [float(metric(start))]
  for t in range(20):
    g = jax.grad(loss)(w, (xt, yt))
    w = {"w": w["w"] - 0.5 * g["w"]}
    if (t + 1) % 10 == 0:
      accs.append(float(metric(w)))
  assert res["steps"] == [0, 10, 20]
  np.testing.assert_allclose(res["best_attack_curve"]["removed"], accs,
                             atol=1e-6)
  want = curves.steps_to_threshold([0, 10, 20], accs, 0.9)
  assert res["steps_to_threshold"]["removed"] == want


def test_relearning_probe_chooses_on_validation_and_reads_test():
  labels = np.array([0, 1, 2] * 8)
  x = jax.random.normal(jax.random.PRNGKey(1), (24, 4))
  idx = relearning.few_shot_indices(labels, 2, classes=(0, 1, 2), seed=0)
  val, test = relearning.validation_halves(labels, seed=5)
  assert sorted(np.concatenate([val, test]).tolist()) == list(range(24))
  assert [int(np.sum(labels[val] == c)) for c in range(3)] == [4, 4, 4]
  loss = lambda p, b: optax.softmax_cross_entropy_with_integer_labels(
      b[0] @ p["w"], b[1]).mean()
  acc = lambda p, rows: jnp.mean(jnp.argmax(x[rows] @ p["w"], -1)
                                 == labels[rows])
  target = attacks.Target(
      loss_fn=loss, metric_fn=lambda p: jnp.stack([acc(p, val),
                                                   acc(p, test)]),
      train_data=(x[idx], jnp.asarray(labels[idx])))
  crv, res = relearning.relearning_probe(
      {"removed": {"w": jnp.zeros((4, 3))}}, target,
      learning_rates=(0.05, 0.5), optimizer="sgd", steps=20, batch_size=6,
      threshold=0.5, eval_every=10)
  m = crv.metric["removed"]
  assert m.shape == (2, 3, 2) and res["selection"] == "validation"
  want = curves.selected_curve(m[..., 0], m[..., 1], [0, 10, 20])
  np.testing.assert_allclose(res["best_attack_curve"]["removed"], want)
  assert res["steps_to_threshold"]["removed"] == curves.steps_to_threshold(
      [0, 10, 20], want, 0.5)
  wide = attacks.Target(loss_fn=loss, metric_fn=lambda p: jnp.zeros(3),
                        train_data=target.train_data)
  with pytest.raises(ValueError, match="validation, test"):
    relearning.relearning_probe({"removed": {"w": jnp.zeros((4, 3))}}, wide,
                                learning_rates=(0.1,), optimizer="sgd",
                                steps=10, batch_size=6, threshold=0.5)


def test_class_recovery_target_reads_the_removed_classes_halves():
  """A linear 'classifier' whose logits are the inputs: the metric is the
  accuracy on the validation and test halves of the removed classes' rows
  (passed as the target's eval_data), computed by hand; the loss is the
  cross-entropy of the training rows."""
  y = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 3])
  x = jnp.asarray(np.eye(4)[[0, 1, 0, 0, 1, 2, 0, 1, 1, 3]], jnp.float32)
  logits = lambda p, xx, yy: xx @ p
  train = (x[:3], jnp.asarray(y[:3]))
  t = relearning.class_recovery_target(logits, eval_data=(x, y),
                                       classes=(1, 2), train_data=train,
                                       seed=4, head=("head",))
  rows = np.flatnonzero(np.isin(y, [1, 2]))
  val, test = (rows[h] for h in relearning.validation_halves(y[rows], 4))
  w = jnp.eye(4)
  right = np.asarray(jnp.argmax(x @ w, -1)) == y
  np.testing.assert_allclose(t.metric_fn(w, t.eval_data),
                             [right[val].mean(), right[test].mean()])
  # The halves are arguments, not constants compiled into the attack's
  # program, padded to one length, 4 (the largest two classes give halves
  # of 2 + 2 rows; classes 2 and 3 give 1 and 3): one compilation serves
  # every seed's and every class set's halves.
  assert not jax.make_jaxpr(t.metric_fn)(w, t.eval_data).consts
  other = relearning.class_recovery_target(
      logits, eval_data=(x, y), classes=(2, 3), train_data=train, seed=0)
  shapes = lambda t: [a.shape for a in jax.tree_util.tree_leaves(t.eval_data)]
  assert shapes(other) == shapes(t) == [(4, 4), (4,), (4,)] * 2
  rows23 = np.flatnonzero(np.isin(y, [2, 3]))
  v23, t23 = (rows23[h] for h in relearning.validation_halves(y[rows23], 0))
  assert (len(v23), len(t23)) == (1, 3)
  np.testing.assert_allclose(other.metric_fn(w, other.eval_data),
                             [right[v23].mean(), right[t23].mean()])
  assert len(val) + len(test) == 6 and not set(val) & set(test)
  np.testing.assert_allclose(t.loss_fn(w, train), np.mean(
      -jax.nn.log_softmax(x[:3] @ w)[np.arange(3), y[:3]]), rtol=1e-6)
  assert t.head == ("head",) and t.train_data is train
  with pytest.raises(ValueError, match="no held-out example"):
    relearning.class_recovery_target(logits, eval_data=(x, y), classes=(7,),
                                     train_data=train, seed=0)


# -------------------------------------------------------------- references
def test_against_references_and_per_attack_deltas():
  per = {"scratch": [0.1, 0.5, 0.7], "protected": [0.1, 0.4, 0.8],
         "original": [0.9, 0.9, 0.95]}
  r = references.against_references(per, references=("scratch", "original"))
  assert r["before"]["protected"] == 0.1 and r["after"]["original"] == 0.95
  assert not r["at_or_below_scratch_every_epoch"]          # 0.8 > 0.7
  assert r["at_or_below_original_every_epoch"]
  per["protected"][2] = None                               # diverged
  assert references.against_references(per)["at_or_below_scratch_every_epoch"]
  c = attacks.AttackCurves([], {}, {"a": np.array([[0.5, 0.7]]),
                                    "b": np.array([[0.2, np.nan]])}, {}, {})
  np.testing.assert_array_equal(references.per_attack_deltas(c, "a", "b"),
                                [[0.3, np.nan]])


def test_paper_protocol_evaluates_once_per_epoch():
  attack, every = references.epoch_attack(
      optimizer="sgd", learning_rate=0.1, batch_size=4, epochs=3,
      num_train=10)
  assert every == 2 and attack.steps == 6 and attack.mode == "full"
  x = jax.random.normal(jax.random.PRNGKey(0), (10, 2))
  y = jnp.arange(10) % 2
  target = attacks.Target(
      loss_fn=lambda p, b: optax.softmax_cross_entropy_with_integer_labels(
          b[0] @ p, b[1]).mean(),
      metric_fn=lambda p: jnp.mean(jnp.argmax(x @ p, -1) == y),
      train_data=(x, y))
  c = references.paper_protocol({"s": jnp.zeros((2, 2))}, target,
                                learning_rate=0.1, batch_size=4, epochs=3)
  assert c.steps["s"].tolist() == [0, 2, 4, 6]
  # several rates: one attacker each, the single-rate curve among them
  many = references.paper_protocol({"s": jnp.zeros((2, 2))}, target,
                                   learning_rate=(1e-3, 0.1), batch_size=4,
                                   epochs=3)
  assert [a.learning_rate for a in many.attacks] == [1e-3, 0.1]
  np.testing.assert_allclose(many.metric["s"][1], c.metric["s"][0])


# -------------------------------------------------------------- generative
def test_judge_metric_on_a_known_sampler():
  classify = lambda im: im[:, :3]                 # logits = first 3 pixels
  features = lambda im: im
  sample = lambda params, prompt, noise: noise + params * prompt
  heldout = lambda params, prompt, ref, t, eps: jnp.sum(params) + 0.0 * t[0]
  metric = generative.judge_metric(sample=sample, classify=classify,
                                   features=features, heldout_loss=heldout)
  prompt = jnp.array([[1.0, 0.0, 0.0, 0.0]])
  ev = {"prompt": prompt, "label": jnp.array([0]),
        "noise": jnp.zeros((1, 5, 4)), "ref": jnp.ones((1, 2, 4)),
        "t": jnp.zeros((1, 2), jnp.int32), "eps": jnp.zeros((1, 2, 4))}
  out = metric(jnp.float32(2.0), ev)
  assert out.shape == (1, 3)
  # every sample is (2, 0, 0, 0): class 0, cosine to (1,1,1,1) is 1/2
  np.testing.assert_allclose(out[0], [1.0, 0.5, 2.0], rtol=1e-6)
  assert float(generative.sample_accuracy(classify, jnp.eye(4)[:3], 1)) \
      == pytest.approx(1 / 3)


def test_judge_data_draws_once_per_seed_and_truncates_to_the_smallest_set():
  held = [np.full((5, 4), 1.0), np.full((3, 4), 2.0)]
  kw = dict(samples=6, num_timesteps=10, seed=3)
  ev = generative.judge_data([[1, 2], [1, 3]], [4, 7], held, **kw)
  assert ev["noise"].shape == (2, 6, 4) and ev["ref"].shape == (2, 3, 4)
  assert ev["t"].shape == ev["eps"].shape[:2] == (2, 3)
  assert ev["label"].dtype == jnp.int32 and ev["label"].tolist() == [4, 7]
  np.testing.assert_array_equal(ev["ref"][1], 2.0)
  assert 0 <= int(ev["t"].min()) and int(ev["t"].max()) < 10
  again = generative.judge_data([[1, 2], [1, 3]], [4, 7], held, **kw)
  jax.tree_util.tree_map(np.testing.assert_array_equal, ev, again)
  other = generative.judge_data([[1, 2], [1, 3]], [4, 7], held,
                                **{**kw, "seed": 4})
  assert not np.array_equal(ev["noise"], other["noise"])


# ------------------------------------------------------------------ probes
def test_line_search_probe_reaches_least_squares_and_gram_extremes():
  key = jax.random.PRNGKey(0)
  f = jax.random.normal(key, (40, 5), jnp.float64)
  y = jnp.argmax(f[:, :3], -1)
  ratio, acc = probes.line_search_probe(f, y, f, y, steps=200, num_classes=3)
  assert ratio.shape == (11,) and float(ratio[0]) == pytest.approx(1.0)
  assert float(ratio[-1]) < 1e-3 and float(ratio[-1]) < float(ratio[1])
  g = probes.gram_extremes(f)
  ev = np.linalg.eigvalsh(np.asarray(f.T @ f))
  assert g["rank"] == 5 and g["dim"] == 5
  np.testing.assert_allclose([g["sigma_min"], g["sigma_max"]],
                             [ev[0], ev[-1]], rtol=1e-10)


def test_least_squares_accuracy_reads_what_the_features_encode():
  y = np.array([0, 1, 2, 0, 1, 2, 0, 0])
  onehot = jnp.eye(3)[y]                    # features = the label: all read
  assert probes.least_squares_accuracy(onehot, y, onehot, y,
                                       num_classes=3) == 1.0
  blank = jnp.zeros((8, 4))                 # nothing: the bias alone, the
  y_test = np.array([0, 0, 1, 2])           # most frequent class (0)
  assert probes.least_squares_accuracy(blank, y, blank[:4], y_test,
                                       num_classes=3) == 0.5


# ------------------------------------------------------ SOPHON calibration
def test_calibrate_takes_the_largest_rate_that_keeps_the_margin():
  rates = [1e-3, 3e-3, 1e-2]
  got = references.calibrate(rates, [0.38, 0.67, 0.87],
                                [0.75, 0.83, 0.85])
  assert got["attack_lr"] == 3e-3 and got["met"]
  assert (got["scratch"], got["original"]) == (0.67, 0.83)
  # no rate keeps it: the largest gap, flagged
  got = references.calibrate(rates, [0.7, 0.8, 0.9], [0.75, 0.82, 0.9])
  assert got["attack_lr"] == 1e-3 and not got["met"]
  with pytest.raises(ValueError, match="equal-length"):
    references.calibrate(rates, [0.1], [0.2])


def _starts(rng, seeds=3, n=4, e=3):
  base = rng.uniform(0.2, 0.4, (seeds, n, e))
  original = base + np.array([0.3, 0.3, 0.0, 0.3])[None, :, None]
  protected = base + np.array([-0.1, 0.2, 0.0, 0.05])[None, :, None]
  return {"scratch": base, "original": original, "protected": protected}


def test_deltas_vs_scratch_reads_every_attack_and_selects_on_validation():
  rng = np.random.default_rng(0)
  val, test = _starts(rng), _starts(rng)
  labels = ["a", "b", "c", "d"]
  got = references.deltas_vs_scratch(val, test, [0, 10, 20], [10, 20],
                                        labels)
  assert got["no_transfer"] == ["c"]           # original == scratch
  np.testing.assert_allclose(
      got["attacks"]["a"]["delta_protected"]["20"]["mean"], -0.1)
  np.testing.assert_allclose(
      got["attacks"]["b"]["delta_transfer"]["10"]["mean"], 0.3)
  assert got["worst_case_transferring"]["attack"] == "b"
  # poisoning the test split (attack d looks worst there) changes no choice
  poisoned = {k: v.copy() for k, v in test.items()}
  poisoned["protected"][:, 3] = 1.0
  again = references.deltas_vs_scratch(val, poisoned, [0, 10, 20],
                                          [10, 20], labels)
  assert again["worst_case_transferring"]["attack"] == "b"
  assert again["no_transfer"] == ["c"]
  with pytest.raises(ValueError, match="not checkpoints"):
    references.deltas_vs_scratch(val, test, [0, 10, 20], [15], labels)
  with pytest.raises(ValueError, match="labels"):
    references.deltas_vs_scratch(val, test, [0, 10, 20], [10], labels[:2])


# ------------------------------------------------------------ displacement
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_displacement_of_sgd_and_adam_against_closed_forms(seed):
  rng = np.random.default_rng(seed)
  c = {"a": jnp.asarray(rng.normal(size=3)), "b": jnp.asarray(rng.normal(size=2))}
  w0 = {"a": jnp.asarray(rng.normal(size=3)), "b": jnp.asarray(rng.normal(size=2))}
  loss = lambda w, _: 0.5 * sum(jnp.sum((w[k] - c[k]) ** 2) for k in w)
  k, lr = 4, 0.3
  batches = jnp.zeros((k, 1))
  dist = np.sqrt(sum(np.sum((np.asarray(w0[n]) - np.asarray(c[n])) ** 2)
                     for n in w0))
  # SGD on 0.5||w - c||^2: w_K - w_0 = (1 - (1 - lr)^K) (c - w_0).
  np.testing.assert_allclose(
      displacement.displacement(w0, loss, optax.sgd(lr), batches),
      (1 - (1 - lr) ** k) * dist, rtol=1e-10)
  # Frozen leaves add nothing: only "b" moves.
  dist_b = np.linalg.norm(np.asarray(w0["b"]) - np.asarray(c["b"]))
  np.testing.assert_allclose(
      displacement.displacement(w0, loss, optax.sgd(lr), batches,
                                trainable=r"^b"),
      (1 - (1 - lr) ** k) * dist_b, rtol=1e-10)
  # One Adam step moves every coordinate by lr (eps aside): lr sqrt(D).
  np.testing.assert_allclose(
      displacement.displacement(w0, loss, optax.adam(1e-3, eps=1e-12),
                                batches[:1]), 1e-3 * np.sqrt(5), rtol=1e-8)


# ------------------------------------------------------------ merge attack
def _merge_problem(seed):
  k = jax.random.split(jax.random.PRNGKey(seed), 4)
  start = {"a": jax.random.normal(k[0], (3, 2)), "b": jnp.zeros(2)}
  xs = jax.random.normal(k[1], (2, 12, 3))                 # two concepts
  ys = jax.random.normal(k[2], (2, 12, 2))
  loss = lambda p, b: jnp.mean((b[0] @ p["a"] + p["b"] - b[1]) ** 2)
  probe = jax.random.normal(k[3], (5, 3))
  metric = lambda p: jnp.sum(probe @ p["a"] + p["b"], axis=0)   # (2,)
  return start, (xs, ys), loss, metric


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_merged_attack_reads_each_copy_as_the_harness_attack_does(seed):
  """Merging by 'take copy i' gives the harness's attack on concept i
  alone, checkpoint by checkpoint; the mean merge gives the mean of the
  copies' parameters (a linear metric: the mean of their metrics)."""
  start, data, loss, metric = _merge_problem(seed)
  attack = attacks.Attack("adam", 0.05, 4, "masked", 6, seed=seed + 3)
  target = attacks.Target(loss_fn=loss, metric_fn=metric, train_data=None,
                          masked_modes={"masked": ("^a$",)})
  per = attacks.run_attacks([attack], {"s": start}, {
      str(i): target._replace(train_data=(data[0][i], data[1][i]))
      for i in range(2)}, eval_every=2)
  kw = dict(attacker=modes.masked(("^a$",)), loss_fn=loss,
            optimizer=optax.adam(0.05), train_data=data, batch_size=4,
            steps=6, eval_every=2, metric_fn=metric, seed=seed + 3)
  for i in range(2):
    take_i = lambda base, adapted, i=i: jax.tree_util.tree_map(
        lambda a: a[i], adapted)
    got = merge_attack.merged_attack(start, merge=take_i, **kw)
    np.testing.assert_allclose(got, per[str(i)].metric["s"][0], rtol=1e-5,
                               atol=1e-6)
  mean = lambda base, adapted: jax.tree_util.tree_map(
      lambda a: jnp.mean(a, 0), adapted)
  got = merge_attack.merged_attack(start, merge=mean, **kw)
  want = (per["0"].metric["s"][0] + per["1"].metric["s"][0]) / 2
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="does not divide"):
    merge_attack.merged_attack(start, merge=mean, **{**kw, "eval_every": 4})
  # a merge that diverges: no data point, even where the metric (an
  # accuracy of NaN logits) would read as a number
  def nan_once_moved(base, adapted):
    a = adapted["a"][0]
    return {"a": jnp.where(jnp.any(a != base["a"]), jnp.nan, a),
            "b": base["b"]}
  acc = lambda p: jnp.mean(jnp.argmax(jnp.ones((4, 3)) @ p["a"], -1) == 0)
  got = merge_attack.merged_attack(start, merge=nan_once_moved,
                                   **{**kw, "metric_fn": acc})
  assert np.isfinite(got[0]) and np.all(np.isnan(got[1:]))


# ---------------------------------------------------------------- concepts
def test_attack_scores_against_hand_computed_worst_concept_and_selectivity():
  acc = np.array([[0.1, 0.2], [0.5, 0.3], [0.4, 0.9]])       # (E=3, C=2)
  wo_acc = np.array([[0.2, 0.2], [0.8, 0.6], [0.8, 1.0]])
  feat = np.full((3, 2), 0.5)
  curves = np.stack([acc, feat, np.ones((3, 2))], -1)
  undefended = np.stack([wo_acc, feat * 2, 2 * np.ones((3, 2))], -1)
  col = np.array([[0.5, 1.0], [0.5, 0.0], [1.0, 0.5]])       # per concept
  s = concepts.attack_scores(curves, undefended, col, concepts=["a", "b"],
                             per_concept=True)
  assert s["concept_accuracy"] == {"a": [0.1, 0.5, 0.4], "b": [0.2, 0.3, 0.9]}
  assert s["worst_concept"] == [0.2, 0.5, 0.9]
  assert s["worst_concept_accuracy"] == 0.9
  # concept k over the collateral of the attack on k; 0 collateral: no data
  np.testing.assert_allclose(s["selectivity"], [0.2, 1.0, 1.8])
  assert s["heldout_loss_gap"] == [-1.0, -1.0, -1.0]
  # IMMA's gap ratios after checkpoint 0: accuracy (ref - ours) / ref
  want = np.mean([(0.8 - 0.5) / 0.8, (0.6 - 0.3) / 0.6, (0.8 - 0.4) / 0.8,
                  (1.0 - 0.9) / 1.0]) * 100
  assert s["mean_sgr_concept_accuracy"] == pytest.approx(want)
  assert s["mean_sgr_feature_similarity"] == pytest.approx(50.0)
  joint = concepts.attack_scores(curves, undefended, np.array([0.5, 1, 0]),
                                 concepts=["a", "b"], per_concept=False)
  np.testing.assert_allclose(joint["selectivity"], [0.4, 0.5, np.nan])
  assert concepts.attack_scores(curves, undefended, None, concepts=["a", "b"],
                                per_concept=False)["selectivity"] is None
  with pytest.raises(ValueError, match="checkpoints, 3, 3"):
    concepts.attack_scores(curves, undefended, None, concepts=["a"] * 3,
                           per_concept=True)


def test_over_seeds_and_matched_weight():
  o = concepts.over_seeds([[0.2, 0.4], [0.4, 0.8]])
  assert o["mean"] == pytest.approx([0.3, 0.6])
  assert o["sd"] == pytest.approx([0.1, 0.2]) and o["seeds"] == 2
  assert concepts.over_seeds([[0.1], None]) is None
  assert concepts.matched_weight({2.0: 0.95, 0.5: 0.90, 1.0: 0.94},
                                 0.93) == (1.0, True)
  assert concepts.matched_weight({2.0: 0.91, 0.5: 0.80, 1.0: 0.92},
                                 0.93) == (1.0, False)
  with pytest.raises(ValueError, match="no weights"):
    concepts.matched_weight({}, 0.9)


def _tagged_training(calls):
  """``train_at`` whose "params" are (method, weight) tags; every call is
  logged as (weight, methods)."""
  def train_at(w, methods):
    calls.append((w, methods))
    todo = methods or ("none", "a", "b", "c")
    return ({m: (m, w) for m in todo},
            {m: {"none": 0.0, "a": 1.0, "b": 2.0, "c": 3.0}[m] for m in todo})
  return train_at


# utility falls with the weight for "a", rises for "b" (never reaching the
# floor), reaches it at the middle weight for "c"; "none" ignores the weight
UTIL = {("a", 1.0): 0.95, ("a", 2.0): 0.92, ("a", 3.0): 0.90,
        ("b", 1.0): 0.80, ("b", 2.0): 0.82, ("b", 3.0): 0.85,
        ("c", 1.0): 0.90, ("c", 2.0): 0.94, ("c", 3.0): 0.96}


@pytest.mark.parametrize("sweep", ["grid", "until_matched"])
def test_match_utility_keeps_each_method_at_its_own_weight(sweep):
  calls = []
  params, walls, rec = concepts.match_utility(
      _tagged_training(calls), (3.0, 1.0, 2.0),
      utility=lambda p: UTIL.get(p, 1.0), floor=0.93, sweep=sweep)
  # the same choice either way: the smallest weight that reaches the floor,
  # else the best one
  assert params == {"none": ("none", 1.0), "a": ("a", 1.0),
                    "b": ("b", 3.0), "c": ("c", 2.0)}
  assert rec["a"]["selection_matched"] is True
  assert rec["b"]["prior_weight"] == 3.0
  assert rec["b"]["selection_matched"] is False
  assert rec["none"]["prior_weight"] is None
  if sweep == "grid":
    assert calls == [(1.0, None), (2.0, None), (3.0, None)]
    assert walls == {"none": 0.0, "a": 3.0, "b": 6.0, "c": 9.0}
    assert rec["c"]["swept"] == {"1": 0.90, "2": 0.94, "3": 0.96}
  else:           # a method's next weight only while it is below the floor
    assert calls == [(1.0, None), (2.0, ("b", "c")), (3.0, ("b",))]
    assert walls == {"none": 0.0, "a": 1.0, "b": 6.0, "c": 6.0}
    assert rec["a"]["swept"] == {"1": 0.95}
    assert rec["c"]["swept"] == {"1": 0.90, "2": 0.94}
  assert rec["b"]["swept"] == {"1": 0.80, "2": 0.82, "3": 0.85}


def test_match_utility_stops_when_every_method_is_matched_and_checks_sweep():
  calls = []
  util = {("a", 1.0): 0.95, ("b", 1.0): 0.94, ("c", 1.0): 0.99}
  params, _, _ = concepts.match_utility(
      _tagged_training(calls), (1.0, 3.0), utility=lambda p: util.get(p, 0.0),
      floor=0.93)
  assert calls == [(1.0, None)] and params["b"] == ("b", 1.0)
  # one weight: nothing selected, nothing swept
  _, _, one = concepts.match_utility(_tagged_training([]), (2.0,),
                                     utility=None, floor=0.93)
  assert one["a"] == {"prior_weight": 2.0, "selection_matched": None,
                      "swept": None}
  with pytest.raises(ValueError, match="unknown sweep 'all'"):
    concepts.match_utility(_tagged_training([]), (1.0,), utility=None,
                           floor=0.9, sweep="all")


def test_immunize_methods_chains_sequential_imma_and_pools_joint():
  log = []

  def fit(name, which, params, slots, desc, steps):
    log.append((name, which, params, np.asarray(slots).tolist(), steps))
    return params + [name]

  out, wall = concepts.immunize_methods(fit, [], concepts=["x", "y"],
                                        steps=10, sequential_steps=5)
  assert out["none"] == [] and wall["none"] == 0.0
  assert out["imma_sequential"] == ["imma_sequential_0", "imma_sequential_1"]
  assert [e[3] for e in log if e[0].startswith("imma_seq")] == [
      [[1.0, 0.0]], [[0.0, 1.0]]]                     # one concept a slot
  assert [e[4] for e in log if e[0].startswith("imma_seq")] == [5, 5]
  joint = next(e for e in log if e[0] == "imma_joint")
  assert joint[1] == "imma" and joint[3] == [[1.0, 1.0]] and joint[4] == 10
  for m in ("max", "mima", "mima_average_merge"):   # each from the start
    e = next(e for e in log if e[0] == m)
    assert e[2] == [] and e[3] == [[1.0, 0.0], [0.0, 1.0]]
  assert list(out) == ["none", "max", "imma_sequential", "imma_joint",
                       "mima", "mima_average_merge"]
  # a subset: only those loops run, "none" only when asked for
  log.clear()
  out, wall = concepts.immunize_methods(fit, [], concepts=["x", "y"],
                                        steps=10, sequential_steps=5,
                                        methods=("imma_joint", "mima"))
  assert [e[0] for e in log] == ["imma_joint", "mima"]
  assert list(out) == list(wall) == ["imma_joint", "mima"]
  with pytest.raises(ValueError, match="unknown method 'mimma'"):
    concepts.immunize_methods(fit, [], concepts=["x"], steps=1,
                              sequential_steps=1, methods=("mimma",))


def test_immunizers_are_the_methods_built_directly():
  """Each immunizer of the comparison takes the same first step as the
  method built by hand with the same options; the merge is MIMA's only
  difference from its average-merge ablation."""
  from immunojax.methods import imma
  from tests.test_imma import UPPER, first_update, merge_problem, toy, \
      toy_batch
  params, loss = toy()
  _, _, keys, reg = merge_problem(0, n=2, t=1, d=4, m=12)
  merged = imma.concept_merge(keys=keys, reg_keys=reg,
                              merged=(r"attn2/to_k/kernel",))
  opt = optax.sgd(0.1)
  upper = dict(upper=UPPER, optimizer=opt, prior_weight=0.5, ascent_bound=2.0)
  lower = dict(lower=modes.full(), inner_lr=0.05, upper_at="every_step",
               inner_optimizer=imma.inner_optimizer("adam"))
  ours = concepts.immunizers(loss, merge=merged, **upper, **lower)
  direct = {"max": imma.max_ascent(loss, **upper),
            "imma": imma.imma(loss, **upper, **lower),
            "mima": imma.mima(loss, merge=merged, **upper, **lower),
            "mima_average_merge": imma.mima(loss, merge=imma.average_merge(),
                                            **upper, **lower)}
  assert set(ours) == set(direct)
  got = {}
  for name, imm in direct.items():
    batch = toy_batch(1, 1 if name == "imma" else 2, k=2)
    got[name], _ = first_update(ours[name], params, batch)
    want, _ = first_update(imm, params, batch)
    jax.tree_util.tree_map(np.testing.assert_array_equal, got[name], want)
  assert not np.allclose(got["mima"]["attn2"]["to_k"]["kernel"],
                         got["mima_average_merge"]["attn2"]["to_k"]["kernel"])


def test_concept_sampler_slots_pools_and_null_rows():
  c, n, batch = 3, 10, 4
  data = {"x": jnp.arange(c)[:, None, None] * jnp.ones((c, n, 2)),
          "tokens": jnp.arange(c)[:, None, None] * jnp.ones((c, n, 3),
                                                             jnp.int32),
          "prior_x": jnp.full((7, 2), 9.0),
          "prior_tokens": jnp.full((7, 3), 9, jnp.int32)}
  draw = lambda key, x, t: {"x": x, "tokens": t}
  null = jnp.asarray([0, 0, 1], jnp.int32)
  sample = concepts.concept_sampler(draw, jax.random.PRNGKey(0), batch=batch,
                                    lower_steps=2, null_rows=1,
                                    null_tokens=null)
  b = sample((data, jnp.eye(c)), 5)
  assert b["lower"]["x"].shape == (c, 2, batch, 2)
  assert b["upper"]["x"].shape == (c, batch, 2)
  for slot in range(c):          # the identity: slot s draws concept s only
    assert np.all(np.asarray(b["lower"]["x"][slot]) == slot)
    assert np.all(np.asarray(b["upper"]["tokens"][slot]) == slot)
  np.testing.assert_array_equal(b["prior"]["tokens"][0], null)
  assert np.all(np.asarray(b["prior"]["tokens"][1:]) == 9)
  one_hot = sample((data, jnp.eye(c)[1:2]), 5)  # IMMA on concept 1
  assert np.all(np.asarray(one_hot["lower"]["x"]) == 1)
  pooled = sample((data, jnp.ones((1, c))), 5)
  assert len(np.unique(np.asarray(pooled["lower"]["x"]))) > 1
  # a pure function of the step
  again = sample((data, jnp.eye(c)), 5)
  jax.tree_util.tree_map(np.testing.assert_array_equal, b, again)
  with pytest.raises(ValueError, match="null_tokens"):
    concepts.concept_sampler(draw, jax.random.PRNGKey(0), batch=batch,
                             lower_steps=1, null_rows=1)
