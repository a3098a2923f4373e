"""The run an experiment writes into: :class:`Run` and its directory.

The runner owns every side effect: the output directory (config.json,
metrics.jsonl, summary.json, report.md, PNGs), progress bars, and orbax
checkpoints of long loops so ``--resume`` continues a crashed run and ends
with the same ``summary.json`` as an uninterrupted one. The command line is
:mod:`experiments._cli`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from experiments import _config

# Fault injection for the crash-recovery tests: SIGKILL this process right
# after the given (1-based) step of any checkpointed loop has been saved.
KILL_ENV = "IMMUNOJAX_FAULT_KILL_AT_STEP"


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be trusted (corrupt, or from another config)."""


class UsageError(SystemExit):
  """A bad option or run directory: one line on stderr, exit code 2."""

  def __init__(self, message: str):
    super().__init__(2)
    self.message = message

  def __str__(self) -> str:
    return self.message


class DivergedError(RuntimeError):
  """A training loop produced NaN/Inf: the run stops and says so."""


# What a run directory of ours may hold; --overwrite deletes nothing else.
OUR_ENTRIES = ("config.json", "metrics.jsonl", "summary.json", "report.md",
               "checkpoints", "corrupt_checkpoints", "results")
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


class CorruptCheckpoint(CheckpointError):
  """A checkpoint whose files cannot be read."""


def _corrupt(loop: str, step: int, where: Path, error: Exception):
  first = (str(error).strip().splitlines() or [""])[0][:160]
  return CorruptCheckpoint(
      f"checkpoint step {step} of loop {loop!r} is corrupt ({where}: "
      f"{type(error).__name__}: {first})")


def fingerprint(config_dict: dict) -> str:
  blob = json.dumps(config_dict, sort_keys=True).encode()
  return hashlib.sha256(blob).hexdigest()[:16]


class Run:
  """Handle an experiment's ``run`` function uses for all its I/O."""

  def __init__(self, name: str, config, options: RunOptions):
    self.name = name
    self.config = config
    self.options = options
    self.out = options.out
    self.config_dict = _config.as_dict(config)
    self.fingerprint = fingerprint(self.config_dict)
    self._metrics_path = self.out / "metrics.jsonl"
    self._start = time.perf_counter()
    self.figures: list[dict] = []
    self.mesh = run_mesh(options)
    self._maps: dict = {}
    self._steps: dict = {}

  @property
  def primary(self) -> bool:
    """True in the process that writes (always, in a one-process run)."""
    import jax  # noqa: PLC0415
    return jax.process_index() == 0

  def grid_map(self, local=None):
    """The map function for independent jobs (attackers, concepts,
    simulated environments): ``local`` itself (default ``jax.vmap``) on one
    device, else :func:`immunojax.parallel.sharded_vmap` over the run's
    devices. One object per ``local``, so jitted callers cache."""
    import jax  # noqa: PLC0415
    local = jax.vmap if local is None else local
    if self.mesh is None:
      return local
    if local not in self._maps:
      from immunojax import parallel  # noqa: PLC0415
      self._maps[local] = parallel.sharded_vmap(self.mesh, local=local)
    return self._maps[local]

  # ------------------------------------------------------------- logging
  def log(self, step: int, loop: str = "main", **metrics) -> None:
    """Appends one JSON object to metrics.jsonl."""
    record = {"loop": loop, "step": int(step), **jsonable(metrics)}
    if not self.primary:
      return
    with self._metrics_path.open("a") as f:
      f.write(json.dumps(record) + "\n")

  def records(self, loop: str) -> list[dict]:
    """The metrics.jsonl records of one loop (every ``log_every`` steps)."""
    if not self._metrics_path.exists():
      return []
    out = []
    for line in self._metrics_path.read_text().splitlines():
      try:
        rec = json.loads(line)
      except json.JSONDecodeError:
        continue
      if rec.get("loop") == loop:
        out.append(rec)
    return out

  def print(self, *args) -> None:
    """Status lines; always shown (``--quiet`` only hides progress bars),
    by the primary process only."""
    if self.primary:
      print(*args, flush=True)

  def progress(self, iterable, *, desc: str, total: int | None = None,
               initial: int = 0):
    from tqdm.auto import tqdm  # noqa: PLC0415
    return tqdm(iterable, desc=desc, total=total, initial=initial,
                disable=(self.options.quiet or not sys.stderr.isatty()
                         or not self.primary),
                leave=False, dynamic_ncols=True)

  # -------------------------------------------------------------- figures
  def figure(self, name: str, ours, paper=None, *, note: str = "") -> None:
    """Records a headline figure: goes to summary.json and report.md."""
    self.figures.append({"name": name, "ours": jsonable(ours),
                         "paper": jsonable(paper), "note": note})

  def plot_path(self, name: str) -> Path:
    return self.out / f"{name}.png"

  def new_figure(self, **kwargs):
    import matplotlib  # noqa: PLC0415
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
    return plt.subplots(**kwargs)

  def save_figure(self, fig, name: str) -> Path:
    import matplotlib.pyplot as plt  # noqa: PLC0415
    path = self.plot_path(name)
    fig.tight_layout()
    if self.primary:
      fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

  # ---------------------------------------------------------- checkpoints
  def _manager(self, loop: str):
    import orbax.checkpoint as ocp  # noqa: PLC0415
    opts = ocp.CheckpointManagerOptions(
        max_to_keep=self.options.keep_checkpoints, create=True)
    return ocp.CheckpointManager(
        (self.out / "checkpoints" / loop).resolve(), options=opts)

  def _restore(self, manager, step: int, template, loop: str):
    import jax  # noqa: PLC0415
    import orbax.checkpoint as ocp  # noqa: PLC0415
    where = self.out / "checkpoints" / loop / str(step)
    try:
      meta = manager.restore(step, args=ocp.args.Composite(
          meta=ocp.args.JsonRestore()))["meta"]
    except Exception as e:  # noqa: BLE001 - orbax raises many types
      raise _corrupt(loop, step, where, e) from None
    if meta.get("fingerprint") != self.fingerprint:
      raise CheckpointError(
          f"checkpoint {where} was written by a run with another config "
          f"(fingerprint {meta.get('fingerprint')} != {self.fingerprint}); "
          "refusing to load it. Use --overwrite to start afresh")
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, template)
    try:
      restored = manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract)))["state"]
    except Exception as e:  # noqa: BLE001
      raise _corrupt(loop, step, where, e) from None
    leaves = jax.tree_util.tree_leaves(restored)
    want = jax.tree_util.tree_leaves(abstract)
    for got, exp in zip(leaves, want):
      if got.shape != exp.shape or got.dtype != exp.dtype:
        raise CheckpointError(
            f"checkpoint {where} holds {got.dtype}{list(got.shape)} where "
            f"the run expects {exp.dtype}{list(exp.shape)}; refusing to load")
    return restored, meta

  def _restore_latest(self, loop: str, template):
    """Restores the newest checkpoint of ``loop``; with ``--fallback``, a
    corrupt one is moved to ``corrupt_checkpoints/`` (never deleted) and the
    one before it is tried."""
    while True:
      manager = self._manager(loop)
      latest = manager.latest_step()
      if latest is None:
        return manager, None, None
      try:
        state, _ = self._restore(manager, latest, template, loop)
        return manager, state, int(latest)
      except CorruptCheckpoint as e:
        older = [s for s in manager.all_steps() if s < latest]
        manager.close()
        if not self.options.fallback:
          hint = (f"; pass --fallback with --resume to set it aside and "
                  f"continue from step {max(older)}" if older else
                  "; no older checkpoint: start again with --overwrite")
          raise CheckpointError(f"{e}{hint}") from None
        aside = self.out / "corrupt_checkpoints" / f"{loop}-{latest}"
        aside.parent.mkdir(exist_ok=True)
        shutil.move(str(self.out / "checkpoints" / loop / str(latest)),
                    str(aside))
        self.print(f"warning: {e}; moved it to {aside} and falling back")
      except CheckpointError:
        manager.close()
        raise

  def _drop_metrics_after(self, loop: str, step: int) -> None:
    if not self.primary or not self._metrics_path.exists():
      return
    lines = self._metrics_path.read_text().splitlines()
    kept = []
    for line in lines:
      try:
        rec = json.loads(line)
      except json.JSONDecodeError:
        continue            # a line cut short by a crash
      if not (rec.get("loop") == loop and rec.get("step", 0) > step):
        kept.append(line)
    if len(kept) != len(lines):
      self._metrics_path.write_text("".join(line + "\n" for line in kept))

  def loop(self, loop: str, state: Any,
           step_fn: Callable[[Any, int], tuple[Any, dict]], num_steps: int, *,
           log_every: int = 10, desc: str | None = None,
           checkpoint: bool = True) -> Any:
    """Runs ``state, metrics = step_fn(state, step)`` for ``num_steps`` steps.

    The state pytree must hold everything the next step depends on
    (parameters, optimizer state, PRNG key); batches should be a function of
    ``(key, step)``, so the step number is the data-iterator position. With
    ``checkpoint`` the state and step are saved through orbax every
    ``--checkpoint-every`` steps and at the end; on ``--resume`` the loop
    continues from the newest checkpoint (a finished loop is skipped).

    Returns:
      The final state.
    """
    import jax  # noqa: PLC0415
    import orbax.checkpoint as ocp  # noqa: PLC0415
    start = 0
    manager = None
    if checkpoint and not self.options.resume:
      manager = self._manager(loop)
      if manager.latest_step() is not None:
        manager.close()
        raise CheckpointError(
            f"{self.out} already holds checkpoints for loop {loop!r}; pass "
            "--resume to continue or --overwrite to start again")
    elif checkpoint:
      manager, restored, latest = self._restore_latest(loop, state)
      if latest is not None:
        state, start = restored, latest
        self.print(f"[{loop}] resumed from step {start}")
    # Records past the start come from a crashed attempt: each step once.
    self._drop_metrics_after(loop, start)
    kill_at = int(os.environ.get(KILL_ENV, "0") or 0)
    every = max(int(self.options.checkpoint_every), 1)
    bar = self.progress(range(start, num_steps), desc=desc or loop,
                        total=num_steps, initial=start)
    metrics = {}
    for step in bar:
      state, metrics = step_fn(state, step)
      done = step + 1
      if done % log_every == 0 or done == num_steps or step == start:
        host = jax.device_get(metrics)
        _check_finite_metrics(loop, done, host)
        self.log(done, loop, **host)
        shown = {k: v for k, v in host.items() if getattr(v, "ndim", 1) == 0
                 or isinstance(v, (int, float))}
        bar.set_postfix({k: f"{float(v):.4g}" for k, v in
                         list(shown.items())[:3]}, refresh=False)
      if manager is not None and (done % every == 0 or done == num_steps):
        _check_finite_state(loop, done, state)   # never checkpoint NaN
        manager.save(done, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            meta=ocp.args.JsonSave({"fingerprint": self.fingerprint,
                                    "loop": loop, "step": done})))
        if kill_at and done >= kill_at:
          manager.wait_until_finished()
          os.kill(os.getpid(), signal.SIGKILL)
    if manager is not None:
      manager.wait_until_finished()
      manager.close()
    return state

  def fit(self, loop: str, immunizer, state: Any,
          sample: Callable[[Any, Any], Any], data: Any, num_steps: int, *,
          key=None, log_every: int = 10, desc: str | None = None,
          checkpoint: bool = True, batch_spec: Any = None) -> Any:
    """:meth:`loop` over ``jit(immunizer.update)``.

    Step ``t`` feeds the batch ``sample(data, t)`` (a pure function of the
    step, so a resumed run sees the same batches) and the key
    ``fold_in(key, t)``. ``data`` and ``key`` are jit arguments, not
    closures, so large arrays are not compiled in as constants, and loops
    that pass the same ``immunizer`` and ``sample`` objects with data of
    one shape share one compilation.

    On several devices (``--devices N``) the batch is split over them
    (:func:`immunojax.parallel.batch_shardings`; ``batch_spec`` says which
    axis, default the leading one) and the state is replicated: the
    compiler reduces the gradients, and the result equals the one-device
    run up to the order of floating-point sums.

    Returns:
      The final state.
    """
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    key = jax.random.PRNGKey(0) if key is None else key
    step = (_jitted_update() if self.mesh is None else
            self._sharded_update(batch_spec))
    return self.loop(
        loop, state,
        lambda s, t: step(immunizer, sample, s, jnp.asarray(t), data, key),
        num_steps, log_every=log_every, desc=desc, checkpoint=checkpoint)

  def split_batch(self, batch, spec=None):
    """Inside a jitted step: ``batch`` split over the run's devices
    (:func:`immunojax.parallel.batch_shardings`); unchanged on one."""
    if self.mesh is None:
      return batch
    from immunojax import parallel  # noqa: PLC0415
    return parallel.split_batch(batch, self.mesh, spec)

  def _sharded_update(self, batch_spec):
    """:func:`_jitted_update` with the batch split over the run's mesh."""
    import jax  # noqa: PLC0415
    from immunojax import parallel  # noqa: PLC0415
    tag = repr(batch_spec)
    if tag not in self._steps:
      rep = parallel.replicated(self.mesh)
      self._steps[tag] = jax.jit(
          functools.partial(_update_step, functools.partial(
              self.split_batch, spec=batch_spec)),
          static_argnums=(0, 1), in_shardings=rep, out_shardings=rep)
    return self._steps[tag]

  # --------------------------------------------------------------- finish
  def finish(self, summary: dict) -> dict:
    summary = dict(jsonable(summary))
    summary.setdefault("experiment", self.name)
    summary["seed"] = self.config_dict.get("seed")
    summary["quick"] = self.options.quick
    summary["figures"] = self.figures
    summary["wall_seconds"] = time.perf_counter() - self._start
    if self.primary:
      (self.out / "summary.json").write_text(json.dumps(summary, indent=2))
      (self.out / "report.md").write_text(run_report(summary, self.out))
    return summary


def _update_step(split, immunizer, sample, state, t, data, key):
  """One step of :meth:`Run.fit`: the batch ``split(sample(data, t))``."""
  import jax  # noqa: PLC0415
  return immunizer.update(state, split(sample(data, t)),
                          jax.random.fold_in(key, t))


@functools.cache
def _jitted_update():
  """``jit(immunizer.update)`` over ``sample(data, t)``, with the immunizer
  and the sampler static: one compilation per (immunizer, sample, shapes)."""
  import jax  # noqa: PLC0415
  return jax.jit(functools.partial(_update_step, lambda batch: batch),
                 static_argnums=(0, 1))


DIVERGED_HINT = ("lower the learning rate (or the regularizer weights) and "
                 "start again with --overwrite")


def _check_finite_metrics(loop: str, step: int, metrics: dict) -> None:
  import numpy as np  # noqa: PLC0415
  for name, value in metrics.items():
    arr = np.asarray(value)
    if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
      raise DivergedError(
          f"loop {loop!r} diverged: {name} is {arr.ravel()[0]} at step "
          f"{step}; {DIVERGED_HINT}")


def _check_finite_state(loop: str, step: int, state) -> None:
  import jax  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415
  for leaf in jax.tree_util.tree_leaves(state):
    arr = np.asarray(leaf)
    if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
      raise DivergedError(
          f"loop {loop!r} diverged: its parameters hold NaN/Inf at step "
          f"{step}; {DIVERGED_HINT}")


def fmt(v) -> str:
  if v is None:
    return "—"
  if isinstance(v, float):
    return f"{v:.4g}"
  return str(v)


def run_report(summary: dict, out: Path) -> str:
  lines = [f"# {summary['experiment']}", ""]
  preamble = summary.get("preamble")
  if isinstance(preamble, list) and preamble:   # what is measured, what is good
    lines += [f"> {line}  " for line in preamble] + [""]
  lines += [f"seed {summary.get('seed')}, quick={summary.get('quick')}, "
            f"wall {summary['wall_seconds']:.1f} s", "",
            "The paper column holds only the paper's own figures; the note "
            "names estimator, protocol and data.", "",
            "| figure | ours | paper | note |", "|---|---|---|---|"]
  for f in summary.get("figures", []):
    lines.append(f"| {f['name']} | {fmt(f['ours'])} | {fmt(f['paper'])} | "
                 f"{f.get('note', '')} |")
  targets = summary.get("targets")
  if isinstance(targets, dict) and targets:
    lines += ["", "## Targets", ""] + [
        f"- {k}: {'n/a' if v is None else 'met' if v else 'MISSED'}"
        for k, v in targets.items()]
  if summary.get("notes"):
    lines += ["", "## Notes", ""] + [f"- {n}" for n in summary["notes"]]
  pngs = sorted(p.name for p in out.glob("*.png"))
  if pngs:
    lines += [""] + [f"![{p}]({p})" for p in pngs]
  return "\n".join(lines) + "\n"


def _versions() -> dict:
  import jax  # noqa: PLC0415
  out = {"jax": jax.__version__}
  for mod in ("flax", "optax", "orbax.checkpoint", "numpy"):
    try:
      out[mod] = __import__(mod, fromlist=["_"]).__version__
    except Exception:  # noqa: BLE001
      out[mod] = None
  return out


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
                if p.name not in OUR_ENTRIES and not (
                    p.is_file() and p.name.endswith(OUR_SUFFIXES)))


def _remove_run(out: Path) -> None:
  for p in out.iterdir():           # everything here is ours (checked)
    shutil.rmtree(p) if p.is_dir() else p.unlink()


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


def prepare_dir(name: str, config, options: RunOptions) -> None:
  """Creates (or checks, for --resume) the run directory; in a
  multi-process run only the primary process does (the others wait).

  Raises:
    UsageError: ``--out`` is a file, cannot be created, holds something
      that is not a run of ours (``--overwrite`` deletes only our runs),
      nothing to resume, or a resume with other options.
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
  occupied = out.exists() and any(out.iterdir())
  if options.resume:
    if not occupied:
      raise UsageError(f"nothing to resume: {out} "
                       f"{'is empty' if out.exists() else 'does not exist'}; "
                       "drop --resume to start a new run there")
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
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(record)
  except OSError as e:
    raise UsageError(f"cannot write the run directory {out}: "
                     f"{e.strerror or e}; choose another --out") from None
