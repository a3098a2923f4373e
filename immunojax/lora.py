"""LoRA adapters on the kernels of any parameter pytree (or NNX module state).

Names follow ``peft``: rank ``r``, ``lora_alpha``, ``target_modules`` (regexes
over ``a/b/kernel`` paths). For a kernel ``W`` of shape ``(in, out)`` (Flax's
``x @ W`` layout) the adapted kernel is ``W + (lora_alpha / r) * A @ B`` with
``A: (in, r)`` Kaiming-uniform (peft's ``a=sqrt(5)``: ``U(±1/sqrt(in))``) and
``B: (r, out)`` zero, so an adapter starts as the identity. A kernel with more
dimensions (a Flax conv's ``(kh, kw, in, out)``) is viewed as the matrix
``(prod(shape[:-1]), shape[-1])`` and the update reshaped back: that is
peft's ``Conv2d`` LoRA (an ``r``-channel conv with the layer's kernel size,
then a 1x1 conv to ``out``), whose fan-in is ``kh * kw * in``.

Every leaf ``target_modules`` matches must be a kernel (>= 2 dimensions): a
pattern that also matches a bias is an error naming it, except for the
default ``("kernel",)``, which warns and skips (so nothing is adapted
silently less than asked). ``init_a`` sets
another Kaiming ``a`` (bound ``sqrt(6 / ((1 + a^2) in))``; GS-LoRA's released
code re-initialises later tasks with ``a = sqrt(50)``). :func:`merge` and
:func:`unmerge` both use the ``lora_alpha / r`` scale (forgetting it in one of
them is a known bug elsewhere).

Adapters are a flat ``{path: {"a": A, "b": B}}`` dict, so they are a plain
pytree for optax, masks, checkpoints and ``vmap``.
"""

from __future__ import annotations

import math
import warnings
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


DEFAULT_TARGETS = LoraConfig._field_defaults["target_modules"]


def target_paths(params: PyTree, target_modules: Iterable[str]) -> list[str]:
  """Paths of the kernels (leaves with >= 2 dimensions) ``target_modules``
  matches.

  Raises:
    ValueError: no kernel matches, or (for patterns other than the default
      ``("kernel",)``, which warns instead) a matched leaf has fewer than 2
      dimensions and so cannot carry an adapter.
  """
  targets = tuple(target_modules)
  mask = masks.mask_from_patterns(params, targets)
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  mflat = jax.tree_util.tree_leaves(mask)
  matched = [(masks.path_string(p), jnp.shape(leaf))
             for (p, leaf), m in zip(flat, mflat) if m]
  paths = [p for p, shape in matched if len(shape) >= 2]
  skipped = [f"{p} {tuple(shape)}" for p, shape in matched if len(shape) < 2]
  if skipped:
    message = (f"LoRA target_modules {targets} match {len(skipped)} "
               f"leaves with fewer than 2 dimensions, which take no adapter: "
               f"{', '.join(skipped[:6])}{' ...' if len(skipped) > 6 else ''}")
    if targets != DEFAULT_TARGETS:
      raise ValueError(message + "; narrow the patterns to kernels (e.g. "
                       "'fc/kernel' rather than 'fc')")
    warnings.warn(message + " (skipped)", stacklevel=3)
  if not paths:
    raise ValueError(f"target_modules {targets} match no kernel (a leaf "
                     "with >= 2 dimensions)")
  return paths


def matrix_shape(shape) -> tuple[int, int]:
  """The matrix a kernel of ``shape`` is viewed as: ``(prod(shape[:-1]),
  shape[-1])``."""
  return math.prod(shape[:-1]), shape[-1]


def init(params: PyTree, config: LoraConfig, *, key: jax.Array) -> dict:
  """Fresh adapters for every targeted kernel (B = 0: the identity)."""
  if config.r < 1:
    raise ValueError(f"LoRA rank r must be >= 1, got {config.r}")
  leaves = {masks.path_string(p): x for p, x in
            jax.tree_util.tree_flatten_with_path(params)[0]}
  adapters = {}
  for i, path in enumerate(target_paths(params, config.target_modules)):
    w = leaves[path]
    d_in, d_out = matrix_shape(w.shape)
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
  """``{path: scale * A @ B}``: the dense update each adapter represents, as
  the ``(prod(shape[:-1]), out)`` matrix (:func:`merge` reshapes it to the
  kernel's shape).

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
  def add(path, w):
    d = deltas.get(masks.path_string(path))
    if d is None:
      return w
    if d.shape != matrix_shape(w.shape):
      raise ValueError(f"adapter for {masks.path_string(path)!r} is "
                       f"{d.shape}, but the kernel {w.shape} is viewed as "
                       f"{matrix_shape(w.shape)}")
    return w + sign * d.reshape(w.shape)
  return jax.tree_util.tree_map_with_path(add, params)


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
