"""Condition-number immunization of a non-linear extractor (paper Eq. 18) and
its baselines, each a factory returning an
:class:`~immunojax.immunizer.Immunizer`.

The objective is ``L(D_P) + lambda_H R_ill(H~_H) + lambda_P R_well(H~_P)``
with ``H~ = F(theta)^T F(theta)`` of pooled features; there is no ``K^-1``
preconditioning (the paper's theory is linear and the released code has none
for deep nets). ``update``'s batch is ``((x_p, y_p), x_h)``: a pre-training
mini-batch and a mini-batch of harmful inputs (no labels needed); its key is
unused.

``normalize=True`` (ours) scales each regularizer gradient to unit global
norm (:func:`~immunojax.methods.cond_num.regularizers.weight`) before
weighting; the paper balances gradient norms by hand.

:func:`label_kappa` (ours, beyond the paper) aims the harmful term at the
label-relevant directions and so needs harmful labels: its batch is
``((x_p, y_p), (x_h, y_h))``.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from immunojax import spectral
from immunojax.immunizer import Immunizer, descend
from immunojax.methods import _registry
from immunojax.methods.cond_num.regularizers import (feature_gram,
                                                     r_ill_features,
                                                     r_well_features, weight)
from immunojax.parallel.collectives import global_sum, pmean

PyTree = Any
FeaturesFn = Callable[[PyTree, jax.Array], jax.Array]


def _immunizer(terms: Callable[[FeaturesFn, Any], dict], *, features_fn,
               task_loss, optimizer, normalize, trainable, axis_name
               ) -> Immunizer:
  """Task gradient plus ``sum lam * normalize(grad term)`` over ``terms``.

  With ``axis_name`` (rows of both batches spread over the axis) the Grams
  are the global ones (``terms`` build them with
  :func:`~immunojax.parallel.global_sum`), each gradient is averaged over
  the axis *before* it is normalised, and the step equals the one-device
  step on the whole batch.
  """
  def direction(params, batch, key):
    del key
    batch_p, harmful = batch
    x_h, y_h = harmful if isinstance(harmful, tuple) else (harmful, None)
    loss, g = pmean(jax.value_and_grad(task_loss)(params, batch_p),
                    axis_name)
    f_p = lambda p: features_fn(p, batch_p[0])
    f_h = lambda p: features_fn(p, x_h)
    for fn, lam in terms(f_p, f_h, y_h):
      gr = weight(lam, normalize)(pmean(jax.grad(fn)(params), axis_name))
      g = jax.tree_util.tree_map(lambda a, b: a + b, g, gr)
    return g, {"task_loss": loss}

  # Reduced in ``direction`` already (normalisation must follow the mean).
  return descend(direction, optimizer, trainable=trainable, axis_name=None)


def cond_num(*, features_fn: FeaturesFn, task_loss: Callable,
         lambda_p: float, lambda_h: float,
         optimizer: optax.GradientTransformation, trainable=None,
         normalize: bool = True, estimator: spectral.EstimatorLike = "pinv",
         axis_name: str | None = None) -> Immunizer:
  """Condition-number immunization of a deep extractor (Eq. 18).

  Args:
    features_fn: ``features_fn(params, x) -> (N, D_hid)`` pooled features.
    task_loss: ``task_loss(params, (x_p, y_p)) -> scalar`` on D_P.
    lambda_p, lambda_h: regularizer weights.
    optimizer: any optax transformation.
    trainable: None, a bool mask or regex pattern(s); the rest is frozen.
    normalize: unit-norm regularizer gradients before weighting (ours).
    estimator: ``kappa`` estimator inside ``R_ill``.
    axis_name: the rows of both batches are spread over this named device
      axis: the Grams are the global ones and each gradient is averaged
      before it is normalised, so the step equals the one-device step.
  """
  est = spectral.estimator(estimator)
  terms = lambda f_p, f_h, _: (
      (lambda p: r_ill_features(f_h(p), estimator=est, axis_name=axis_name),
       lambda_h),
      (lambda p: r_well_features(f_p(p), axis_name=axis_name), lambda_p))
  return _immunizer(terms, features_fn=features_fn, task_loss=task_loss,
                    optimizer=optimizer, normalize=normalize,
                    trainable=trainable, axis_name=axis_name)


def r_ill_only(*, features_fn: FeaturesFn, task_loss: Callable,
               lambda_h: float, optimizer: optax.GradientTransformation,
               trainable=None, normalize: bool = True,
               estimator: spectral.EstimatorLike = "pinv",
               axis_name: str | None = None) -> Immunizer:
  """Baseline: the ``R_ill`` term only. Arguments as :func:`cond_num`."""
  est = spectral.estimator(estimator)
  terms = lambda f_p, f_h, _: (
      (lambda p: r_ill_features(f_h(p), estimator=est, axis_name=axis_name),
       lambda_h),)
  return _immunizer(terms, features_fn=features_fn, task_loss=task_loss,
                    optimizer=optimizer, normalize=normalize,
                    trainable=trainable, axis_name=axis_name)


def opt_kappa(*, features_fn: FeaturesFn, task_loss: Callable,
              lambda_p: float, lambda_h: float,
              optimizer: optax.GradientTransformation, trainable=None,
              normalize: bool = True,
              estimator: spectral.EstimatorLike = "pinv",
              axis_name: str | None = None) -> Immunizer:
  """Baseline: ``lambda_P log kappa(H~_P) + lambda_H / log kappa(H~_H)``.
  Arguments as :func:`cond_num`."""
  est = spectral.estimator(estimator)

  def log_kappa(f):
    e = est(feature_gram(f, small=est.name != "official",
                         axis_name=axis_name)[0])
    return jax.numpy.log(e.sigma_max) - jax.numpy.log(e.sigma_min)

  terms = lambda f_p, f_h, _: ((lambda p: log_kappa(f_p(p)), lambda_p),
                               (lambda p: 1.0 / log_kappa(f_h(p)), lambda_h))
  return _immunizer(terms, features_fn=features_fn, task_loss=task_loss,
                    optimizer=optimizer, normalize=normalize,
                    trainable=trainable, axis_name=axis_name)


def label_gram(features: jax.Array, labels: jax.Array, num_classes: int, *,
               axis_name: str | None = None) -> jax.Array:
  """The ``(C, C)`` Gram of the label-relevant directions.

  ``H_Y = F^T P_Y F`` with ``P_Y = Y (Y^T Y)^-1 Y^T`` the projection onto
  the one-hot label columns (a class absent from the batch gets a zero
  row): the curvature a linear probe's loss has along the directions that
  separate the classes. Its non-zero spectrum equals that of the returned
  ``(C, C)`` matrix ``D^-1/2 Y^T F F^T Y D^-1/2``, ``D = Y^T Y``. With
  ``axis_name`` the rows are spread over that axis and ``Y^T F`` and the
  counts are the global sums.
  """
  y = jax.nn.one_hot(labels, num_classes, dtype=features.dtype)
  if axis_name is None:
    counts = jnp.sum(y, axis=0)
    m = (y / jnp.sqrt(jnp.maximum(counts, 1.0))).T @ features  # (C, D)
    return m @ m.T
  counts = jax.lax.stop_gradient(global_sum(jnp.sum(y, axis=0), axis_name))
  m = global_sum(y.T @ features, axis_name) / jnp.sqrt(
      jnp.maximum(counts, 1.0))[:, None]
  return m @ m.T


def label_kappa(*, features_fn: FeaturesFn, task_loss: Callable,
                lambda_p: float, lambda_h: float, num_classes: int,
                optimizer: optax.GradientTransformation, trainable=None,
                normalize: bool = True,
                estimator: spectral.EstimatorLike = "pinv",
                axis_name: str | None = None) -> Immunizer:
  """Ours, beyond the paper: ``lambda_P R_well(H~_P) + lambda_H / log
  kappa_Y`` with ``kappa_Y = sigma_max(H~_H) / sigma_min(H_Y)``.

  ``H_Y`` (:func:`label_gram`) is the harmful Gram restricted to the
  label-relevant directions. Raising ``kappa(H~_H)`` can be won in
  directions that carry no label signal (near-dead features), which a
  probe never needs; ``kappa_Y`` only grows when the weakest class contrast
  gets small curvature next to the largest curvature overall, so a probe
  with a step safe for ``sigma_max`` learns that contrast slowly. Needs
  harmful labels: ``update``'s batch is ``((x_p, y_p), (x_h, y_h))``.
  Other arguments as :func:`cond_num`.
  """
  est = spectral.estimator(estimator)

  def log_kappa_label(f, y):
    top = est(feature_gram(f, small=est.name != "official",
                           axis_name=axis_name)[0]).sigma_max
    low = est(label_gram(f, y, num_classes, axis_name=axis_name)).sigma_min
    return jnp.log(top) - jnp.log(low)

  def terms(f_p, f_h, y_h):
    if y_h is None:
      raise ValueError("label_kappa needs harmful labels: pass the batch "
                       "((x_p, y_p), (x_h, y_h))")
    return ((lambda p: r_well_features(f_p(p), axis_name=axis_name),
             lambda_p),
            (lambda p: 1.0 / log_kappa_label(f_h(p), y_h), lambda_h))

  return _immunizer(terms, features_fn=features_fn, task_loss=task_loss,
                    optimizer=optimizer, normalize=normalize,
                    trainable=trainable, axis_name=axis_name)


METHODS: dict[str, Callable[..., Immunizer]] = {
    "cond_num": cond_num, "r_ill_only": r_ill_only, "opt_kappa": opt_kappa,
    "label_kappa": label_kappa}


def by_name(name: str, **options) -> Immunizer:
  """The deep method ``name`` (a key of :data:`METHODS`) with the subset of
  ``options`` its factory takes."""
  return _registry.by_name(METHODS, name, **options)
