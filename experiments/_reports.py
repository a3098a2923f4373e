"""A run's report.md: the figures beside the paper's (or the smoke-size
banner), tables, claims, targets, notes and plots; the value format every
report shares."""

from __future__ import annotations

from pathlib import Path


def fmt(v) -> str:
  if v is None:
    return "—"
  if isinstance(v, float):
    return f"{v:.4g}"
  return str(v)


SMOKE_BANNER = ("**Smoke size (`--quick`): the pipeline runs, the numbers "
                "mean nothing.** No paper figure stands beside them; run the "
                "full size for figures to compare.")


def target_word(v) -> str:
  """A target's verdict: met, MISSED, or n/a (None: nothing to judge)."""
  return "n/a" if v is None else "met" if v else "MISSED"


def print_targets(run, targets: dict) -> None:
  for k, v in targets.items():
    run.print(f"  target {k}: {target_word(v)}")


def claim_line(c: dict, *, quick: bool = False) -> str:
  """One claim as a markdown bullet: the verdict first, then the claim,
  the reason and the figure (a smoke-size verdict says so)."""
  tag = " (smoke size)" if quick else ""
  return (f"- **{c['verdict']}**{tag}: {c['claim']} — {c['reason']} "
          f"({c['figure']})")


def run_report(summary: dict, out: Path) -> str:
  lines = [f"# {summary['experiment']}", ""]
  preamble = summary.get("preamble")
  if isinstance(preamble, list) and preamble:   # what is measured, what is good
    lines += [f"> {line}  " for line in preamble] + [""]
  lines += [f"seed {summary.get('seed')}, quick={summary.get('quick')}, "
            f"wall {summary['wall_seconds']:.1f} s", ""]
  if summary.get("quick"):      # smoke size: no paper figure beside it
    lines += [SMOKE_BANNER, "", "| figure | ours (smoke) | note |",
              "|---|---|---|"]
    lines += [f"| {f['name']} | {fmt(f['ours'])} | {f.get('note', '')} |"
              for f in summary.get("figures", [])]
  else:
    lines += ["The paper column holds only the paper's own figures; the "
              "note names estimator, protocol and data.", "",
              "| figure | ours | paper | note |", "|---|---|---|---|"]
    lines += [f"| {f['name']} | {fmt(f['ours'])} | {fmt(f['paper'])} | "
              f"{f.get('note', '')} |" for f in summary.get("figures", [])]
  for t in summary.get("tables") or []:      # [{"title", "markdown"}]
    lines += ["", f"## {t['title']}", "", t["markdown"].rstrip()]
  claims = summary.get("claims") or []
  if claims:
    lines += ["", "## Claims", ""] + [claim_line(c, quick=summary.get("quick"))
                                      for c in claims]
  targets = summary.get("targets")
  if isinstance(targets, dict) and targets:
    lines += ["", "## Targets", ""] + [
        f"- {k}: {target_word(v)}"
        for k, v in targets.items()]
  if summary.get("notes"):
    lines += ["", "## Notes", ""] + [f"- {n}" for n in summary["notes"]]
  pngs = sorted(p.name for p in out.glob("*.png"))
  if pngs:
    lines += [""] + [f"![{p}]({p})" for p in pngs]
  return "\n".join(lines) + "\n"
