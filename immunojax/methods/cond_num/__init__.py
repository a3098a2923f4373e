"""Condition-number immunization (Zheng, Bai, Bullins, Yeh, ICML 2025).

Make linear probing on a harmful task slow by raising the condition number of
its probe Hessian ``H_H(theta) = theta^T K_H theta``, while lowering that of
the pre-training task, ``H_P``. Spec: ``shared/specs/cond_num.md``.

  regularizers    ``R_well``, ``R_ill`` and Theorem 4.2's closed-form gradients
  preconditioner  Algorithm 1's ``K^-1``
  linear          the method and its baselines on a linear extractor
  deep            the method and its baselines on a deep extractor (Eq. 18)
  rir             the relative immunization ratio (Eq. 15 / 17), Def. 3.1

The method's name is ``cond_num``; its baselines are ``r_ill_only``,
``opt_kappa`` and (linear only) ``probe_ascent``.
"""

from immunojax.methods.cond_num import deep, linear
from immunojax.methods.cond_num.linear import (LinearProblem, init_params,
                                               linear_problem)
from immunojax.methods.cond_num.preconditioner import (PRECONDITIONERS,
                                                       precondition,
                                                       preconditioner)
from immunojax.methods.cond_num.regularizers import (
    feature_gram, frobenius_sq, r_ill, r_ill_features, r_ill_grad_theta,
    r_well, r_well_features, r_well_grad_theta)
from immunojax.methods.cond_num.rir import (RIR, relative_immunization_ratio,
                                            rir_over_groups, succeeds)

__all__ = [
    "LinearProblem", "PRECONDITIONERS", "RIR", "deep", "feature_gram",
    "frobenius_sq", "init_params", "linear", "linear_problem", "precondition",
    "preconditioner", "r_ill", "r_ill_features", "r_ill_grad_theta",
    "r_well", "r_well_features", "r_well_grad_theta",
    "relative_immunization_ratio", "rir_over_groups", "succeeds",
]
