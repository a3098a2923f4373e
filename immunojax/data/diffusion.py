"""Denoising pairs for a tiny DDPM-style denoiser (SOPHON's generation mode).

A denoiser ``eps_hat = f(x_t, t)`` is trained on ``x_t = sqrt(abar_t) x_0 +
sqrt(1 - abar_t) eps`` with the standard linear schedule (``beta`` from 1e-4
to 0.02 over ``T = 1000`` steps) and ``t`` uniform. The released SOPHON code
fixes ``t = 1`` (spec §2.3); we draw every timestep.
"""

from __future__ import annotations

import numpy as np

NUM_TIMESTEPS = 1000


def alphas_bar(num_timesteps: int = 1000) -> np.ndarray:
  betas = np.linspace(1e-4, 0.02, num_timesteps)
  return np.cumprod(1.0 - betas)


def time_features(t: np.ndarray, num_timesteps: int = 1000,
                  num_frequencies: int = 8) -> np.ndarray:
  """Sinusoidal features of ``t / T``: ``(N, 2 * num_frequencies)``."""
  freqs = np.pi * 2.0 ** np.arange(num_frequencies)
  angle = (t / num_timesteps)[:, None] * freqs
  return np.concatenate([np.sin(angle), np.cos(angle)], axis=1)


def denoising_pairs(x0: np.ndarray, *, seed: int, copies: int = 4,
                    num_timesteps: int = 1000, t_max: int | None = None):
  """``copies`` noisy versions of every image in ``x0`` (``(N, D)`` in
  [0, 1], rescaled to [-1, 1]), at timesteps uniform in ``[1, t_max]``
  (``t_max`` None: every timestep, ``[1, num_timesteps]``).

  Returns:
    ``(inputs, eps)``: inputs ``(copies * N, D + 16)`` = ``[x_t, features
    of t]``, and the noise ``eps`` ``(copies * N, D)`` to predict; float32.

  Raises:
    ValueError: ``t_max`` outside ``[1, num_timesteps]``.
  """
  t_max = num_timesteps if t_max is None else int(t_max)
  if not 1 <= t_max <= num_timesteps:
    raise ValueError(f"t_max must be in [1, {num_timesteps}], got {t_max}")
  rng = np.random.default_rng(seed)
  x = np.tile(2.0 * x0 - 1.0, (copies, 1))
  t = rng.integers(1, t_max + 1, len(x))
  ab = alphas_bar(num_timesteps)[t - 1][:, None]
  eps = rng.normal(size=x.shape)
  xt = np.sqrt(ab) * x + np.sqrt(1.0 - ab) * eps
  inputs = np.concatenate([xt, time_features(t, num_timesteps)], axis=1)
  return inputs.astype(np.float32), eps.astype(np.float32)
