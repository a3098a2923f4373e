"""Boolean pytree masks: which parameters move during fine-tuning.

Our masks say True for *trainable*; :func:`only` turns one into optax's
``selective_transform`` (whose mask says True for *frozen*).
"""

from __future__ import annotations

import re
from typing import Any, Iterable

import jax
import optax

PyTree = Any


def path_string(path) -> str:
  """``('layers', 0, 'kernel')``-style key path rendered as ``layers/0/kernel``."""
  parts = []
  for k in path:
    for attr in ("key", "idx", "name"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return "/".join(parts)


def mask_from_patterns(params: PyTree, patterns: str | Iterable[str]) -> PyTree:
  """True for leaves whose ``a/b/c`` path matches any regex (``re.search``).

  Raises:
    ValueError: a pattern matches no leaf (almost always a typo).
  """
  patterns = [patterns] if isinstance(patterns, str) else list(patterns)
  compiled = [re.compile(p) for p in patterns]
  paths = [path_string(p) for p, _ in
           jax.tree_util.tree_flatten_with_path(params)[0]]
  for p, c in zip(patterns, compiled):
    if not any(c.search(s) for s in paths):
      raise ValueError(f"pattern {p!r} matches no parameter; paths are "
                       f"{paths[:12]}{' ...' if len(paths) > 12 else ''}")
  return jax.tree_util.tree_map_with_path(
      lambda p, _: any(c.search(path_string(p)) for c in compiled), params)


def check_mask(mask: PyTree, params: PyTree) -> None:
  """Raises ValueError unless ``mask`` has params' structure with bool leaves."""
  ms, ps = jax.tree_util.tree_structure(mask), jax.tree_util.tree_structure(params)
  if ms != ps:
    raise ValueError(f"trainable mask structure {ms} does not match the "
                     f"parameter structure {ps}")
  bad = [x for x in jax.tree_util.tree_leaves(mask) if not isinstance(x, bool)]
  if bad:
    raise ValueError("trainable mask leaves must be Python bools, got "
                     f"{type(bad[0]).__name__}")


def resolve(trainable, params: PyTree) -> PyTree | None:
  """``None`` (all), a mask pytree, or regex pattern(s) -> mask or None."""
  if trainable is None:
    return None
  if isinstance(trainable, str) or (isinstance(trainable, (list, tuple)) and
                                    trainable and all(isinstance(t, str)
                                                      for t in trainable)):
    return mask_from_patterns(params, trainable)
  check_mask(trainable, params)
  return trainable


def only(optimizer: optax.GradientTransformation,
         trainable: PyTree | None) -> optax.GradientTransformation:
  """``optimizer`` on the leaves where ``trainable`` is True; the others get
  a zero update and no optimizer state (exact freezing, weight decay
  included). ``None`` trains everything."""
  if trainable is None:
    return optimizer
  frozen = jax.tree_util.tree_map(lambda m: not m, trainable)
  return optax.selective_transform(optimizer, freeze_mask=frozen)
