"""GS-LoRA and GS-LoRA++ continual forgetting (Zhao et al., CVPR 2024 /
T-PAMI), and the full fine-tuning baselines of their tables.

One task of continual forgetting (spec ``gs_lora.md`` §2): fresh LoRA
adapters on the FFN kernels of every block, trained with

  L = CE(retain) + beta * ReLU(BND - CE(forget)) + alpha * sum_g ||g||
      [+ lambda_f * ReLU(BND_pro - KL(p_y || emb_f)) + lambda_r * KL(p_y || emb_r)]

where a group ``g`` is every adapter of one block (group lasso, safe square
root), the bracket is GS-LoRA++'s prototype term (prototypes: class means of
the embedding at the start of the task), and only the adapters train. The
model read back (``imm.params``) is the merge ``W + (1/r) A B``.

:func:`finetune_forget` is the same data loss on the model's own weights
(head frozen), with an optional anchor ``lambda sum F (theta - theta_0)^2``:
``F = 1`` is the paper's L2 baseline, a diagonal Fisher
(:func:`diagonal_fisher`) its EWC.

Each ``forward(params, x, labels, key) -> (logits, embedding)`` gets the
labels (CosFace applies its margin) and a dropout key (None: no dropout).
Batches are ``{"retain": (x, y, w), "forget": (x, y, w)}`` with per-example
weights ``w`` (0 marks padding, so ragged batches are exact means).
Coefficients may be traced values: a jitted task runner can build the
immunizer inside ``jit`` and reuse one compilation for every task and
variant.

Deviations from the released code, each deliberate: batches are padded to a
fixed size with zero weights instead of being ragged; the structure loss is
``sqrt(sum + 1e-12)`` (JAX's square root has a NaN gradient at 0).
"""

from __future__ import annotations

import re
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from immunojax import _checks, lora as _lora, losses, masks
from immunojax.immunizer import Immunizer
from immunojax.parallel.collectives import pmean, weighted_mean

PyTree = Any
Forward = Callable[[PyTree, jax.Array, jax.Array, Any], tuple]
# One group per top-level module; an item of a layer list (``blocks/3``,
# ``layers/0``) counts as a module. On our ViT this is one group per block.
MODULE_GROUPS = r"^([^/]+(?:/\d+)?)"
BLOCK_GROUPS = r"blocks/(\d+)/"   # explicitly: one group per transformer block


def _natural(key: str):
  """Sort key with numbers compared as numbers (``blocks/2 < blocks/10``)."""
  return [(0, int(t), "") if t.isdigit() else (1, 0, t)
          for t in re.split(r"(\d+)", key) if t]


def groups(adapters: dict, pattern: str = MODULE_GROUPS) -> list[dict]:
  """The adapters split into groups by ``pattern``'s first capture group,
  ordered naturally (numbers as numbers). The default puts each top-level
  module in its own group (a layer list's items count as modules:
  ``conv1``, ``fc``, ``blocks/0``, ``blocks/1``, ...); pass e.g.
  :data:`BLOCK_GROUPS` or your own regex for another split.

  Raises:
    ValueError: an adapter path the pattern does not match.
  """
  out: dict[str, dict] = {}
  for path, ab in adapters.items():
    m = re.search(pattern, path)
    if m is None:
      raise ValueError(f"group pattern {pattern!r} does not match adapter "
                       f"{path!r}")
    out.setdefault(m.group(1), {})[path] = ab
  return [out[k] for k in sorted(out, key=_natural)]


def group_norms(adapters: dict, pattern: str = MODULE_GROUPS) -> jax.Array:
  """``(G,)`` norms ``sqrt(sum ||P||^2)`` of the groups (plain square root:
  a report, not a loss)."""
  return jnp.stack([losses.group_norm(g, eps=0.0)
                    for g in groups(adapters, pattern)])


def zeroed(norms: jax.Array, rtol: float = 1e-3) -> jax.Array:
  """Groups called zero: norm below ``rtol`` times the largest norm (the
  spec's suggested rule; the paper's threshold is not published)."""
  norms = jnp.asarray(norms)
  return norms < rtol * jnp.max(norms)


def class_prototypes(embed: Callable[[jax.Array], jax.Array], x: jax.Array,
                     y: jax.Array, weights: jax.Array, num_classes: int
                     ) -> jax.Array:
  """``(num_classes, dim)`` mean embedding of each class over the examples
  with weight 1 (zeros for a class with none)."""
  emb = embed(x)
  onehot = jax.nn.one_hot(y, num_classes, dtype=emb.dtype) * weights[:, None]
  counts = onehot.sum(0)
  return (onehot.T @ emb) / jnp.maximum(counts, 1.0)[:, None]


def _data_loss(forward: Forward, params, batch, key, beta, bound, axis_name,
               forget="bounded", teacher=None, logit_scale=1.0,
               prototypes=None):
  (xr, yr, wr), (xf, yf, wf) = batch["retain"], batch["forget"]
  kr, kf = jax.random.split(key)
  logits_r, emb_r = forward(params, xr, yr, kr)
  ce = optax.softmax_cross_entropy_with_integer_labels
  # Global weighted means (over every device's rows under axis_name) before
  # the bounded forget's ReLU, which does not split over examples.
  ce_r = weighted_mean(ce(logits_r, yr), wr, axis_name)
  if forget in ("bounded", "bounded_each"):    # the CE with the margin on
    logits_f, emb_f = forward(params, xf, yf, kf)
    ce_each = ce(logits_f, yf)
    ce_f = weighted_mean(ce_each, wf, axis_name)
    if forget == "bounded":   # as released: the bound on the batch mean
      term = losses.bounded_forget(ce_f, bound)
    else:                     # the bound on every example
      term = weighted_mean(losses.bounded_forget(ce_each, bound), wf,
                           axis_name)
  else:                       # margin-free logits
    logits_f, emb_f = forward(params, xf, None, kf)
    ce_f = weighted_mean(ce(logits_f, yf), wf, axis_name)
    if forget == "orthogonal":
      values = losses.orthogonal_forget_values(logits_f, logit_scale)
    elif forget == "runner_up":
      values = losses.runner_up_cross_entropy_values(
          logits_f, forward(teacher, xf, None, None)[0], yf)
    else:
      values = losses.runner_up_collapse_values(
          emb_f, forward(teacher, xf, None, None)[0], yf, prototypes)
    term = weighted_mean(values, wf, axis_name)
  value = ce_r + beta * term
  return value, (emb_r, emb_f, {"retain_ce": ce_r, "forget_ce": ce_f,
                                "forget_term": term})


class GSLoraState(NamedTuple):
  base: PyTree        # the merged weights left by earlier tasks (frozen)
  adapters: dict      # this task's LoRA (A, B) per FFN kernel
  opt_state: PyTree
  step: jax.Array


def gs_lora(forward: Forward, *, lora_config: _lora.LoraConfig,
            optimizer: optax.GradientTransformation, alpha=1e-4,
            alpha_warmup_steps=0, beta=0.2, bound=105.0,
            group_pattern: str = MODULE_GROUPS,
            prototypes: jax.Array | None = None, prototype_weight=0.0,
            prototype_bound=18.0, pull_weight=0.0, forget: str = "bounded",
            logit_scale=1.0, axis_name: str | None = None) -> Immunizer:
  """One task of GS-LoRA (GS-LoRA++ when ``prototypes`` are given).

  Args:
    forward: ``forward(params, x, labels, key) -> (logits, embedding)``.
    lora_config: rank, scale (``lora_alpha / r``; the code's 1/r is
      ``lora_alpha = 1``), the FFN kernels to adapt, the A init.
    optimizer: over the adapters (the code: AdamW, wd 0.05, per-epoch
      cosine).
    alpha: structure (group-lasso) weight; ``alpha_warmup_steps``: 0 before
      this many steps (the code's ``--warmup_alpha``).
    beta, bound: the bounded forget term ``beta * ReLU(bound - CE_f)``.
    group_pattern: regex whose first group names an adapter's group
      (default: one group per top-level module, see :func:`groups`).
    prototypes: ``(classes, dim)`` class means (GS-LoRA++), or None.
    prototype_weight, prototype_bound: ``lambda_f * ReLU(BND_pro -
      KL_f)`` pushes forgotten classes from their prototypes.
    pull_weight: ``lambda_r * KL_r`` pulls retained ones in (0 in every
      released script).
    forget: the forget term, one of :data:`immunojax.losses.FORGET_OBJECTIVES`:
      ``"bounded"`` (released: ``beta * ReLU(bound - CE_f)`` on the batch
      mean, margin on), ``"bounded_each"`` (ours: the mean of
      ``ReLU(bound - CE_i)`` over the forget examples, so one class pushed
      far past the bound cannot carry another that is still recognised),
      ``"orthogonal"`` (``beta *`` mean squared margin-free logit over
      ``logit_scale``: the forgotten embeddings orthogonal to every head
      row), ``"runner_up"`` (``beta *`` CE against the start-of-task
      model's prediction with the true class removed), ``"collapse"``
      (``beta * (1 - cos)`` to the prototype of that runner-up class; needs
      ``prototypes``). The last three are ours too, aimed at "never saw"
      rather than the antipode.
    logit_scale: the cosine head's scale ``s`` (``"orthogonal"`` only).
    axis_name: the batch's rows are spread over this named device axis:
      the cross-entropies and prototype distances are global weighted means
      (before the ReLUs), the gradients are averaged, and the step equals
      the one-device step on the whole batch (dropout masks are drawn per
      device, so with dropout it equals it in distribution only).

  Returns:
    An :class:`Immunizer`; ``init(params, key)`` makes fresh adapters,
    ``params(state)`` merges them.
  """
  _checks.check_choice(forget, losses.FORGET_OBJECTIVES, "forget")
  if forget == "collapse" and prototypes is None:
    raise ValueError('forget="collapse" needs prototypes (the class-mean '
                     "features it pulls forgotten examples onto)")

  def init(params, key):
    adapters = _lora.init(params, lora_config, key=key)
    groups(adapters, group_pattern)   # fail early on a bad pattern
    return GSLoraState(params, adapters, optimizer.init(adapters),
                       jnp.zeros((), jnp.int32))

  def loss(adapters, base, batch, key, step):
    params = _lora.merge(base, adapters, lora_config)
    value, (emb_r, emb_f, metrics) = _data_loss(
        forward, params, batch, key, beta, bound, axis_name, forget, base,
        logit_scale, prototypes)
    structure = losses.group_lasso(groups(adapters, group_pattern))
    a = jnp.where(step < alpha_warmup_steps, 0.0, alpha)
    value = value + a * structure
    metrics["structure"] = structure
    if prototypes is not None:
      (_, yr, wr), (_, yf, wf) = batch["retain"], batch["forget"]
      push = weighted_mean(losses.prototype_kl_values(emb_f, yf, prototypes),
                           wf, axis_name)
      pull = weighted_mean(losses.prototype_kl_values(emb_r, yr, prototypes),
                           wr, axis_name)
      value = value + (prototype_weight * jax.nn.relu(prototype_bound - push)
                       + pull_weight * pull)
      metrics.update(prototype_push=push, prototype_pull=pull)
    metrics["loss"] = value
    return value, metrics

  def update(state, batch, key):
    g, metrics = pmean(jax.grad(loss, has_aux=True)(
        state.adapters, state.base, batch, key, state.step), axis_name)
    u, opt_state = optimizer.update(g, state.opt_state, state.adapters)
    return GSLoraState(state.base, optax.apply_updates(state.adapters, u),
                       opt_state, state.step + 1), metrics

  def params(state):
    return _lora.merge(state.base, state.adapters, lora_config)

  return Immunizer(init, update, params)


class AnchoredState(NamedTuple):
  params: PyTree
  anchor: PyTree      # the weights at the start of the task
  opt_state: PyTree


def finetune_forget(forward: Forward, *,
                    optimizer: optax.GradientTransformation, trainable,
                    beta=0.2, bound=105.0, anchor_weight=0.0,
                    importance: PyTree | None = None,
                    forget: str = "bounded", logit_scale=1.0,
                    axis_name: str | None = None) -> Immunizer:
  """The same data loss on the model's weights: the baselines.

  Adds ``anchor_weight * sum importance * (theta - theta_0)^2`` with
  ``theta_0`` the weights at ``init``: ``importance=None`` (all ones) is the
  L2 baseline, a diagonal Fisher is EWC; ``anchor_weight=0`` is plain
  fine-tuning with the forget loss; ``beta=0`` from fresh weights is
  retraining on the retained data.

  Args:
    trainable: bool mask pytree over the params (the paper's baselines
      freeze the head); frozen leaves get no update and no weight decay.
    forget, logit_scale, axis_name: as :func:`gs_lora` (the teacher of
      ``"runner_up"`` is the anchor, the weights at ``init``).
  """
  _checks.check_choice(forget, losses.FORGET_OBJECTIVES, "forget")
  if forget == "collapse":
    raise ValueError('forget="collapse" is GS-LoRA\'s (it needs the '
                     "prototypes gs_lora takes)")
  opt = masks.only(optimizer, trainable)

  def init(params, key):
    del key
    return AnchoredState(params, params, opt.init(params))

  def loss(params, anchor, batch, key):
    value, (_, _, metrics) = _data_loss(forward, params, batch, key, beta,
                                        bound, axis_name, forget, anchor,
                                        logit_scale)
    sq = jax.tree_util.tree_map(lambda p, a: jnp.square(p - a), params,
                                anchor)
    if importance is not None:
      sq = jax.tree_util.tree_map(jnp.multiply, importance, sq)
    drift = sum(jnp.sum(s) for s in jax.tree_util.tree_leaves(sq))
    metrics["anchor"] = drift
    value = value + anchor_weight * drift
    metrics["loss"] = value
    return value, metrics

  def update(state, batch, key):
    g, metrics = pmean(jax.grad(loss, has_aux=True)(
        state.params, state.anchor, batch, key), axis_name)
    u, opt_state = opt.update(g, state.opt_state, state.params)
    return AnchoredState(optax.apply_updates(state.params, u), state.anchor,
                         opt_state), metrics

  return Immunizer(init, update, lambda state: state.params)


def diagonal_fisher(forward: Forward, params: PyTree, x: jax.Array,
                    y: jax.Array, weights: jax.Array) -> PyTree:
  """EWC's importance: the weighted mean over examples of the squared
  per-example gradient of the cross-entropy (no dropout)."""
  def one(xi, yi):
    return jax.grad(lambda p: losses.cross_entropy(
        forward(p, xi[None], yi[None], None)[0], yi[None]))(params)
  sq = jax.tree_util.tree_map(jnp.square, jax.vmap(one)(x, y))
  total = jnp.maximum(jnp.sum(weights), 1.0)
  return jax.tree_util.tree_map(
      lambda s: jnp.tensordot(weights, s, axes=1) / total, sq)
