"""Linear probes on frozen features: how fast a head learns the harmful
task, and the spectrum that sets that speed (the condition-number paper's
deep protocol)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from immunojax import attacks, models, spectral


@functools.partial(jax.jit, static_argnames=("steps", "num_classes"))
def line_search_probe(f_train, y_train, f_test, y_test, *, steps: int,
                      num_classes: int):
  """The paper's probe: exact-line-search GD on ``0.5||F W - Y||^2`` with
  one-hot ``Y``, from ``W = 0``; ten evaluations.

  Returns:
    ``(distance_ratio, test_accuracy)``, each of length 11 (steps ``0,
    steps/10, ..., steps``): ``||W_t - W*||^2 / ||W*||^2`` to the
    least-squares head, and the test accuracy of ``f_test @ W_t``.
  """
  y = jax.nn.one_hot(y_train, num_classes, dtype=f_train.dtype)
  w_star = attacks.least_squares_probe(f_train, y)
  measure = lambda w: (jnp.sum((w - w_star) ** 2) / jnp.sum(w_star ** 2),
                       models.accuracy(f_test @ w, y_test))

  def block(w, _):
    w = attacks.exact_line_search_gd(f_train, y, steps // 10, w0=w).w
    return w, measure(w)

  w0 = jnp.zeros_like(w_star)
  _, (ratio, acc) = jax.lax.scan(block, w0, None, length=10)
  r0, a0 = measure(w0)
  return (jnp.concatenate([r0[None], ratio]),
          jnp.concatenate([jnp.asarray(a0, acc.dtype)[None], acc]))


def least_squares_accuracy(f_train, y_train, f_test, y_test, *,
                           num_classes: int) -> float:
  """The depth of what features still encode: accuracy on ``(f_test,
  y_test)`` of the minimum-norm least-squares head (with a bias) fitted to
  one-hot ``y_train`` -- what any exact solver reads from frozen features
  in one step, however slowly gradient descent would get there.

  Returns:
    The share of test rows whose argmax over ``num_classes`` is the label.
  """
  with_bias = lambda f: jnp.concatenate([f, jnp.ones((f.shape[0], 1),
                                                     f.dtype)], 1)
  w = attacks.least_squares_probe(with_bias(f_train),
                                  jax.nn.one_hot(y_train, num_classes))
  pred = np.asarray(jnp.argmax(with_bias(f_test) @ w, -1))
  return float(np.mean(pred == np.asarray(y_test)))


def gram_extremes(features) -> dict:
  """``sigma_min``, ``sigma_max`` and rank of ``F^T F`` (the rank-aware
  ``pinv`` estimator), and the feature dimension."""
  e = spectral.pinv().of_features(features)
  return {"sigma_min": float(e.sigma_min), "sigma_max": float(e.sigma_max),
          "rank": int(e.rank), "dim": int(features.shape[1])}
