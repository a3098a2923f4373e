"""The command line every ``python -m experiments.<name>`` shares.

An experiment module defines a frozen dataclass ``Config`` (with a ``seed``
field), a dict ``QUICK`` of overrides for ``--quick``, and
``experiment(config, run) -> summary`` where ``run`` is a
:class:`experiments._runner.Run`. It ends with
``main = _cli.entry_point(NAME, Config, experiment, quick=QUICK)``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from experiments import _config
from experiments import _rundir
from experiments._errors import CheckpointError, DivergedError, UsageError
from experiments._reports import SMOKE_BANNER, fmt
from experiments._rundir import RunOptions, prepare_dir, start_devices
from experiments._runner import Run


def parse(name: str, config_cls, quick: dict, argv=None, description=""):
  parser = argparse.ArgumentParser(
      prog=f"python -m experiments.{name}", description=description,
      allow_abbrev=False)
  parser.add_argument("--quick", action="store_true",
                      help="reduced size (what the test suite runs)")
  parser.add_argument("--out", type=Path, default=None,
                      help=f"run directory [default: results/{name}/<timestamp>]")
  parser.add_argument("--config", default=None,
                      help="JSON or YAML file of config options")
  parser.add_argument("--resume", action="store_true",
                      help="continue the run in --out from its checkpoints")
  parser.add_argument("--overwrite", action="store_true",
                      help="replace an existing run in --out (only a run "
                      "directory of ours is ever deleted)")
  parser.add_argument("--fallback", action="store_true",
                      help="with --resume: set a corrupt newest checkpoint "
                      "aside (corrupt_checkpoints/) and continue from the "
                      "one before it")
  parser.add_argument("--quiet", action="store_true",
                      help="no progress bars (automatic when not a TTY)")
  parser.add_argument("--checkpoint-every", type=int, default=50,
                      help="steps between checkpoints of long loops [default: 50]")
  parser.add_argument("--keep-checkpoints", type=int, default=2,
                      help="checkpoints kept per loop [default: 2]")
  parser.add_argument("--devices", type=int, default=1,
                      help="data- and attacker-parallel over the first N "
                      "local devices (on CPU, N simulated devices) "
                      "[default: 1]")
  parser.add_argument("--distributed", action="store_true",
                      help="join a multi-process run (one process per host): "
                      "coordinator, process count and id from "
                      "IMMUNOJAX_COORDINATOR_ADDRESS / IMMUNOJAX_NUM_PROCESSES "
                      "/ IMMUNOJAX_PROCESS_ID or the cluster (SLURM, ...); "
                      "the mesh spans every process's devices (--devices "
                      "local devices each)")
  parser.add_argument("--no-compile-cache", action="store_true",
                      help="compile every program afresh (default: JAX's "
                      "persistent compilation cache in "
                      "$IMMUNOJAX_COMPILE_CACHE or ~/.cache/immunojax/jax; "
                      "IMMUNOJAX_COMPILE_CACHE=off also turns it off)")
  _config.add_config_arguments(parser, config_cls, quick)
  args = parser.parse_args(argv)
  run_keys = {"quick", "out", "config", "resume", "overwrite", "quiet",
              "checkpoint_every", "keep_checkpoints", "fallback", "devices",
              "distributed", "no_compile_cache"}
  cli_values = {k: v for k, v in vars(args).items() if k not in run_keys}
  file_values = _config.load_config_file(args.config) if args.config else None
  config = _config.resolve(config_cls, quick=args.quick, quick_overrides=quick,
                           file_values=file_values, cli_values=cli_values)
  if args.checkpoint_every < 1:
    parser.error("--checkpoint-every must be >= 1")
  if args.keep_checkpoints < 1:
    parser.error("--keep-checkpoints must be >= 1 (0 would keep no "
                 "checkpoint, so a crash could not be resumed)")
  if args.devices < 1:
    parser.error("--devices must be >= 1")
  if args.fallback and not args.resume:
    parser.error("--fallback goes with --resume")
  if args.resume and args.overwrite:
    parser.error("--resume and --overwrite exclude each other")
  out = args.out
  if out is None:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path("results") / name / f"{stamp}-seed{getattr(config, 'seed', 0)}"
  options = RunOptions(out=out, resume=args.resume, overwrite=args.overwrite,
                       quiet=args.quiet, quick=args.quick,
                       checkpoint_every=args.checkpoint_every,
                       keep_checkpoints=args.keep_checkpoints,
                       fallback=args.fallback, devices=args.devices,
                       distributed=args.distributed,
                       compile_cache=not args.no_compile_cache)
  return config, options


def entry_point(name: str, config_cls, run_fn, *, quick: dict,
                description: str = "", x64: bool = True, preflight=None):
  """Builds ``main(argv=None) -> int`` for an experiment module.

  Exit codes: 0 done; 2 a usage error (bad option, run directory, data or
  checkpoint), one line on stderr, and nothing written when it is found
  before the run starts; 1 the run diverged (NaN/Inf), with the step.

  Args:
    x64: switch ``jax_enable_x64`` on when ``main`` starts (spectra of
      ill-conditioned matrices need float64); importing the module does not.
    preflight: ``preflight(config)``, run before anything is written; raise
      ``ValueError``/``OSError`` naming what is wrong (e.g. a data file).
  """

  def main(argv=None) -> int:
    try:
      config, options = parse(name, config_cls, quick, argv, description)
      if preflight is not None:
        try:
          preflight(config)
        except (ValueError, OSError) as e:
          raise UsageError(str(e)) from None
      import jax  # noqa: PLC0415
      if x64:
        jax.config.update("jax_enable_x64", True)
      if options.compile_cache:
        from immunojax import compile_cache  # noqa: PLC0415
        compile_cache.enable()
      start_devices(options)
      prepare_dir(name, config, options)
      run = Run(name, config, options)
      summary = run.finish(run_fn(config, run))
    except (UsageError, CheckpointError) as e:
      print(f"error: {e}", file=sys.stderr)
      return 2
    except DivergedError as e:
      print(f"error: {e}", file=sys.stderr)
      return 1
    finally:
      if "options" in locals():
        _rundir.release(options.out)    # the OS would, at exit
    run.print(f"[{name}] wrote {options.out}/summary.json")
    if summary.get("quick"):       # smoke size: no paper figure beside it
      run.print("  " + SMOKE_BANNER.replace("**", ""))
    for f in summary["figures"]:
      paper = ("" if summary.get("quick")
               else f"  paper {fmt(f['paper'])}")
      run.print(f"  {f['name']}: ours {fmt(f['ours'])}{paper}  {f['note']}")
    return 0

  return main
