"""Gather every summary.json below a directory into one markdown dashboard.

  python -m experiments.report RESULTS_DIR [--out RESULTS_DIR/README.md]

At the top the cross-defense table; then one section per paper
(experiments._catalog): its claims with the verdicts the experiments
computed, the headline plots, ours beside the paper's figures, the full
size's time and command; the experiments that failed (``failed.json``),
are still running or were skipped (``skipped.json``), with the command
that runs them; the versions and git commit; in an appendix every figure
with its note (estimator, protocol, data), seed and wall time, and every
run's notes."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from experiments import _catalog, _rundir
from experiments._reports import SMOKE_BANNER, fmt
from experiments._rundir import write_atomic

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


def skipped(root: Path, name: str = SKIPPED) -> list[dict]:
  """``[{"experiment", "reason", "command"}]`` from ``root/skipped.json``
  (or the list of objects in ``root/name``)."""
  path = root / name
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


FAILED = "failed.json"


def failed(root: Path) -> list[dict]:
  """``[{"experiment", "exit", "command"}]`` from ``root/failed.json``."""
  return skipped(root, FAILED)


def _versions(runs) -> str:
  """The versions and git commit the runs recorded (their config.json)."""
  for run_dir, _ in runs:
    v = _config(run_dir).get("versions")
    if isinstance(v, dict):
      return ", ".join(f"{k} {fmt(x)}" for k, x in v.items())
  return "versions not recorded"


FULL_VERDICTS = Path(__file__).with_name("full_verdicts.json")
# Options a full-size run may carry (they do not change what it computes).
_NEUTRAL = {"--out", "--overwrite", "--quiet", "--data-dir",
            "--no-compile-cache", "--devices", "--resume"}


def _config(run_dir: Path) -> dict:
  """A run's config.json ({} when unreadable)."""
  try:
    cfg = json.loads((run_dir / "config.json").read_text())
  except (OSError, json.JSONDecodeError):
    return {}
  return cfg if isinstance(cfg, dict) else {}


def store_full_verdicts(root: Path, path: Path | None = None) -> dict:
  """Writes the claims of the full-size runs below ``root`` to ``path``
  (the dashboard shows them beside a smaller run's verdicts). A run counts
  as full size when its command line sets no option beyond where it writes
  and what it reads (``_NEUTRAL``); others are left out with a warning.

  Returns:
    ``{module: {"claims", "wall_seconds", "versions", "argv"}}`` as written.
  """
  stored = {}
  for run_dir, s in collect(root):
    cfg = _config(run_dir)
    name, argv = s.get("experiment"), cfg.get("argv")
    entry = _catalog.BY_MODULE.get(name)
    neutral = _NEUTRAL | set(entry.verdict_neutral if entry else ())
    flags = {a for a in argv or [] if a.startswith("--")}
    if s.get("quick") or argv is None or flags - neutral:
      print(f"warning: {run_dir} is not a full-size run "
            f"({'quick' if s.get('quick') else sorted(flags - neutral)}); "
            "left out")
      continue
    stored[name] = {"claims": s.get("claims") or [],
                    "wall_seconds": s.get("wall_seconds"),
                    "versions": cfg.get("versions"), "argv": argv}
  write_atomic(path or FULL_VERDICTS,
               json.dumps(stored, indent=1, ensure_ascii=False) + "\n")
  return stored


def full_verdicts(path: Path | None = None) -> dict:
  """The stored full-size runs' claims (:func:`store_full_verdicts`), or
  ``{}``."""
  try:
    stored = json.loads((path or FULL_VERDICTS).read_text())
  except (OSError, json.JSONDecodeError):
    return {}
  return stored if isinstance(stored, dict) else {}


def _claims_table(entries, quick: bool, stored: dict) -> list[str]:
  """``entries``: ``[(experiment, run_dir_link or None, claim)]``; the
  stored full run's verdict of the same claim beside each."""
  if not entries:
    return []
  lines = [f"| claim | experiment | this run{' (smoke)' if quick else ''} "
           "| full run (stored) | reason | figure |",
           "|---|---|---|---|---|---|"]
  for e, link, c in entries:
    full = {x.get("claim"): x.get("verdict")
            for x in (stored.get(e) or {}).get("claims") or []}
    here = f"**{c.get('verdict', '?')}**" if link else "not run"
    where = f"[{e}]({link})" if link else e
    lines.append(f"| {_cell(c.get('claim'))} | {where} | {here} | "
                 f"{_cell(full.get(c.get('claim'), '—'))} | "
                 f"{_cell(c.get('reason', ''))} | {_cell(c.get('figure', ''))} |")
  return lines


def _section(title, members, rel, quick, stored) -> list[str]:
  """One paper's section: claims, headline plots, ours beside the paper's
  figures, full size and its command. ``members``: ``[(catalog entry or
  None, name, [(run_dir, summary)])]``."""
  lines = ["", f"## {title}", ""]
  claims, plots, figs, sizes, missing = [], [], [], [], []
  for entry, name, runs in members:
    if entry is not None:
      sizes.append(f"`{_catalog.command(entry)}` ({entry.full_time})")
    if not runs:
      kept = (stored.get(name) or {}).get("claims") or []
      claims += [(name, None, c) for c in kept if isinstance(c, dict)]
      missing.append(f"- {name}: not in this run"
                     + (" (its stored full-run verdicts are above)"
                        if kept else ""))
      continue
    for run_dir, s in runs:
      link = f"{rel(run_dir)}/report.md"
      claims += [(name, link, c) for c in s.get("claims") or []
                 if isinstance(c, dict)]
      pngs = sorted(run_dir.glob("*.png"))
      head = [p for p in pngs if entry and p.stem == entry.headline] \
          or pngs[:1]
      plots += [(name, p) for p in head]
      figs += [(name, f) for f in s.get("figures") or []
               if isinstance(f, dict) and f.get("paper") is not None]
  lines += _claims_table(claims, quick, stored) or ["No claims recorded."]
  if missing:
    lines += [""] + missing
  for name, p in plots:
    lines += ["", f"**{name}** — [{p.name}]({rel(p)})  ",
              f'<img src="{rel(p)}" width="560" alt="{name}: {p.stem}">']
  if figs:
    lines += [""]
    if quick:
      lines += ["Figures the papers report (ours at smoke size; the paper "
                "column is left out):", "",
                "| experiment | figure | ours (smoke) | note |",
                "|---|---|---|---|"]
      lines += [f"| {n} | {_cell(f.get('name'))} | {fmt(f.get('ours'))} | "
                f"{_cell(f.get('note', ''))} |" for n, f in figs]
    else:
      lines += ["| experiment | figure | ours | paper | note |",
                "|---|---|---|---|---|"]
      lines += [f"| {n} | {_cell(f.get('name'))} | {fmt(f.get('ours'))} | "
                f"{fmt(f.get('paper'))} | {_cell(f.get('note', ''))} |"
                for n, f in figs]
  if sizes:
    lines += ["", "Full size on 2 cores: " + "; ".join(sizes) + "."]
  return lines


def render(root: Path, runs, out: Path, stored: dict | None = None) -> str:
  quick = any(s.get("quick") for _, s in runs)
  stored = full_verdicts() if stored is None else stored
  rel = lambda p: os.path.relpath(p, out.parent)
  lines = [HEADER, ""]
  if quick:
    lines += [SMOKE_BANNER, ""]
  lines += [f"{len(runs)} run(s) found below `{root}`; {_versions(runs)}.",
            "", "Each paper's claims with a verdict the experiment computed "
            "from its own numbers — *holds*, *partly* or *does not hold "
            "here* — with the reason and the figure behind it; the "
            "thresholds live beside each experiment's `claims`. The paper "
            "column holds only the papers' own figures."]
  if stored:
    commits = sorted({str((v.get("versions") or {}).get("immunojax"))
                      for v in stored.values()})
    lines += ["", "*full run (stored)*: the verdict of the same claim in a "
              f"full-size run of each experiment (commit {', '.join(commits)}"
              f"; `experiments/{FULL_VERDICTS.name}`)."]
  by_module: dict[str, list] = {}
  for run_dir, s in runs:
    by_module.setdefault(s.get("experiment", "?"), []).append((run_dir, s))
  for key, title in _catalog.PAPERS.items():
    members = [(e, e.module, by_module.get(e.module, []))
               for e in _catalog.EXPERIMENTS if e.paper == key]
    if key == "cross_defense":
      for _, s in by_module.get("cross_defense", []):
        for t in s.get("tables") or []:
          lines += ["", f"## {title}", "", f"### {t['title']}", "",
                    t["markdown"].rstrip()]
          title = "Cross-defense table: verdicts"
    lines += _section(title, members, rel, quick, stored)
  other = [(None, m, r) for m, r in by_module.items()
           if m not in _catalog.BY_MODULE]
  if other:
    lines += _section("Other runs", other, rel, quick, stored)
  fails = failed(root)
  if fails:
    lines += ["", "## Failed", "",
              "These exited with an error; their figures above (if any) are "
              "from an earlier run.", "",
              "| experiment | exit | command that runs it |", "|---|---|---|"]
    lines += [f"| {_cell(e.get('experiment', '?'))} | {e.get('exit')} | "
              f"`{_cell(e.get('command', ''))}` |" for e in fails]
  live = in_progress(root)
  if live:
    lines += ["", "## In progress", "",
              "Still being written by a live run; run the report again when "
              "it ends:", ""] + [f"- `{rel(d)}`" for d in live]
  skips = skipped(root)
  if skips:
    lines += ["", "## Skipped", "",
              "| experiment | reason | command that runs it |", "|---|---|---|"]
    lines += [f"| {_cell(e.get('experiment', '?'))} | "
              f"{_cell(e.get('reason', ''))} | `{_cell(e.get('command', ''))}` |"
              for e in skips]
  lines += ["", "## Appendix: every figure", "",
            "One row per figure; the note names the estimator, protocol and "
            "data behind each.", "",
            "| experiment | run | figure | ours | paper | note | seed | quick "
            "| wall (s) |",
            "|---|---|---|---|---|---|---|---|---|"]
  for run_dir, s in runs:
    figures = [f for f in (s.get("figures") or []) if isinstance(f, dict)] \
        or [{"name": "— (no figures recorded)"}]
    wall = s.get("wall_seconds")
    for f in figures:
      paper = ("— (smoke size)" if s.get("quick")
               else fmt(f.get("paper")))
      lines.append(
          f"| {s.get('experiment', '?')} | [{run_dir.name}]"
          f"({rel(run_dir)}/report.md) | "
          f"{_cell(f.get('name', '?'))} | {fmt(f.get('ours'))} | "
          f"{paper} | {_cell(f.get('note', ''))} | "
          f"{s.get('seed')} | {s.get('quick')} | "
          f"{fmt(float(wall)) if isinstance(wall, (int, float)) else '—'} |")
  noted = [(d, s) for d, s in runs if isinstance(s.get("notes"), list)
           and s["notes"]]
  if noted:
    lines += ["", "## Appendix: notes", ""]
    for run_dir, s in noted:
      lines.append(f"**{s.get('experiment')}** (`{run_dir.name}`)")
      lines += [f"- {_cell(n)}" for n in s["notes"]] + [""]
  return "\n".join(lines) + "\n"


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m experiments.report",
                              description=__doc__.splitlines()[0])
  p.add_argument("results_dir", type=Path)
  p.add_argument("--out", type=Path, default=None,
                 help="markdown path [default: RESULTS_DIR/README.md]")
  p.add_argument("--store-full-verdicts", action="store_true",
                 help="write the claims of the full-size runs below "
                 f"RESULTS_DIR to {FULL_VERDICTS.name} (shown beside "
                 "smaller runs' verdicts), and no dashboard")
  args = p.parse_args(argv)
  if not args.results_dir.is_dir():
    p.error(f"{args.results_dir} is not a directory")
  if args.store_full_verdicts:
    stored = store_full_verdicts(args.results_dir)
    print(f"wrote {FULL_VERDICTS} ({len(stored)} experiments)")
    return 0
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
