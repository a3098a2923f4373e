"""IMMA / MIMA: the Merge layer phi*, UCE erasure, the bilevel schemes and
the toy denoiser (spec imma_mima.md §4.7)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.test_util import check_grads

from immunojax import diffusion, models, modes
from immunojax.data import prompts
from immunojax.methods import imma

KV = imma.KV_KERNELS


def merge_problem(seed, n=3, t=2, d=8, d_out=5, m=40):
  k = jax.random.split(jax.random.PRNGKey(seed), 4)
  return (jax.random.normal(k[0], (d, d_out)),
          jax.random.normal(k[1], (n, d, d_out)),
          jax.random.normal(k[2], (n, t, d)),
          jax.random.normal(k[3], (m, d)))


phi_star = jax.jit(imma.phi_star)


@pytest.mark.parametrize("seed", [0, 1])
def test_phi_star_meets_constraints_and_minimises(seed):
  k0, ks, keys, reg = merge_problem(seed)
  merged = phi_star(k0, ks, keys, reg)
  for n in range(ks.shape[0]):        # each concept's keys -> its values
    np.testing.assert_allclose(keys[n] @ merged, keys[n] @ ks[n], atol=1e-10)
  same = phi_star(k0, jnp.stack([k0] * 3), keys, reg)
  np.testing.assert_allclose(same, k0, atol=1e-12)
  # Among feasible kernels (C dK = C (K_n - K0) rows), phi* has the smallest
  # || C_reg (K - K0) ||: add a random null-space direction of C.
  c = keys.reshape(-1, keys.shape[-1])
  null = np.linalg.svd(np.asarray(c))[2][c.shape[0]:]     # (d - Nt, d)
  obj = lambda kk: float(jnp.sum((reg @ (kk - k0)) ** 2))
  for i in range(5):
    z = jax.random.normal(jax.random.PRNGKey(100 + i), (null.shape[0],
                                                         k0.shape[1]))
    other = merged + 0.1 * null.T @ z
    np.testing.assert_allclose(c @ other, c @ merged, atol=1e-10)
    assert obj(other) > obj(merged)


@pytest.mark.parametrize("seed", [0, 1])
def test_phi_star_gradient_matches_finite_differences(seed):
  k0, ks, keys, reg = merge_problem(seed, d=6, d_out=3, m=20)
  w = jax.random.normal(jax.random.PRNGKey(seed + 9), (6, 3))
  f = jax.jit(lambda a, b: jnp.sum(w * jnp.tanh(imma.phi_star(
      a, b, keys, reg, ridge=0.1))))
  check_grads(f, (k0, ks), order=1, modes=("rev",), eps=1e-4)


def test_merge_rejects_ill_posed_keys():
  _, _, keys, reg = merge_problem(0)
  with pytest.raises(ValueError, match="singular"):
    imma.concept_merge(keys=keys, reg_keys=reg[:3])
  with pytest.raises(ValueError, match="linearly dependent"):
    imma.concept_merge(keys=jnp.stack([keys[0], keys[0]]), reg_keys=reg)
  with pytest.raises(ValueError, match="exceed"):
    imma.concept_merge(keys=jnp.ones((5, 2, 8)), reg_keys=reg)
  with pytest.raises(ValueError, match="NaN"):
    imma.concept_merge(keys=keys.at[0, 0, 0].set(jnp.nan), reg_keys=reg)


def test_concept_merge_on_a_pytree():
  k0, ks, keys, reg = merge_problem(3)
  base = {"attn2": {"to_k": {"kernel": k0}, "to_q": {"kernel": k0}}}
  adapted = {"attn2": {"to_k": {"kernel": ks}, "to_q": {"kernel": ks}}}
  out = imma.concept_merge(keys=keys, reg_keys=reg).apply(base, adapted)
  np.testing.assert_allclose(out["attn2"]["to_k"]["kernel"],
                             imma.phi_star(k0, ks, keys, reg))
  np.testing.assert_allclose(out["attn2"]["to_q"]["kernel"], ks.mean(0))
  avg = imma.average_merge().apply(base, adapted)
  np.testing.assert_allclose(avg["attn2"]["to_k"]["kernel"], ks.mean(0))
  with pytest.raises(ValueError, match="one concept"):
    imma.single().apply(base, adapted)


def test_uce_erases_and_preserves():
  k = jax.random.split(jax.random.PRNGKey(4), 4)
  d = 16
  w0 = jax.random.normal(k[0], (d, 12))
  erase, guide = jax.random.normal(k[1], (2, d)), jax.random.normal(k[2], (2, d))
  keep = jax.random.normal(k[3], (6, d))
  w = imma.uce_kernel(w0, erase, guide, keep, lam=1e-4, erase_scale=1.0,
                      preserve_scale=1.0)
  np.testing.assert_allclose(erase @ w, guide @ w0, atol=1e-3)
  np.testing.assert_allclose(keep @ w, keep @ w0, atol=1e-3)
  # the released weights (lam 0.5) move erase keys most of the way there
  w = imma.uce_kernel(w0, erase, guide, keep)
  before = jnp.linalg.norm(erase @ w0 - guide @ w0)
  assert jnp.linalg.norm(erase @ w - guide @ w0) < 0.3 * before


# ----------------------------------------------------- bilevel schemes
def toy(seed=0):
  """A linear 'denoiser' with named attention-like kernels."""
  k = jax.random.split(jax.random.PRNGKey(seed), 3)
  params = {"attn2": {"to_k": {"kernel": 0.3 * jax.random.normal(k[0], (4, 3))},
                      "to_q": {"kernel": 0.3 * jax.random.normal(k[1], (3, 3))}},
            "other": {"kernel": 0.3 * jax.random.normal(k[2], (3, 3))}}

  def loss(p, b):
    x, c, y = b
    h = jnp.tanh(c @ p["attn2"]["to_k"]["kernel"]) * (
        x @ p["attn2"]["to_q"]["kernel"])
    return jnp.mean((h @ p["other"]["kernel"] - y) ** 2)
  return params, loss


def toy_batch(seed, n, k=1, b=5):
  r = jax.random.split(jax.random.PRNGKey(seed), 6)
  def one(i, lead):
    return (jax.random.normal(r[i], lead + (b, 3)),
            jax.random.normal(r[i + 1], lead + (b, 4)),
            jax.random.normal(r[i + 2], lead + (b, 3)))
  lower, upper = one(0, (n, k)), one(3, (n,))
  prior = jax.tree_util.tree_map(lambda a: a[0], one(1, (1,)))
  return {"lower": lower, "upper": upper, "prior": prior}


def first_update(imm, params, batch):
  state = imm.init(params, jax.random.PRNGKey(0))
  state, metrics = jax.jit(imm.update)(state, batch, jax.random.PRNGKey(1))
  return imm.params(state), metrics


UPPER = (r"attn2/",)


def test_zero_inner_lr_reduces_mima_to_direct_maximisation():
  params, loss = toy()
  _, _, keys, reg = merge_problem(0, n=2, t=1, d=4, m=12)
  batch = toy_batch(1, 2)
  opt = optax.sgd(0.1)
  merged = imma.concept_merge(keys=keys, reg_keys=reg,
                              merged=(r"attn2/to_k/kernel",))
  got, m = first_update(imma.mima(loss, merge=merged, upper=UPPER,
                                  lower=modes.full(), inner_lr=0.0,
                                  optimizer=opt), params, batch)
  want, _ = first_update(imma.max_ascent(loss, upper=UPPER, optimizer=opt),
                         params, batch)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(
      a, b, atol=1e-12), got, want)
  assert not np.allclose(got["attn2"]["to_q"]["kernel"],
                         params["attn2"]["to_q"]["kernel"])
  np.testing.assert_array_equal(got["other"]["kernel"],     # not in S^u
                                params["other"]["kernel"])
  assert set(m) == {"inner_loss", "upper_loss", "prior_loss"}


@pytest.mark.parametrize("first_order", [False, True])
def test_imma_unrolled_is_the_one_step_hypergradient(first_order):
  """One concept, Merge = identity: the update is SGD on the hand-written
  hypergradient of -L(x_u; theta - alpha grad L(x_l; theta)) + L(prior),
  over three seeds (one compilation)."""
  _, loss = toy()
  alpha, eta = 0.3, 0.05
  imm = imma.imma(loss, upper=UPPER, lower=modes.full(), inner_lr=alpha,
                  optimizer=optax.sgd(eta), first_order=first_order)
  update = jax.jit(lambda p, b: imm.params(imm.update(
      imm.init(p, None), b, jax.random.PRNGKey(1))[0]))

  def objective(p, batch):
    low = jax.tree_util.tree_map(lambda a: a[0, 0], batch["lower"])
    up = jax.tree_util.tree_map(lambda a: a[0], batch["upper"])
    g = jax.grad(loss)(p, low)
    if first_order:
      g = jax.lax.stop_gradient(g)
    q = jax.tree_util.tree_map(lambda w, gw: w - alpha * gw, p, g)
    return -loss(q, up) + loss(q, batch["prior"])
  grad = jax.jit(jax.grad(objective))
  for seed in range(3):
    params, batch = toy(seed)[0], toy_batch(seed + 5, 1)
    got, g = update(params, batch), grad(params, batch)
    for path in (("attn2", "to_k"), ("attn2", "to_q")):
      want = (params[path[0]][path[1]]["kernel"]
              - eta * g[path[0]][path[1]]["kernel"])
      np.testing.assert_allclose(got[path[0]][path[1]]["kernel"], want,
                                 rtol=1e-9, atol=1e-12)
    if not first_order and seed == 0:   # stop_gradient: no derivative
      check_grads(jax.jit(lambda p: objective(p, batch)), (params,), order=1,
                  modes=("rev",), eps=1e-5)


@pytest.mark.parametrize("upper_at", ["final", "every_step"])
def test_unrolled_adam_lower_level_is_the_hand_unrolled_hypergradient(
    upper_at):
  """An Adam attacker unrolled for K = 3 steps (second order): the update is
  SGD on the hypergradient of a hand-written Python loop of optax.adam --
  the upper loss read after step K, or averaged over steps 0..K."""
  _, loss = toy()
  alpha, eta, k = 0.05, 0.1, 3
  adam = lambda lr: optax.adam(lr, eps_root=1e-16)
  imm = imma.imma(loss, upper=UPPER, lower=modes.full(), inner_lr=alpha,
                  inner_optimizer=adam, optimizer=optax.sgd(eta),
                  upper_at=upper_at)
  params, batch = toy(4)[0], toy_batch(11, 1, k=k)

  def objective(p):
    opt = adam(alpha)
    q, s, terms = p, opt.init(p), []
    up = jax.tree_util.tree_map(lambda a: a[0], batch["upper"])
    for t in range(k + 1):
      terms.append(-loss(q, up) + loss(q, batch["prior"]))
      if t < k:
        low = jax.tree_util.tree_map(lambda a: a[0, t], batch["lower"])
        u, s = opt.update(jax.grad(loss)(q, low), s, q)
        q = optax.apply_updates(q, u)
    return terms[-1] if upper_at == "final" else sum(terms) / (k + 1)

  got, m = first_update(imm, params, batch)
  g = jax.grad(objective)(params)
  for name in ("to_k", "to_q"):
    np.testing.assert_allclose(
        got["attn2"][name]["kernel"],
        params["attn2"][name]["kernel"] - eta * g["attn2"][name]["kernel"],
        rtol=1e-8, atol=1e-12)
  assert np.isfinite(float(m["upper_loss"]))
  with pytest.raises(ValueError, match="upper_at"):
    imma.imma(loss, upper=UPPER, lower=modes.full(), inner_lr=alpha,
              optimizer=optax.sgd(eta), upper_at="sometimes")
  with pytest.raises(ValueError, match="every_step"):
    imma.imma(loss, upper=UPPER, lower=modes.full(), inner_lr=alpha,
              optimizer=optax.sgd(eta), scheme="alternating",
              upper_at="every_step")


def test_mima_hypergradient_matches_finite_differences():
  params, loss = toy(3)
  _, _, keys, reg = merge_problem(2, n=2, t=1, d=4, m=12)
  batch = toy_batch(9, 2, k=2)
  merged = imma.concept_merge(keys=keys, reg_keys=reg,
                              merged=(r"attn2/to_k/kernel",))
  imm = imma.mima(loss, merge=merged, upper=UPPER, lower=modes.full(),
                  inner_lr=0.2, optimizer=optax.sgd(1.0))
  # sgd(1) from theta: the update is minus the (masked) hypergradient
  got, _ = first_update(imm, params, batch)
  direction = jax.tree_util.tree_map(lambda a, b: a - b, got, params)

  @jax.jit
  def objective(p):
    copies = jax.vmap(lambda b: modes.adapt(
        modes.full(), p, loss, optax.sgd(0.2), b, key=jax.random.PRNGKey(0),
        check_finite=False).params)(batch["lower"])
    q = merged.apply(p, copies)
    return (-jnp.mean(jax.vmap(lambda b: loss(q, b))(batch["upper"]))
            + loss(q, batch["prior"]))
  eps = 1e-6
  rng = np.random.default_rng(0)
  for path in (("attn2", "to_k"), ("attn2", "to_q")):
    v = rng.normal(size=params[path[0]][path[1]]["kernel"].shape)
    def shifted(s):
      p = jax.tree_util.tree_map(lambda a: a, params)
      p[path[0]][path[1]] = {"kernel": p[path[0]][path[1]]["kernel"] + s * v}
      return objective(p)
    fd = (shifted(eps) - shifted(-eps)) / (2 * eps)
    ours = -float(jnp.sum(direction[path[0]][path[1]]["kernel"] * v))
    np.testing.assert_allclose(ours, fd, rtol=1e-6)


@pytest.mark.parametrize("bound", [None, 0.5])
def test_bounded_ascent_and_prior_on_the_released_model(bound):
  """ascent_bound B and prior_at="released": the update is SGD on
  -min(L(x_u; theta'), B) + L(prior; theta), written by hand; below the
  bound the ascent term has no gradient."""
  _, loss = toy()
  alpha, eta = 0.3, 0.05
  imm = imma.imma(loss, upper=UPPER, lower=modes.full(), inner_lr=alpha,
                  optimizer=optax.sgd(eta), ascent_bound=bound,
                  prior_at="released")
  params, batch = toy(2)[0], toy_batch(7, 1)

  def objective(p):
    low = jax.tree_util.tree_map(lambda a: a[0, 0], batch["lower"])
    up = jax.tree_util.tree_map(lambda a: a[0], batch["upper"])
    q = jax.tree_util.tree_map(lambda w, gw: w - alpha * gw, p,
                               jax.grad(loss)(p, low))
    lu = loss(q, up)
    return -(lu if bound is None else jnp.minimum(lu, bound)) + loss(
        p, batch["prior"])
  got, m = first_update(imm, params, batch)
  g = jax.grad(objective)(params)
  assert bound is None or float(m["upper_loss"]) > bound  # clipped
  k = got["attn2"]["to_q"]["kernel"]
  np.testing.assert_allclose(
      k, params["attn2"]["to_q"]["kernel"] - eta * g["attn2"]["to_q"]["kernel"],
      rtol=1e-9, atol=1e-12)
  if bound is not None:          # only the prior moves the parameters
    gp = jax.grad(lambda p: loss(p, batch["prior"]))(params)
    np.testing.assert_allclose(
        k, params["attn2"]["to_q"]["kernel"] - eta * gp["attn2"]["to_q"][
            "kernel"], rtol=1e-9, atol=1e-12)


def test_alternating_persists_the_lower_level_and_releases_only_s_u():
  params, loss = toy(4)
  _, _, keys, reg = merge_problem(5, n=2, t=1, d=4, m=12)
  merged = imma.concept_merge(keys=keys, reg_keys=reg,
                              merged=(r"attn2/to_k/kernel",))
  imm = imma.mima(loss, merge=merged, upper=(r"attn2/to_q",),
                  lower=modes.full(), inner_lr=0.1, optimizer=optax.sgd(0.1),
                  scheme="alternating")
  state = imm.init(params, jax.random.PRNGKey(0))
  batch = toy_batch(2, 2, k=1)
  state, _ = jax.jit(imm.update)(state, batch, jax.random.PRNGKey(1))
  live = state.params
  # the live key kernel is phi*(theta, theta - alpha g_n): it answers each
  # concept's key as that concept's SGD copy does
  g = jax.vmap(jax.grad(loss), in_axes=(None, 0))(
      params, jax.tree_util.tree_map(lambda a: a[:, 0], batch["lower"]))
  kk = params["attn2"]["to_k"]["kernel"]
  for n in range(2):
    np.testing.assert_allclose(
        keys[n] @ live["attn2"]["to_k"]["kernel"],
        keys[n] @ (kk - 0.1 * g["attn2"]["to_k"]["kernel"][n]), atol=1e-10)
  assert not np.allclose(live["other"]["kernel"], params["other"]["kernel"])
  out = imm.params(state)          # released: base + S^u from the live model
  np.testing.assert_array_equal(out["other"]["kernel"], params["other"]["kernel"])
  np.testing.assert_array_equal(out["attn2"]["to_k"]["kernel"], kk)
  np.testing.assert_array_equal(out["attn2"]["to_q"]["kernel"],
                                live["attn2"]["to_q"]["kernel"])


def test_bad_options_are_named():
  params, loss = toy()
  with pytest.raises(ValueError, match="scheme"):
    imma.imma(loss, upper=UPPER, lower=modes.full(), inner_lr=0.1,
              optimizer=optax.sgd(1), scheme="paper")
  with pytest.raises(ValueError, match="adapters"):
    from immunojax import lora
    imma.imma(loss, upper=UPPER, lower=modes.lora(lora.LoraConfig(r=1)),
              inner_lr=0.1, optimizer=optax.sgd(1), scheme="alternating")
  with pytest.raises(ValueError, match="inner_lr"):
    imma.imma(loss, upper=UPPER, lower=modes.full(), inner_lr=-1.0,
              optimizer=optax.sgd(1))
  with pytest.raises(ValueError, match="ascent_bound"):
    imma.imma(loss, upper=UPPER, lower=modes.full(), inner_lr=0.1,
              optimizer=optax.sgd(1), ascent_bound=0.0)
  with pytest.raises(ValueError, match="prior_at"):
    imma.imma(loss, upper=UPPER, lower=modes.full(), inner_lr=0.1,
              optimizer=optax.sgd(1), prior_at="theta")
  with pytest.raises(ValueError, match="unrolled"):
    imma.imma(loss, upper=UPPER, lower=modes.full(), inner_lr=0.1,
              optimizer=optax.sgd(1), scheme="alternating",
              prior_at="released")


# ------------------------------------------------ denoiser and sampler
def test_denoiser_names_and_shapes():
  model = models.ConditionalDenoiser(dim=16, context_dim=8, depth=1, heads=2,
                                     rngs=nnx.Rngs(0))
  apply, params = models.functional(model)
  b0 = params["blocks"][0]
  assert set(b0["attn2"]) == {"to_q", "to_k", "to_v", "to_out"}
  assert b0["attn2"]["to_k"]["kernel"].shape == (8, 16)
  assert "bias" not in b0["attn2"]["to_k"] and "bias" in b0["attn2"]["to_out"]
  apply = jax.jit(apply)
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 64))
  ctx = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 8))
  out = apply(params, x, jnp.array([0, 5, 199]), ctx)
  assert out.shape == (3, 64)
  # the prompt reaches the output only through attn2's keys and values
  other = apply(params, x, jnp.array([0, 5, 199]), ctx + 1.0)
  assert not np.allclose(out, other)


def test_ddim_recovers_the_data_point_with_the_ideal_predictor():
  ab = diffusion.schedule(200)
  x0 = jnp.asarray(np.random.default_rng(0).uniform(-0.9, 0.9, (4, 6)))
  ideal = lambda x, t: (x - jnp.sqrt(ab[t])[:, None] * x0) / jnp.sqrt(
      1.0 - ab[t])[:, None]
  noise = jax.random.normal(jax.random.PRNGKey(0), x0.shape)
  np.testing.assert_allclose(diffusion.ddim_sample(ideal, noise, ab, steps=20),
                             x0, atol=1e-6)
  with pytest.raises(ValueError, match="steps"):
    diffusion.ddim_sample(ideal, noise, ab, steps=0)


def test_prompts_and_placeholder_rows():
  vocab = prompts.digit_vocabulary(8)
  enc = prompts.text_encoder(vocab, dim=4, seed=0)
  p = prompts.placeholder_prompt(vocab, 1)
  assert p[-1] == vocab.size + 1
  rows = prompts.encode(enc, p, placeholders=jnp.ones((2, 4)))
  np.testing.assert_allclose(rows[2], 1.0 + enc.positions[2])
  with pytest.raises(ValueError, match="unknown token"):
    vocab.ids(["<d11>"])


def test_inner_optimizer_by_name_keeps_adams_derivative_finite():
  assert imma.inner_optimizer("sgd") is None            # the paper's SGD
  assert imma.inner_optimizer("rmsprop") == "rmsprop"   # any other name
  p = {"w": jnp.array([1.0, -2.0])}
  g = jnp.array([0.5, 0.0])                             # one gradient is 0
  ours, plain = imma.inner_optimizer("adam")(0.1), optax.adam(0.1)

  def update(opt):
    return lambda v: opt.update({"w": v}, opt.init(p), p)[0]["w"]
  np.testing.assert_allclose(update(ours)(g), update(plain)(g), rtol=1e-6)
  assert np.all(np.isfinite(jax.jacrev(update(ours))(g)))
  assert not np.all(np.isfinite(jax.jacrev(update(plain))(g)))
