"""SOPHON: the losses, the fine-tuning suppression gradient, NTR, the guard."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from immunojax import losses
from immunojax.methods import sophon as sp


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_restricted_losses_match_their_formulas(seed):
  rng = np.random.default_rng(seed)
  z = jnp.asarray(rng.normal(size=(7, 5)) * 3)
  y = jnp.asarray(rng.integers(0, 5, 7))
  p = np.asarray(jax.nn.softmax(z))
  py = p[np.arange(7), np.asarray(y)]
  np.testing.assert_allclose(losses.ice_paper(z, y), np.mean(-np.log1p(-py)),
                             rtol=1e-10)
  np.testing.assert_allclose(
      losses.ice_code(z, y),
      np.mean(np.asarray(z)[np.arange(7), np.asarray(y)]
              + np.log(np.exp(-np.asarray(z)).sum(1))), rtol=1e-10)
  np.testing.assert_allclose(losses.kl_uniform(z),
                             np.mean(np.sum(0.2 * np.log(0.2 / p), 1)),
                             rtol=1e-10)
  # KLU's gradient is p - 1/C per sample (paper), divided by the batch.
  np.testing.assert_allclose(jax.grad(losses.kl_uniform)(z),
                             (p - 0.2) / 7, rtol=1e-8, atol=1e-12)
  e = jnp.asarray(rng.normal(size=(3, 2, 2)))
  np.testing.assert_allclose(losses.denial_of_service(e),
                             np.mean(np.asarray(e) ** 2), rtol=1e-12)
  # ice_paper is stable where p_y -> 1 (naive log(1 - p) would be -inf).
  big = jnp.array([[60.0, 0.0, 0.0]])
  assert np.isfinite(float(losses.ice_paper(big, jnp.array([0]))))


def _problem(seed=0, k=4, b=10, d=3, c=3):
  rng = np.random.default_rng(seed)
  params = {"body": {"kernel": jnp.asarray(rng.normal(size=(d, 4)))},
            "head": {"kernel": jnp.asarray(rng.normal(size=(4, c)))}}
  apply = lambda p, x: jnp.tanh(x @ p["body"]["kernel"]) @ p["head"]["kernel"]
  xs = jnp.asarray(rng.normal(size=(1, k, b, d)))
  ys = jnp.asarray(rng.integers(0, c, (1, k, b)))
  xo = jnp.asarray(rng.normal(size=(1, b, d)))
  yo = jnp.asarray(rng.integers(0, c, (1, b)))
  return params, apply, {"restricted": (xs, ys), "original": (xo, yo)}


def _reference_fomaml(params, apply, xs, ys, key, lr, num_support):
  """The spec's explicit accumulation (sophon.md §2.4), plain SGD."""
  _, split_key = jax.random.split(key)
  keys = jax.random.split(split_key, xs.shape[0])
  theta, acc, total = params, None, 0.0
  for k in range(xs.shape[0]):
    perm = jax.random.permutation(keys[k], xs.shape[1])
    s, q = perm[:num_support], perm[num_support:]
    g = jax.grad(lambda t: losses.cross_entropy(apply(t, xs[k][s]),
                                                ys[k][s]))(theta)
    theta = jax.tree_util.tree_map(lambda t, g: t - lr * g, theta, g)
    lq, gq = jax.value_and_grad(lambda t: losses.ice_code(
        apply(t, xs[k][q]), ys[k][q]))(theta)
    acc = gq if acc is None else jax.tree_util.tree_map(jnp.add, acc, gq)
    total += lq
  k = xs.shape[0]
  return jax.tree_util.tree_map(lambda a: a / k, acc), total / k


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_first_order_fts_gradient_is_the_spec_accumulation(seed):
  params, apply, batch = _problem(seed)
  xs, ys = (a[0] for a in batch["restricted"])
  key = jax.random.PRNGKey(seed)
  imm = sp.sophon(apply=apply, environments=[sp.Environment("full", "sgd", 0.3)],
                  fts_optimizer=optax.sgd(1.0), ntr_optimizer=optax.sgd(0.0))
  state = imm.init(params, key)
  new, m = jax.jit(imm.update)(state, batch, key)
  # the domain key is the second of split(key, D + 1)
  g_ref, l_ref = _reference_fomaml(params, apply, xs, ys,
                                   jax.random.split(key, 2)[1], 0.3, 9)
  np.testing.assert_allclose(m["fts_loss"], l_ref, rtol=1e-10)
  for a, p, g in zip(jax.tree_util.tree_leaves(new.params),
                     jax.tree_util.tree_leaves(params),
                     jax.tree_util.tree_leaves(g_ref)):
    np.testing.assert_allclose(p - a, g, rtol=1e-8, atol=1e-12)


def test_second_order_fts_matches_finite_differences():
  params, apply, batch = _problem(3, k=3)
  key = jax.random.PRNGKey(0)
  for order in (True, False):
    imm = sp.sophon(apply=apply,
                    environments=[sp.Environment("full", "momentum", 0.2)],
                    first_order=order, fts_optimizer=optax.sgd(1.0),
                    ntr_optimizer=optax.sgd(0.0))
    upd = jax.jit(imm.update)
    new, m = upd(imm.init(params, key), batch, key)
    step = jax.tree_util.tree_map(lambda a, b: a - b, params, new.params)
    # finite difference of the FTS loss along the body kernel's (0, 0) entry
    def fts_at(eps):
      p = {**params, "body": {"kernel": params["body"]["kernel"].at[0, 0]
                              .add(eps)}}
      return float(upd(imm.init(p, key), batch, key)[1]["fts_loss"])
    fd = (fts_at(1e-6) - fts_at(-1e-6)) / 2e-6
    got = float(step["body"]["kernel"][0, 0])
    if order:
      assert abs(got - fd) > 1e-6 * abs(fd)      # FOMAML is an approximation
    else:
      np.testing.assert_allclose(got, fd, rtol=1e-5)


def test_head_modes_and_guard_rollback():
  params, apply, batch = _problem(4)
  key = jax.random.PRNGKey(1)
  only_head = sp.sophon(apply=apply, environments=[
      sp.Environment("head", "sgd", 0.5)], fts_optimizer=optax.sgd(1.0),
      ntr_optimizer=optax.sgd(0.0))
  new, _ = jax.jit(only_head.update)(only_head.init(params, key), batch, key)
  assert not np.allclose(new.params["head"]["kernel"], params["head"]["kernel"])
  reinit = sp.sophon(apply=apply, environments=[
      sp.Environment("reinit_head", "sgd", 0.5)],
      fts_optimizer=optax.sgd(1.0), ntr_optimizer=optax.sgd(0.0))
  new, _ = jax.jit(reinit.update)(reinit.init(params, key), batch, key)
  # the fresh head's meta-gradient reaches the real head
  assert not np.allclose(new.params["head"]["kernel"], params["head"]["kernel"])
  xo, yo = (a[0] for a in batch["original"])
  guard = sp.accuracy_guard(apply, xo, yo, 1.01)       # unreachable: roll back
  guarded = sp.sophon(apply=apply, environments=[
      sp.Environment("full", "sgd", 0.5)], guard=guard)
  state = guarded.init(params, key)
  new, m = jax.jit(guarded.update)(state, batch, key)
  assert int(m["rolled_back"]) == 1
  for a, b in zip(jax.tree_util.tree_leaves(new),
                  jax.tree_util.tree_leaves(state)):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError, match="environment mode"):
    sp.sophon(apply=apply, environments=[sp.Environment("lora", "sgd", 0.1)])
  with pytest.raises(ValueError, match="at least one"):
    sp.sophon(apply=apply, environments=[])


def test_fts_slows_the_attack_it_simulates_and_ntr_keeps_the_task():
  # Two toy domains: after 300 updates, the attacker SOPHON simulated (SGD,
  # full fine-tuning) learns the restricted task more slowly from the
  # protected model than from the unprotected one; NTR trains the original.
  rng = np.random.default_rng(0)
  w_o, w_r = rng.normal(size=(2, 6, 3))
  def domain(w, n):
    x = rng.normal(size=(n, 6))
    return jnp.asarray(x), jnp.asarray(np.argmax(x @ w, 1))
  xo, yo = domain(w_o, 400)
  xr, yr = domain(w_r, 400)
  params = {"body": {"kernel": jnp.asarray(rng.normal(size=(6, 16)) * 0.4)},
            "head": {"kernel": jnp.asarray(rng.normal(size=(16, 3)) * 0.4)}}
  apply = lambda p, x: jnp.tanh(x @ p["body"]["kernel"]) @ p["head"]["kernel"]
  imm = sp.sophon(apply=apply,
                  environments=[sp.Environment("full", "sgd", 0.5)],
                  fts_optimizer=optax.adam(3e-3), ntr_optimizer=optax.adam(3e-3))
  state = imm.init(params, jax.random.PRNGKey(0))
  step = jax.jit(imm.update)
  for t in range(300):
    k = jax.random.PRNGKey(t)
    ir = jax.random.choice(k, 400, (1, 5, 20))
    io = jax.random.choice(jax.random.fold_in(k, 1), 400, (1, 20))
    state, m = step(state, {"restricted": (xr[ir], yr[ir]),
                            "original": (xo[io], yo[io])}, k)
  p = imm.params(state)
  acc = lambda p, x, y: float(jnp.mean(jnp.argmax(apply(p, x), -1) == y))
  assert acc(p, xo, yo) > acc(params, xo, yo) + 0.1     # NTR learns D_S
  from immunojax import attacks
  target = attacks.Target(
      lambda q, b: losses.cross_entropy(apply(q, b[0]), b[1]),
      lambda q: jnp.mean(jnp.argmax(apply(q, xr), -1) == yr), (xr, yr))
  grid = attacks.grid(optimizers=("sgd",), learning_rates=(0.5,),
                      batch_sizes=(20,), steps=(20,))
  curves = attacks.run_attacks(grid, {"original": params, "protected": p},
                               target, eval_every=5)
  # measured 0.70 vs 0.89 after 5 steps, 0.83 vs 0.91 after 10
  assert curves.metric["protected"][0, 1] < curves.metric["original"][0, 1] - 0.1
  assert curves.metric["protected"][0, 2] < curves.metric["original"][0, 2]


# ------------------------------------------------- restricted-domain data
def test_denoising_pairs_draw_timesteps_up_to_t_max():
  from immunojax.data import diffusion
  x0 = np.random.default_rng(0).uniform(size=(50, 64))
  for t_max in (1, 250, 1000):
    inputs, eps = diffusion.denoising_pairs(x0, seed=1, copies=4,
                                            t_max=t_max)
    assert inputs.shape == (200, 80) and eps.shape == (200, 64)
    # the first feature pair is sin / cos(pi t / T): t read back exactly
    t = np.round(np.arccos(np.clip(inputs[:, 72], -1, 1)) / np.pi * 1000)
    assert t.min() >= 1 and t.max() <= t_max
    if t_max == 1000:
      assert t.max() > 250                   # every timestep is drawn
  with pytest.raises(ValueError, match="t_max"):
    diffusion.denoising_pairs(x0, seed=1, t_max=0)


def test_glyph_variants_are_a_family_of_shapes_per_class():
  from immunojax.data import domains
  t = domains.glyph_templates(6, seed=3)
  assert t.shape == (10, 6, 8, 8)
  for c in range(10):
    np.testing.assert_array_equal(t[c, 0], domains._glyph(c))
    assert len({t[c, v].tobytes() for v in range(6)}) >= 3
  # variants=1 draws exactly what the base glyphs always drew (the other
  # experiments' data): the draw sequence written out by hand.
  one = domains.glyphs(seed=5, num_train=40, num_test=10)
  base = np.stack([domains._glyph(c) for c in range(10)])
  rng = np.random.default_rng(5)
  y = rng.integers(0, 10, 40)
  dy, dx = rng.integers(-1, 2, (2, 40))
  img = np.stack([np.roll(np.roll(base[c], a, 0), b, 1)
                  for c, a, b in zip(y, dy, dx)])
  img = img * rng.uniform(0.6, 1.0, (40, 1, 1)) + rng.normal(0, 0.15,
                                                             img.shape)
  np.testing.assert_array_equal(one.y_train, y)
  np.testing.assert_allclose(one.x_train,
                             np.clip(img, 0, 1).reshape(40, 64), rtol=1e-6)
  assert not np.array_equal(domains.glyphs(seed=5, variants=4).x_train,
                            domains.glyphs(seed=5).x_train)
  with pytest.raises(ValueError, match="variants"):
    domains.glyph_templates(0)
