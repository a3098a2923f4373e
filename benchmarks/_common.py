"""Timing, output and plotting helpers shared by the benchmark scripts."""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import jax
from flax import nnx

from immunojax import losses, models


def block(x):
  return jax.tree_util.tree_map(
      lambda a: a.block_until_ready() if hasattr(a, "block_until_ready") else a,
      x)


def timed(fn, *args, repeats: int = 3):
  """Returns (result, first_call_seconds, median_run_seconds).

  The first call includes compilation; ``compile = first - median`` is what
  the records call compile time.
  """
  t = time.perf_counter()
  out = block(fn(*args))
  first = time.perf_counter() - t
  runs = []
  for _ in range(repeats):
    t = time.perf_counter()
    out = block(fn(*args))
    runs.append(time.perf_counter() - t)
  return out, first, statistics.median(runs)


def interleaved(calls, *, repeats: int = 3) -> list[float]:
  """Median seconds of each ``(fn, *args)`` in ``calls``, timed in turns:
  round ``r`` runs every call once, so a change in the machine's load during
  the measurement touches all of them alike and their ratios stay put. Each
  is called once first (compilation, warm-up), untimed."""
  for fn, *args in calls:
    block(fn(*args))
  runs = [[] for _ in calls]
  for _ in range(repeats):
    for times, (fn, *args) in zip(runs, calls):
      t = time.perf_counter()
      block(fn(*args))
      times.append(time.perf_counter() - t)
  return [statistics.median(times) for times in runs]


def parser(description: str, default_out: str) -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=description)
  p.add_argument("--quick", action="store_true",
                 help="reduced sizes; finishes in under a minute")
  p.add_argument("--smoke", action="store_true",
                 help="the smallest sizes (the test suite's contract check; "
                      "its figures mean nothing); implies --quick")
  p.add_argument("--out", default=default_out,
                 help="JSON output path (a PNG is written beside it)")
  p.add_argument("--repeats", type=int, default=None,
                 help="timed repeats per measurement (median reported)")
  p.add_argument("--no-compile-cache", action="store_true",
                 help="compile every program afresh (default: JAX's "
                 "persistent compilation cache; first-call times then "
                 "include loading, not compiling, on a warm cache)")
  return p


_CACHE: dict = {}


def start(args) -> None:
  """Call after parsing: turns on the persistent compilation cache unless
  ``--no-compile-cache`` (recorded in every output's ``machine``)."""
  from immunojax import compile_cache  # noqa: PLC0415
  path = None if args.no_compile_cache else compile_cache.enable()
  _CACHE.update(directory=str(path) if path else None,
                entries_at_start=compile_cache.entries(path) if path else 0)


def machine() -> dict:
  return {"jax": jax.__version__, "devices": [str(d) for d in jax.devices()],
          "python": platform.python_version(), "processor": platform.machine(),
          "compile_cache": dict(_CACHE) or None}


def write(out: str, payload: dict) -> Path:
  path = Path(out)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(payload, indent=2, default=float))
  return path


def finish(out: str, records: list, summary: dict) -> Path:
  """Writes ``{records, summary, machine}`` to ``out`` and prints the summary."""
  path = write(out, {"records": records, "summary": summary,
                     "machine": machine()})
  print("summary:")
  for key, value in summary.items():
    print(f"  {key}: {value}")
  print(f"wrote {path}", flush=True)
  return path


def plot_lines(path: Path, panels: list[tuple[str, str, dict]]) -> Path:
  """One log-log panel per (title, xlabel, {label: (xs, ys)})."""
  import matplotlib  # noqa: PLC0415
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415
  fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.2))
  axes = [axes] if len(panels) == 1 else axes
  for ax, (title, xlabel, series) in zip(axes, panels):
    for label, (xs, ys) in series.items():
      ax.plot(xs, ys, marker="o", label=label)
    ax.set(xscale="log", yscale="log", title=title, xlabel=xlabel,
           ylabel="run time (s, median)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
  fig.tight_layout()
  png = path.with_suffix(".png")
  fig.savefig(png, dpi=110)
  plt.close(fig)
  return png


def mlp(seed: int, width: int, *, depth: int = 2, d_in: int = 64,
        d_out: int = 10, dtype=None):
  """``(loss(params, x, y), params)`` of a tanh ``models.MLP`` classifier,
  the network every benchmark measures; ``dtype`` casts the parameters
  (default: float64 when x64 is on, else float32)."""
  apply, params = models.functional(models.MLP(
      [d_in] + [width] * depth + [d_out], rngs=nnx.Rngs(seed),
      activation=jax.numpy.tanh))
  dtype = dtype or jax.numpy.zeros(()).dtype
  params = jax.tree_util.tree_map(lambda a: a.astype(dtype), params)
  return (lambda p, x, y: losses.cross_entropy(apply(p, x), y)), params
