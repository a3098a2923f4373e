"""A paper's claims and whether they hold here, computed from a run's own
numbers.

Every experiment's ``summary.json`` carries ``claims``: a list of
``{claim, verdict, reason, figure}`` with ``verdict`` one of
:data:`VERDICTS`. An experiment builds each entry with :func:`graded` from
named checks (each a bool, or ``None`` where the run did not measure it):
all checks pass -> *holds*; some -> *partly*; none -> *does not hold here*.
The reason names the checks that failed (or that all passed), and
``figure`` is the number the verdict mainly rests on, as text. The
thresholds behind the checks live in the experiment beside the claim.
"""

from __future__ import annotations

from typing import Mapping

HOLDS, PARTLY, NOT_HERE = "holds", "partly", "does not hold here"
VERDICTS = (HOLDS, PARTLY, NOT_HERE)
UNMEASURED = "not measured"

# Condition-number papers' "RIR ≫ 1", read as an order of magnitude.
RIR_FAR_ABOVE_ONE = 10.0


def claim(text: str, verdict: str, reason: str, figure: str) -> dict:
  """One claim entry.

  Raises:
    ValueError: ``verdict`` is not one of :data:`VERDICTS` (or
      :data:`UNMEASURED`), or ``text`` is empty.
  """
  if verdict not in VERDICTS + (UNMEASURED,):
    raise ValueError(f"verdict {verdict!r} is not one of {VERDICTS}")
  if not text:
    raise ValueError("a claim needs its text")
  return {"claim": text, "verdict": verdict, "reason": reason,
          "figure": figure}


def graded(text: str, checks: Mapping[str, bool | None], *,
           figure: str,
           requires: Mapping[str, bool | None] | None = None) -> dict:
  """A claim whose verdict grades named checks.

  Args:
    text: the paper's claim, one line.
    checks: ``{description: passed}``; ``None`` marks a check the run did
      not measure (it counts for neither side).
    figure: the figure the verdict rests on, as text.
    requires: ``{description: met}``: what must hold for the claim to be
      testable here (e.g. the references differ). One that fails makes the
      verdict *does not hold here* with it as the reason; met ones do not
      count as evidence for the claim.

  Returns:
    :func:`claim`'s entry: *holds* when every measured check passed,
    *does not hold here* when none did, else *partly*; ``not measured``
    when no check was measured. The reason lists the failed checks (or
    says all passed).
  """
  unmet = [k for k, v in (requires or {}).items() if v is False]
  if unmet:
    return claim(text, NOT_HERE, "untestable here, not: " + "; ".join(unmet),
                 figure)
  measured = {k: bool(v) for k, v in checks.items() if v is not None}
  if not measured:
    return claim(text, UNMEASURED, "no check measured in this run", figure)
  failed = [k for k, v in measured.items() if not v]
  passed = [k for k, v in measured.items() if v]
  if not failed:
    verdict, reason = HOLDS, "; ".join(passed)
  elif not passed:
    verdict, reason = NOT_HERE, "not: " + "; ".join(failed)
  else:
    verdict, reason = PARTLY, ("yes: " + "; ".join(passed) + " — not: "
                               + "; ".join(failed))
  return claim(text, verdict, reason, figure)


def check(claims) -> list[dict]:
  """``claims`` validated (a list of :func:`claim` entries).

  Raises:
    ValueError: not a list, or an entry without the four keys or with an
      unknown verdict.
  """
  if not isinstance(claims, list):
    raise ValueError(f"claims must be a list, got {type(claims).__name__}")
  out = []
  for c in claims:
    if not isinstance(c, dict) or set(c) != {"claim", "verdict", "reason",
                                             "figure"}:
      raise ValueError(f"a claim is {{claim, verdict, reason, figure}}, "
                       f"got {c!r}")
    out.append(claim(c["claim"], c["verdict"], c["reason"], c["figure"]))
  return out


def relation(a: dict, b: dict, *, sd: float = 2.0) -> str | None:
  """``"below"``, ``"above"`` or ``"no difference"``: how the mean of
  ``a`` stands to ``b``'s by the 2-sd rule (:func:`eval.curves.differs`:
  the larger sd of the two); None when either has no mean."""
  from immunojax.eval.curves import differs  # noqa: PLC0415
  d = differs(a, b, sd=sd)
  if d is None:
    return None
  if not d:
    return "no difference"
  return "below" if float(a["mean"]) < float(b["mean"]) else "above"


def mean_sd(x: dict | None) -> str:
  """A :func:`eval.curves.mean_std` scalar as ``mean ± sd``."""
  if not x or x.get("mean") is None:
    return "—"
  return f"{num(x['mean'])} ± {num(x.get('std') or 0.0, 2)}"


def num(x, digits: int = 3) -> str:
  """``x`` to ``digits`` significant digits for a claim's figure ("—" for
  None or a non-finite value)."""
  if x is None:
    return "—"
  x = float(x)
  return f"{x:.{digits}g}" if x == x and abs(x) != float("inf") else "—"
