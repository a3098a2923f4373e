"""Judging a generative model by its samples: a frozen classifier's
accuracy on them and the similarity of their features to real images.

IMMA/MIMA and SOPHON's generation experiments ask whether an attacked model
generates the removed concept again; a frozen judge (a classifier trained
on real images, never touched by the attacker) scores the samples. All
functions are pure and jit-able.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np


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


def judge_data(prompts: Sequence, labels: Sequence[int],
               heldout: Sequence[np.ndarray], *, samples: int,
               num_timesteps: int, seed: int) -> dict:
  """The ``ev`` of :func:`judge_metric` for ``C`` concepts, drawn once.

  Args:
    prompts: ``C`` token rows (each concept's prompt).
    labels: the judge's class of each concept.
    heldout: ``C`` arrays of real held-out images ``(n_c, D)`` (truncated
      to the smallest ``n_c``).
    samples: samples per concept.
    num_timesteps: the diffusion's timesteps (held-out draws of ``t``).
    seed: numpy seed of the sampling noise and the held-out draws.

  Returns:
    ``{"prompt", "label", "noise" (C, samples, D), "ref", "t", "eps"}``.
  """
  rng = np.random.default_rng(seed)
  h = min(len(x) for x in heldout)
  hx = np.stack([np.asarray(x)[:h] for x in heldout])
  return {"prompt": jnp.asarray(np.stack(prompts)),
          "label": jnp.asarray(labels, jnp.int32),
          "noise": jnp.asarray(rng.normal(size=(len(labels), samples,
                                                hx.shape[-1])), jnp.float32),
          "ref": jnp.asarray(hx, jnp.float32),
          "t": jnp.asarray(rng.integers(0, num_timesteps, hx.shape[:2]),
                           jnp.int32),
          "eps": jnp.asarray(rng.normal(size=hx.shape), jnp.float32)}
