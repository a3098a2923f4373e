"""Condition-number immunization (Zheng, Bai, Bullins, Yeh, ICML 2025).

Make linear probing on a harmful task slow by raising the condition number
of its probe Hessian ``H_H(theta) = theta^T K_H theta``, while lowering that
of the pre-training task, ``H_P``. Spec: ``shared/specs/cond_num.md``.

Differences from the released code, each deliberate (spec §6.1):
  * ``kappa``, ``sigma_min`` and ``k`` are rank-aware (``"pinv"``); the code's
    estimator is available as ``estimator="official"``.
  * ``R_ill`` uses ``k = rank(S)`` and ``R_well`` ``p = dim(S)``, not the raw
    input's last axis.
  * ``K^-1`` preconditions on Algorithm 1's side, ``K^+ grad``;
    ``precondition_side="right"`` reproduces the code's ``grad K^-1``.
  * Linear extractors have no bias (the paper's setting).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from immunojax import _checks, finetune as _finetune, spectral

METHODS = ("ours", "r_ill_only", "opt_kappa", "imma")
PRECONDITIONERS = ("pinv", "ridge", "none")


# ---------------------------------------------------------------- regularizers
def frobenius_sq(s: jax.Array) -> jax.Array:
  return jnp.sum(s * s)


def r_well(s: jax.Array, *, p: int | None = None) -> jax.Array:
  """``R_well(S) = sigma_max^2 / 2 - ||S||_F^2 / (2p)`` (Nenov et al.).

  Non-negative, an upper bound on ``log kappa``; gradient descent on it lowers
  ``kappa``. ``p`` defaults to the dimension of ``S`` (pass ``D`` when ``S``
  is the small ``N x N`` Gram of ``N x D`` features).
  """
  p = s.shape[0] if p is None else p
  top = jnp.max(jnp.abs(spectral.eigenvalues(s)))
  return 0.5 * top ** 2 - frobenius_sq(s) / (2 * p)


def r_ill(s: jax.Array, *, rank=None, estimator: str = "pinv",
          rtol: float | None = None) -> jax.Array:
  """``R_ill(S) = 1 / (||S||_F^2 / (2k) - sigma_min^2 / 2)`` (paper Eq. 12).

  ``k`` = numerical rank and ``sigma_min`` the smallest non-zero singular
  value (rank-aware), unless ``rank`` or ``estimator="official"`` say
  otherwise. Gradient descent on it raises ``kappa`` (Thm 4.1).
  """
  e = spectral.spectrum_extremes(s, estimator=estimator, rtol=rtol)
  k = jax.lax.stop_gradient(e.rank) if rank is None else rank
  return 1.0 / (frobenius_sq(s) / (2 * k) - 0.5 * e.sigma_min ** 2)


def feature_gram(features: jax.Array) -> tuple[jax.Array, int]:
  """The cheaper of ``F^T F`` / ``F F^T`` (same non-zero spectrum) and ``D``."""
  return spectral.gram(features, small=True), features.shape[1]


def r_well_features(features: jax.Array) -> jax.Array:
  """``R_well(F^T F)`` computed on the smaller Gram."""
  s, d = feature_gram(features)
  return r_well(s, p=d)


def r_ill_features(features: jax.Array, **kwargs) -> jax.Array:
  """``R_ill(F^T F)`` computed on the smaller Gram."""
  return r_ill(feature_gram(features)[0], **kwargs)


def r_well_grad_theta(theta: jax.Array, k_mat: jax.Array) -> jax.Array:
  """Thm 4.2: ``grad_theta R_well(theta^T K theta)`` in closed form."""
  h = theta.T @ k_mat @ theta
  w, v = jnp.linalg.eigh(h)
  top = v[:, -1]
  return 2 * k_mat @ theta @ (w[-1] * jnp.outer(top, top) - h / h.shape[0])


def r_ill_grad_theta(theta: jax.Array, k_mat: jax.Array, *,
                     rtol: float | None = None) -> jax.Array:
  """Thm 4.2: ``grad_theta R_ill(theta^T K theta)`` in closed form."""
  h = theta.T @ k_mat @ theta
  w, v = jnp.linalg.eigh(h)
  rtol = h.shape[0] * jnp.finfo(h.dtype).eps if rtol is None else rtol
  keep = w > rtol * w[-1]
  k = jnp.sum(keep)
  i = jnp.argmin(jnp.where(keep, w, jnp.inf))
  vk = v[:, i]
  g = frobenius_sq(h) / (2 * k) - 0.5 * w[i] ** 2
  return 2 * k_mat @ theta @ (w[i] * jnp.outer(vk, vk) - h / k) / g ** 2


# --------------------------------------------------------------- preconditioner
def preconditioner(k_mat: jax.Array, *, kind: str = "pinv",
                   ridge: float = 1.0) -> jax.Array:
  """The matrix ``P`` standing for ``K^-1`` in Algorithm 1.

  ``"pinv"``: the Moore-Penrose inverse (rank-aware; ``K`` is singular on the
  house-price data and on any batch with ``N < D``); ``"ridge"``:
  ``(K + ridge I)^-1`` (the released code's choice); ``"none"``: ``I``.
  """
  _checks.check_choice(kind, PRECONDITIONERS, "preconditioner")
  _checks.check_symmetric(k_mat, "K")
  _checks.check_finite(k_mat, "K")
  d = k_mat.shape[0]
  if kind == "none":
    return jnp.eye(d, dtype=k_mat.dtype)
  if kind == "ridge":
    if ridge <= 0:
      raise ValueError(f"ridge must be > 0, got {ridge}")
    return jnp.linalg.inv(k_mat + ridge * jnp.eye(d, dtype=k_mat.dtype))
  w, v = jnp.linalg.eigh(k_mat)
  keep = w > d * jnp.finfo(k_mat.dtype).eps * jnp.max(jnp.abs(w))
  return (v * jnp.where(keep, 1.0 / jnp.where(keep, w, 1.0), 0.0)) @ v.T


def precondition(grad_theta: jax.Array, p_mat: jax.Array, *,
                 side: str = "left") -> jax.Array:
  """``P grad`` (Algorithm 1) or ``grad P`` (the released code, spec §2.8)."""
  _checks.check_choice(side, ("left", "right"), "precondition_side")
  return p_mat @ grad_theta if side == "left" else grad_theta @ p_mat


# ------------------------------------------------------------- linear training
class LinearConfig(NamedTuple):
  """Hyper-parameters of linear-extractor immunization (all methods).

  Attributes:
    method: ``ours`` (R_well + R_ill, preconditioned, Alg. 1),
      ``r_ill_only`` (Alg. 1 with ``lambda_p = 0``), ``opt_kappa`` (gradient
      descent on ``log kappa(H_P) + 1 / log kappa(H_H)``, as the released
      code's unwired ``kappa_loss``), ``imma`` (bilevel: maximise the harmful
      probe's loss after ``inner_steps`` of gradient descent; our adaptation,
      the paper's is in an appendix we do not have).
    learning_rate: ``eta``.
    lambda_p, lambda_h: regularizer weights.
    normalize: scale each regularizer direction to unit Frobenius norm
      before weighting (ours: the paper balances gradient norms by hand;
      this makes ``lambda`` a step length, stable across data scales).
    preconditioner, ridge, precondition_side: see :func:`preconditioner`.
    estimator: ``kappa`` estimator inside the regularizers.
    inner_steps, inner_lr: IMMA's simulated probe.
    task_loss: ``"mse"`` (regression, house price) or ``"bce"`` (binary
      logistic loss on 0/1 labels, the code's MNIST loss).
    track_kappa: also return ``log kappa`` of ``H_P`` and ``H_H`` each step
      (two more eigendecompositions; logging only).
  """
  method: str = "ours"
  learning_rate: float = 0.005
  lambda_p: float = 1.0
  lambda_h: float = 1.0
  normalize: bool = True
  preconditioner: str = "pinv"
  ridge: float = 1.0
  precondition_side: str = "left"
  estimator: str = "pinv"
  inner_steps: int = 20
  inner_lr: float = 0.1
  task_loss: str = "mse"
  track_kappa: bool = True


def _unit(g):
  return g / jnp.maximum(jnp.linalg.norm(g), jnp.finfo(g.dtype).tiny)


def regression_loss(theta, omega, x, y):
  """The released code's pre-training loss ``||y - X theta omega||^2 / N``."""
  return jnp.mean((x @ theta @ omega - y) ** 2)


def logistic_loss(theta, omega, x, y):
  """Binary cross-entropy with logits ``X theta omega`` and 0/1 labels."""
  z = x @ theta @ omega
  return jnp.mean(jnp.logaddexp(0.0, z) - y * z)


TASK_LOSSES = {"mse": regression_loss, "bce": logistic_loss}


class LinearData(NamedTuple):
  """Full-data Grams, their preconditioners and the IMMA harmful set."""
  k_p: jax.Array
  k_h: jax.Array
  p_p: jax.Array
  p_h: jax.Array
  x_h: jax.Array
  y_h: jax.Array


def linear_data(x_p, x_h, y_h, config: LinearConfig) -> LinearData:
  """Precomputes ``K_P = X_P^T X_P``, ``K_H`` and their preconditioners."""
  _checks.check_choice(config.method, METHODS, "method")
  _checks.check_choice(config.task_loss, TASK_LOSSES, "task_loss")
  k_p, k_h = spectral.gram(x_p), spectral.gram(x_h)
  kw = dict(kind=config.preconditioner, ridge=config.ridge)
  return LinearData(k_p, k_h, preconditioner(k_p, **kw),
                    preconditioner(k_h, **kw), x_h, y_h)


def regularizer_direction(theta: jax.Array, data: LinearData,
                          config: LinearConfig) -> tuple[jax.Array, dict]:
  """The (preconditioned, weighted) regularizer part of the theta update."""
  side = config.precondition_side
  est = config.estimator
  h_p = lambda t: t.T @ data.k_p @ t
  h_h = lambda t: t.T @ data.k_h @ t
  metrics = {}
  if config.method in ("ours", "r_ill_only"):
    g_ill = jax.grad(lambda t: r_ill(h_h(t), estimator=est))(theta)
    d = config.lambda_h * _maybe_unit(precondition(g_ill, data.p_h, side=side),
                                      config)
    if config.method == "ours":
      g_well = jax.grad(lambda t: r_well(h_p(t)))(theta)
      d = d + config.lambda_p * _maybe_unit(
          precondition(g_well, data.p_p, side=side), config)
  elif config.method == "opt_kappa":
    g_p = jax.grad(lambda t: spectral.log_condition_number(
        h_p(t), estimator=est))(theta)
    g_h = jax.grad(lambda t: 1.0 / spectral.log_condition_number(
        h_h(t), estimator=est))(theta)
    d = (config.lambda_p * _maybe_unit(g_p, config)
         + config.lambda_h * _maybe_unit(g_h, config))
  else:  # imma
    def harmful_after_probe(t):
      feats = data.x_h @ t
      w0 = jnp.zeros((t.shape[1], 1), t.dtype)
      probe = lambda w, _: 0.5 * jnp.mean((feats @ w - data.y_h[:, None]) ** 2)
      res = _finetune.finetune(w0, probe, optax.sgd(config.inner_lr),
                               jnp.zeros((config.inner_steps, 1)),
                               check_finite=False)
      return res.metrics["loss"][-1]
    value, g = jax.value_and_grad(harmful_after_probe)(theta)
    metrics["harmful_loss_after_probe"] = value
    d = -config.lambda_h * _maybe_unit(g, config)   # ascend the harmful loss
  return d, metrics


def _maybe_unit(g, config):
  return _unit(g) if config.normalize else g


def linear_step(state: dict, batch: tuple, data: LinearData,
                config: LinearConfig) -> tuple[dict, dict]:
  """One simultaneous update of ``(theta, omega)`` (Algorithm 1, line 4-6).

  Args:
    state: ``{"theta": (D, D_hid), "omega": (D_hid, 1)}``.
    batch: ``(x_p, y_p)`` pre-training batch for the task loss.

  Returns:
    New state and metrics (task loss, log-kappas of ``H_P``, ``H_H``).
  """
  theta, omega = state["theta"], state["omega"]
  x, y = batch
  loss, (g_theta, g_omega) = jax.value_and_grad(
      TASK_LOSSES[config.task_loss], (0, 1))(
      theta, omega, x, y[:, None])
  d_reg, metrics = regularizer_direction(theta, data, config)
  eta = config.learning_rate
  new = {"theta": theta - eta * (g_theta + d_reg),
         "omega": omega - eta * g_omega}
  metrics["task_loss"] = loss
  if config.track_kappa:
    metrics.update(log_kappa_p=spectral.log_condition_number(
        theta.T @ data.k_p @ theta), log_kappa_h=spectral.log_condition_number(
            theta.T @ data.k_h @ theta))
  return new, metrics


# -------------------------------------------------------------------- metrics
class RIR(NamedTuple):
  """Relative immunization ratio and its components (paper Eq. 15 / 17).

  ``kappa_ratio_harmful`` is (i) ``kappa(H_H(imm)) / kappa(H_H(ref))``
  (want >> 1), ``kappa_ratio_pretrain`` is (ii) for ``H_P`` (want <= 1),
  ``rir = (i) / (ii)``.
  """
  rir: jax.Array
  kappa_ratio_harmful: jax.Array
  kappa_ratio_pretrain: jax.Array


def _kappa_of_features(f, estimator):
  if estimator == "official":
    return spectral.condition_number(spectral.gram(f), estimator="official")
  return spectral.condition_number(spectral.gram_eigenvalues(f))


def relative_immunization_ratio(feats_p_imm, feats_h_imm, feats_p_ref,
                                feats_h_ref, *, estimator: str = "pinv") -> RIR:
  """RIR from feature matrices (``H = F^T F``) of immunized and reference
  extractors; the reference is the identity (raw inputs) for Eq. 15 and the
  initial extractor ``theta_0`` for Eq. 17."""
  _checks.check_choice(estimator, spectral.ESTIMATORS, "estimator")
  k = lambda f: _kappa_of_features(f, estimator)
  i = k(feats_h_imm) / k(feats_h_ref)
  ii = k(feats_p_imm) / k(feats_p_ref)
  return RIR(i / ii, i, ii)


def rir_over_groups(extract_imm, extract_ref, x_p, x_h, *, key: jax.Array,
                    num_groups: int = 20, group_size: int = 100,
                    estimator: str = "pinv") -> dict:
  """RIR_theta0 (Eq. 17) as the paper computes it: the mean (and std) of the
  per-group ratios over ``num_groups`` fixed, seeded groups of
  ``group_size`` samples, the same groups for both extractors (the released
  script compares an extractor with itself and always reports 1)."""
  n = min(x_p.shape[0], x_h.shape[0])
  if group_size > n:
    raise ValueError(f"group_size {group_size} exceeds the {n} samples")
  rows = []
  for g in range(num_groups):
    kp, kh = jax.random.split(jax.random.fold_in(key, g))
    ip = jax.random.choice(kp, x_p.shape[0], (group_size,), replace=False)
    ih = jax.random.choice(kh, x_h.shape[0], (group_size,), replace=False)
    r = relative_immunization_ratio(
        extract_imm(x_p[ip]), extract_imm(x_h[ih]), extract_ref(x_p[ip]),
        extract_ref(x_h[ih]), estimator=estimator)
    rows.append([float(v) for v in r])
  arr = jnp.asarray(rows)
  mean, std = arr.mean(0), arr.std(0)
  return {"rir": float(mean[0]), "rir_std": float(std[0]),
          "kappa_ratio_harmful": float(mean[1]),
          "kappa_ratio_pretrain": float(mean[2]),
          "num_groups": num_groups, "group_size": group_size,
          "estimator": estimator}


# ------------------------------------------------------------------ deep case
def deep_objective_grads(params, features_fn, task_loss_fn, batch_p, x_h, *,
                         method: str = "ours", lambda_p: float = 1.0,
                         lambda_h: float = 1.0, normalize: bool = True):
  """Gradient of ``L(D_P) + lambda_H R_ill(H~_H) + lambda_P R_well(H~_P)``
  for a non-linear extractor (paper Eq. 18: ``H~ = F(theta)^T F(theta)`` of
  pooled features). No ``K^-1`` preconditioning (the paper's theory is linear
  and the released code has none for deep nets).

  Args:
    params: model parameters (pytree).
    features_fn: ``features_fn(params, x) -> (N, D_hid)``.
    task_loss_fn: ``task_loss_fn(params, batch) -> scalar`` on D_P.
    batch_p: pre-training batch; its inputs ``batch_p[0]`` give ``H~_P``.
    x_h: harmful inputs (no labels needed).
    method: ``ours``, ``r_ill_only`` or ``opt_kappa``.
    normalize: scale each regularizer gradient to unit global norm (ours).

  Returns:
    ``(grads, metrics)``.
  """
  _checks.check_choice(method, ("ours", "r_ill_only", "opt_kappa"), "method")
  loss, g = jax.value_and_grad(task_loss_fn)(params, batch_p)
  f_p = lambda p: features_fn(p, batch_p[0])
  f_h = lambda p: features_fn(p, x_h)
  if method == "opt_kappa":
    kap = lambda f: spectral.log_condition_number(spectral.gram_eigenvalues(f))
    terms = {"p": (lambda p: kap(f_p(p)), lambda_p),
             "h": (lambda p: 1.0 / kap(f_h(p)), lambda_h)}
  else:
    terms = {"h": (lambda p: r_ill_features(f_h(p)), lambda_h)}
    if method == "ours":
      terms["p"] = (lambda p: r_well_features(f_p(p)), lambda_p)
  for fn, lam in terms.values():
    gr = jax.grad(fn)(params)
    if normalize:
      norm = optax.tree.norm(gr)
      gr = jax.tree_util.tree_map(
          lambda x: x / jnp.maximum(norm, jnp.finfo(x.dtype).tiny), gr)
    g = jax.tree_util.tree_map(lambda a, b: a + lam * b, g, gr)
  return g, {"task_loss": loss}
