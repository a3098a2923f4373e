"""LoRA on any kernel: conv kernels as (kh*kw*in, out) matrices, no silent
skips, GS-LoRA's default groups on a model without ``blocks``."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from immunojax import attacks, lora, losses, models
from immunojax.methods import gs_lora as gs


class CNN(nnx.Module):
  """A researcher's own model: names outside our conventions."""

  def __init__(self, *, rngs):
    self.conv1 = nnx.Conv(1, 4, (3, 3), rngs=rngs)
    self.conv2 = nnx.Conv(4, 6, (3, 3), rngs=rngs)
    self.fc = nnx.Linear(6 * 8 * 8, 16, rngs=rngs)
    self.classifier = nnx.Linear(16, 10, rngs=rngs)

  def __call__(self, x):
    x = jax.nn.relu(self.conv1(x))
    x = jax.nn.relu(self.conv2(x))
    return self.classifier(jax.nn.relu(self.fc(x.reshape(x.shape[0], -1))))


def cnn():
  apply, params = models.functional(CNN(rngs=nnx.Rngs(0)))
  return apply, jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), params)


def conv(x, kernel):
  return jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def test_conv_lora_is_the_reshaped_dense_lora_and_peft_two_conv_form():
  _, params = cnn()
  cfg = lora.LoraConfig(r=2, lora_alpha=4.0, target_modules=(r"conv\d/kernel",))
  ad = lora.init(params, cfg, key=jax.random.PRNGKey(1))
  assert set(ad) == {"conv1/kernel", "conv2/kernel"}
  assert ad["conv2/kernel"]["a"].shape == (3 * 3 * 4, 2)   # fan-in kh*kw*in
  # B = 0: the identity.
  merged0 = lora.merge(params, ad, cfg)
  np.testing.assert_array_equal(merged0["conv2"]["kernel"],
                                params["conv2"]["kernel"])
  ad = {p: {"a": v["a"], "b": jax.random.normal(jax.random.PRNGKey(2),
                                                 v["b"].shape)}
        for p, v in ad.items()}
  merged = lora.merge(params, ad, cfg)
  w = params["conv2"]["kernel"]
  a, b = ad["conv2/kernel"]["a"], ad["conv2/kernel"]["b"]
  np.testing.assert_allclose(merged["conv2"]["kernel"].reshape(-1, 6),
                             w.reshape(-1, 6) + cfg.scale * a @ b, rtol=1e-12)
  # peft's Conv2d LoRA: an r-channel conv with the layer's kernel, then 1x1.
  x = jax.random.normal(jax.random.PRNGKey(3), (2, 8, 8, 4))
  two_stage = conv(x, w) + cfg.scale * conv(conv(x, a.reshape(3, 3, 4, 2)),
                                             b.reshape(1, 1, 2, 6))
  np.testing.assert_allclose(conv(x, merged["conv2"]["kernel"]), two_stage,
                             rtol=1e-10, atol=1e-12)
  np.testing.assert_allclose(lora.unmerge(merged, ad, cfg)["conv2"]["kernel"],
                             w, atol=1e-12)


def test_patterns_that_match_biases_are_refused_and_the_default_warns():
  _, params = cnn()
  with pytest.raises(ValueError, match="conv1/bias"):
    lora.init(params, lora.LoraConfig(r=2, target_modules=("conv1",)),
              key=jax.random.PRNGKey(0))
  params = {**params, "scale": {"kernel": jnp.ones(3)}}   # a 1-D "kernel"
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    ad = lora.init(params, lora.LoraConfig(r=2), key=jax.random.PRNGKey(0))
  assert any("scale/kernel" in str(w.message) for w in caught)
  assert set(ad) == {"conv1/kernel", "conv2/kernel", "fc/kernel",
                     "classifier/kernel"}


def test_harness_lora_attack_adapts_the_conv_kernels():
  apply, params = cnn()
  x = jax.random.normal(jax.random.PRNGKey(4), (32, 8, 8, 1))
  y = jnp.arange(32) % 10
  target = attacks.Target(
      loss_fn=lambda p, bt: losses.cross_entropy(apply(p, bt[0]), bt[1]),
      metric_fn=lambda p: models.accuracy(apply(p, x), y), train_data=(x, y),
      head=("classifier",),
      lora_config=lora.LoraConfig(r=2, target_modules=(r"conv\d/kernel",)))
  grid = attacks.grid(optimizers=["adam"], learning_rates=(0.05,),
                      modes=("lora",), steps=(20,), batch_sizes=(16,))
  curves = attacks.run_attacks(grid, {"cnn": params}, target, eval_every=10)
  m = curves.metric["cnn"][0]
  assert np.all(np.isfinite(m)) and m[-1] > m[0]


def test_gs_lora_default_groups_are_top_level_modules():
  _, params = cnn()
  cfg = lora.LoraConfig(r=2, lora_alpha=1.0,
                        target_modules=(r"(conv\d|fc)/kernel",))
  ad = lora.init(params, cfg, key=jax.random.PRNGKey(0))
  assert [list(g) for g in gs.groups(ad)] == [["conv1/kernel"],
                                              ["conv2/kernel"], ["fc/kernel"]]
  nested = {f"blocks/{i}/fc1/kernel": {} for i in (10, 2, 0)}
  assert [list(g) for g in gs.groups(nested)] == [
      ["blocks/0/fc1/kernel"], ["blocks/2/fc1/kernel"], ["blocks/10/fc1/kernel"]]
  forward = lambda p, xx, yy, k: (models.functional(CNN(rngs=nnx.Rngs(0)))[0](
      p, xx), jnp.zeros((xx.shape[0], 4)))
  imm = gs.gs_lora(forward, lora_config=cfg, optimizer=optax.adam(1e-2))
  state = imm.init(params, jax.random.PRNGKey(0))
  assert gs.group_norms(state.adapters).shape == (3,)
