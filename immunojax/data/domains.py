"""Restricted domains for SOPHON-style experiments, generated offline.

``noise_shift`` is the transform the SOPHON spec's toy study found to
transfer from digits (a 1-pixel shift plus Gaussian noise: the original
model clearly beats scratch there); ``glyphs`` is a farther, procedurally
generated 10-class 8x8 stroke set.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from immunojax.data.digits import load_digits


class Domain(NamedTuple):
  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray


def noise_shift(x: np.ndarray, *, seed: int = 0, shift: int = 1,
                sigma: float = 0.25) -> np.ndarray:
  """Rolls ``(N, 64)`` 8x8 images ``shift`` pixels along the width, adds
  ``N(0, sigma^2)`` noise and clips to [0, 1]."""
  rng = np.random.default_rng(seed)
  img = np.roll(x.reshape(-1, 8, 8), shift, axis=2)
  img = img + rng.normal(0.0, sigma, img.shape)
  return np.clip(img, 0.0, 1.0).reshape(x.shape).astype(np.float32)


def digit_halves(*, seed: int = 0, test_fraction: float = 0.3,
                 guard: int = 100) -> tuple[Domain, Domain, tuple]:
  """The bundled digits split into two disjoint halves.

  Returns:
    ``(original, restricted, (x_guard, y_guard))``: half A (its train part
    minus ``guard`` held-out images, which a guard may score), half B under
    :func:`noise_shift`.
  """
  x, y = load_digits()
  perm = np.random.default_rng(seed).permutation(len(x))
  halves = perm[: len(x) // 2], perm[len(x) // 2:]

  def split(idx):
    n_test = int(round(test_fraction * len(idx)))
    return idx[n_test:], idx[:n_test]

  (a_tr, a_te), (b_tr, b_te) = split(halves[0]), split(halves[1])
  a_guard, a_tr = a_tr[:guard], a_tr[guard:]
  original = Domain(x[a_tr], y[a_tr], x[a_te], y[a_te])
  restricted = Domain(noise_shift(x[b_tr], seed=seed + 1), y[b_tr],
                      noise_shift(x[b_te], seed=seed + 2), y[b_te])
  return original, restricted, (x[a_guard], y[a_guard])


_STROKES = {
    0: [(3, slice(1, 7))],                      # horizontal bar
    1: [(slice(1, 7), 3)],                      # vertical bar
    2: "diag", 3: "anti",
    4: [(3, slice(1, 7)), (slice(1, 7), 3)],    # plus
    5: "x",
    6: [(1, slice(1, 7)), (6, slice(1, 7)), (slice(1, 7), 1),
        (slice(1, 7), 6)],                      # ring
    7: [(slice(1, 7), 1), (6, slice(1, 7))],    # L
    8: [(1, slice(1, 7)), (slice(1, 7), 3)],    # T
    9: [(2, slice(1, 7)), (5, slice(1, 7))],    # two bars
}


def _glyph(c: int) -> np.ndarray:
  img = np.zeros((8, 8), np.float32)
  spec = _STROKES[c]
  idx = np.arange(1, 7)
  if spec in ("diag", "x"):
    img[idx, idx] = 1.0
  if spec in ("anti", "x"):
    img[idx, 7 - idx] = 1.0
  if isinstance(spec, list):
    for r, col in spec:
      img[r, col] = 1.0
  return img


def glyph_templates(variants: int, *, seed: int = 0) -> np.ndarray:
  """``(10, variants, 8, 8)`` stroke templates: variant 0 of each class is
  its base glyph; the others move the strokes by up to a pixel, thicken them
  along a random axis and drop a random pixel run (``numpy.random.
  default_rng(seed)``), so a class is a family of shapes rather than one."""
  if variants < 1:
    raise ValueError(f"variants must be >= 1, got {variants}")
  rng = np.random.default_rng(seed)
  out = np.zeros((10, variants, 8, 8), np.float32)
  for c in range(10):
    base = _glyph(c)
    out[c, 0] = base
    for v in range(1, variants):
      img = np.roll(np.roll(base, rng.integers(-1, 2), 0),
                    rng.integers(-1, 2), 1)
      if rng.random() < 0.5:
        img = np.maximum(img, np.roll(img, 1, int(rng.integers(0, 2))))
      on = np.flatnonzero(img.ravel())
      cut = rng.choice(on, size=min(len(on) // 4, 2), replace=False)
      img.ravel()[cut] = 0.0
      out[c, v] = img
  return out


def glyphs(*, num_train: int = 600, num_test: int = 270, seed: int = 0,
           sigma: float = 0.15, variants: int = 1) -> Domain:
  """Ten stroke classes on 8x8 (``variants`` templates each, see
  :func:`glyph_templates`; 1: the base glyph only), each sample jittered by
  up to 1 pixel, scaled by an intensity in [0.6, 1] and noised, in
  [0, 1]."""
  templates = glyph_templates(variants, seed=seed + 7919)
  rng = np.random.default_rng(seed)

  def sample(n):
    y = rng.integers(0, 10, n)
    if variants == 1:            # the original draw sequence, unchanged
      img = templates[y, 0]
    else:
      img = templates[y, rng.integers(0, variants, n)]
    dy, dx = rng.integers(-1, 2, (2, n))
    img = np.stack([np.roll(np.roll(im, a, 0), b, 1)
                    for im, a, b in zip(img, dy, dx)])
    img = img * rng.uniform(0.6, 1.0, (n, 1, 1)) + rng.normal(0, sigma,
                                                              img.shape)
    return np.clip(img, 0, 1).reshape(n, 64).astype(np.float32), \
        y.astype(np.int32)

  return Domain(*sample(num_train), *sample(num_test))
