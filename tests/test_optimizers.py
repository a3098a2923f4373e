"""Optimizers as values: names, factories, ready transformations, in the
harness and in SOPHON's environments."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from immunojax import attacks, optimizers
from immunojax.methods import sophon as sp

X = jax.random.normal(jax.random.PRNGKey(0), (64, 4))
Y = X @ jnp.asarray([1.0, -2.0, 3.0, 0.5])
TARGET = attacks.Target(
    loss_fn=lambda p, b: jnp.mean((b[0] @ p["w"] - b[1]) ** 2),
    metric_fn=lambda p: -jnp.mean((X @ p["w"] - Y) ** 2),
    train_data=(X, Y))
START = {"p": {"w": jnp.zeros(4)}}


def clipped_adamw(lr):
  return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(lr))


def final(grid):
  return attacks.run_attacks(grid, START, TARGET, eval_every=10).metric["p"][:, -1]


def test_names_of_user_optimizers_are_readable():
  assert optimizers.optimizer(optax.lion).name == "lion"
  assert optimizers.optimizer(clipped_adamw).name == "clipped_adamw"
  user = lambda lr: optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(lr))
  assert optimizers.optimizer(user).name == "chain(clip_by_global_norm, adamw)"
  assert optimizers.optimizer(user, name="mine").name == "mine"
  assert optimizers.optimizer(optax.adam(1e-3)).name == "chain(scale_by_adam, scale)"
  assert optimizers.optimizer("adam").name == "adam"
  with pytest.raises(ValueError, match="unknown optimizer"):
    optimizers.optimizer(3)
  with pytest.raises(ValueError, match="unknown optimizer"):
    optimizers.optimizer("lbfgs")


def test_a_factory_equals_the_same_optimizer_by_name_and_a_ready_one():
  """A factory lr -> transform gives the named optimizer's curve; a ready
  transform at that rate gives it too, with one attack and its own rate."""
  by_name = final(attacks.grid(optimizers=["adam"], learning_rates=(0.05,),
                               steps=(30,), batch_sizes=(16,)))
  factory = final(attacks.grid(optimizers=[lambda lr: optax.adam(lr)],
                               learning_rates=(0.05,), steps=(30,),
                               batch_sizes=(16,)))
  ready_grid = attacks.grid(optimizers=[optax.adam(0.05)],
                            learning_rates=(0.01, 0.05, 0.1), steps=(30,),
                            batch_sizes=(16,))
  assert len(ready_grid) == 1 and ready_grid[0].learning_rate is None
  assert "(own rate)" in ready_grid[0].label
  np.testing.assert_allclose(factory, by_name, rtol=1e-6)
  np.testing.assert_allclose(final(ready_grid), by_name, rtol=1e-6)
  assert ready_grid[0].as_dict()["optimizer"] == "chain(scale_by_adam, scale)"


def test_lion_and_a_user_chain_run_in_one_grid_with_labels():
  grid = attacks.grid(optimizers=[optax.lion, clipped_adamw, "sgd"],
                      learning_rates=(0.01, 0.1), steps=(20,), batch_sizes=(16,))
  curves = attacks.run_attacks(grid, START, TARGET, eval_every=10)
  summary = attacks.summarize(curves)
  labels = [a.label for a in grid]
  assert labels[0].startswith("lion lr=0.01") and labels[2].startswith(
      "clipped_adamw lr=0.01")
  assert summary["p"]["within_budget"]["20"]["attack"] in labels
  assert np.all(np.isfinite(curves.metric["p"]))


def test_a_schedule_that_branches_on_the_rate_runs_with_concrete_rates():
  """optax.warmup_cosine_decay_schedule tests `peak_value == 0.0` in Python:
  a traced rate would raise TracerBoolConversionError inside the harness."""
  def warmup_cosine(lr):
    return optax.adam(optax.warmup_cosine_decay_schedule(0.0, lr, 5, 30))
  opt = optimizers.optimizer(warmup_cosine)
  assert opt.concrete_rate
  grid = attacks.grid(optimizers=[opt], learning_rates=(0.05, 0.2),
                      steps=(30,), batch_sizes=(16,))
  got = final(grid)
  for i, lr in enumerate((0.05, 0.2)):   # each rate equals its own run
    alone = final(attacks.grid(
        optimizers=[lambda _, lr=lr: warmup_cosine(lr)], learning_rates=(1.0,),
        steps=(30,), batch_sizes=(16,)))
    np.testing.assert_allclose(got[i], alone[0], rtol=1e-6)
  assert got[0] != got[1]
  with pytest.raises(ValueError, match="cannot be traced"):
    jax.jit(lambda lr: opt(lr).init({"w": jnp.zeros(2)}))(0.1)


def test_rebinding_a_name_changes_the_curve(monkeypatch):
  """The compiled-attack cache is keyed on the optimizer's code, not its
  name: re-registering "sgd" must not return the old curves."""
  grid = attacks.grid(optimizers=["sgd"], learning_rates=(0.05,), steps=(20,),
                      batch_sizes=(16,))
  before = final(grid)
  monkeypatch.setitem(optimizers.OPTIMIZERS, "sgd",
                      lambda learning_rate: optax.sgd(learning_rate / 10))
  after = final(grid)
  assert not np.allclose(before, after)
  monkeypatch.undo()
  np.testing.assert_allclose(final(grid), before, rtol=1e-7)


def test_two_different_optimizers_with_one_name_are_refused():
  with pytest.raises(ValueError, match="both named 'same'"):
    attacks.grid(optimizers=[optimizers.optimizer(optax.sgd, name="same"),
                             optimizers.optimizer(optax.adam, name="same")],
                 learning_rates=(0.1,))


def test_sophon_simulates_the_attack_it_is_scored_by():
  """An Environment built from a harness Attack carries the same optimizer
  value; SOPHON accepts factories and ready transformations."""
  attack = attacks.grid(optimizers=[optax.lion], learning_rates=(1e-3,),
                        modes=("full",))[0]
  env = sp.Environment.from_attack(attack)
  assert env.optimizer is attack.optimizer and env.learning_rate == 1e-3
  assert env.as_dict()["optimizer"] == "lion"
  apply = lambda p, x: x @ p["w"]
  params = {"w": jax.random.normal(jax.random.PRNGKey(1), (4, 3)) * 0.1}
  xs = jax.random.normal(jax.random.PRNGKey(2), (1, 3, 8, 4))
  ys = jnp.zeros((1, 3, 8), jnp.int32)
  batch = {"restricted": (xs, ys), "original": (xs[0, :1], ys[0, :1])}
  for envs in ([env], [sp.Environment("full", optax.sgd(0.1), None)]):
    imm = sp.sophon(apply=apply, environments=envs, head=("w",))
    state, metrics = jax.jit(imm.update)(imm.init(params, None), batch,
                                         jax.random.PRNGKey(3))
    assert np.isfinite(float(metrics["fts_loss"]))
  with pytest.raises(ValueError, match="learning rate must be > 0"):
    sp.sophon(apply=apply, environments=[sp.Environment("full", optax.lion,
                                                        None)])
