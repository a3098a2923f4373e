"""The digits text-to-image world (immunojax.eval.text_to_image): its data
rows, UCE erasure, phi*'s keys, the attacker displacement and the attack
scopes, each against a hand computation or the harness run directly."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from immunojax import attacks
from immunojax.data import prompts
from immunojax.eval import text_to_image as t2i
from immunojax.methods import imma

CONCEPTS = (1, 3, 7)


@pytest.fixture(scope="module")
def world():
  return t2i.DigitTextToImage(patch=4, dim=8, context_dim=8, depth=1,
                              heads=2, timesteps=20, guidance=2.0,
                              sample_steps=2, num_concepts=len(CONCEPTS),
                              seed=0)


def _paths(tree):
  return {jax.tree_util.keystr(p): v for p, v in
          jax.tree_util.tree_leaves_with_path(tree)}


def test_concept_data_truncates_to_a_common_count_and_keeps_the_prior(world):
  d = world.concept_data(CONCEPTS, CONCEPTS)
  counts = [len(world.images(k)) for k in CONCEPTS]
  n = min(counts)
  assert d["x"].shape == (3, n, 64) and d["tokens"].shape[:2] == (3, n)
  for i, k in enumerate(CONCEPTS):
    np.testing.assert_array_equal(d["x"][i], world.images(k)[:n])
    np.testing.assert_array_equal(d["tokens"][i][0], world.prompt(k))
  others = [k for k in range(10) if k not in CONCEPTS]
  assert len(d["prior_x"]) == sum(len(world.images(k)) for k in others)
  # the prior rows carry their own digit's prompt, never a concept's
  concept_rows = {tuple(world.prompt(k)) for k in CONCEPTS}
  assert not {tuple(t) for t in np.asarray(d["prior_tokens"])} & concept_rows
  assert float(d["x"].min()) >= -1.0 and float(d["x"].max()) <= 1.0


def test_attack_rows_tile_copies_and_train_the_placeholder_under_ti(world):
  rows, prompt_rows = world.attack_rows(CONCEPTS, textual_inversion=False,
                                        copies=2, seed=5)
  n = 2 * min(len(world.images(k)) for k in CONCEPTS)
  assert all(len(r["x"]) == n for r in rows)
  # copy 2 repeats copy 1's images with other noise
  m = len(world.images(CONCEPTS[0]))
  np.testing.assert_array_equal(rows[0]["x"][:m], world.images(CONCEPTS[0]))
  np.testing.assert_array_equal(rows[0]["x"][m:min(n, 2 * m)],
                                world.images(CONCEPTS[0])[:min(n, 2 * m) - m])
  assert not np.array_equal(rows[0]["eps"][:10], rows[0]["eps"][m:m + 10])
  assert int(rows[0]["t"].max()) < world.timesteps
  ti, ti_prompts = world.attack_rows(CONCEPTS, textual_inversion=True,
                                     copies=2, seed=5)
  for i in range(3):
    np.testing.assert_array_equal(ti_prompts[i],
                                  prompts.placeholder_prompt(world.vocab, i))
    np.testing.assert_array_equal(prompt_rows[i], world.prompt(CONCEPTS[i]))
    # the same seed draws the same noise whatever the prompt
    np.testing.assert_array_equal(ti[i]["eps"], rows[i]["eps"])


def test_erase_moves_only_attn2_kv_and_sends_concepts_to_the_null_row(world):
  params = world.init
  erased = world.erase(params, CONCEPTS)
  before, after = _paths(params), _paths(erased)
  e = world.concept_rows(CONCEPTS)
  g = prompts.encode(world.encoder, world.null)[2]
  # kept: the seven other digits' <dk> rows and the shared "a", "digit"
  keep = jnp.concatenate([
      world.concept_rows([k for k in range(10) if k not in CONCEPTS]),
      prompts.encode(world.encoder, prompts.class_prompt(world.vocab))[:2]])
  assert keep.shape == (9, world.context_dim)
  changed = 0
  for path, w in before.items():
    if "attn2" in path and ("to_k" in path or "to_v" in path) \
        and "kernel" in path:
      changed += 1
      w1 = after[path]
      np.testing.assert_allclose(w1, imma.uce_kernel(
          w, e, jnp.broadcast_to(g, e.shape), keep), atol=1e-6)
      gap0 = jnp.linalg.norm(e @ w - g @ w)
      assert jnp.linalg.norm(e @ w1 - g @ w) < 0.7 * gap0, path
    else:
      np.testing.assert_array_equal(after[path], w, err_msg=path)
  assert changed == 2          # depth 1: one key and one value kernel


def test_merge_keys_shapes(world):
  keys, reg = world.merge_keys(CONCEPTS, seed=11, captions=5)
  assert keys.shape == (3, 1, world.context_dim)
  np.testing.assert_allclose(keys[:, 0], world.concept_rows(CONCEPTS))
  tokens = world.prompt(0).shape[0]
  assert reg.shape == ((5 + 7) * tokens, world.context_dim)


def test_pretraining_rows_drop_prompts_to_null_at_the_cfg_rate(world):
  (x, tokens), sample = world.pretraining(jax.random.PRNGKey(0), batch=400,
                                          cfg_dropout=0.25)
  assert x.shape == (len(world.split.y_train), 64)
  assert float(x.min()) >= -1.0 and float(x.max()) <= 1.0
  np.testing.assert_array_equal(tokens[5], world.prompt(world.split.y_train[5]))
  b = sample((x, tokens), 3)
  null = np.all(np.asarray(b["tokens"]) == np.asarray(world.null), axis=1)
  assert 0.15 < null.mean() < 0.35                     # ~ cfg_dropout
  kept = np.asarray(b["tokens"])[~null]                # the rest: a digit's
  digits = {tuple(world.prompt(k)) for k in range(10)}
  assert all(tuple(r) in digits for r in kept)
  assert set(b) == {"x", "tokens", "t", "eps"}
  again = sample((x, tokens), 3)                       # a function of t
  np.testing.assert_array_equal(again["eps"], b["eps"])
  assert not np.array_equal(sample((x, tokens), 4)["eps"], b["eps"])


def test_judge_data_defaults_to_each_digits_own_prompt(world):
  own = world.judge_data([2, 5], samples=3, seed=1)
  given = world.judge_data([2, 5], [world.prompt(2), world.prompt(5)],
                           samples=3, seed=1)
  jax.tree_util.tree_map(np.testing.assert_array_equal, own, given)


def test_displacement_of_an_attacker_that_trains_nothing_is_zero(world):
  # the placeholder rows appear in no concept prompt: their gradient is 0
  sim, ev = t2i.attacker_displacement(
      world, world.init, CONCEPTS, lower_optimizer=optax.sgd(1.0),
      lower=("placeholder",), inner_steps=2,
      attack_optimizer=optax.adam(1e-2), attack_steps=3, batch_size=4,
      seed=0)
  assert sim == [0.0, 0.0, 0.0]
  assert all(v > 0 for v in ev)
  sim2, _ = t2i.attacker_displacement(
      world, world.init, CONCEPTS, lower_optimizer=optax.adam(1e-2),
      lower=(r"^unet/",), inner_steps=3, attack_optimizer=optax.adam(1e-2),
      attack_steps=3, batch_size=4, seed=0)
  # the same optimizer, steps and batches on S^l = the whole denoiser as
  # the evaluated attacker on everything (the placeholder has no gradient)
  np.testing.assert_allclose(sim2, ev, rtol=1e-5)


def test_attack_scopes_are_the_harness_runs(world):
  """per_concept[:, i] is the attack on concept i scored on concept i,
  joint the joint attack, collateral the mean over the collateral digits;
  a concept's attack samples only its concept and the collateral digits,
  with the joint attack's draws for those prompts."""
  def metric(params, ev):        # (C, 3) from the prompts' denoising loss
    loss = jax.vmap(lambda p, r, t, e: world.loss(params, {
        "x": r, "tokens": jnp.broadcast_to(p, (r.shape[0], p.shape[0])),
        "t": t, "eps": e}))(ev["prompt"], ev["ref"], ev["t"], ev["eps"])
    return jnp.stack([loss, 2 * loss, 3 * loss], -1)
  starts = {"a": world.init}
  kw = dict(concepts=CONCEPTS, collateral=(0, 2), copies=1, samples=4,
            seed=3)
  out, _ = t2i.attack_concepts(
      world, metric, starts, attack_modes=("kv",), rates={"kv": 1e-2},
      steps=2, eval_every=1, batch_size=4, lora_rank=1,
      merge=lambda stack: stack, **kw)
  targets = t2i.attack_targets(world, metric, textual_inversion=False,
                               lora_rank=1, **kw)
  grid = [attacks.Attack("adam", 1e-2, 4, "kv", 2, seed=3)]
  direct = attacks.run_attacks(grid, starts, targets, eval_every=1)
  got = out["kv"]
  assert got["steps"].tolist() == [0, 1, 2]
  joint_ev = targets["joint"].eval_data
  for i, k in enumerate(CONCEPTS):
    own = targets[str(k)].eval_data
    for name, a in own.items():            # concept i, then the collateral
      np.testing.assert_array_equal(
          a, np.concatenate([joint_ev[name][i:i + 1], joint_ev[name][3:]]))
    m = np.asarray(direct[str(k)].metric["a"][0])          # (3, 3, 3)
    assert m.shape == (3, 3, 3)
    np.testing.assert_allclose(got["scopes"]["per_concept"]["a"][:, i],
                               m[:, 0])
    np.testing.assert_allclose(got["collateral"]["per_concept"]["a"][:, i],
                               m[:, 1:, 0].mean(-1))
  np.testing.assert_allclose(got["scopes"]["joint"]["a"],
                             np.asarray(direct["joint"].metric["a"][0])[:, :3])
  assert got["diverged"] == {"a": False}
