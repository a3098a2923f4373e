"""GS-LoRA / GS-LoRA++: losses, groups, H-mean, the task schedule, the
immunizers and the small ViT (spec gs_lora.md §6.4)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from immunojax import lora, losses, models
from immunojax.data import continual
from immunojax.methods import gs_lora as gs

FFN = (r"blocks/\d+/fc[12]/kernel",)


def tiny_vit(seed=0, **kw):
  args = dict(side=8, patch=4, dim=8, depth=2, heads=2, mlp_dim=16,
              num_classes=4, rngs=nnx.Rngs(seed))
  args.update(kw)
  apply, params = models.functional(models.ViT(**args))
  return (lambda p, x, y, key: apply(p, x, y, key=key)), params


def test_vit_spec_size_and_outputs():
  model = nnx.eval_shape(lambda: models.ViT(rngs=nnx.Rngs(0)))
  sizes = [p.size for p in jax.tree_util.tree_leaves(nnx.state(model))
           if hasattr(p, "size")]
  assert sum(sizes) == 135_360             # spec §6.2
  fwd, p = tiny_vit()
  x = jax.random.uniform(jax.random.PRNGKey(1), (5, 64))
  y = jnp.array([0, 1, 2, 3, 0])
  fwd = jax.jit(fwd)
  logits, emb = fwd(p, x, None, None)
  assert logits.shape == (5, 4) and emb.shape == (5, 8)
  margin, _ = fwd(p, x, y, None)   # CosFace: margin only on the true class
  diff = np.array(logits - margin)
  np.testing.assert_allclose(diff[np.arange(5), np.asarray(y)], 64 * 0.35,
                             rtol=1e-5)
  diff[np.arange(5), np.asarray(y)] = 0
  assert np.abs(diff).max() < 1e-4
  a = fwd(p, x, y, jax.random.PRNGKey(2))[0]   # dropout only with a key
  assert not np.allclose(a, margin)
  np.testing.assert_array_equal(fwd(p, x, y, None)[0], margin)


def test_group_lasso_value_and_finite_gradient_at_zero():
  groups = [{"a": jnp.array([3.0, 4.0])}, {"a": jnp.zeros(2),
                                            "b": jnp.zeros((2, 2))},
            {"a": jnp.array([1.0]), "b": jnp.array([[2.0, 2.0]])}]
  assert math.isclose(float(losses.group_lasso(groups)), 5.0 + 3.0,
                      rel_tol=1e-5)
  g = jax.grad(losses.group_lasso)(groups)
  assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(g))
  np.testing.assert_allclose(g[0]["a"], [0.6, 0.8], rtol=1e-5)
  np.testing.assert_array_equal(g[1]["b"], 0.0)


def test_bounded_forget_switches_off_above_the_bound():
  grad = jax.grad(lambda ce: losses.bounded_forget(ce, 105.0))
  assert float(grad(100.0)) == -1.0     # ascent on CE below the bound
  assert float(grad(110.0)) == 0.0


def test_bounded_each_bounds_every_example_not_the_batch_mean():
  # Forget CEs 0 and ~2B: their mean meets the released bound, so
  # "bounded" stops, while the first example is still recognised;
  # "bounded_each" keeps pushing it (and only it).
  bound = 10.0
  table = jnp.array([[30.0, 0.0], [0.0, 20.0], [5.0, 0.0]])
  fwd = lambda p, x, y, key: (p[x], p[x])
  batch = {"retain": (jnp.array([2]), jnp.array([0]), jnp.ones(1)),
           "forget": (jnp.array([0, 1]), jnp.array([0, 0]), jnp.ones(2))}
  ce = optax.softmax_cross_entropy_with_integer_labels(table[:2],
                                                       jnp.array([0, 0]))
  assert float(jnp.mean(ce)) > bound > float(ce[0])

  def term(forget, p=table):
    return gs._data_loss(fwd, p, batch, jax.random.PRNGKey(0), 1.0, bound,
                         None, forget)[1][2]["forget_term"]

  assert float(term("bounded")) == 0.0
  np.testing.assert_allclose(term("bounded_each"),
                             np.mean(np.maximum(bound - np.asarray(ce), 0)),
                             rtol=1e-6)
  g = jax.grad(lambda p: term("bounded_each", p))(table)
  assert float(jnp.abs(g[0]).sum()) > 0 and float(jnp.abs(g[1]).sum()) == 0


def test_orthogonal_forget_is_the_mean_squared_cosine():
  rng = np.random.default_rng(1)
  emb, head = rng.normal(size=(3, 6)), rng.normal(size=(4, 6))
  cos = (emb / np.linalg.norm(emb, axis=1, keepdims=True)) @ (
      head / np.linalg.norm(head, axis=1, keepdims=True)).T
  logits = models.cosface_logits(jnp.asarray(emb), jnp.asarray(head),
                                 scale=64.0)
  np.testing.assert_allclose(losses.orthogonal_forget_values(logits, 64.0),
                             np.mean(cos ** 2, axis=1), rtol=1e-5)
  # zero exactly when the embedding is orthogonal to every head row
  head = jnp.eye(6)[:4]
  orth = models.cosface_logits(jnp.eye(6)[4:], head, scale=64.0)
  np.testing.assert_array_equal(losses.orthogonal_forget_values(orth, 64.0),
                                0.0)


def test_runner_up_ce_teaches_the_prediction_without_the_true_class():
  logits = jnp.array([[0.3, -1.0, 2.0, 0.5], [1.0, 0.0, 0.0, -2.0]])
  teacher = jnp.array([[5.0, 1.0, 0.0, 3.0], [0.0, 4.0, 1.0, 1.0]])
  labels = jnp.array([0, 1])
  values = losses.runner_up_cross_entropy_values(logits, teacher, labels)
  for i in range(2):
    t = np.array(teacher[i], float)
    t[int(labels[i])] = -np.inf
    q = np.exp(t - t.max())
    q /= q.sum()
    lp = np.array(logits[i]) - np.log(np.sum(np.exp(logits[i])))
    assert q[int(labels[i])] == 0.0
    np.testing.assert_allclose(values[i], -np.sum(q * lp), rtol=1e-5)
  g = jax.grad(lambda t: losses.runner_up_cross_entropy_values(
      logits, t, labels).sum())(teacher)
  np.testing.assert_array_equal(g, 0.0)      # the teacher is a constant


@pytest.mark.parametrize("forget", ["orthogonal", "runner_up", "collapse"])
def test_forget_objectives_move_the_forget_set_where_they_aim(forget):
  fwd, params = toy()
  cfg = lora.LoraConfig(r=2, lora_alpha=1.0, target_modules=FFN)
  batch = _batch()
  xf, yf, _ = batch["forget"]
  xr, yr, wr = batch["retain"]
  protos = gs.class_prototypes(lambda v: fwd(params, v, None, None)[1],
                               jnp.concatenate([xr, xf]),
                               jnp.concatenate([yr, yf]),
                               jnp.ones(2 * len(yr)), 4)

  def train(beta):
    imm = gs.gs_lora(fwd, lora_config=cfg, optimizer=optax.adam(3e-2),
                     alpha=0.0, beta=beta, forget=forget, logit_scale=64.0,
                     prototypes=protos)
    state = imm.init(params, jax.random.PRNGKey(0))
    update = jax.jit(imm.update)
    for t in range(60):
      state, m = update(state, batch, jax.random.PRNGKey(t))
    return imm.params(state), float(m["forget_term"])

  weight = 100.0 if forget == "orthogonal" else 1.0
  (p_on, on), (_, off) = train(weight), train(0.0)
  assert on < 0.5 * off           # the term does what retain CE alone won't
  logits = fwd(p_on, xf, None, None)[0]
  if forget == "runner_up":      # the teacher's best class but the true one
    teacher = fwd(params, xf, None, None)[0]
    runner_up = jnp.argmax(jnp.where(jax.nn.one_hot(yf, 4, dtype=bool),
                                     -jnp.inf, teacher), -1)
    assert float(jnp.mean(jnp.argmax(logits, -1) == runner_up)) >= 5 / 6
  elif forget == "orthogonal":
    assert float(jnp.max(jnp.abs(logits / 64.0))) < 0.3


def test_collapse_values_by_hand_and_prototypes_required():
  emb = jnp.array([[1.0, 0.0], [0.0, 2.0]])
  teacher = jnp.array([[9.0, 1.0, 3.0], [0.0, 5.0, 4.0]])
  protos = jnp.array([[1.0, 1.0], [0.0, -3.0], [2.0, 0.0]])
  v = losses.runner_up_collapse_values(emb, teacher, jnp.array([0, 1]),
                                       protos)
  # example 0: runner-up class 2 (cos 1 -> 0); example 1: class 2 (cos 0 -> 1)
  np.testing.assert_allclose(v, [0.0, 1.0], atol=1e-6)
  fwd, _ = toy()
  with pytest.raises(ValueError, match="prototypes"):
    gs.gs_lora(fwd, lora_config=lora.LoraConfig(r=2, target_modules=FFN),
               optimizer=optax.sgd(1.0), forget="collapse")


def test_unknown_forget_objective_is_named():
  fwd, params = toy()
  cfg = lora.LoraConfig(r=2, target_modules=FFN)
  with pytest.raises(ValueError, match="forget.*antipode|antipode"):
    gs.gs_lora(fwd, lora_config=cfg, optimizer=optax.sgd(1.0),
               forget="antipode")
  with pytest.raises(ValueError, match="antipode"):
    gs.finetune_forget(fwd, optimizer=optax.sgd(1.0), trainable=params,
                       forget="antipode")


def test_prototype_kl_matches_kl_div_batchmean():
  rng = np.random.default_rng(0)
  emb, protos = rng.normal(size=(3, 5)), rng.normal(size=(4, 5))
  y = np.array([2, 0, 2])
  logp = protos[y] - np.log(np.exp(protos[y]).sum(1, keepdims=True))
  logq = emb - np.log(np.exp(emb).sum(1, keepdims=True))
  want = np.sum(np.exp(logp) * (logp - logq)) / 3
  got = losses.prototype_kl(jnp.asarray(emb), jnp.asarray(y),
                            jnp.asarray(protos))
  assert math.isclose(float(got), want, rel_tol=1e-6)
  w = jnp.array([1.0, 1.0, 0.0])         # padding is left out of the mean
  want_w = np.sum((np.exp(logp) * (logp - logq)).sum(1)[:2]) / 2
  assert math.isclose(float(losses.prototype_kl(
      jnp.asarray(emb), jnp.asarray(y), jnp.asarray(protos), w)), want_w,
      rel_tol=1e-6)


def test_task_schedule_mirrors_the_protocol():
  order = continual.class_order(10, 3)
  ts = continual.tasks(order, first_retained=8, per_task=2, num_tasks=4)
  seen = set()
  for t, task in enumerate(ts):
    assert len(task.retain) == 8 - 2 * t and len(task.forget) == 2
    assert set(task.retain) | set(task.forget) | set(task.old) == set(range(10))
    assert set(task.old) == seen          # Acc_o: exactly the earlier ones
    seen |= set(task.forget)
  with pytest.raises(ValueError, match="no class to retain"):
    continual.tasks(order, first_retained=8, per_task=2, num_tasks=5)


@pytest.mark.parametrize("regime", continual.REGIMES)
def test_subsets_per_regime(regime):
  y = np.repeat(np.arange(4), 30)
  idx = continual.subset(y, [0, 1, 2], regime=regime, ratio=0.1, shots=4,
                         missing=(1,), seed=0)
  counts = np.bincount(y[idx], minlength=4)
  want = {"ratio": [3, 3, 3, 0], "few_shot": [4, 4, 4, 0],
          "missing": [3, 0, 3, 0]}[regime]
  assert counts.tolist() == want
  with pytest.raises(ValueError, match="unknown regime"):
    continual.subset(y, [0], regime="half")


def test_task_subsets_draw_each_task_with_its_own_seed():
  y = np.repeat(np.arange(6), 20)
  ts = continual.tasks(range(6), first_retained=4, per_task=1, num_tasks=2)
  got = continual.task_subsets(y, ts, regime="ratio", ratio=0.2, seed=3)
  for t, (retain, forget) in enumerate(got):
    kw = dict(regime="ratio", ratio=0.2, seed=3000 + 17 * t)
    np.testing.assert_array_equal(retain,
                                  continual.subset(y, ts[t].retain, **kw))
    np.testing.assert_array_equal(forget,
                                  continual.subset(y, ts[t].forget, **kw))
  assert not np.array_equal(got[0][0][:4], got[1][0][:4])   # fresh draws


def test_stratified_indices_hold_out_each_classs_share():
  from immunojax.data import stratified_indices
  y = np.repeat([0, 1, 2], [10, 7, 5])
  rng = np.random.default_rng(0)
  tr, te = stratified_indices(y, (2, 0), test_fraction=0.3, rng=rng)
  assert np.bincount(y[te], minlength=3).tolist() == [3, 0, 2]   # round(.3 n)
  assert np.bincount(y[tr], minlength=3).tolist() == [7, 0, 3]
  assert set(tr).isdisjoint(te) and y[te][0] == 2    # classes in given order
  again = stratified_indices(y, (2, 0), test_fraction=0.3,
                             rng=np.random.default_rng(0))
  np.testing.assert_array_equal(again[0], tr)
  with pytest.raises(ValueError, match="test_fraction"):
    stratified_indices(y, (0,), test_fraction=1.0, rng=rng)


def test_groups_are_blocks_and_zeroed_rule():
  _, params = tiny_vit()
  adapters = lora.init(params, lora.LoraConfig(r=2, target_modules=FFN),
                       key=jax.random.PRNGKey(0))
  gr = gs.groups(adapters)
  assert [sorted(g) for g in gr] == [
      [f"blocks/{i}/fc1/kernel", f"blocks/{i}/fc2/kernel"] for i in range(2)]
  assert gs.group_norms(adapters).shape == (2,)
  np.testing.assert_array_equal(gs.zeroed(jnp.array([1.0, 5e-4, 0.0])),
                                [False, True, True])
  with pytest.raises(ValueError, match="does not match"):
    gs.groups(adapters, r"layers/(\d+)/")


def test_lora_init_a_sets_the_kaiming_bound():
  _, params = tiny_vit()
  for a, bound in ((None, 1 / math.sqrt(8)),
                   (math.sqrt(50), math.sqrt(6 / 51) / math.sqrt(8))):
    ad = lora.init(params, lora.LoraConfig(r=2, target_modules=FFN,
                                           init_a=a),
                   key=jax.random.PRNGKey(0))
    big = ad["blocks/0/fc1/kernel"]["a"]
    assert float(jnp.abs(big).max()) <= bound
    assert float(jnp.abs(big).max()) > 0.8 * bound


def toy():
  """A two-block model with FFN-named kernels: ``x -> relu(x W1) W2`` per
  block, CosFace head; cheap to compile."""
  k = jax.random.split(jax.random.PRNGKey(0), 5)
  params = {"blocks": {str(i): {"fc1": {"kernel": 0.3 * jax.random.normal(
      k[2 * i], (64, 16))}, "fc2": {"kernel": 0.3 * jax.random.normal(
          k[2 * i + 1], (16, 64))}} for i in range(2)},
      "head": jax.random.normal(k[4], (4, 64))}

  def fwd(p, x, y, key):
    del key
    for i in range(2):
      b = p["blocks"][str(i)]
      x = x + jax.nn.relu(x @ b["fc1"]["kernel"]) @ b["fc2"]["kernel"]
    return models.cosface_logits(x, p["head"], y), x
  return fwd, params


def _batch(seed=0, n=6):
  k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
  xr = jax.random.uniform(k1, (n, 64))
  xf = jax.random.uniform(k2, (n, 64))
  return {"retain": (xr, jnp.arange(n) % 2, jnp.ones(n)),
          "forget": (xf, 2 + jnp.arange(n) % 2, jnp.ones(n))}


def test_gs_lora_pp_trains_only_ffn_adapters_and_merges():
  plus = True
  fwd, params = tiny_vit()
  cfg = lora.LoraConfig(r=2, lora_alpha=1.0, target_modules=FFN)
  protos = jnp.ones((4, 8)) if plus else None
  imm = gs.gs_lora(fwd, lora_config=cfg, optimizer=optax.adamw(1e-2),
                   alpha=0.1, prototypes=protos, prototype_weight=0.5,
                   prototype_bound=1.0)
  state = imm.init(params, jax.random.PRNGKey(0))
  same = jax.tree_util.tree_map(jnp.array_equal, imm.params(state), params)
  assert all(jax.tree_util.tree_leaves(same))     # B = 0: the identity
  for t in range(3):
    state, metrics = jax.jit(imm.update)(state, _batch(t),
                                         jax.random.PRNGKey(t))
  assert ("prototype_push" in metrics) == plus
  merged = imm.params(state)
  flat = jax.tree_util.tree_flatten_with_path(merged)[0]
  base = jax.tree_util.tree_leaves(params)
  for (path, new), old in zip(flat, base):
    name = "/".join(str(getattr(k, "key", getattr(k, "idx", k)))
                    for k in path)
    moved = not np.array_equal(new, old)
    assert moved == bool(__import__("re").search(FFN[0], name)), name
  # merge = W + (1/r) A B with the scale kept
  a = state.adapters["blocks/1/fc2/kernel"]
  np.testing.assert_allclose(merged["blocks"][1]["fc2"]["kernel"],
                             params["blocks"][1]["fc2"]["kernel"]
                             + 0.5 * a["a"] @ a["b"], rtol=1e-6, atol=1e-7)


def test_structure_warmup_and_gradient():
  fwd, params = toy()
  cfg = lora.LoraConfig(r=2, lora_alpha=1.0, target_modules=FFN)
  batch = _batch()

  @jax.jit   # coefficients traced: one compilation for every variant
  def update_with(alpha, warm):
    imm = gs.gs_lora(fwd, lora_config=cfg, optimizer=optax.sgd(1.0),
                     alpha=alpha, alpha_warmup_steps=warm, beta=0.0)
    s = imm.init(params, jax.random.PRNGKey(0))
    return imm.update(s, batch, jax.random.PRNGKey(1))[0].adapters
  base = update_with(0.0, 0)
  warm = update_with(3.0, 1)       # step 0 is inside the warm-up
  on = update_with(3.0, 0)
  leaves = jax.tree_util.tree_leaves
  assert all(np.array_equal(a, b) for a, b in zip(leaves(base), leaves(warm)))
  # SGD step 1: the structure term adds -alpha * A / ||group|| to A (B = 0).
  ad = lora.init(params, cfg, key=jax.random.PRNGKey(0))
  norm = math.sqrt(sum(float(jnp.sum(x ** 2)) for x in
                       leaves(gs.groups(ad)[0])))
  want = base["blocks/0/fc1/kernel"]["a"] - 3.0 * ad["blocks/0/fc1/kernel"][
      "a"] / norm
  np.testing.assert_allclose(on["blocks/0/fc1/kernel"]["a"], want, rtol=1e-4,
                             atol=1e-6)


def test_finetune_forget_anchor_freezing_and_fisher():
  fwd, params = toy()
  trainable = jax.tree_util.tree_map_with_path(
      lambda p, _: getattr(p[0], "key", None) != "head", params)
  imm = gs.finetune_forget(fwd, optimizer=optax.adamw(1e-2),
                           trainable=trainable, beta=0.2, anchor_weight=0.1)
  state = imm.init(params, jax.random.PRNGKey(0))
  update = jax.jit(imm.update)
  for t in range(2):
    state, m = update(state, _batch(t), jax.random.PRNGKey(t))
  assert np.array_equal(state.params["head"], params["head"])
  assert float(m["anchor"]) > 0
  # EWC importance: mean of squared per-example gradients.
  x, y = _batch()["retain"][:2]
  w = jnp.array([1.0, 1, 1, 0, 1, 1])
  fisher = jax.jit(lambda p: gs.diagonal_fisher(fwd, p, x, y, w))(params)
  g = jax.jit(lambda p, xi, yi: jax.grad(lambda q: losses.cross_entropy(
      fwd(q, xi, yi, None)[0], yi))(p))
  want = jax.tree_util.tree_map(
      lambda *gs_: sum(v ** 2 for v in gs_) / 5,
      *[g(params, x[i:i + 1], y[i:i + 1]) for i in (0, 1, 2, 4, 5)])
  for a, b in zip(jax.tree_util.tree_leaves(fisher),
                  jax.tree_util.tree_leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-10)


def test_class_prototypes_are_weighted_class_means():
  x = jnp.arange(12.0).reshape(6, 2)
  y = jnp.array([0, 0, 1, 1, 1, 2])
  w = jnp.array([1.0, 1, 1, 1, 0, 1])
  p = gs.class_prototypes(lambda v: v, x, y, w, 4)
  np.testing.assert_allclose(p, [[1, 2], [5, 6], [10, 11], [0, 0]])


def test_padded_batch_positions_cover_each_valid_entry_once_per_epoch():
  from immunojax import data
  key = jax.random.PRNGKey(0)
  fn = jax.jit(lambda t, n: data.padded_batch_positions(
      key, n, 12, 4, t, (n + 3) // 4))
  for n in (12, 9, 3):                     # traced: one compilation
    per_epoch = (n + 3) // 4
    for epoch in range(2):
      pos, w = zip(*[fn(epoch * per_epoch + t, n) for t in range(per_epoch)])
      pos, w = np.concatenate(pos), np.concatenate(w)
      assert w.sum() == n                       # the ragged tail weighs 0
      assert sorted(pos[w > 0].tolist()) == list(range(n))
