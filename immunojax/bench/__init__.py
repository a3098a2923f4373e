"""The cross-defense table as pure functions (no I/O).

* :mod:`~immunojax.bench.metrics`: validation-selected worst cases, rho /
  sigma / nra, censored steps to a threshold, attacker effort, paired
  bootstrap intervals, the verdict.
* :mod:`~immunojax.bench.table`: a start point's curves
  (:class:`StartCurves`), the references (U, N, S) and one registry of
  aggregations, applied to every start point.
* :mod:`~immunojax.bench.curves`: a start point's harness curves as the
  table's input, and the validation-selected attack confirmed on fresh
  seeds.
* :mod:`~immunojax.bench.defenses`: every defense family on one classifier
  (:class:`ClassifierProblem`), a registry of builders with a claim and a
  knob each.

``experiments.cross_defense`` runs it on sklearn digits.
"""

from immunojax.bench import curves, defenses, metrics, table
from immunojax.bench.defenses import (DEFENSES, ClassifierProblem, Defense,
                                      Stage)
from immunojax.bench.table import (AGGREGATES, Confirmed, References,
                                   StartCurves, aggregate)

__all__ = ["AGGREGATES", "ClassifierProblem", "Confirmed", "DEFENSES",
           "Defense", "References", "Stage", "StartCurves", "aggregate",
           "curves", "defenses", "metrics", "table"]
