"""Gather every summary.json below a directory into one markdown dashboard.

  python -m experiments.report RESULTS_DIR [--out RESULTS_DIR/README.md]

One row per headline figure: experiment, run, our figure, the paper's figure,
the figure's note (estimator, protocol, data), seed, wall time; then each
run's notes, the experiments ``reproduce`` skipped (from ``skipped.json``)
with the reason and the command that runs them, and the PNGs as thumbnails.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from experiments import _rundir
from experiments._rundir import SMOKE_BANNER, fmt, write_atomic

HEADER = "# immunojax reproduction dashboard"


def collect(root: Path) -> list[tuple[Path, dict]]:
  runs = []
  for path in sorted(root.rglob("summary.json")):
    try:
      summary = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
      print(f"warning: skipping unreadable {path}: {e}")
      continue
    if not isinstance(summary, dict):
      print(f"warning: skipping {path}: not a summary (a JSON object)")
      continue
    runs.append((path.parent, summary))
  return runs


SKIPPED = "skipped.json"


def in_progress(root: Path) -> list[Path]:
  """Run directories below ``root`` that a live run holds (their files are
  not final; files are replaced whole, so none is read half-written)."""
  return sorted(p.parent for p in root.rglob(_rundir.LOCK)
                if _rundir.is_locked(p.parent))


def skipped(root: Path) -> list[dict]:
  """``[{"experiment", "reason", "command"}]`` from ``root/skipped.json``."""
  path = root / SKIPPED
  if not path.exists():
    return []
  try:
    entries = json.loads(path.read_text())
  except (OSError, json.JSONDecodeError) as e:
    print(f"warning: unreadable {path}: {e}")
    return []
  return [e for e in entries if isinstance(e, dict)] \
      if isinstance(entries, list) else []


def _cell(text) -> str:
  return str(text).replace("|", "\\|").replace("\n", " ")


def render(root: Path, runs, out: Path) -> str:
  smoke = [SMOKE_BANNER, ""] if any(s.get("quick") for _, s in runs) \
      else []
  lines = [HEADER, "", *smoke,
           f"{len(runs)} run(s) found below `{root}`. The paper column holds "
           "only the papers' own figures; the note names the estimator, "
           "protocol and data behind each figure.", "",
           "| experiment | run | figure | ours | paper | note | seed | quick "
           "| wall (s) |",
           "|---|---|---|---|---|---|---|---|---|"]
  for run_dir, s in runs:
    rel = os.path.relpath(run_dir, out.parent)
    figures = [f for f in (s.get("figures") or []) if isinstance(f, dict)] \
        or [{"name": "— (no figures recorded)"}]
    wall = s.get("wall_seconds")
    for f in figures:
      paper = ("— (smoke size)" if s.get("quick")
               else fmt(f.get("paper")))
      lines.append(
          f"| {s.get('experiment', '?')} | [{run_dir.name}]({rel}/report.md) | "
          f"{_cell(f.get('name', '?'))} | {fmt(f.get('ours'))} | "
          f"{paper} | {_cell(f.get('note', ''))} | "
          f"{s.get('seed')} | {s.get('quick')} | "
          f"{fmt(float(wall)) if isinstance(wall, (int, float)) else '—'} |")
  live = in_progress(root)
  if live:
    lines += ["", "## In progress", "",
              "Still being written by a live run; run the report again when "
              "it ends:", ""] + [
                  f"- `{os.path.relpath(d, out.parent)}`" for d in live]
  skips = skipped(root)
  if skips:
    lines += ["", "## Skipped", "",
              "| experiment | reason | command that runs it |", "|---|---|---|"]
    lines += [f"| {_cell(e.get('experiment', '?'))} | "
              f"{_cell(e.get('reason', ''))} | `{_cell(e.get('command', ''))}` |"
              for e in skips]
  noted = [(d, s) for d, s in runs if isinstance(s.get("notes"), list)
           and s["notes"]]
  if noted:
    lines += ["", "## Notes", ""]
    for run_dir, s in noted:
      lines.append(f"**{s.get('experiment')}** (`{run_dir.name}`)")
      lines += [f"- {_cell(n)}" for n in s["notes"]] + [""]
  lines += ["", "## Plots", ""]
  for run_dir, s in runs:
    pngs = sorted(run_dir.glob("*.png"))
    if not pngs:
      continue
    lines.append(f"**{s.get('experiment')}** (`{run_dir.name}`)  ")
    for p in pngs:
      rel = os.path.relpath(p, out.parent)
      lines.append(f'<a href="{rel}"><img src="{rel}" width="240" '
                   f'alt="{p.stem}"></a>')
    lines.append("")
  return "\n".join(lines) + "\n"


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m experiments.report",
                              description=__doc__.splitlines()[0])
  p.add_argument("results_dir", type=Path)
  p.add_argument("--out", type=Path, default=None,
                 help="markdown path [default: RESULTS_DIR/README.md]")
  args = p.parse_args(argv)
  if not args.results_dir.is_dir():
    p.error(f"{args.results_dir} is not a directory")
  out = args.out or args.results_dir / "README.md"
  if out.exists() and not out.read_text(errors="replace").startswith(HEADER):
    print(f"error: {out} exists and is not a dashboard of ours; refusing to "
          "overwrite it (pass another --out)", file=sys.stderr)
    return 2
  runs = collect(args.results_dir)
  write_atomic(out, render(args.results_dir, runs, out))
  print(f"wrote {out} ({len(runs)} runs)")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
