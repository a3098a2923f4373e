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

PyTree = Any


class FinetuneResult(NamedTuple):
  """Final parameters, optimizer state, and per-step metrics (leading K)."""
  params: PyTree
  opt_state: PyTree
  metrics: dict


def masked_optimizer(optimizer: optax.GradientTransformation,
                     mask: PyTree | None) -> optax.GradientTransformation:
  """Applies ``optimizer`` where ``mask`` is True; frozen leaves get a zero
  update and no optimizer state (exact freezing, weight decay included)."""
  if mask is None:
    return optimizer
  labels = jax.tree_util.tree_map(lambda m: "train" if m else "freeze", mask)
  return optax.multi_transform({"train": optimizer,
                                "freeze": optax.set_to_zero()}, labels)


def _num_steps(batches) -> int:
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
      ``"nested"``: checkpointed chunks of ``~sqrt(K)`` steps, about
      ``2 sqrt(K)`` saved carries for one extra forward pass.
    opt_state: continue from this optimizer state instead of ``init``.
    check_finite: when called eagerly, raise if any step's loss is NaN/Inf.

  Returns:
    :class:`FinetuneResult` with metrics ``{"loss": (K,), **aux}``.

  Differentiable in ``params`` (and any traced hyper-parameter), second order
  through the optimizer state unless ``first_order``.
  """
  _num_steps(batches)
  mask = masks.resolve(trainable, params)
  opt = masked_optimizer(optimizer, mask)
  state0 = opt.init(params) if opt_state is None else opt_state

  def step(carry, batch):
    p, s = carry
    out, g = jax.value_and_grad(loss_fn, has_aux=_has_aux(loss_fn, p, batch))(
        p, batch)
    loss, aux = out if isinstance(out, tuple) else (out, {})
    if first_order:
      g = jax.lax.stop_gradient(g)
    updates, s = opt.update(g, s, p)
    return (optax.apply_updates(p, updates), s), {"loss": loss, **aux}

  if remat not in (False, True, "step", "nested"):
    raise ValueError(f"unknown remat {remat!r}; expected False, True, 'step' "
                     "or 'nested'")
  if remat:
    step = jax.checkpoint(step)
  if remat == "nested":
    (p, s), metrics = _nested_scan(step, (params, state0), batches,
                                   _num_steps(batches))
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
  return FinetuneResult(p, s, metrics)


def _nested_scan(step, carry, xs, length: int):
  """``lax.scan`` as an outer scan over checkpointed chunks of ~sqrt(K) steps.

  Reverse mode saves one carry per chunk plus the carries of the one chunk
  being differentiated: about ``2 sqrt(K)`` carries instead of ``K``, for one
  extra forward pass. (Scan-based checkpoints are honoured by XLA; an
  unrolled tree of ``jax.checkpoint`` calls is not.)
  """
  chunk = max(1, math.isqrt(length - 1) + 1)
  full = length // chunk
  head = jax.tree_util.tree_map(
      lambda a: a[:full * chunk].reshape((full, chunk) + a.shape[1:]), xs)
  body = jax.checkpoint(lambda c, x: jax.lax.scan(step, c, x))
  carry, m = jax.lax.scan(body, carry, head)
  m = jax.tree_util.tree_map(lambda a: a.reshape((-1,) + a.shape[2:]), m)
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
