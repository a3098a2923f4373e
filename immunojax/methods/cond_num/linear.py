"""Condition-number immunization of a linear extractor (Algorithm 1) and its
baselines, each a factory returning an :class:`~immunojax.immunizer.Immunizer`.

Parameters are ``{"theta": (D, D_hid), "omega": (D_hid, 1)}``; ``update``'s
batch is a pre-training mini-batch ``(x_p, y_p)`` and its key is unused. The
full-data Grams ``K_P``, ``K_H``, their preconditioners and (for the bilevel
baseline) the harmful set come in at construction, as a
:class:`LinearProblem`.

=================  =========================================================
factory            update direction for ``theta`` (besides the task gradient)
=================  =========================================================
``cond_num``       ``lambda_H P_H grad R_ill(H_H) + lambda_P P_P grad R_well(H_P)``
                   (the paper's method, Alg. 1)
``r_ill_only``     the ``R_ill`` term alone
``opt_kappa``      ``grad [lambda_P log kappa(H_P) + lambda_H / log kappa(H_H)]``
                   unpreconditioned (the released code's unwired ``kappa_loss``)
``probe_ascent``   ascend the harmful probe's loss after ``inner_steps`` of
                   gradient descent, differentiated through the fine-tuning loop
                   (the paper's bilevel "IMMA" baseline as we adapt it; not the
                   IMMA method of :mod:`immunojax.methods.imma`)
=================  =========================================================

Deviations from the released code, each deliberate (spec §6.1):
  * ``kappa``, ``sigma_min`` and ``k`` are rank-aware (``pinv``); the code's
    estimator is ``estimator=spectral.official()``.
  * ``R_ill`` uses ``k = rank(S)`` and ``R_well`` ``p = dim(S)``.
  * ``K^-1`` preconditions on Algorithm 1's side, ``K^+ grad``;
    ``precondition_side="right"`` reproduces the code's ``grad K^-1``.
  * ``normalize=True`` (ours) scales each regularizer direction to unit norm
    (:func:`~immunojax.methods.cond_num.regularizers.weight`) before
    weighting, so ``lambda`` is a step length; the paper's rule is
    ``normalize=False`` with weights that balance the gradient norms
    (:func:`balanced_lambdas` computes them at ``t = 0``).
  * Linear extractors have no bias (the paper's setting).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from immunojax import _checks, finetune as _finetune, spectral
from immunojax.immunizer import Immunizer, descend
from immunojax.methods import _registry
from immunojax.methods.cond_num.preconditioner import precondition, preconditioner
from immunojax.methods.cond_num.regularizers import r_ill, r_well, weight


def regression_loss(theta, omega, x, y):
  """The released code's pre-training loss ``||y - X theta omega||^2 / N``."""
  return jnp.mean((x @ theta @ omega - y) ** 2)


def logistic_loss(theta, omega, x, y):
  """Binary cross-entropy with logits ``X theta omega`` and 0/1 labels."""
  z = x @ theta @ omega
  return jnp.mean(jnp.logaddexp(0.0, z) - y * z)


TASK_LOSSES = {"mse": regression_loss, "bce": logistic_loss}


class LinearProblem(NamedTuple):
  """Full-data Grams, their preconditioners and the harmful set."""
  k_p: jax.Array
  k_h: jax.Array
  p_p: jax.Array
  p_h: jax.Array
  x_h: jax.Array
  y_h: jax.Array | None


def linear_problem(x_p, x_h, y_h=None, *, preconditioner_kind: str = "pinv",
                   ridge: float = 1.0) -> LinearProblem:
  """Precomputes ``K_P = X_P^T X_P``, ``K_H`` and their preconditioners
  (:func:`~immunojax.methods.cond_num.preconditioner.preconditioner`).
  ``vmap``-able over stacked tasks."""
  k_p, k_h = spectral.gram(x_p), spectral.gram(x_h)
  kw = dict(kind=preconditioner_kind, ridge=ridge)
  return LinearProblem(k_p, k_h, preconditioner(k_p, **kw),
                       preconditioner(k_h, **kw), x_h, y_h)


def init_params(dim: int, hidden: int | None = None, dtype=None) -> dict:
  """``theta_0 = I`` (the identity extractor) and a zero head."""
  hidden = dim if hidden is None else hidden
  return {"theta": jnp.eye(dim, hidden, dtype=dtype),
          "omega": jnp.zeros((hidden, 1), dtype)}


Terms = dict[str, Callable]   # "h" / "p" -> theta -> (direction, metrics)


def _immunizer(terms: Terms, weights: dict, problem: LinearProblem, *,
               optimizer, task_loss: str, normalize: bool, estimator,
               track_kappa: bool, axis_name: str | None) -> Immunizer:
  """The shared step: task gradient plus ``sum_j weight_j(term_j(theta))``."""
  _checks.check_choice(task_loss, TASK_LOSSES, "task_loss")
  loss_fn = TASK_LOSSES[task_loss]
  est = spectral.estimator(estimator)
  scale = {j: weight(weights[j], normalize) for j in terms}

  def direction(params, batch, key):
    del key
    theta, omega = params["theta"], params["omega"]
    x, y = batch
    loss, (g_theta, g_omega) = jax.value_and_grad(loss_fn, (0, 1))(
        theta, omega, x, y[:, None])
    metrics = {"task_loss": loss}
    for j, term in terms.items():
      d, m = term(theta)
      g_theta = g_theta + scale[j](d)
      metrics.update(m)
    if track_kappa:
      metrics.update(
          log_kappa_p=spectral.log_condition_number(
              theta.T @ problem.k_p @ theta, estimator=est),
          log_kappa_h=spectral.log_condition_number(
              theta.T @ problem.k_h @ theta, estimator=est))
    return {"theta": g_theta, "omega": g_omega}, metrics

  return descend(direction, optimizer, axis_name=axis_name)


def _r_ill_term(problem, side, est):
  def term(theta):
    g = jax.grad(lambda t: r_ill(t.T @ problem.k_h @ t, estimator=est))(theta)
    return precondition(g, problem.p_h, side=side), {}
  return term


def _r_well_term(problem, side):
  def term(theta):
    g = jax.grad(lambda t: r_well(t.T @ problem.k_p @ t))(theta)
    return precondition(g, problem.p_p, side=side), {}
  return term


def _opt_kappa_terms(problem, est) -> Terms:
  log_kappa = lambda s: spectral.log_condition_number(s, estimator=est)
  return {
      "h": lambda theta: (jax.grad(
          lambda t: 1.0 / log_kappa(t.T @ problem.k_h @ t))(theta), {}),
      "p": lambda theta: (jax.grad(
          lambda t: log_kappa(t.T @ problem.k_p @ t))(theta), {})}


def _probe_ascent_terms(problem, inner_steps, inner_lr) -> Terms:
  if problem.y_h is None:
    raise ValueError("probe_ascent needs the harmful labels: build the "
                     "problem with linear_problem(x_p, x_h, y_h)")
  inner_steps = _checks.check_positive_int(inner_steps, "inner_steps")

  def harmful_after_probe(theta):
    feats = problem.x_h @ theta
    w0 = jnp.zeros((theta.shape[1], 1), theta.dtype)
    probe = lambda w, _: 0.5 * jnp.mean((feats @ w - problem.y_h[:, None]) ** 2)
    res = _finetune.finetune(w0, probe, optax.sgd(inner_lr),
                             jnp.zeros((inner_steps, 1)), check_finite=False)
    return res.metrics["loss"][-1]

  def term(theta):   # ascend the harmful loss: the descent direction is -grad
    value, g = jax.value_and_grad(harmful_after_probe)(theta)
    return -g, {"harmful_loss_after_probe": value}

  return {"h": term}


def method_terms(name: str, problem: LinearProblem, *,
                 precondition_side: str = "left",
                 estimator: spectral.EstimatorLike = "pinv",
                 inner_steps: int = 20, inner_lr: float = 0.1) -> Terms:
  """The regularizer terms of method ``name``, unweighted.

  Returns:
    ``{"h": term, "p": term}`` (only ``"h"`` for ``r_ill_only`` and
    ``probe_ascent``), each ``term(theta) -> (direction, metrics)``: the
    descent direction for ``theta`` (preconditioned where the method is),
    before the weight ``lambda_h`` / ``lambda_p`` and normalization.
  """
  _checks.check_choice(name, METHODS, "method")
  _checks.check_choice(precondition_side, ("left", "right"),
                       "precondition_side")
  est = spectral.estimator(estimator)
  if name == "cond_num":
    return {"h": _r_ill_term(problem, precondition_side, est),
            "p": _r_well_term(problem, precondition_side)}
  if name == "r_ill_only":
    return {"h": _r_ill_term(problem, precondition_side, est)}
  if name == "opt_kappa":
    return _opt_kappa_terms(problem, est)
  return _probe_ascent_terms(problem, inner_steps, inner_lr)


def balanced_lambdas(name: str, problem: LinearProblem, params: dict, batch,
                     *, task_loss: str = "mse", ratio: float = 1.0,
                     **term_options) -> dict:
  """The paper's rule for un-normalized directions (``normalize=False``):
  weights under which each regularizer gradient has the task gradient's norm
  at ``params`` (``t = 0``), times ``ratio`` for the pre-training term.

  "We choose lambda_P and lambda_H by balancing the gradient norm" [P §5.1]:
  the paper sets them by hand; this computes them. The task gradient is over
  ``theta`` and ``omega`` together (at a zero head its ``theta`` part is 0).

  Args:
    name, problem, term_options: as :func:`method_terms`.
    params: ``{"theta", "omega"}`` where the norms are matched.
    batch: ``(x, y)`` of D_P for the task gradient (the full training set
      makes the rule deterministic).
    task_loss: ``"mse"`` or ``"bce"``.
    ratio: ``lambda_P / lambda_H`` relative to the balanced pair.

  Returns:
    ``{"lambda_h": ..., "lambda_p": ...}`` (``lambda_p`` only for methods
    with a pre-training term); ``vmap``-able.
  """
  _checks.check_choice(task_loss, TASK_LOSSES, "task_loss")
  x, y = batch
  g = jax.grad(TASK_LOSSES[task_loss], (0, 1))(params["theta"],
                                               params["omega"], x, y[:, None])
  task_norm = optax.tree.norm(g)
  out = {}
  for j, term in method_terms(name, problem, **term_options).items():
    norm = optax.tree.norm(term(params["theta"])[0])
    lam = task_norm / jnp.maximum(norm, jnp.finfo(norm.dtype).tiny)
    out[f"lambda_{j}"] = lam * (ratio if j == "p" else 1.0)
  return out


def cond_num(problem: LinearProblem, *, lambda_p: float, lambda_h: float,
           optimizer: optax.GradientTransformation, task_loss: str = "mse",
           normalize: bool = True, precondition_side: str = "left",
           estimator: spectral.EstimatorLike = "pinv",
           track_kappa: bool = True, axis_name: str | None = None
           ) -> Immunizer:
  """Condition-number immunization (Algorithm 1): ``R_ill`` on ``H_H`` and
  ``R_well`` on ``H_P``, each gradient preconditioned by ``K^+``.

  Args:
    problem: :func:`linear_problem`.
    lambda_p, lambda_h: regularizer weights (step lengths when
      ``normalize``; see :func:`balanced_lambdas` for the paper's rule);
      may be traced, so a ``vmap`` can sweep them.
    optimizer: ``optax.sgd(eta)`` is Algorithm 1's update.
    task_loss: ``"mse"`` (regression) or ``"bce"`` (0/1 labels).
    normalize: unit-norm regularizer directions before weighting (ours).
    precondition_side: ``"left"`` (Alg. 1) or ``"right"`` (released code).
    estimator: ``kappa`` estimator inside ``R_ill`` and the logged ``kappa``.
    track_kappa: log ``log kappa`` of ``H_P`` and ``H_H`` every step (two
      more eigendecompositions).
    axis_name: average the update over this named device axis.
  """
  terms = method_terms("cond_num", problem,
                       precondition_side=precondition_side,
                       estimator=estimator)
  return _immunizer(terms, {"h": lambda_h, "p": lambda_p}, problem,
                    optimizer=optimizer, task_loss=task_loss,
                    normalize=normalize, estimator=estimator,
                    track_kappa=track_kappa, axis_name=axis_name)


def r_ill_only(problem: LinearProblem, *, lambda_h: float,
               optimizer: optax.GradientTransformation, task_loss: str = "mse",
               normalize: bool = True, precondition_side: str = "left",
               estimator: spectral.EstimatorLike = "pinv",
               track_kappa: bool = True, axis_name: str | None = None
               ) -> Immunizer:
  """Baseline: Algorithm 1 with the ``R_ill`` term only (no ``R_well``).
  Arguments as :func:`cond_num`."""
  terms = method_terms("r_ill_only", problem,
                       precondition_side=precondition_side,
                       estimator=estimator)
  return _immunizer(terms, {"h": lambda_h}, problem, optimizer=optimizer,
                    task_loss=task_loss, normalize=normalize,
                    estimator=estimator, track_kappa=track_kappa,
                    axis_name=axis_name)


def opt_kappa(problem: LinearProblem, *, lambda_p: float, lambda_h: float,
              optimizer: optax.GradientTransformation, task_loss: str = "mse",
              normalize: bool = True,
              estimator: spectral.EstimatorLike = "pinv",
              track_kappa: bool = True, axis_name: str | None = None
              ) -> Immunizer:
  """Baseline: descend ``lambda_P log kappa(H_P) + lambda_H / log
  kappa(H_H)`` directly, unpreconditioned (the released code's unwired
  ``kappa_loss``). Arguments as :func:`cond_num`."""
  terms = method_terms("opt_kappa", problem, estimator=estimator)
  return _immunizer(terms, {"h": lambda_h, "p": lambda_p}, problem,
                    optimizer=optimizer, task_loss=task_loss,
                    normalize=normalize, estimator=estimator,
                    track_kappa=track_kappa, axis_name=axis_name)


def probe_ascent(problem: LinearProblem, *, lambda_h: float,
                 optimizer: optax.GradientTransformation,
                 inner_steps: int = 20, inner_lr: float = 0.1,
                 task_loss: str = "mse", normalize: bool = True,
                 estimator: spectral.EstimatorLike = "pinv",
                 track_kappa: bool = True, axis_name: str | None = None
                 ) -> Immunizer:
  """Baseline (bilevel): ascend the harmful probe's loss after
  ``inner_steps`` of gradient descent (rate ``inner_lr``) on a fresh zero
  head, differentiated through :func:`immunojax.finetune.finetune`.

  The condition-number paper's "IMMA" baseline as we adapt it to linear
  probing (its appendix is not available); named so it cannot be confused
  with the IMMA method. Needs ``problem.y_h``. Other arguments as
  :func:`cond_num`; metrics add ``harmful_loss_after_probe``.
  """
  terms = method_terms("probe_ascent", problem, inner_steps=inner_steps,
                       inner_lr=inner_lr)
  return _immunizer(terms, {"h": lambda_h}, problem, optimizer=optimizer,
                    task_loss=task_loss, normalize=normalize,
                    estimator=estimator, track_kappa=track_kappa,
                    axis_name=axis_name)


METHODS: dict[str, Callable[..., Immunizer]] = {
    "cond_num": cond_num, "r_ill_only": r_ill_only, "opt_kappa": opt_kappa,
    "probe_ascent": probe_ascent}


def by_name(name: str, problem: LinearProblem, **options) -> Immunizer:
  """The linear method ``name`` (a key of :data:`METHODS`) with the subset of
  ``options`` its factory takes (``r_ill_only`` has no ``lambda_p``; only
  ``probe_ascent`` takes ``inner_steps``)."""
  return _registry.by_name(METHODS, name, problem, **options)
