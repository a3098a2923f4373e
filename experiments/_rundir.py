"""A run directory and its one owner: options, the lock, atomic files.

A run holds an exclusive OS advisory lock (``flock``) on ``run.lock`` in
its directory for its whole life, taken before anything in the directory
is read, removed or written; the OS drops it when the process ends (a
``kill -9`` included), so a stale lock never blocks ``--resume``. A second
run, ``--resume`` or ``--overwrite`` on a locked directory stops with one
line naming the holder. Every file the runner writes whole (config.json,
summary.json, report.md, curve JSONs, the dashboard) is written to a
temporary file beside it and renamed into place, so a reader never sees
half of one.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from experiments import _config
from experiments._errors import UsageError

LOCK = "run.lock"
# What a run directory of ours may hold; --overwrite deletes nothing else.
OUR_ENTRIES = ("config.json", "metrics.jsonl", "summary.json", "report.md",
               "checkpoints", "corrupt_checkpoints", "results", LOCK)
OUR_SUFFIXES = (".png", "_curves.json")


@dataclass(frozen=True)
class RunOptions:
  out: Path
  resume: bool
  overwrite: bool
  quiet: bool
  quick: bool
  checkpoint_every: int
  keep_checkpoints: int
  fallback: bool = False
  devices: int = 1
  distributed: bool = False
  compile_cache: bool = True


def jsonable(x):
  """JSON-able copy: arrays to lists, non-finite floats to null."""
  import numpy as np  # noqa: PLC0415
  if isinstance(x, dict):
    return {str(k): jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [jsonable(v) for v in x]
  if hasattr(x, "shape") and hasattr(x, "dtype"):
    a = np.asarray(x)
    return jsonable(a.item() if a.ndim == 0 else a.tolist())
  if isinstance(x, float) and not math.isfinite(x):
    return None   # JSON has no NaN/Inf; null means "no finite value"
  return x


def fingerprint(config_dict: dict) -> str:
  blob = json.dumps(config_dict, sort_keys=True).encode()
  return hashlib.sha256(blob).hexdigest()[:16]


def write_atomic(path: Path, text: str) -> Path:
  """``path.write_text(text)``, but readers see the old file or the new
  one, never a part: a temporary file in the same directory, flushed, then
  renamed over ``path``."""
  path = Path(path)
  tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
  with tmp.open("w") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)
  return path


# ------------------------------------------------------------------ lock
_HELD: dict[Path, int] = {}      # directory -> the open lock file (fd)


def _holder(lock: Path) -> str:
  try:
    info = json.loads(lock.read_text())
    return (f"pid {info['pid']}, started at "
            f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(info['started']))}")
  except (OSError, ValueError, KeyError, TypeError):
    return "pid unknown"


def try_lock(out: Path) -> bool:
  """Takes the exclusive lock of ``out`` (which must exist) for this
  process; False when another process holds it."""
  out = Path(out).resolve()
  if out in _HELD:
    return True
  fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    os.close(fd)
    return False
  os.ftruncate(fd, 0)
  os.write(fd, json.dumps({"pid": os.getpid(),
                           "started": time.time()}).encode())
  os.fsync(fd)
  _HELD[out] = fd
  return True


def lock(out: Path) -> None:
  """:func:`try_lock` or a :class:`UsageError` naming the holder."""
  if not try_lock(out):
    raise UsageError(
        f"{out} is in use by another run ({_holder(Path(out) / LOCK)}); "
        "wait for it, or pick another --out")


def is_locked(out: Path) -> bool:
  """Whether another process holds ``out``'s lock (a reader's check)."""
  out = Path(out).resolve()
  if out in _HELD or not (out / LOCK).exists():
    return False
  fd = os.open(out / LOCK, os.O_RDONLY)
  try:
    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    fcntl.flock(fd, fcntl.LOCK_UN)
    return False
  except BlockingIOError:
    return True
  finally:
    os.close(fd)


def release(out: Path) -> None:
  """Drops this process's lock of ``out`` (the OS does at exit anyway)."""
  fd = _HELD.pop(Path(out).resolve(), None)
  if fd is not None:
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


# -------------------------------------------------------------- contents
def run_config(out: Path) -> dict | None:
  """The ``config.json`` of a run directory of ours, or None."""
  try:
    saved = json.loads((out / "config.json").read_text())
  except (OSError, ValueError):
    return None
  if not isinstance(saved, dict) or not {"experiment", "config",
                                         "fingerprint"} <= set(saved):
    return None
  return saved


def foreign_entries(out: Path) -> list[str]:
  """Entries of ``out`` that a run of ours does not write."""
  return sorted(p.name for p in out.iterdir()
                if p.name not in OUR_ENTRIES and not p.name.startswith(".")
                and not (p.is_file() and p.name.endswith(OUR_SUFFIXES)))


def _remove_run(out: Path) -> None:
  for p in out.iterdir():           # everything here is ours (checked)
    if p.name == LOCK:              # held by us: removing it would unlock
      continue
    shutil.rmtree(p) if p.is_dir() else p.unlink()


def _versions() -> dict:
  import jax  # noqa: PLC0415
  out = {"immunojax": _git_commit(), "jax": jax.__version__}
  for mod in ("flax", "optax", "orbax.checkpoint", "numpy"):
    try:
      out[mod] = __import__(mod, fromlist=["_"]).__version__
    except Exception:  # noqa: BLE001
      out[mod] = None
  return out


def _git_commit() -> str | None:
  """The checkout's commit (``+dirty`` with uncommitted changes to tracked
  files); None outside a git checkout."""
  import subprocess  # noqa: PLC0415
  here = Path(__file__).resolve().parent
  try:
    head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"],
                          cwd=here, capture_output=True, text=True,
                          timeout=10)
    if head.returncode:
      return None
    dirty = subprocess.run(["git", "status", "--porcelain",
                            "--untracked-files=no"], cwd=here,
                           capture_output=True, text=True, timeout=10)
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
  except (OSError, subprocess.SubprocessError):
    return None


# -------------------------------------------------------------- devices
def start_devices(options: RunOptions) -> None:
  """Before JAX starts: on CPU, asks for ``--devices`` simulated devices,
  joins a multi-process run (``--distributed``), then checks the devices
  are there.

  Raises:
    UsageError: the devices or the cluster settings are not there.
  """
  import jax  # noqa: PLC0415
  from immunojax import parallel  # noqa: PLC0415
  if options.devices > 1 and "xla_force_host_platform_device_count" not in \
      os.environ.get("XLA_FLAGS", ""):
    try:
      jax.config.update("jax_num_cpu_devices", options.devices)
    except RuntimeError:
      pass     # JAX already started (an in-process call): checked below
  if options.distributed:
    try:
      parallel.initialize()
    except (ValueError, RuntimeError) as e:
      raise UsageError(f"--distributed: {e}") from None
  try:
    parallel.local_mesh(options.devices)
  except ValueError as e:
    raise UsageError(f"--devices {options.devices}: {e}") from None


def run_mesh(options: RunOptions):
  """The run's device mesh: None on one device in one process."""
  if options.devices == 1 and not options.distributed:
    return None
  from immunojax import parallel  # noqa: PLC0415
  if options.distributed:
    return parallel.global_mesh()
  return parallel.local_mesh(options.devices)


# ------------------------------------------------------------- prepare
def prepare_dir(name: str, config, options: RunOptions) -> None:
  """Takes the run directory: its lock first, then creates it (or checks
  it, for --resume). In a multi-process run process 0 holds the lock and
  prepares; the others wait, then check the lock is held.

  Raises:
    UsageError: ``--out`` is a file, cannot be created, is in use by
      another run, holds something that is not a run of ours
      (``--overwrite`` deletes only our runs), nothing to resume, or a
      resume with other options.
  """
  import jax  # noqa: PLC0415
  if jax.process_count() > 1:
    error = None
    if jax.process_index() == 0:
      try:
        _prepare_dir(name, config, options)
      except UsageError as e:
        error = e
    _sync("prepare_dir")
    if error is not None:
      raise error
    if jax.process_index() != 0 and not (options.out / LOCK).exists():
      raise UsageError(f"{options.out}: process 0 holds no lock on it (is "
                       "--out on a filesystem every process shares?)")
    return
  _prepare_dir(name, config, options)


def _sync(tag: str) -> None:
  from jax.experimental import multihost_utils  # noqa: PLC0415
  multihost_utils.sync_global_devices(f"immunojax {tag}")


def _prepare_dir(name: str, config, options: RunOptions) -> None:
  out = options.out
  config_dict = _config.as_dict(config)
  if out.exists() and not out.is_dir():
    raise UsageError(f"--out {out} is a file, not a directory; choose "
                     "another --out")
  if options.resume and not out.exists():
    raise UsageError(f"nothing to resume: {out} does not exist; drop "
                     "--resume to start a new run there")
  existed = out.exists()
  try:
    out.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise UsageError(f"cannot write the run directory {out}: "
                     f"{e.strerror or e}; choose another --out") from None
  had_lock_file = (out / LOCK).exists()
  try:
    lock(out)
    _check_and_claim(name, out, config_dict, options)
  except BaseException:
    held = Path(out).resolve() in _HELD
    release(out)
    if held and not had_lock_file:   # leave nothing of ours behind
      (out / LOCK).unlink(missing_ok=True)
      if not existed and not any(out.iterdir()):
        out.rmdir()
    raise


def _check_and_claim(name, out, config_dict, options) -> None:
  occupied = any(p.name != LOCK for p in out.iterdir())
  if options.resume:
    if not occupied:
      raise UsageError(f"nothing to resume: {out} is empty; drop --resume "
                       "to start a new run there")
    saved = run_config(out)
    if saved is None:
      raise UsageError(f"cannot resume {out}: its config.json is missing or "
                       "unreadable, so it is not a run of ours")
    if saved.get("experiment") != name:
      raise UsageError(f"{out} is a run of {saved.get('experiment')}, not "
                       f"{name}; cannot resume")
    if saved.get("config") != config_dict:
      diff = sorted(k for k in set(saved["config"]) | set(config_dict)
                    if saved["config"].get(k) != config_dict.get(k))
      raise UsageError(f"cannot resume {out}: its config differs in {diff}; "
                       "use the same options (or --overwrite)")
    return
  if occupied:
    if not options.overwrite:
      raise UsageError(f"{out} exists and is not empty; pass --resume to "
                       "continue it or --overwrite to replace it")
    if run_config(out) is None:
      raise UsageError(f"refusing to --overwrite {out}: it is not a run "
                       "directory of ours (no config.json written by an "
                       "experiment); choose another --out")
    foreign = foreign_entries(out)
    if foreign:
      raise UsageError(f"refusing to --overwrite {out}: it holds files that "
                       f"are not ours ({', '.join(foreign[:5])}"
                       f"{', ...' if len(foreign) > 5 else ''}); move them or "
                       "choose another --out")
    _remove_run(out)
  import jax  # noqa: PLC0415
  record = json.dumps({
      "experiment": name, "config": config_dict,
      "seed": config_dict.get("seed"), "quick": options.quick,
      "fingerprint": fingerprint(config_dict), "versions": _versions(),
      "devices": [str(d) for d in jax.devices()], "argv": sys.argv[1:],
  }, indent=2)
  try:
    write_atomic(out / "config.json", record)
  except OSError as e:
    raise UsageError(f"cannot write the run directory {out}: "
                     f"{e.strerror or e}; choose another --out") from None
