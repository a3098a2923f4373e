"""LoRA adapters on dense kernels of any parameter pytree (or NNX module state).

Names follow ``peft``: rank ``r``, ``lora_alpha``, ``target_modules`` (regexes
over ``a/b/kernel`` paths). For a kernel ``W`` of shape ``(in, out)`` (Flax's
``x @ W`` layout) the adapted kernel is ``W + (lora_alpha / r) * A @ B`` with
``A: (in, r)`` Kaiming-uniform (peft's ``a=sqrt(5)``: ``U(±1/sqrt(in))``) and
``B: (r, out)`` zero, so an adapter starts as the identity. ``init_a`` sets
another Kaiming ``a`` (bound ``sqrt(6 / ((1 + a^2) in))``; GS-LoRA's released
code re-initialises later tasks with ``a = sqrt(50)``). :func:`merge` and
:func:`unmerge` both use the ``lora_alpha / r`` scale (forgetting it in one of
them is a known bug elsewhere).

Adapters are a flat ``{path: {"a": A, "b": B}}`` dict, so they are a plain
pytree for optax, masks, checkpoints and ``vmap``.
"""

from __future__ import annotations

from typing import Any, Iterable, NamedTuple

import jax
import jax.numpy as jnp

from immunojax import masks

PyTree = Any


class LoraConfig(NamedTuple):
  r: int = 8
  lora_alpha: float = 16.0
  target_modules: tuple[str, ...] = ("kernel",)
  init_a: float | None = None   # Kaiming a; None: peft's sqrt(5)

  @property
  def scale(self) -> float:
    return self.lora_alpha / self.r


def target_paths(params: PyTree, target_modules: Iterable[str]) -> list[str]:
  """Paths of 2-D leaves matched by ``target_modules``."""
  mask = masks.mask_from_patterns(params, tuple(target_modules))
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  mflat = jax.tree_util.tree_leaves(mask)
  paths = [masks.path_string(p) for (p, leaf), m in zip(flat, mflat)
           if m and jnp.ndim(leaf) == 2]
  if not paths:
    raise ValueError(f"target_modules {tuple(target_modules)} match no 2-D "
                     "kernel")
  return paths


def init(params: PyTree, config: LoraConfig, *, key: jax.Array) -> dict:
  """Fresh adapters for every targeted kernel (B = 0: the identity)."""
  if config.r < 1:
    raise ValueError(f"LoRA rank r must be >= 1, got {config.r}")
  leaves = {masks.path_string(p): x for p, x in
            jax.tree_util.tree_flatten_with_path(params)[0]}
  adapters = {}
  for i, path in enumerate(target_paths(params, config.target_modules)):
    w = leaves[path]
    d_in, d_out = w.shape
    if config.r > min(d_in, d_out):
      raise ValueError(f"LoRA rank {config.r} exceeds min(in, out) of {path} "
                       f"{w.shape}")
    bound = (1.0 / jnp.sqrt(d_in) if config.init_a is None else
             jnp.sqrt(6.0 / ((1.0 + config.init_a ** 2) * d_in)))
    a = jax.random.uniform(jax.random.fold_in(key, i), (d_in, config.r),
                           w.dtype, -bound, bound)
    adapters[path] = {"a": a, "b": jnp.zeros((config.r, d_out), w.dtype)}
  return adapters


def delta(adapters: dict, config: LoraConfig) -> dict:
  """``{path: scale * A @ B}``: the dense update each adapter represents.

  Raises:
    ValueError: an adapter's rank is not ``config.r`` (its ``alpha / r``
      scale would be wrong).
  """
  for p, ab in adapters.items():
    r = jnp.shape(ab["a"])[-1]
    if r != config.r or jnp.shape(ab["b"])[0] != config.r:
      raise ValueError(f"adapter {p!r} has rank {r} but the LoraConfig says "
                       f"r={config.r}: its scale lora_alpha / r would be "
                       "wrong; pass the config the adapters were made with")
  return {p: config.scale * (ab["a"] @ ab["b"]) for p, ab in adapters.items()}


def _add(params, deltas: dict, sign: float):
  missing = set(deltas) - {masks.path_string(p) for p, _ in
                           jax.tree_util.tree_flatten_with_path(params)[0]}
  if missing:
    raise ValueError(f"adapters for unknown parameters: {sorted(missing)}")
  return jax.tree_util.tree_map_with_path(
      lambda p, w: w + sign * deltas[masks.path_string(p)]
      if masks.path_string(p) in deltas else w, params)


def merge(params: PyTree, adapters: dict, config: LoraConfig) -> PyTree:
  """``W + (alpha / r) A B`` on every adapted kernel."""
  return _add(params, delta(adapters, config), 1.0)


def unmerge(params: PyTree, adapters: dict, config: LoraConfig) -> PyTree:
  """Inverse of :func:`merge` (same ``alpha / r`` scale)."""
  return _add(params, delta(adapters, config), -1.0)


def adapted_loss(loss_fn, base_params: PyTree, config: LoraConfig):
  """``loss(adapters, batch) = loss_fn(merge(base, adapters), batch)``.

  Fine-tune the returned function with :func:`immunojax.finetune.finetune`
  over the adapters; the base stays frozen by construction.
  """
  return lambda adapters, batch: loss_fn(merge(base_params, adapters, config),
                                         batch)
