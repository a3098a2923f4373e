"""Judging a generative model by its samples: a frozen classifier's
accuracy on them and the similarity of their features to real images.

IMMA/MIMA and SOPHON's generation experiments ask whether an attacked model
generates the removed concept again; a frozen judge (a classifier trained
on real images, never touched by the attacker) scores the samples. All
functions are pure and jit-able.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


def unit_rows(f: jax.Array) -> jax.Array:
  """Rows of ``f`` scaled to unit norm (zero rows stay ~0)."""
  return f / jnp.maximum(jnp.linalg.norm(f, axis=-1, keepdims=True), 1e-12)


def sample_accuracy(classify: Callable, samples: jax.Array, label
                    ) -> jax.Array:
  """Share of ``samples`` the frozen ``classify`` (logits) assigns
  ``label``."""
  return jnp.mean(jnp.argmax(classify(samples), -1) == label)


def feature_cosine(features: Callable, samples: jax.Array,
                   reference: jax.Array) -> jax.Array:
  """Mean cosine between every sample's and every real reference image's
  ``features`` (the frozen judge's penultimate layer, say)."""
  return jnp.mean(unit_rows(features(samples))
                  @ unit_rows(features(reference)).T)


def judge_metric(*, sample: Callable, classify: Callable,
                 features: Callable, heldout_loss: Callable) -> Callable:
  """``metric(params, ev) -> (C, 3)``: per concept ``c`` the judge's
  accuracy on samples, their feature cosine to held-out real images, and
  the held-out denoising loss.

  Args:
    sample: ``sample(params, prompt, noise) -> images`` (e.g. DDIM).
    classify, features: the frozen judge.
    heldout_loss: ``heldout_loss(params, prompt, ref, t, eps)``: the
      model's training loss on fixed held-out draws.

  ``ev`` holds, with a leading concept axis: ``prompt``, ``label``,
  ``noise`` (sampling noise), ``ref`` (real images), ``t`` and ``eps``
  (the held-out draws). An attack-harness metric (jit argument).
  """
  def one(params, prompt, label, noise, ref, t, eps):
    x = sample(params, prompt, noise)
    return jnp.stack([sample_accuracy(classify, x, label),
                      feature_cosine(features, x, ref),
                      heldout_loss(params, prompt, ref, t, eps)])

  def metric(params, ev):
    return jax.vmap(lambda *a: one(params, *a))(
        ev["prompt"], ev["label"], ev["noise"], ev["ref"], ev["t"], ev["eps"])
  return metric
