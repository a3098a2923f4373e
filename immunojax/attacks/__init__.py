"""Attacks on a protected model: the grid harness and closed-form probes."""

from immunojax.attacks.closed_form import (LineSearchCurve,
                                           exact_line_search_gd,
                                           least_squares_probe)
from immunojax.attacks.harness import (MODES, Attack, AttackCurves, Target,
                                       grid, run_attacks, summarize)
from immunojax.optimizers import (OPTIMIZERS, Optimizer, make_optimizer,
                                  optimizer)

__all__ = ["Attack", "AttackCurves", "LineSearchCurve", "MODES", "OPTIMIZERS",
           "Optimizer", "Target", "exact_line_search_gd", "grid", "least_squares_probe",
           "make_optimizer", "optimizer", "run_attacks", "summarize"]
