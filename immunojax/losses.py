"""Losses that immunization methods put on a simulated attacker's model.

All take logits (or a denoiser's noise prediction) and return a batch mean.
``cross_entropy`` and ``mse`` are the ordinary training losses; the rest are
what SOPHON's fine-tuning suppression minimises on restricted-domain data
(spec ``sophon.md`` §3):

* ``ice_code``: the released code's "inverse cross-entropy",
  ``CE(1 - z, y) = z_y + logsumexp(-z)``; its gradient vanishes only when the
  true class has by far the lowest logit (the default).
* ``ice_paper``: the paper's ``-log(1 - p_y)``, computed stably as
  ``logsumexp(z) - logsumexp_{j != y}(z_j)``.
* ``kl_uniform``: ``KL(U || p) = -(1/C) sum_j log(C p_j)``; needs no labels.
* ``denial_of_service``: ``mean ||eps_hat||^2`` (per-sample mean over the
  output, as released): drives a denoiser's noise prediction to zero.
* ``negated_cross_entropy`` / ``negated_mse``: the unbounded baselines the
  paper argues against.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy with integer labels."""
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def ice_code(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """``CE(1 - z, y)``, the released SOPHON code's inverse cross-entropy."""
  return cross_entropy(-logits, labels)


def ice_paper(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """``-log(1 - p_y)`` (paper Eq. 11), stable for ``p_y -> 1`` and ``-> 0``."""
  others = jnp.where(jax.nn.one_hot(labels, logits.shape[-1], dtype=bool),
                     -jnp.inf, logits)
  return jnp.mean(jax.nn.logsumexp(logits, axis=-1)
                  - jax.nn.logsumexp(others, axis=-1))


def kl_uniform(logits: jax.Array, labels: jax.Array | None = None
               ) -> jax.Array:
  """``KL(U || softmax(z))`` with ``U = 1/C`` (labels are ignored)."""
  del labels
  c = logits.shape[-1]
  logp = jax.nn.log_softmax(logits, axis=-1)
  return jnp.mean(-jnp.mean(logp, axis=-1) - jnp.log(c))


def negated_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """``-CE``: unbounded below, its gradient never vanishes (a baseline)."""
  return -cross_entropy(logits, labels)


def mse(prediction: jax.Array, target: jax.Array) -> jax.Array:
  """Per-sample mean squared error over all but the batch axis, then the
  batch mean (the released denoiser loss)."""
  err = (prediction - target) ** 2
  return jnp.mean(err.reshape(err.shape[0], -1).mean(axis=1))


def denial_of_service(prediction: jax.Array, target: jax.Array | None = None
                      ) -> jax.Array:
  """``MSE(eps_hat, 0)``: SOPHON's loss for denoisers (target ignored)."""
  del target
  return mse(prediction, jnp.zeros_like(prediction))


def negated_mse(prediction: jax.Array, target: jax.Array) -> jax.Array:
  """``-MSE``: maximise the denoising error (the naive baseline)."""
  return -mse(prediction, target)


RESTRICTED_LOSSES = {"ice_code": ice_code, "ice_paper": ice_paper,
                     "kl_uniform": kl_uniform,
                     "negated_cross_entropy": negated_cross_entropy,
                     "denial_of_service": denial_of_service,
                     "negated_mse": negated_mse}
