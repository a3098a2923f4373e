"""Prompts for the toy text-to-image setting: a vocabulary and a frozen
"text encoder" (a stand-in for CLIP's, spec ``imma_mima.md`` §4.1).

Every prompt has ``length`` tokens. The encoder is a frozen random table
``E`` (entries ``N(0, 1/dim)``) plus frozen positions ``P``: row ``i`` of a
prompt's embedding is ``E[id_i] + P[i]``. Ids at or past the vocabulary size
index trainable *placeholder* rows instead (textual inversion's new token).
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

SPECIAL = ("<null>", "a", "digit")


class Vocabulary(NamedTuple):
  """Token strings; ``ids(["a", "digit", "<d3>"])`` maps them to ints."""
  tokens: tuple[str, ...]

  @property
  def size(self) -> int:
    return len(self.tokens)

  def ids(self, words) -> np.ndarray:
    index = {t: i for i, t in enumerate(self.tokens)}
    unknown = [w for w in words if w not in index]
    if unknown:
      raise ValueError(f"unknown token(s) {unknown}")
    return np.asarray([index[w] for w in words], np.int32)


def digit_vocabulary(num_fillers: int = 64) -> Vocabulary:
  """``<null>``, ``a``, ``digit``, ``<d0>`` .. ``<d9>`` and filler words
  ``w0`` .. (the words of the regularisation captions)."""
  return Vocabulary(SPECIAL + tuple(f"<d{k}>" for k in range(10))
                    + tuple(f"w{i}" for i in range(num_fillers)))


def concept_prompt(vocab: Vocabulary, digit: int) -> np.ndarray:
  """``a digit <dk>``."""
  return vocab.ids(["a", "digit", f"<d{digit}>"])


def class_prompt(vocab: Vocabulary) -> np.ndarray:
  """``a digit <null>`` (the prior / class prompt)."""
  return vocab.ids(["a", "digit", "<null>"])


def null_prompt(vocab: Vocabulary) -> np.ndarray:
  """``<null> <null> <null>`` (classifier-free guidance's empty prompt)."""
  return vocab.ids(["<null>"] * 3)


def placeholder_prompt(vocab: Vocabulary, index: int = 0) -> np.ndarray:
  """``a digit <v*_index>``: the placeholder is id ``vocab.size + index``."""
  return np.asarray([*vocab.ids(["a", "digit"]), vocab.size + index],
                    np.int32)


def filler_captions(vocab: Vocabulary, count: int, *, seed: int
                    ) -> np.ndarray:
  """``(count, 3)`` random captions of filler words (the regularisation
  captions standing in for the LAION captions)."""
  fillers = [i for i, t in enumerate(vocab.tokens) if t.startswith("w")]
  if not fillers:
    raise ValueError("the vocabulary has no filler words")
  rng = np.random.default_rng(seed)
  return rng.choice(fillers, size=(count, 3)).astype(np.int32)


class TextEncoder(NamedTuple):
  table: jnp.ndarray       # (vocab, dim)
  positions: jnp.ndarray   # (length, dim)


def text_encoder(vocab: Vocabulary, *, dim: int = 32, length: int = 3,
                 seed: int = 0) -> TextEncoder:
  """A frozen random encoder (table and positions ``N(0, 1/dim)``)."""
  rng = np.random.default_rng(seed)
  scale = 1.0 / np.sqrt(dim)
  return TextEncoder(
      jnp.asarray(rng.normal(0.0, scale, (vocab.size, dim)), jnp.float32),
      jnp.asarray(rng.normal(0.0, scale, (length, dim)), jnp.float32))


def encode(encoder: TextEncoder, ids, placeholders=None) -> jnp.ndarray:
  """Embeddings ``(..., length, dim)`` of prompts ``ids`` ``(..., length)``.

  Args:
    placeholders: ``(P, dim)`` rows for ids ``vocab .. vocab + P - 1``.
  """
  table = encoder.table
  if placeholders is not None:
    table = jnp.concatenate([table, placeholders.astype(table.dtype)])
  ids = jnp.asarray(ids)
  if ids.shape[-1] != encoder.positions.shape[0]:
    raise ValueError(f"prompts have {ids.shape[-1]} tokens, the encoder "
                     f"{encoder.positions.shape[0]}")
  return table[ids] + encoder.positions
