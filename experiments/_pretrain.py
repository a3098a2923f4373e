"""Pre-training theta_0: the one helper every experiment uses."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from experiments._runner import Run
from immunojax import data, losses
from immunojax.immunizer import supervised


def fit(run: Run, loss_fn, params, arrays, *, steps: int, lr: float,
        batch_size: int, seed: int, desc: str, loop: str = "pretrain"):
  """Adam on ``loss_fn(params, batch)`` over minibatches of ``arrays``, as a
  checkpointed loop of ``run``; batches from ``PRNGKey(seed)``.

  Returns:
    The pre-trained parameters.
  """
  trainer = supervised(loss_fn, optax.adam(lr))
  key = jax.random.PRNGKey(seed)
  # The batch key travels with the data (a jit argument): closed over, it
  # would be a constant of the compiled step, one program per seed.
  state = run.fit(loop, trainer, trainer.init(params, key),
                  lambda d, t: data.minibatch(d[0], d[1], batch_size, t),
                  (key, arrays), steps, desc=desc)
  return trainer.params(state)


def classifier(run: Run, apply, params, split, *, dtype=None, **kwargs):
  """:func:`fit` on the cross-entropy of ``split``'s training set."""
  arrays = (jnp.asarray(split.x_train, dtype), jnp.asarray(split.y_train))
  return fit(run, lambda p, b: losses.cross_entropy(apply(p, b[0]), b[1]),
             params, arrays, **kwargs)
