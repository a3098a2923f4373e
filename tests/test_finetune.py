"""Fine-tuning engine: reference loop, meta-gradients, masks, LoRA, harness."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from immunojax import attacks, lora, models, modes
from immunojax.finetune import finetune
from immunojax.immunizer import descend, supervised


def quad_loss(w, batch):
  x, y = batch
  return 0.5 * jnp.mean((x @ w - y) ** 2)


def data(k=6, b=8, d=3, seed=0):
  kx, ky = jax.random.split(jax.random.PRNGKey(seed))
  return (jax.random.normal(kx, (k, b, d)), jax.random.normal(ky, (k, b)))


@pytest.mark.parametrize("opt", [optax.sgd(0.1), optax.adam(0.05),
                                 optax.sgd(0.1, momentum=0.9)])
def test_finetune_equals_python_loop(opt):
  batches = data()
  w = jnp.ones(3)
  res = finetune(w, quad_loss, opt, batches)
  s = opt.init(w)
  ref, losses = w, []
  for t in range(6):
    b = (batches[0][t], batches[1][t])
    l, g = jax.value_and_grad(quad_loss)(ref, b)
    u, s = opt.update(g, s, ref)
    ref = optax.apply_updates(ref, u)
    losses.append(l)
  np.testing.assert_allclose(res.params, ref, rtol=1e-12)
  np.testing.assert_allclose(res.metrics["loss"], losses, rtol=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_meta_gradient_through_sgd_on_quadratic_is_analytic(seed):
  # L_in(w) = 0.5 w^T A w - b^T w. K SGD steps: w_K = M^K w0 + c, M = I - lr A.
  # Outer f(w_K) = 0.5 ||w_K||^2  =>  df/dw0 = (M^K)^T w_K.
  rng = np.random.default_rng(seed)
  q = rng.normal(size=(4, 4))
  a = jnp.asarray(q @ q.T / 4 + np.eye(4))
  b = jnp.asarray(rng.normal(size=4))
  lr, k = 0.1, 7
  loss = lambda w, _: 0.5 * w @ a @ w - b @ w
  batches = jnp.zeros((k, 1))
  outer = lambda w0: 0.5 * jnp.sum(finetune(w0, loss, optax.sgd(lr),
                                            batches).params ** 2)
  w0 = jnp.asarray(rng.normal(size=4))
  mk = np.linalg.matrix_power(np.eye(4) - lr * np.asarray(a), k)
  wk = finetune(w0, loss, optax.sgd(lr), batches).params
  np.testing.assert_allclose(jax.grad(outer)(w0), mk.T @ np.asarray(wk),
                             rtol=1e-10)
  # First order drops d w_K / d w0 = M^K and keeps the identity path.
  fo = lambda w0: 0.5 * jnp.sum(finetune(w0, loss, optax.sgd(lr), batches,
                                         first_order=True).params ** 2)
  np.testing.assert_allclose(jax.grad(fo)(w0), wk, rtol=1e-10)
  # remat changes memory, not values (nested: 7 = 3 chunks of 3 minus a tail).
  for remat in (True, "step", "nested"):
    rm = lambda w0: 0.5 * jnp.sum(finetune(w0, loss, optax.sgd(lr), batches,
                                           remat=remat).params ** 2)
    np.testing.assert_allclose(jax.grad(rm)(w0), jax.grad(outer)(w0),
                               rtol=1e-12)
  res = finetune(w0, loss, optax.sgd(lr), batches, remat="nested")
  assert res.metrics["loss"].shape == (k,)
  with pytest.raises(ValueError, match="unknown remat"):
    finetune(w0, loss, optax.sgd(lr), batches, remat="sqrt")


def test_second_order_through_adam_state_matches_finite_differences():
  batches = data(k=4)
  outer = lambda w0: jnp.sum(finetune(w0, quad_loss, optax.adam(0.05),
                                      batches).params ** 2)
  from jax.test_util import check_grads
  check_grads(outer, (jnp.array([0.3, -0.2, 0.5]),), order=1, modes=["rev"],
              eps=1e-6, atol=1e-6, rtol=1e-5)


def test_learning_rate_is_differentiable_and_vmappable():
  batches = data()
  def final_loss(lr):
    opt = optax.inject_hyperparams(optax.sgd)(learning_rate=lr)
    return finetune(jnp.ones(3), quad_loss, opt, batches).metrics["loss"][-1]
  lrs = jnp.array([0.01, 0.1, 0.3])
  vals = jax.vmap(final_loss)(lrs)
  np.testing.assert_allclose(vals, [final_loss(l) for l in lrs], rtol=1e-12)
  assert np.isfinite(jax.grad(final_loss)(0.1))


def test_mask_freezing_is_exact_even_with_weight_decay():
  params = {"body": jnp.ones(3), "head": jnp.ones(3)}
  loss = lambda p, b: quad_loss(p["body"] * p["head"], b)
  res = finetune(params, loss, optax.adamw(0.1, weight_decay=0.5), data(),
                 trainable="head")
  np.testing.assert_array_equal(res.params["body"], params["body"])
  assert not np.allclose(res.params["head"], params["head"])
  res2 = finetune(params, loss, optax.adamw(0.1, weight_decay=0.5), data(),
                  trainable={"body": False, "head": True})
  np.testing.assert_array_equal(res2.params["head"], res.params["head"])


@pytest.mark.parametrize("bad,kind,match", [
    ({"trainable": {"body": True}}, ValueError, "structure"),
    ({"trainable": "nosuchlayer"}, ValueError, "matches no parameter"),
])
def test_bad_masks(bad, kind, match):
  params = {"body": jnp.ones(3), "head": jnp.ones(3)}
  loss = lambda p, b: quad_loss(p["body"], b)
  with pytest.raises(kind, match=match):
    finetune(params, loss, optax.sgd(0.1), data(), **bad)


def test_empty_batches_and_nonfinite_loss_fail_clearly():
  with pytest.raises(ValueError, match="zero steps"):
    finetune(jnp.ones(3), quad_loss, optax.sgd(0.1),
             (jnp.zeros((0, 8, 3)), jnp.zeros((0, 8))))
  with pytest.raises(ValueError, match="empty"):
    finetune(jnp.ones(3), quad_loss, optax.sgd(0.1), {})
  with pytest.raises(FloatingPointError, match="non-finite at step"):
    finetune(jnp.ones(3), quad_loss, optax.sgd(1e6), data(k=60))


# ------------------------------------------------------------------ LoRA
def test_lora_merge_equals_dense_product_and_unmerge_inverts():
  params = {"fc": {"kernel": jax.random.normal(jax.random.PRNGKey(0), (6, 5)),
                   "bias": jnp.zeros(5)}}
  cfg = lora.LoraConfig(r=2, lora_alpha=8.0, target_modules=("kernel",))
  ad = lora.init(params, cfg, key=jax.random.PRNGKey(1))
  assert set(ad) == {"fc/kernel"}
  np.testing.assert_array_equal(ad["fc/kernel"]["b"], 0)
  assert np.all(np.abs(ad["fc/kernel"]["a"]) <= 1 / np.sqrt(6))
  ad = {"fc/kernel": {"a": ad["fc/kernel"]["a"],
                      "b": jax.random.normal(jax.random.PRNGKey(2), (2, 5))}}
  merged = lora.merge(params, ad, cfg)
  expected = params["fc"]["kernel"] + 4.0 * ad["fc/kernel"]["a"] @ ad["fc/kernel"]["b"]
  np.testing.assert_allclose(merged["fc"]["kernel"], expected, rtol=1e-12)
  np.testing.assert_allclose(lora.unmerge(merged, ad, cfg)["fc"]["kernel"],
                             params["fc"]["kernel"], rtol=1e-12)


def test_lora_on_nnx_module_trains_only_adapters():
  class Net(nnx.Module):
    def __init__(self, rngs):
      self.fc = nnx.Linear(4, 8, rngs=rngs)
      self.head = nnx.Linear(8, 1, rngs=rngs)
    def __call__(self, x):
      return self.head(jnp.tanh(self.fc(x)))[:, 0]

  apply, params = models.functional(Net(nnx.Rngs(0)))
  def loss(p, batch):
    x, y = batch
    return jnp.mean((apply(p, x) - y) ** 2)
  cfg = lora.LoraConfig(r=2, lora_alpha=2.0, target_modules=("fc/kernel",))
  ad = lora.init(params, cfg, key=jax.random.PRNGKey(0))
  x = jax.random.normal(jax.random.PRNGKey(1), (5, 16, 4))
  y = jnp.sin(x.sum(-1))
  res = finetune(ad, lora.adapted_loss(loss, params, cfg), optax.adam(0.05),
                 (x, y))
  assert res.metrics["loss"][-1] < res.metrics["loss"][0]
  merged = lora.merge(params, res.params, cfg)
  np.testing.assert_array_equal(merged["head"]["kernel"], params["head"]["kernel"])
  assert not np.allclose(merged["fc"]["kernel"], params["fc"]["kernel"])


# --------------------------------------------------------------- harness
def _probe_target():
  kx, kw = jax.random.split(jax.random.PRNGKey(0))
  x = jax.random.normal(kx, (256, 5))
  y = (x @ jax.random.normal(kw, (5,)) > 0).astype(jnp.int32)
  def logits(p, x):
    return jnp.tanh(x @ p["body"]["kernel"]) @ p["head"]["kernel"]
  def loss(p, batch):
    xb, yb = batch
    return optax.softmax_cross_entropy_with_integer_labels(logits(p, xb), yb).mean()
  metric = lambda p: jnp.mean(jnp.argmax(logits(p, x), -1) == y)
  return attacks.Target(loss, metric, (x, y), head=("head",),
                        lora_config=lora.LoraConfig(r=2, lora_alpha=4.0,
                                                    target_modules=("body",)))


def test_grid_runs_vmapped_and_summarizes():
  target = _probe_target()
  k1, k2 = jax.random.split(jax.random.PRNGKey(3))
  good = {"body": {"kernel": jnp.eye(5) * 2.0},
          "head": {"kernel": jax.random.normal(k1, (5, 2)) * 0.1}}
  bad = {"body": {"kernel": jnp.eye(5) * 1e-3},
         "head": {"kernel": jax.random.normal(k2, (5, 2)) * 0.1}}
  # (every mode is tested in test_attacker_modes_move_what_they_say)
  grid = attacks.grid(optimizers=("sgd", "adam"), learning_rates=(0.01, 0.1),
                      batch_sizes=(32,), modes=("full", "lora"),
                      steps=(40,), seeds=(0, 1))
  assert len(grid) == 2 * 2 * 2 * 2
  curves = attacks.run_attacks(grid, {"protected": bad, "scratch": good},
                               target, eval_every=10)
  assert curves.metric["protected"].shape == (len(grid), 5)
  assert np.all(np.isfinite(curves.metric["protected"]))
  s = attacks.summarize(curves, threshold=0.8)
  for start in ("protected", "scratch"):   # the worst case is the curves' max
    m = curves.metric[start]
    assert s[start]["within_budget"]["40"]["metric"] == pytest.approx(
        float(np.nanmax(m)))
    best = grid[int(np.argmax(np.nanmax(m, axis=1)))].label
    assert s[start]["within_budget"]["40"]["attack"] == best
  # Steps to threshold are read off the curves: the first evaluation step
  # at which any attack reaches 0.8, and the overhead is their ratio.
  first = lambda m: min((int(curves.steps["scratch"][np.argmax(r >= 0.8)])
                         for r in m if (r >= 0.8).any()), default=None)
  assert s["scratch"]["steps_to_threshold"] == first(curves.metric["scratch"])
  assert s["protected"]["steps_to_threshold"] == first(curves.metric["protected"])
  if s["protected"]["steps_to_threshold"] is not None:
    assert s["protected"]["finetune_overhead_vs_scratch"] == pytest.approx(
        s["protected"]["steps_to_threshold"] / s["scratch"]["steps_to_threshold"])
  # vmapped group equals a single attack run alone.
  alone = attacks.run_attacks([grid[5]], {"p": bad}, target, eval_every=10)
  np.testing.assert_allclose(alone.metric["p"][0], curves.metric["protected"][5],
                             atol=1e-6)


def test_named_targets_share_compilation_and_array_metrics():
  """Targets differing only in arrays are attacked in one call; a masked
  mode named by the target; an array metric with eval_data."""
  base = _probe_target()
  x, y = base.train_data
  def logits(p, x):
    return jnp.tanh(x @ p["body"]["kernel"]) @ p["head"]["kernel"]
  metric = lambda p, d: jnp.stack([
      jnp.mean(jnp.argmax(logits(p, d[0]), -1) == d[1]),
      jnp.mean(jnp.argmax(logits(p, d[0]), -1) != d[1])])
  halves = {f"h{i}": base._replace(
      metric_fn=metric, train_data=(x[i::2], y[i::2]),
      eval_data=(x[i::2], y[i::2]), masked_modes={"body": ("body",)})
      for i in (0, 1)}
  p = {"body": {"kernel": jnp.eye(5)}, "head": {"kernel": jnp.zeros((5, 2))}}
  grid = attacks.grid(optimizers=("adam",), learning_rates=(0.05,),
                      modes=("body",), steps=(20,), extra_modes=("body",))
  out = attacks.run_attacks(grid, {"p": p}, halves, eval_every=10)
  assert set(out) == {"h0", "h1"}
  m0, m1 = out["h0"].metric["p"], out["h1"].metric["p"]
  assert m0.shape == (1, 3, 2)
  np.testing.assert_allclose(m0.sum(-1), 1.0)
  assert not np.allclose(m0, m1)          # each half trains on its own data
  # the head is frozen in mode "body": with a zero head, logits stay 0, so
  # accuracy is that of always predicting class 0
  np.testing.assert_allclose(m0[0, -1, 0], float(jnp.mean(y[0::2] == 0)))
  # one target alone gives the same curves as in the mapping
  from immunojax.attacks import harness  # noqa: PLC0415
  cached = len(harness._GROUP_FNS)
  alone = attacks.run_attacks(grid, {"p": p}, halves["h1"], eval_every=10)
  np.testing.assert_allclose(alone.metric["p"], m1)
  assert len(harness._GROUP_FNS) == cached   # a later call reuses the group
  with pytest.raises(ValueError, match="scalar metric"):
    attacks.summarize(alone)
  with pytest.raises(ValueError, match="share"):
    attacks.run_attacks(grid, {"p": p}, {"a": halves["h0"], "b": base},
                        eval_every=10)
  with pytest.raises(ValueError, match="unknown mode"):
    attacks.run_attacks(grid, {"p": p}, base, eval_every=10)


def test_every_optimizer_and_bad_names():
  target = _probe_target()
  p = {"body": {"kernel": jnp.eye(5)}, "head": {"kernel": jnp.zeros((5, 2))}}
  grid = attacks.grid(optimizers=tuple(attacks.OPTIMIZERS), learning_rates=(0.05,),
                      steps=(10,))
  curves = attacks.run_attacks(grid, {"p": p}, target, eval_every=5)
  assert np.all(np.isfinite(curves.metric["p"]))
  with pytest.raises(ValueError, match="unknown optimizer"):
    attacks.grid(optimizers=("lbfgs",), learning_rates=(0.1,))
  with pytest.raises(ValueError, match="unknown mode"):
    attacks.grid(optimizers=("sgd",), learning_rates=(0.1,), modes=("half",))
  with pytest.raises(ValueError, match="multiple of"):
    attacks.run_attacks(grid[:1], {"p": p}, target, eval_every=3)


def test_closed_form_attacker_reaches_least_squares_optimum():
  rng = np.random.default_rng(0)
  f = jnp.asarray(rng.normal(size=(40, 6)) * np.array([1, 1, 1, 1, 1e-3, 1e-3]))
  y = jnp.asarray(rng.normal(size=(40, 1)))
  w = attacks.least_squares_probe(f, y)
  np.testing.assert_allclose(f.T @ (f @ w - y), 0, atol=1e-9)   # normal eqs
  curve = attacks.exact_line_search_gd(f, y, 200)
  assert curve.norm_ratio[0] == 1.0
  assert np.all(np.diff(np.asarray(curve.loss)) <= 1e-12)        # monotone
  well = attacks.exact_line_search_gd(f[:, :4], y, 200)
  # Ill-conditioning slows GD (kappa ~ 1e6 vs ~ 3) but not the exact solver.
  assert float(well.norm_ratio[20]) < 1e-8 < float(curve.norm_ratio[20])


def test_functional_mlp_matches_module():
  model = models.MLP((4, 8, 3), rngs=nnx.Rngs(0))
  apply, params = models.functional(model)
  x = jnp.ones((2, 4))
  np.testing.assert_allclose(apply(params, x), model(x), rtol=1e-6)
  assert set(params) == {"layers", "head"}
  g = jax.grad(lambda p: apply(p, x).sum())(params)
  assert g["head"]["kernel"].shape == (8, 3)


# ------------------------------------------------- evaluation, axis_name
def test_eval_inside_the_scan_equals_chunked_runs():
  batches = data(k=12)
  w0 = jnp.ones(3)
  held = (batches[0][0], batches[1][0])
  ev = lambda w: {"held": quad_loss(w, held), "norm": jnp.sum(w ** 2)}
  for remat in (False, "step", "nested"):
    res = finetune(w0, quad_loss, optax.adam(0.05), batches, eval_fn=ev,
                   eval_every=4, remat=remat)
    w, s, expected = w0, None, [ev(w0)]
    for c in range(3):
      chunk = jax.tree_util.tree_map(lambda a: a[4 * c:4 * c + 4], batches)
      r = finetune(w, quad_loss, optax.adam(0.05), chunk, opt_state=s)
      w, s = r.params, r.opt_state
      expected.append(ev(w))
    np.testing.assert_allclose(res.evals["held"],
                               [e["held"] for e in expected], rtol=1e-12)
    np.testing.assert_allclose(res.params, w, rtol=1e-12)
    assert res.metrics["loss"].shape == (12,)
  with pytest.raises(ValueError, match="does not divide"):
    finetune(w0, quad_loss, optax.sgd(0.1), batches, eval_fn=ev, eval_every=5)
  with pytest.raises(ValueError, match="go together"):
    finetune(w0, quad_loss, optax.sgd(0.1), batches, eval_fn=ev)


@pytest.mark.parametrize("seed", [0, 1])
def test_axis_name_averages_gradients_over_shards(seed):
  # 4 shards of a batch under vmap(axis_name) == the whole batch at once.
  x, y = data(k=5, b=16, seed=seed)
  whole = finetune(jnp.ones(3), quad_loss, optax.adam(0.05), (x, y))
  shards = (x.reshape(5, 4, 4, 3).transpose(1, 0, 2, 3),
            y.reshape(5, 4, 4).transpose(1, 0, 2))
  sharded = jax.vmap(lambda b: finetune(jnp.ones(3), quad_loss,
                                        optax.adam(0.05), b, axis_name="d",
                                        check_finite=False),
                     axis_name="d")(shards)
  for i in range(4):
    np.testing.assert_allclose(sharded.params[i], whole.params, rtol=1e-10)
  np.testing.assert_allclose(sharded.metrics["loss"][0], whole.metrics["loss"],
                             rtol=1e-10)


# ----------------------------------------------------------- attacker modes
def _two_layer():
  k1, k2 = jax.random.split(jax.random.PRNGKey(0))
  return {"body": {"kernel": jax.random.normal(k1, (3, 4))},
          "head": {"kernel": jax.random.normal(k2, (4, 1))[:, 0]}}


def _model_loss(p, batch):
  x, y = batch
  return 0.5 * jnp.mean((jnp.tanh(x @ p["body"]["kernel"]) @ p["head"]["kernel"]
                         - y) ** 2)


@pytest.mark.parametrize("name", ["full", "head", "reinit_head", "probe",
                                  "lora", "masked"])
def test_attacker_modes_move_what_they_say(name):
  params = _two_layer()
  mode = modes.from_name(name, head_patterns="^head/", trainable="^body/",
                         lora_config=lora.LoraConfig(
                             r=2, lora_alpha=2.0, target_modules=("body",)))
  res = modes.adapt(mode, params, _model_loss, optax.adam(0.05), data(k=20),
                    key=jax.random.PRNGKey(1), eval_fn=lambda p: _model_loss(
                        p, (data()[0][0], data()[1][0])), eval_every=10)
  moved = {k: not np.allclose(res.params[k]["kernel"], params[k]["kernel"])
           for k in params}
  assert moved == {"full": {"body": True, "head": True},
                   "head": {"body": False, "head": True},
                   "reinit_head": {"body": True, "head": True},
                   "probe": {"body": False, "head": True},
                   "lora": {"body": True, "head": False},
                   "masked": {"body": True, "head": False}}[name]
  assert res.evals.shape == (3,)
  a = mode.prepare(params, jax.random.PRNGKey(1))
  np.testing.assert_allclose(res.evals[0], _model_loss(
      a.to_model(a.trainable), (data()[0][0], data()[1][0])), rtol=1e-12)
  if name in ("reinit_head", "probe"):   # a fresh head: N(0, 1 / fan-in)
    assert not np.allclose(a.trainable["head"]["kernel"],
                           params["head"]["kernel"])
  with pytest.raises(ValueError, match="unknown mode"):
    modes.from_name("half")


# ------------------------------------------------------- the contract
def test_supervised_immunizer_equals_hand_written_optax_steps():
  batches = data(k=8)
  opt = optax.adam(0.05)
  imm = supervised(quad_loss, opt)
  state = imm.init(jnp.ones(3), jax.random.PRNGKey(0))
  step = jax.jit(imm.update)
  w, s = jnp.ones(3), opt.init(jnp.ones(3))
  for t in range(8):
    b = (batches[0][t], batches[1][t])
    state, m = step(state, b, jax.random.PRNGKey(t))
    value, g = jax.value_and_grad(quad_loss)(w, b)
    u, s = opt.update(g, s, w)
    w = optax.apply_updates(w, u)
    np.testing.assert_allclose(m["loss"], value, rtol=1e-12)
  np.testing.assert_allclose(imm.params(state), w, rtol=1e-12)


def test_descend_freezes_and_averages_over_an_axis():
  params = {"body": jnp.ones(3), "head": jnp.ones(3)}
  direction = lambda p, b, k: (jax.tree_util.tree_map(lambda a: a * b, p),
                               {"b": b})
  imm = descend(direction, optax.adamw(0.1, weight_decay=0.5),
                trainable="head")
  state = imm.init(params, None)
  for _ in range(3):
    state, _ = imm.update(state, 2.0, None)
  np.testing.assert_array_equal(imm.params(state)["body"], params["body"])
  assert not np.allclose(imm.params(state)["head"], params["head"])
  avg = descend(direction, optax.sgd(1.0), axis_name="i")
  out, m = jax.vmap(lambda b: avg.update(avg.init(params, None), b, None),
                    axis_name="i")(jnp.array([1.0, 3.0]))
  np.testing.assert_allclose(out.params["head"], [[-1.0] * 3] * 2)  # 1 - 2
  np.testing.assert_allclose(m["b"], [2.0, 2.0])
