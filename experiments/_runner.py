"""The run an experiment writes into: :class:`Run` and its directory.

The runner owns every side effect: the output directory (config.json,
metrics.jsonl, summary.json, report.md, PNGs), progress bars, and orbax
checkpoints of long loops so ``--resume`` continues a crashed run and ends
with the same ``summary.json`` as an uninterrupted one. The command line is
:mod:`experiments._cli`.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable

from experiments import _claims, _config
from experiments._checkpoints import Checkpoints
from experiments._errors import DivergedError
from experiments._reports import run_report
from experiments._rundir import (RunOptions, fingerprint, jsonable,
                                 run_mesh, write_atomic)

# Fault injection for the crash-recovery tests: SIGKILL this process right
# after the given (1-based) step of any checkpointed loop has been saved.
KILL_ENV = "IMMUNOJAX_FAULT_KILL_AT_STEP"


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
    self.checkpoints = Checkpoints(
        self.out, fingerprint=self.fingerprint,
        keep=options.keep_checkpoints, fallback=options.fallback,
        print_fn=self.print)

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

  def call_devices(self):
    """Where independent calls go, one a device (:func:`immunojax.parallel.
    spread_calls`): this process's devices of the run's mesh; None on one
    device."""
    if self.mesh is None:
      return None
    import jax  # noqa: PLC0415
    return [d for d in self.mesh.devices.flat
            if d.process_index == jax.process_index()]

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

  def over_seeds(self, seeds, one_seed: Callable[[int, str], Any]) -> list:
    """``one_seed(seed, prefix)`` for each seed in turn: the first seed's
    loops unprefixed (as a one-seed run), the others' under ``seed_<s>/``.
    Each seed's models are new closures whose programs compile anew, so the
    compile caches are dropped between seeds: a long 3-seed run once died
    in LLVM ("Cannot allocate memory") at the kernel's 65,530 maps."""
    import jax  # noqa: PLC0415
    out = []
    for i, s in enumerate(seeds):
      if len(seeds) > 1:
        self.print(f"seed {s} ({i + 1}/{len(seeds)})")
      out.append(one_seed(s, "" if i == 0 else f"seed_{s}/"))
      if i < len(seeds) - 1:
        jax.clear_caches()
    return out

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
    start = 0
    manager = None
    if checkpoint and not self.options.resume:
      manager = self.checkpoints.fresh(loop)
    elif checkpoint:
      manager, restored, latest = self.checkpoints.restore_latest(loop, state)
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
        self.checkpoints.save(manager, loop, done, state)
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
    if "claims" not in summary:
      raise ValueError(f"{self.name}: the summary has no 'claims' (the "
                       "paper's claims with verdicts, experiments._claims)")
    summary["claims"] = _claims.check(summary["claims"])
    if self.primary:
      write_atomic(self.out / "summary.json", json.dumps(summary, indent=2))
      write_atomic(self.out / "report.md", run_report(summary, self.out))
    return summary

  def write_json(self, name: str, obj) -> Path:
    """``out/name`` holding ``obj`` as JSON, written atomically (by the
    primary process only)."""
    path = self.out / name
    if self.primary:
      write_atomic(path, json.dumps(jsonable(obj)))
    return path


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
