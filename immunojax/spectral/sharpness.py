"""The top Hessian eigenvalue as a differentiable function of the model.

``lambda_max(theta)`` of ``H(theta) = hess loss(theta)`` is what sharpness- and
kappa-regularised training differentiates. Reverse mode through Lanczos would
store every iteration; instead the VJP uses the eigenvector (Hellmann-Feynman):
for a simple top eigenvalue with unit eigenvector ``v``,
``d lambda = v^T dH v``, so the cotangent of ``theta`` (and of the data) is
``g * grad_theta (v^T H(theta) v)`` -- one reverse pass through one
Hessian-vector product, whatever the number of Lanczos steps.
"""

from __future__ import annotations

from typing import Callable

import jax

from immunojax.spectral.eigensolver import top_eigenvalues
from immunojax.spectral.operators import hessian_matvec, tree_vdot


def top_hessian_eigenvalue(loss_fn: Callable[..., jax.Array], *,
                           tol: float = 1e-8, max_steps: int = 200,
                           **options) -> Callable[..., jax.Array]:
  """Configure a differentiable ``lambda_max`` of ``loss_fn``'s Hessian.

  Args:
    loss_fn: scalar ``loss_fn(params, *args)``.
    tol: relative residual of the eigenpair (``criterion="vector"`` of
      :func:`immunojax.spectral.eigenpairs`): the eigenvector's angle error is
      at most ``tol * lambda / gap``, and the gradient's relative error is of
      that order.
    max_steps: Lanczos cap.
    **options: passed to :func:`immunojax.spectral.top_eigenvalues`
      (``basis_size``, ``basis_dtype``, ...).

  Returns:
    ``fn(v0, params, *args) -> lambda_max``: ``v0`` a start vector shaped
    like ``params`` (e.g. :func:`immunojax.spectral.random_vector`; its
    cotangent is zero). Reverse-mode differentiable in ``params`` and
    ``args`` (custom VJP); no forward mode. The VJP assumes the top eigenvalue
    is simple: at a multiple eigenvalue ``lambda_max`` is not differentiable
    and the result is one of its directional derivatives.
  """
  matvec = hessian_matvec(loss_fn)

  def solve(v0, params, *args):
    return top_eigenvalues(matvec, v0, params, *args, k=1, tol=tol,
                           max_steps=max_steps, criterion="vector", **options)

  @jax.custom_vjp
  def fn(v0, params, *args):
    return solve(v0, params, *args).values[0]

  def fwd(v0, params, *args):
    pairs = solve(v0, params, *args)
    v = jax.tree_util.tree_map(lambda x: x[0], pairs.vectors)
    return pairs.values[0], (v, v0, params, args)

  def bwd(saved, g):
    v, v0, params, args = saved
    v = jax.tree_util.tree_map(lambda x, p: x.astype(p.dtype), v, params)

    def quadratic(params, *args):
      return tree_vdot(v, matvec(v, params, *args))

    # vjp, not grad: integer arguments (labels) get float0 cotangents.
    _, pullback = jax.vjp(quadratic, params, *args)
    grads = pullback(g)
    return (jax.tree_util.tree_map(lambda x: x * 0, v0), *grads)

  fn.defvjp(fwd, bwd)
  return fn
