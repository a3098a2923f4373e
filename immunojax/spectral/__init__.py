"""Spectral core: exact and matrix-free Hessian spectra, condition numbers.

Precision: every function computes in the dtype of its inputs and never flips
``jax_enable_x64``. Spectra of ill-conditioned matrices need float64; enable it
in your own program (``jax.config.update("jax_enable_x64", True)``) or scope it
(``with jax.enable_x64(True): ...``) and pass float64 arrays. Our experiments
and benchmarks enable it for themselves and keep networks in float32.
"""

from immunojax.spectral.condition import (ESTIMATORS, Estimator, Extremes,
                                          condition_number, estimator,
                                          log_condition_number, nonzero,
                                          numerical_rank, official, pinv,
                                          rank_rtol, spectrum_extremes)
from immunojax.spectral.dense import eigenvalues, eigh
from immunojax.spectral.eigensolver import (ConditionNumberBounds, Eigenpairs,
                                            bottom_eigenvalues,
                                            condition_number_bounds,
                                            eigenpairs, top_eigenvalues)
from immunojax.spectral.hessian import hessian_matrix, hvp, num_params
from immunojax.spectral.hutchinson import hutchinson_trace
from immunojax.spectral.operators import (hessian_matvec, random_vector,
                                          tree_vdot)
from immunojax.spectral.lanczos import (LanczosResult, extreme_eigenvalues,
                                        lanczos)
from immunojax.spectral.power import PowerIterationResult, power_iteration
from immunojax.spectral.probe import (gram, gram_eigenvalues, mse_probe_hessian,
                                      mse_probe_loss, softmax_probe_hessian,
                                      softmax_probe_loss)
from immunojax.spectral.sharpness import top_hessian_eigenvalue
from immunojax.spectral.slq import (SpectralQuadrature, quadrature_trace,
                                    spectral_density,
                                    stochastic_lanczos_quadrature)

__all__ = [
    "ConditionNumberBounds", "Eigenpairs", "bottom_eigenvalues",
    "condition_number_bounds", "eigenpairs", "hessian_matvec",
    "random_vector", "top_eigenvalues", "top_hessian_eigenvalue", "tree_vdot",
    "ESTIMATORS", "Estimator", "Extremes", "LanczosResult",
    "PowerIterationResult", "SpectralQuadrature", "condition_number",
    "eigenvalues", "eigh", "estimator", "extreme_eigenvalues", "gram",
    "gram_eigenvalues", "hessian_matrix", "hutchinson_trace", "hvp", "lanczos",
    "log_condition_number", "mse_probe_hessian", "mse_probe_loss", "nonzero",
    "num_params", "numerical_rank", "official", "pinv", "power_iteration",
    "quadrature_trace", "rank_rtol", "softmax_probe_hessian",
    "softmax_probe_loss", "spectral_density", "spectrum_extremes",
    "stochastic_lanczos_quadrature",
]
