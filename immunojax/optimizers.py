"""Attacker optimizers by name: the "environments" a fine-tuner may choose.

The attack harness draws its grids from these, and the methods that simulate
fine-tuning (SOPHON's environments, IMMA's lower level) sample from them.
"""

from __future__ import annotations

from typing import Callable

import optax

from immunojax import _checks

OPTIMIZERS: dict[str, Callable[..., optax.GradientTransformation]] = {
    "sgd": optax.sgd,
    "momentum": lambda learning_rate: optax.sgd(learning_rate, momentum=0.9),
    "nesterov": lambda learning_rate: optax.sgd(learning_rate, momentum=0.9,
                                                nesterov=True),
    "adam": optax.adam,
    "adamw": optax.adamw,
    "rmsprop": optax.rmsprop,
    "adagrad": optax.adagrad,
    "adadelta": optax.adadelta,
    # SOPHON's evaluation attacker: SGD, momentum 0.9, weight decay 1e-4.
    "momentum_wd": lambda learning_rate: optax.chain(
        optax.add_decayed_weights(1e-4),
        optax.sgd(learning_rate, momentum=0.9)),
}


def make_optimizer(name: str, learning_rate) -> optax.GradientTransformation:
  """The optimizer ``name`` with a learning rate that may be a traced value
  (``optax.inject_hyperparams``), so it can be vmapped and differentiated.

  Raises:
    ValueError: ``name`` is not one of :data:`OPTIMIZERS`.
  """
  _checks.check_choice(name, OPTIMIZERS, "optimizer")
  return optax.inject_hyperparams(OPTIMIZERS[name])(learning_rate=learning_rate)
