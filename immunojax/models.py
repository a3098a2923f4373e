"""Small Flax NNX networks and a bridge from modules to pure functions.

The core works on parameter pytrees; :func:`functional` turns any NNX module
into ``apply(params, *args)`` plus its parameters as a plain nested dict, so
``finetune``, ``lora`` and the attack harness never see module objects.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx


def functional(module: nnx.Module, method: str = "__call__"
               ) -> tuple[Callable, dict]:
  """``(apply, params)``: ``apply(params, *args)`` calls ``module.method``
  (default the module itself) with ``params`` (a pure dict of its
  ``nnx.Param`` values); other state (e.g. batch statistics) is frozen at its
  current value."""
  graphdef, param_state, rest = nnx.split(module, nnx.Param, ...)
  params = nnx.to_pure_dict(param_state)

  def apply(p, *args, **kwargs):
    state = jax.tree_util.tree_map(lambda a: a, param_state)  # fresh copy
    nnx.replace_by_pure_dict(state, p)
    return getattr(nnx.merge(graphdef, state, rest), method)(*args, **kwargs)

  return apply, params


class MLP(nnx.Module):
  """``x -> [dense -> act]* -> head``; the last layer is named ``head``."""

  def __init__(self, sizes: Sequence[int], *, rngs: nnx.Rngs,
               activation: Callable = jax.nn.relu):
    if len(sizes) < 2:
      raise ValueError(f"MLP needs at least (in, out) sizes, got {sizes}")
    self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs)
                            for a, b in zip(sizes[:-2], sizes[1:-1])])
    self.head = nnx.Linear(sizes[-2], sizes[-1], rngs=rngs)
    self.activation = activation

  def features(self, x):
    for layer in self.layers:
      x = self.activation(layer(x))
    return x

  def __call__(self, x):
    return self.head(self.features(x))


def mlp_size(sizes: Sequence[int]) -> int:
  """Number of parameters of ``MLP(sizes)`` (kernels and biases)."""
  return sum((a + 1) * b for a, b in zip(sizes[:-1], sizes[1:]))


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return jnp.mean(jnp.argmax(logits, axis=-1) == labels)


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
  """Inverted dropout; the identity when ``key`` is None (evaluation)."""
  if key is None or rate == 0.0:
    return x
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0.0)


def cosface_logits(embedding: jax.Array, weight: jax.Array,
                   labels: jax.Array | None = None, *, scale: float = 64.0,
                   margin: float = 0.35) -> jax.Array:
  """CosFace: ``s * (cos(emb, W_c) - m * onehot(y))``; the margin only when
  ``labels`` are given (the GS-LoRA code passes them at evaluation too)."""
  e = embedding / jnp.maximum(jnp.linalg.norm(embedding, axis=-1,
                                              keepdims=True), 1e-12)
  w = weight / jnp.maximum(jnp.linalg.norm(weight, axis=-1, keepdims=True),
                           1e-12)
  cos = e @ w.T
  if labels is not None:
    cos = cos - margin * jax.nn.one_hot(labels, w.shape[0], dtype=cos.dtype)
  return scale * cos


class Block(nnx.Module):
  """Pre-norm transformer block; attention scores scaled by ``dim**-0.5``
  (the model width, as the Face Transformer does, not the head width)."""

  def __init__(self, dim: int, heads: int, mlp_dim: int, *, rngs: nnx.Rngs):
    if dim % heads:
      raise ValueError(f"dim {dim} is not divisible by heads {heads}")
    self.heads = heads
    self.norm1 = nnx.LayerNorm(dim, rngs=rngs)
    self.qkv = nnx.Linear(dim, 3 * dim, use_bias=False, rngs=rngs)
    self.out = nnx.Linear(dim, dim, rngs=rngs)
    self.norm2 = nnx.LayerNorm(dim, rngs=rngs)
    self.fc1 = nnx.Linear(dim, mlp_dim, rngs=rngs)
    self.fc2 = nnx.Linear(mlp_dim, dim, rngs=rngs)

  def __call__(self, x, *, rate: float = 0.0, keys=(None, None, None)):
    b, n, d = x.shape
    q, k, v = jnp.split(self.qkv(self.norm1(x)), 3, axis=-1)
    split = lambda t: t.reshape(b, n, self.heads, d // self.heads)
    att = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", split(q), split(k))
                         * d ** -0.5, axis=-1)
    o = jnp.einsum("bhqk,bkhd->bqhd", att, split(v)).reshape(b, n, d)
    x = x + dropout(self.out(o), rate, keys[0])
    h = dropout(jax.nn.gelu(self.fc1(self.norm2(x)), approximate=False), rate,
                keys[1])
    return x + dropout(self.fc2(h), rate, keys[2])


class ViT(nnx.Module):
  """A small Vision Transformer with a CosFace head (GS-LoRA's backbone).

  Square ``side x side`` single-channel images (flattened rows) are cut into
  ``patch x patch`` patches; a learnable CLS token and positions; pre-norm
  :class:`Block` s; the embedding is the final LayerNorm of the CLS token.
  ``__call__(x, labels=None, *, key=None) -> (logits, embedding)``: CosFace
  logits (margin on when labels are given); dropout only with a ``key``.
  """

  def __init__(self, *, side: int = 8, patch: int = 2, dim: int = 64,
               depth: int = 4, heads: int = 4, mlp_dim: int = 128,
               num_classes: int = 10, dropout_rate: float = 0.1,
               scale: float = 64.0, margin: float = 0.35, rngs: nnx.Rngs):
    if side % patch:
      raise ValueError(f"image side {side} is not divisible by patch {patch}")
    self.side, self.patch = side, patch
    self.rate, self.scale, self.margin = dropout_rate, scale, margin
    tokens = (side // patch) ** 2 + 1
    self.embed = nnx.Linear(patch * patch, dim, rngs=rngs)
    self.cls = nnx.Param(jax.random.normal(rngs.params(), (1, 1, dim),
                                           jnp.float32))
    self.pos = nnx.Param(jax.random.normal(rngs.params(), (1, tokens, dim),
                                           jnp.float32))
    self.blocks = nnx.List([Block(dim, heads, mlp_dim, rngs=rngs)
                            for _ in range(depth)])
    self.norm = nnx.LayerNorm(dim, rngs=rngs)
    self.head = nnx.Param(nnx.initializers.xavier_uniform()(
        rngs.params(), (num_classes, dim), jnp.float32))

  def features(self, x, *, key=None):
    """The embedding: LayerNorm of the CLS token, ``(batch, dim)``."""
    b, s, p = x.shape[0], self.side, self.patch
    x = x.reshape(b, s // p, p, s // p, p).transpose(0, 1, 3, 2, 4)
    x = self.embed(x.reshape(b, (s // p) ** 2, p * p))
    x = jnp.concatenate([jnp.broadcast_to(self.cls[...], (b, 1, x.shape[-1])),
                         x], axis=1) + self.pos[...]
    keys = ([None] * (1 + 3 * len(self.blocks)) if key is None else
            list(jax.random.split(key, 1 + 3 * len(self.blocks))))
    x = dropout(x, self.rate, keys[0])
    for i, block in enumerate(self.blocks):
      x = block(x, rate=self.rate, keys=keys[1 + 3 * i: 4 + 3 * i])
    return self.norm(x[:, 0])

  def __call__(self, x, labels=None, *, key=None):
    emb = self.features(x, key=key)
    return cosface_logits(emb, self.head[...], labels, scale=self.scale,
                          margin=self.margin), emb


class Attention(nnx.Module):
  """Multi-head attention named like Stable Diffusion's ``Attention``:
  ``to_q``, ``to_k``, ``to_v`` (no bias) and ``to_out`` (weight and bias).
  Self-attention when ``context`` is None; cross-attention over ``context``
  (``(batch, tokens, context_dim)``) otherwise."""

  def __init__(self, dim: int, heads: int, *, context_dim: int | None = None,
               rngs: nnx.Rngs):
    if dim % heads:
      raise ValueError(f"dim {dim} is not divisible by heads {heads}")
    kv_dim = dim if context_dim is None else context_dim
    self.heads = heads
    self.to_q = nnx.Linear(dim, dim, use_bias=False, rngs=rngs)
    self.to_k = nnx.Linear(kv_dim, dim, use_bias=False, rngs=rngs)
    self.to_v = nnx.Linear(kv_dim, dim, use_bias=False, rngs=rngs)
    self.to_out = nnx.Linear(dim, dim, rngs=rngs)

  def __call__(self, x, context=None):
    context = x if context is None else context
    b, n, d = x.shape
    h = self.heads
    split = lambda t: t.reshape(t.shape[0], t.shape[1], h, d // h)
    q, k, v = split(self.to_q(x)), split(self.to_k(context)), split(
        self.to_v(context))
    att = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k)
                         * (d // h) ** -0.5, axis=-1)
    return self.to_out(jnp.einsum("bhqk,bkhd->bqhd", att, v).reshape(b, n, d))


class DenoiserBlock(nnx.Module):
  """``x + attn1(LN x)``, ``x + attn2(LN x, context)``, ``x + MLP(LN x)``."""

  def __init__(self, dim: int, heads: int, context_dim: int, *,
               rngs: nnx.Rngs):
    self.norm1 = nnx.LayerNorm(dim, rngs=rngs)
    self.attn1 = Attention(dim, heads, rngs=rngs)
    self.norm2 = nnx.LayerNorm(dim, rngs=rngs)
    self.attn2 = Attention(dim, heads, context_dim=context_dim, rngs=rngs)
    self.norm3 = nnx.LayerNorm(dim, rngs=rngs)
    self.fc1 = nnx.Linear(dim, 4 * dim, rngs=rngs)
    self.fc2 = nnx.Linear(4 * dim, dim, rngs=rngs)

  def __call__(self, x, context):
    x = x + self.attn1(self.norm1(x))
    x = x + self.attn2(self.norm2(x), context)
    return x + self.fc2(jax.nn.gelu(self.fc1(self.norm3(x))))


def timestep_embedding(t: jax.Array, dim: int,
                       max_period: float = 10_000.0) -> jax.Array:
  """Sinusoidal embedding of (integer or real) timesteps: ``(batch, dim)``."""
  half = dim // 2
  freqs = jnp.exp(-jnp.log(max_period) * jnp.arange(half, dtype=jnp.float32)
                  / half)
  angle = jnp.asarray(t, jnp.float32)[:, None] * freqs
  return jnp.concatenate([jnp.cos(angle), jnp.sin(angle)], axis=-1)


class ConditionalDenoiser(nnx.Module):
  """A tiny text-conditioned noise predictor (a stand-in for SD's UNet).

  Square ``side x side`` single-channel images (flattened rows) become
  ``(side / patch)**2`` patch tokens of width ``dim`` plus learned positions;
  a sinusoidal timestep embedding goes through an MLP and is added to every
  token; ``depth`` :class:`DenoiserBlock` s (self-attention ``attn1``,
  cross-attention ``attn2`` over the prompt embedding, MLP); a final
  LayerNorm and a linear ``head`` back to pixels.
  ``__call__(x_t, t, context) -> eps_hat`` with ``x_t: (batch, side**2)``,
  ``t: (batch,)`` and ``context: (batch, tokens, context_dim)``.
  """

  def __init__(self, *, side: int = 8, patch: int = 2, dim: int = 64,
               context_dim: int = 32, depth: int = 2, heads: int = 4,
               rngs: nnx.Rngs):
    if side % patch:
      raise ValueError(f"image side {side} is not divisible by patch {patch}")
    self.side, self.patch, self.dim = side, patch, dim
    tokens = (side // patch) ** 2
    self.embed = nnx.Linear(patch * patch, dim, rngs=rngs)
    self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(),
                                                  (1, tokens, dim)))
    self.time1 = nnx.Linear(dim, dim, rngs=rngs)
    self.time2 = nnx.Linear(dim, dim, rngs=rngs)
    self.blocks = nnx.List([DenoiserBlock(dim, heads, context_dim, rngs=rngs)
                            for _ in range(depth)])
    self.norm = nnx.LayerNorm(dim, rngs=rngs)
    self.head = nnx.Linear(dim, patch * patch, rngs=rngs)

  def __call__(self, x, t, context):
    b, s, p = x.shape[0], self.side, self.patch
    g = s // p
    h = x.reshape(b, g, p, g, p).transpose(0, 1, 3, 2, 4).reshape(b, g * g,
                                                                  p * p)
    temb = self.time2(jax.nn.silu(self.time1(timestep_embedding(t, self.dim))))
    h = self.embed(h) + self.pos[...] + temb[:, None, :]
    for block in self.blocks:
      h = block(h, context)
    out = self.head(self.norm(h)).reshape(b, g, g, p, p)
    return out.transpose(0, 1, 3, 2, 4).reshape(b, s * s)
