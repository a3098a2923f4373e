"""scikit-learn's bundled 8x8 digits (1,797 images): no download needed."""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np


class Split(NamedTuple):
  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray


def load_digits() -> tuple[np.ndarray, np.ndarray]:
  """``(x, y)``: ``x`` float32 ``(1797, 64)`` in [0, 1], ``y`` int32 labels."""
  try:
    from sklearn.datasets import load_digits as _load  # noqa: PLC0415
  except ImportError as e:  # pragma: no cover - exercised only without sklearn
    raise ImportError("the digits data ships with scikit-learn: "
                      "pip install scikit-learn (or immunojax[experiments])"
                      ) from e
  d = _load()
  return (d.data / 16.0).astype(np.float32), d.target.astype(np.int32)


def stratified_indices(labels: np.ndarray, classes: Sequence[int], *,
                       test_fraction: float, rng: np.random.Generator
                       ) -> tuple[np.ndarray, np.ndarray]:
  """``(train, test)`` indices into ``labels``: each class in ``classes`` (in
  that order) shuffled by ``rng``, its first ``round(test_fraction * n_c)``
  held out. ``rng`` advances (a caller may go on drawing from it)."""
  if not 0.0 <= test_fraction < 1.0:
    raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
  labels = np.asarray(labels)
  tr, te = [], []
  for c in classes:
    idx = rng.permutation(np.flatnonzero(labels == c))
    n_test = int(round(test_fraction * len(idx)))
    te.append(idx[:n_test])
    tr.append(idx[n_test:])
  return np.concatenate(tr), np.concatenate(te)


def class_split(classes: Sequence[int], *, test_fraction: float = 0.3,
                seed: int = 0, relabel: bool = True) -> Split:
  """Images of ``classes`` only, stratified train/test split.

  Args:
    classes: digit classes to keep.
    test_fraction: held-out share of each class.
    seed: shuffling seed.
    relabel: map ``classes[i]`` to label ``i`` (so a 5-way head fits 5..9).
  """
  if not classes or len(set(classes)) != len(classes) or \
      not all(0 <= c <= 9 for c in classes):
    raise ValueError(f"classes must be distinct digits 0-9, got {classes}")
  x, y = load_digits()
  rng = np.random.default_rng(seed)
  tr, te = stratified_indices(y, classes, test_fraction=test_fraction, rng=rng)
  tr, te = rng.permutation(tr), rng.permutation(te)
  lut = np.full(10, -1, np.int32)
  lut[list(classes)] = np.arange(len(classes)) if relabel else list(classes)
  return Split(x[tr], lut[y[tr]], x[te], lut[y[te]])


TASK_VARIANTS = ("paper", "code")


def binary_digit_tasks(variant: str = "paper", *, seed: int = 0,
                       normalize: bool = True):
  """Ten binary tasks on the bundled digits, stacked for ``vmap``.

  ``"paper"``: task ``k`` is "digit k vs the rest": all ``n`` images of
  digit ``k`` (label 1; ``n`` = the smallest class size, 174) plus an
  equal-size seeded sample of the other digits (label 0), so tasks differ in
  their inputs and Grams. ``"code"``: the released code's variant (spec
  cond_num.md §5.2): task ``k`` holds only the ``n`` images of digit ``k``;
  its labels are constant (0 for D_P, 1 for D_H, set by the caller).

  ``normalize`` applies one global mean/std to every pixel (the code's
  ``Normalize(0.1307, 0.3081)`` analogue).

  Returns:
    ``(x, y)``: ``x`` float32 ``(10, N, 64)``, ``y`` float32 ``(10, N)``
    (``N = 2n`` for "paper", ``n`` for "code").
  """
  if variant not in TASK_VARIANTS:
    raise ValueError(f"unknown task variant {variant!r}; expected one of "
                     f"{list(TASK_VARIANTS)}")
  x, y = load_digits()
  if normalize:
    x = (x - x.mean()) / x.std()
  rng = np.random.default_rng(seed)
  n = min(int(np.sum(y == c)) for c in range(10))
  xs, ys = [], []
  for k in range(10):
    own = rng.permutation(np.flatnonzero(y == k))[:n]
    if variant == "code":
      xs.append(x[own])
      ys.append(np.ones(n, np.float32))
      continue
    rest = rng.choice(np.flatnonzero(y != k), n, replace=False)
    idx = rng.permutation(np.concatenate([own, rest]))
    xs.append(x[idx])
    ys.append((y[idx] == k).astype(np.float32))
  return np.stack(xs).astype(np.float32), np.stack(ys)
