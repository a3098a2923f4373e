"""A jitted, differentiable fine-tuning loop: ``lax.scan`` over optax steps.

The same loop serves the attacker (evaluate a protected model) and the
defender (differentiate through a simulated attack: SOPHON, IMMA, ...).
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from immunojax import _checks, masks
from immunojax.parallel.collectives import pmean

PyTree = Any


class FinetuneResult(NamedTuple):
  """Final parameters and optimizer state, per-step metrics (leading ``K``)
  and, with an ``eval_fn``, its values at steps ``0, N, 2N, ..., K``
  (leading ``K / N + 1``; None without one)."""
  params: PyTree
  opt_state: PyTree
  metrics: dict
  evals: PyTree = None


def num_steps(batches) -> int:
  """The leading (step) axis shared by every array of ``batches``."""
  leaves = jax.tree_util.tree_leaves(batches)
  if not leaves:
    raise ValueError("batches is empty: pass a pytree of arrays stacked along "
                     "a leading step axis")
  sizes = {jnp.shape(x)[0] if jnp.ndim(x) else None for x in leaves}
  if None in sizes or len(sizes) != 1:
    raise ValueError("every batch array needs the same leading step axis, got "
                     f"leading sizes {sorted(map(str, sizes))}")
  k = sizes.pop()
  if k == 0:
    raise ValueError("batches has zero steps (leading axis of length 0)")
  return k


def finetune(params: PyTree, loss_fn: Callable[[PyTree, Any], jax.Array],
             optimizer: optax.GradientTransformation, batches: PyTree, *,
             trainable=None, first_order: bool = False, remat: bool = False,
             opt_state: PyTree | None = None,
             eval_fn: Callable[[PyTree], PyTree] | None = None,
             eval_every: int | None = None,
             axis_name: str | None = None,
             check_finite: bool = True) -> FinetuneResult:
  """Runs ``K`` optimizer steps, one per batch, inside one ``lax.scan``.

  Args:
    params: starting parameters (any pytree).
    loss_fn: ``loss_fn(params, batch) -> scalar`` or ``(scalar, aux_dict)``.
    optimizer: any optax transformation (use ``optax.inject_hyperparams``
      to make the learning rate a traced, differentiable value).
    batches: pytree whose leaves are stacked along a leading axis of ``K``
      steps; step ``t`` gets ``tree_map(lambda b: b[t], batches)``.
    trainable: None (everything moves), a bool pytree mask, or regex
      pattern(s) over ``a/b/c`` parameter paths.
    first_order: stop gradients through the inner gradients (first-order
      MAML): the result still depends on ``params`` through the update path,
      but not through second derivatives.
    remat: ``False``; ``True`` or ``"step"``: ``jax.checkpoint`` on the scan
      body (no activations kept, but each step's input carry, i.e. params
      and optimizer state, still is: memory grows with ``K``);
      ``"nested"``: checkpointed chunks of ``~sqrt(K)`` steps (of
      ``eval_every`` steps when evaluating), about ``2 sqrt(K)`` saved
      carries for one extra forward pass.
    opt_state: continue from this optimizer state instead of ``init``.
    eval_fn: ``eval_fn(params) -> pytree`` (e.g. held-out accuracy), run
      inside the scan before the first step and after every ``eval_every``
      steps; the values are ``FinetuneResult.evals``.
    eval_every: steps between evaluations; must divide ``K``. Required with
      ``eval_fn``.
    axis_name: average gradients (and the logged loss) over this named axis
      (``lax.pmean``), e.g. the batch-sharding axis of a ``shard_map`` with
      ``check_vma=False`` (with it on, gradients of replicated parameters
      arrive summed already) or a ``vmap(..., axis_name=...)``; None: no
      collective.
    check_finite: when called eagerly, raise if any step's loss is NaN/Inf.

  Returns:
    :class:`FinetuneResult` with metrics ``{"loss": (K,), **aux}``.

  Differentiable in ``params`` (and any traced hyper-parameter), second order
  through the optimizer state unless ``first_order``.
  """
  k = num_steps(batches)
  if remat not in (False, True, "step", "nested"):
    raise ValueError(f"unknown remat {remat!r}; expected False, True, 'step' "
                     "or 'nested'")
  if (eval_fn is None) != (eval_every is None):
    raise ValueError("eval_fn and eval_every go together: pass both or neither")
  if eval_every is not None:
    eval_every = _checks.check_positive_int(eval_every, "eval_every")
    if k % eval_every:
      raise ValueError(f"eval_every={eval_every} does not divide the {k} "
                       "fine-tuning steps")
  mask = masks.resolve(trainable, params)
  opt = masks.only(optimizer, mask)
  state0 = opt.init(params) if opt_state is None else opt_state

  def step(carry, batch):
    p, s = carry
    out, g = jax.value_and_grad(loss_fn, has_aux=_has_aux(loss_fn, p, batch))(
        p, batch)
    loss, aux = out if isinstance(out, tuple) else (out, {})
    g, loss, aux = pmean((g, loss, aux), axis_name)
    if first_order:
      g = jax.lax.stop_gradient(g)
    updates, s = opt.update(g, s, p)
    return (optax.apply_updates(p, updates), s), {"loss": loss, **aux}

  if remat:
    step = jax.checkpoint(step)
  evals = None
  if eval_fn is not None:
    (p, s), metrics, evals = _evaluating_scan(step, (params, state0), batches,
                                              k, eval_every, eval_fn,
                                              remat == "nested")
  elif remat == "nested":
    (p, s), metrics = _nested_scan(step, (params, state0), batches, k)
  else:
    (p, s), metrics = jax.lax.scan(step, (params, state0), batches)
  if check_finite and _checks.is_concrete(metrics["loss"]):
    losses = np.asarray(metrics["loss"])
    bad = np.flatnonzero(~np.isfinite(losses))
    if bad.size:
      raise FloatingPointError(
          f"fine-tuning loss became non-finite at step {int(bad[0])} "
          f"(value {losses[bad[0]]}); lower the learning rate or check the "
          "data")
    if not all(np.all(np.isfinite(np.asarray(x))) for x in
               jax.tree_util.tree_leaves(p) if jnp.issubdtype(
                   jnp.result_type(x), jnp.inexact)):
      raise FloatingPointError(
          f"fine-tuning parameters became non-finite in the last step ({k}); "
          "lower the learning rate")
  return FinetuneResult(p, s, metrics, evals)


def _chunked(xs, num_chunks: int, size: int):
  return jax.tree_util.tree_map(
      lambda a: a[:num_chunks * size].reshape((num_chunks, size) + a.shape[1:]),
      xs)


def _unchunked(tree):
  return jax.tree_util.tree_map(lambda a: a.reshape((-1,) + a.shape[2:]), tree)


def _evaluating_scan(step, carry, xs, length: int, every: int, eval_fn,
                     checkpoint_chunks: bool):
  """An outer scan over chunks of ``every`` steps, evaluating after each."""
  def chunk(carry, x):
    carry, m = jax.lax.scan(step, carry, x)
    return carry, (m, eval_fn(carry[0]))

  if checkpoint_chunks:
    chunk = jax.checkpoint(chunk)
  first = eval_fn(carry[0])
  carry, (m, evals) = jax.lax.scan(chunk, carry,
                                   _chunked(xs, length // every, every))
  evals = jax.tree_util.tree_map(
      lambda a, b: jnp.concatenate([a[None], b]), first, evals)
  return carry, _unchunked(m), evals


def _nested_scan(step, carry, xs, length: int):
  """``lax.scan`` as an outer scan over checkpointed chunks of ~sqrt(K) steps.

  Reverse mode saves one carry per chunk plus the carries of the one chunk
  being differentiated: about ``2 sqrt(K)`` carries instead of ``K``, for one
  extra forward pass. (Scan-based checkpoints are honoured by XLA; an
  unrolled tree of ``jax.checkpoint`` calls is not.)
  """
  chunk = max(1, math.isqrt(length - 1) + 1)
  full = length // chunk
  body = jax.checkpoint(lambda c, x: jax.lax.scan(step, c, x))
  carry, m = jax.lax.scan(body, carry, _chunked(xs, full, chunk))
  m = _unchunked(m)
  if full * chunk < length:
    tail = jax.tree_util.tree_map(lambda a: a[full * chunk:], xs)
    carry, mt = jax.lax.scan(step, carry, tail)
    m = jax.tree_util.tree_map(lambda a, b: jnp.concatenate([a, b]), m, mt)
  return carry, m


def _has_aux(loss_fn, params, batch) -> bool:
  """Whether ``loss_fn`` returns ``(loss, aux)``; checks the loss is scalar."""
  out = jax.eval_shape(loss_fn, params, batch)
  has_aux = isinstance(out, tuple)
  if has_aux and len(out) != 2:
    raise ValueError("loss_fn must return a scalar or (scalar, aux_dict)")
  loss = out[0] if has_aux else out
  if loss.shape != ():
    raise ValueError(f"loss_fn must return a scalar, got shape {loss.shape}")
  return has_aux
