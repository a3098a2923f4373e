"""Run every experiment module, then the dashboard.

  python -m experiments.reproduce [--size quick|showcase|full] [--out DIR]
                                  [--data-dir DIR]

Sizes: ``quick`` checks the pipeline (smoke: its numbers mean nothing);
``showcase`` runs each experiment at the smallest size whose verdicts on
its paper's claims equal the full run's (experiments._catalog says which
options, and why); ``full`` is every experiment's own default. Each
experiment runs in its own process (so one failure does not stop the
rest); an experiment whose data is missing is skipped with the reason.
"""

from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys
import time
from pathlib import Path

from experiments import _catalog, report
from experiments._rundir import write_atomic

# (module, needs --data-dir), in the order they run: experiments._catalog.
EXPERIMENTS: list[tuple[str, bool]] = [(e.module, e.needs_data)
                                       for e in _catalog.EXPERIMENTS]
SIZES = ("quick", "showcase", "full")


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m experiments.reproduce",
                              description=__doc__.splitlines()[0])
  p.add_argument("--size", choices=SIZES, default=None,
                 help="quick (smoke), showcase (the full runs' verdicts, "
                 "smallest size) or full [default: showcase]")
  p.add_argument("--quick", action="store_true", help="= --size quick")
  p.add_argument("--out", type=Path, default=None,
                 help="[default: results/reproduce-<size>-<timestamp>]")
  p.add_argument("--data-dir", type=Path, default=None,
                 help="house-price CSV folder (e.g. ../shared/data/house_price)")
  p.add_argument("--only", default=None, help="comma-separated module names")
  p.add_argument("--devices", type=int, default=1,
                 help="passed to every experiment [default: 1]")
  p.add_argument("--no-compile-cache", action="store_true",
                 help="passed to every experiment: compile every program "
                 "afresh (default: JAX's persistent compilation cache)")
  args = p.parse_args(argv)
  if args.quick and args.size not in (None, "quick"):
    p.error(f"--quick and --size {args.size} contradict each other")
  size = "quick" if args.quick else args.size or "showcase"
  args.quick = size == "quick"
  if args.out is None:
    args.out = (Path("results")
                / f"reproduce-{size}-{time.strftime('%Y%m%d-%H%M%S')}")
  if args.devices < 1:
    p.error("--devices must be >= 1")
  only = set(args.only.split(",")) if args.only else None
  failures, skips = [], []
  from immunojax import compile_cache  # noqa: PLC0415
  cache = (None if args.no_compile_cache or
           compile_cache.disabled_by_environment()
           else compile_cache.default_directory())
  cached_before = compile_cache.entries(cache) if cache else 0
  started = time.perf_counter()
  for name, needs_data in EXPERIMENTS:
    if only and name not in only:
      continue
    entry = _catalog.BY_MODULE[name]
    if size == "showcase" and entry.showcase is None:
      reason = (f"not in the showcase (full size {entry.full_time} on 2 "
                "cores; the dashboard shows its stored full-run verdicts)")
      print(f"[reproduce] skip {name}: {reason}", flush=True)
      skips.append({"experiment": name, "reason": reason,
                    "command": _catalog.command(entry)})
      continue
    module = importlib.import_module(f"experiments.{name}")
    reason = getattr(module, "unavailable_reason", lambda d: None)(args.data_dir)
    if reason:
      print(f"[reproduce] skip {name}: {reason}", flush=True)
      skips.append({"experiment": name, "reason": reason,
                    "command": _catalog.command(entry, size)})
      continue
    cmd = [sys.executable, "-m", f"experiments.{name}", "--out",
           str(args.out / name), "--overwrite", "--quiet"]
    cmd += _catalog.size_args(entry, size)
    if args.devices > 1:
      cmd += ["--devices", str(args.devices)]
    if args.no_compile_cache:
      cmd.append("--no-compile-cache")
    if needs_data:
      cmd += ["--data-dir", str(args.data_dir)]
    print(f"[reproduce] {' '.join(cmd[1:])}", flush=True)
    t = time.perf_counter()
    rc = subprocess.call(cmd)
    print(f"[reproduce] {name}: exit {rc} in {time.perf_counter() - t:.1f} s",
          flush=True)
    if rc:
      failures.append({"experiment": name, "exit": rc,
                       "command": " ".join(["python"] + cmd[1:])})
  args.out.mkdir(parents=True, exist_ok=True)
  write_atomic(args.out / report.SKIPPED, json.dumps(skips, indent=2))
  write_atomic(args.out / report.FAILED, json.dumps(failures, indent=2))
  report.main([str(args.out)])
  wall = time.perf_counter() - started
  if cache is None:
    state = "compile cache off"
  else:
    added = compile_cache.entries(cache) - cached_before
    state = (f"compile cache {'warm' if cached_before else 'cold'} "
             f"({cached_before} programs cached before, {added} added; "
             f"{cache})")
  print(f"[reproduce] size {size}: wall time {wall:.1f} s; {state}",
        flush=True)
  if failures:
    print(f"[reproduce] failed: {[f['experiment'] for f in failures]}",
          file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
