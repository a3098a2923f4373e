"""Epsilon-prediction diffusion: the training loss, classifier-free guidance
and a deterministic DDIM sampler, for any noise predictor.

A noise predictor is ``eps_fn(x_t, t) -> eps_hat`` (``x_t: (batch, D)``,
integer ``t: (batch,)`` in ``[0, T)``); conditioning is closed over (see
:func:`guided`). The schedule is ``alphas_bar`` of shape ``(T,)``
(:func:`immunojax.data.diffusion.alphas_bar`: linear ``beta`` from 1e-4 to
0.02), the DDPM/latent-diffusion convention the IMMA/MIMA and SOPHON code
train with.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from immunojax.data.diffusion import alphas_bar as _alphas_bar


def schedule(num_timesteps: int) -> jax.Array:
  """``alphas_bar`` (float32, ``(num_timesteps,)``) of the linear schedule."""
  if num_timesteps < 2:
    raise ValueError(f"num_timesteps must be >= 2, got {num_timesteps}")
  return jnp.asarray(_alphas_bar(num_timesteps), jnp.float32)


def add_noise(x0: jax.Array, t: jax.Array, eps: jax.Array,
              alphas_bar: jax.Array) -> jax.Array:
  """``sqrt(ab_t) x0 + sqrt(1 - ab_t) eps`` per row."""
  ab = alphas_bar[t][:, None]
  return jnp.sqrt(ab) * x0 + jnp.sqrt(1.0 - ab) * eps


def epsilon_loss(eps_fn: Callable[[jax.Array, jax.Array], jax.Array],
                 x0: jax.Array, t: jax.Array, eps: jax.Array,
                 alphas_bar: jax.Array,
                 weights: jax.Array | None = None) -> jax.Array:
  """``mean ||eps - eps_fn(x_t, t)||^2`` (``F.mse_loss(model_pred, noise)``);
  with ``weights`` ``(batch,)``, the weighted mean over rows."""
  err = jnp.mean((eps_fn(add_noise(x0, t, eps, alphas_bar), t) - eps) ** 2,
                 axis=-1)
  if weights is None:
    return jnp.mean(err)
  return jnp.sum(weights * err) / jnp.maximum(jnp.sum(weights), 1e-12)


def guided(eps_fn: Callable, context: jax.Array, null_context: jax.Array,
           scale: float) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """Classifier-free guidance: ``eps_u + scale (eps_c - eps_u)``.

  Args:
    eps_fn: ``eps_fn(x_t, t, context)``.
    context, null_context: ``(batch, tokens, dim)`` prompt and empty-prompt
      embeddings (one forward pass over both halves).
    scale: guidance scale (1: conditional only).
  """
  def fn(x, t):
    both = eps_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]),
                  jnp.concatenate([context, null_context]))
    cond, uncond = jnp.split(both, 2)
    return uncond + scale * (cond - uncond)
  return fn


def ddim_sample(eps_fn: Callable[[jax.Array, jax.Array], jax.Array],
                noise: jax.Array, alphas_bar: jax.Array, *,
                steps: int = 50, clip: float | None = 1.0) -> jax.Array:
  """Deterministic DDIM (eta = 0) from ``noise`` ``(batch, D)``.

  ``steps`` timesteps evenly spaced from ``T - 1`` down to 0 (one
  ``lax.scan``); the predicted ``x0`` is clipped to ``[-clip, clip]`` (the
  data range; None: no clipping).

  Returns:
    The samples ``x0``, ``(batch, D)``.
  """
  num_t = alphas_bar.shape[0]
  if not 1 <= steps <= num_t:
    raise ValueError(f"steps must be in [1, {num_t}], got {steps}")
  ts = jnp.round(jnp.linspace(num_t - 1, 0, steps)).astype(jnp.int32)
  prev = jnp.concatenate([ts[1:], jnp.asarray([-1], jnp.int32)])

  def step(x, tt):
    t, tp = tt
    ab = alphas_bar[t]
    ab_prev = jnp.where(tp >= 0, alphas_bar[jnp.maximum(tp, 0)], 1.0)
    eps = eps_fn(x, jnp.full((x.shape[0],), t))
    x0 = (x - jnp.sqrt(1.0 - ab) * eps) / jnp.sqrt(ab)
    if clip is not None:
      x0 = jnp.clip(x0, -clip, clip)
      eps = (x - jnp.sqrt(ab) * x0) / jnp.sqrt(1.0 - ab)
    return (jnp.sqrt(ab_prev) * x0 + jnp.sqrt(1.0 - ab_prev) * eps).astype(
        x.dtype), None

  x, _ = jax.lax.scan(step, noise, (ts, prev))
  return x
