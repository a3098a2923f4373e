"""Attacker modes: which part of a model a fine-tuner moves, and how.

A mode is a value (configure once): ``mode.prepare(params, key)`` returns an
:class:`Adaptation`, i.e. the pytree the optimizer moves, its trainable
mask, and the map back to the model's full parameters. :func:`adapt` runs
:func:`immunojax.finetune.finetune` under a mode. The attack harness uses
these; so do the methods that simulate an attacker (SOPHON's fine-tuning
suppression, IMMA's lower level, GS-LoRA's relearning probe).

* ``full``: every parameter.
* ``head``: only the leaves matching the head pattern(s); the rest frozen.
* ``reinit_head``: every parameter, after re-initialising the head.
* ``probe``: a fresh head (re-initialised) trained alone on frozen
  features: linear probing.
* ``lora``: LoRA adapters on the targeted kernels; the base stays frozen.
* ``masked``: only the leaves a given mask or pattern list marks trainable.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax

from immunojax import _checks, lora as _lora, masks
from immunojax.finetune import FinetuneResult, finetune

PyTree = Any
MODES = ("full", "head", "reinit_head", "probe", "lora", "masked")


class Adaptation(NamedTuple):
  """What an attacker optimizes.

  Attributes:
    trainable: the pytree the optimizer moves (the model's parameters, or
      LoRA adapters).
    mask: bool pytree over ``trainable`` (True: moves), or None for all.
    to_model: ``to_model(trainable) -> params`` the model is called with.
  """
  trainable: PyTree
  mask: PyTree | None
  to_model: Callable[[PyTree], PyTree]


class AttackerMode(NamedTuple):
  """A configured mode: ``prepare(params, key) -> Adaptation``."""
  name: str
  prepare: Callable[[PyTree, jax.Array], Adaptation]


def _identity(p):
  return p


def full() -> AttackerMode:
  """Fine-tune every parameter."""
  return AttackerMode("full", lambda params, key: Adaptation(params, None,
                                                             _identity))


def head(patterns: str | Sequence[str] = ("head",)) -> AttackerMode:
  """Fine-tune only the leaves whose path matches ``patterns`` (a probe)."""
  return masked(patterns, name="head")


def masked(trainable, *, name: str = "masked") -> AttackerMode:
  """Fine-tune the leaves ``trainable`` marks: a bool mask pytree, or regex
  pattern(s) over ``a/b/c`` paths (resolved against the model's params)."""
  def prepare(params, key):
    del key
    return Adaptation(params, masks.resolve(trainable, params), _identity)
  return AttackerMode(name, prepare)


def reinit_head(patterns: str | Sequence[str] = ("head",)) -> AttackerMode:
  """Re-initialise the head (normal / sqrt(fan-in) kernels, zero biases),
  then fine-tune everything."""
  def prepare(params, key):
    mask = masks.mask_from_patterns(params, patterns)
    return Adaptation(reinitialize(params, mask, key), None, _identity)
  return AttackerMode("reinit_head", prepare)


def probe(patterns: str | Sequence[str] = ("head",)) -> AttackerMode:
  """Linear probing: re-initialise the head (as :func:`reinit_head`) and
  train only it; the rest is frozen."""
  def prepare(params, key):
    mask = masks.mask_from_patterns(params, patterns)
    return Adaptation(reinitialize(params, mask, key), mask, _identity)
  return AttackerMode("probe", prepare)


def lora(config: _lora.LoraConfig) -> AttackerMode:
  """Fresh LoRA adapters (B = 0) on the kernels ``config`` targets."""
  def prepare(params, key):
    adapters = _lora.init(params, config, key=key)
    return Adaptation(adapters, None,
                      lambda a: _lora.merge(params, a, config))
  return AttackerMode("lora", prepare)


def from_name(name: str, *, head_patterns: str | Sequence[str] = ("head",),
              lora_config: _lora.LoraConfig | None = None,
              trainable=None) -> AttackerMode:
  """A mode from its name (for grids and command lines).

  Args:
    name: one of :data:`MODES`.
    head_patterns: the head, for ``head``, ``reinit_head`` and ``probe``.
    lora_config: the adapters, for ``lora`` (default ``LoraConfig()``).
    trainable: the mask or patterns, for ``masked``.
  """
  _checks.check_choice(name, MODES, "mode")
  if name == "full":
    return full()
  if name == "head":
    return head(head_patterns)
  if name == "reinit_head":
    return reinit_head(head_patterns)
  if name == "probe":
    return probe(head_patterns)
  if name == "lora":
    return lora(lora_config or _lora.LoraConfig())
  if trainable is None:
    raise ValueError("mode 'masked' needs `trainable` (a mask or patterns)")
  return masked(trainable)


def reinitialize(params: PyTree, mask: PyTree, key: jax.Array) -> PyTree:
  """Leaves where ``mask`` is True drawn afresh: 2-D+ as
  ``normal / sqrt(shape[0])``, others zero; leaf ``i`` uses
  ``fold_in(key, i)``."""
  leaves, tree = jax.tree_util.tree_flatten(params)
  mleaves = jax.tree_util.tree_leaves(mask)
  out = []
  for i, (x, m) in enumerate(zip(leaves, mleaves)):
    if not m:
      out.append(x)
    elif jnp.ndim(x) >= 2:
      out.append(jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype)
                 / jnp.sqrt(x.shape[0]))
    else:
      out.append(jnp.zeros_like(x))
  return jax.tree_util.tree_unflatten(tree, out)


def adapt(mode: AttackerMode, params: PyTree,
          loss_fn: Callable[[PyTree, Any], jax.Array],
          optimizer: optax.GradientTransformation, batches: PyTree, *,
          key: jax.Array, eval_fn: Callable[[PyTree], PyTree] | None = None,
          **finetune_kwargs) -> FinetuneResult:
  """Fine-tunes ``params`` the way ``mode`` does.

  Args:
    mode: an :class:`AttackerMode`.
    params: the model's parameters (the attacker's start point).
    loss_fn: ``loss_fn(model_params, batch)``, on the model's parameters.
    optimizer, batches: as :func:`immunojax.finetune.finetune`.
    key: initialises what the mode creates (adapters, a new head).
    eval_fn: ``eval_fn(model_params)``, evaluated as in ``finetune``.
    **finetune_kwargs: passed on (``eval_every``, ``first_order``,
      ``remat``, ``axis_name``, ``check_finite``).

  Returns:
    ``FinetuneResult`` whose ``params`` are the *model's* parameters after
    the attack (adapters merged); ``opt_state`` is over the trainable pytree.
  """
  a = mode.prepare(params, key)
  loss = lambda p, b: loss_fn(a.to_model(p), b)
  ev = None if eval_fn is None else (lambda p: eval_fn(a.to_model(p)))
  res = finetune(a.trainable, loss, optimizer, batches, trainable=a.mask,
                 eval_fn=ev, **finetune_kwargs)
  return res._replace(params=a.to_model(res.params))
