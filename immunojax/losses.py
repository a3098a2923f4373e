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


def weighted_cross_entropy(logits: jax.Array, labels: jax.Array,
                           weights: jax.Array) -> jax.Array:
  """Cross-entropy averaged with per-example ``weights`` (0 for padding, so a
  ragged last batch is the mean over its real examples)."""
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  return jnp.sum(weights * ce) / jnp.maximum(jnp.sum(weights), 1e-12)


def bounded_forget(forget_ce: jax.Array, bound: float) -> jax.Array:
  """GS-LoRA's selective forgetting ``ReLU(BND - CE_forget)``: gradient
  ascent on the forget-set cross-entropy until it exceeds ``bound``."""
  return jax.nn.relu(bound - forget_ce)


FORGET_OBJECTIVES = ("bounded", "bounded_each", "orthogonal", "runner_up",
                     "collapse")


def orthogonal_forget_values(logits: jax.Array, scale=1.0) -> jax.Array:
  """``(batch,)`` mean over classes of ``(z_c / scale)^2``: zero when the
  embedding is orthogonal to every head row. ``logits`` are margin-free; on a
  cosine head ``s cos`` with ``scale = s`` this is the mean squared cosine
  (the geometry of a class the head never learned, not its antipode)."""
  return jnp.mean(jnp.square(logits / scale), axis=-1)


def runner_up_cross_entropy_values(logits: jax.Array,
                                   teacher_logits: jax.Array,
                                   labels: jax.Array) -> jax.Array:
  """``(batch,)`` cross-entropy of ``logits`` against the teacher's
  prediction with each example's own class removed: ``softmax`` of
  ``teacher_logits`` with the label's entry at ``-inf`` (no gradient through
  the teacher). The forgotten images are taught what the original model
  would have said had their class not existed: a model-free stand-in for a
  model that never saw it."""
  own = jax.nn.one_hot(labels, logits.shape[-1], dtype=bool)
  q = jax.nn.softmax(jnp.where(own, -jnp.inf,
                               jax.lax.stop_gradient(teacher_logits)), axis=-1)
  return -jnp.sum(q * jax.nn.log_softmax(logits, axis=-1), axis=-1)


def runner_up_collapse_values(embedding: jax.Array, teacher_logits: jax.Array,
                              labels: jax.Array, prototypes: jax.Array
                              ) -> jax.Array:
  """``(batch,)`` ``1 - cos(emb, p_c)`` with ``c`` the teacher's best class
  other than the label and ``p_c`` its prototype (class-mean feature): each
  forgotten example's features are pulled onto the centre of the retained
  class it most resembles, where no linear head can tell it apart (the
  features of a class a model never saw are mixed with others'; a head
  trained on a few shots cannot separate them)."""
  own = jax.nn.one_hot(labels, teacher_logits.shape[-1], dtype=bool)
  c = jnp.argmax(jnp.where(own, -jnp.inf,
                           jax.lax.stop_gradient(teacher_logits)), axis=-1)
  unit = lambda v: v / jnp.maximum(jnp.linalg.norm(v, axis=-1, keepdims=True),
                                   1e-12)
  target = jax.lax.stop_gradient(unit(prototypes[c]))
  return 1.0 - jnp.sum(unit(embedding) * target, axis=-1)


def prototype_kl(embedding: jax.Array, labels: jax.Array,
                 prototypes: jax.Array, weights: jax.Array | None = None
                 ) -> jax.Array:
  """``KL(softmax(p_y) || softmax(emb))`` over the feature axis, batch mean
  (GS-LoRA++'s prototype distance, ``F.kl_div(log_softmax(emb),
  log_softmax(proto), reduction="batchmean", log_target=True)``).

  Args:
    embedding: ``(batch, dim)`` features of the current model.
    labels: ``(batch,)`` class of each example.
    prototypes: ``(classes, dim)`` class-mean features.
    weights: optional ``(batch,)`` example weights (0 for padding).
  """
  kl = prototype_kl_values(embedding, labels, prototypes)
  if weights is None:
    return jnp.mean(kl)
  return jnp.sum(weights * kl) / jnp.maximum(jnp.sum(weights), 1e-12)


def prototype_kl_values(embedding: jax.Array, labels: jax.Array,
                        prototypes: jax.Array) -> jax.Array:
  """``(batch,)`` per-example ``KL(softmax(p_y) || softmax(emb))``, the
  terms :func:`prototype_kl` averages."""
  lp = jax.nn.log_softmax(prototypes[labels], axis=-1)
  lq = jax.nn.log_softmax(embedding, axis=-1)
  return jnp.sum(jnp.exp(lp) * (lp - lq), axis=-1)


def group_norm(group, eps: float = 1e-12) -> jax.Array:
  """``sqrt(sum ||P||^2 + eps)`` over the leaves of one group: finite
  gradient at an all-zero group (the plain square root's is NaN)."""
  sq = sum(jnp.sum(jnp.square(x)) for x in jax.tree_util.tree_leaves(group))
  return jnp.sqrt(sq + eps)


def group_lasso(groups, eps: float = 1e-12) -> jax.Array:
  """``sum_g sqrt(sum_{P in g} ||P||_F^2)``: the group-lasso (structure)
  penalty over a sequence of pytrees, one per group, no size weighting."""
  return sum(group_norm(g, eps) for g in groups)
