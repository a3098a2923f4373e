"""Orbax checkpoints of a run's loops: save, restore, set a corrupt one
aside (never deleted), refuse one written by another config."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Callable

from experiments._errors import CheckpointError, CorruptCheckpoint


def _corrupt(loop: str, step: int, where: Path, error: Exception):
  first = (str(error).strip().splitlines() or [""])[0][:160]
  return CorruptCheckpoint(
      f"checkpoint step {step} of loop {loop!r} is corrupt ({where}: "
      f"{type(error).__name__}: {first})")


class Checkpoints:
  """The checkpoints of one run directory."""

  def __init__(self, out: Path, *, fingerprint: str, keep: int,
               fallback: bool, print_fn: Callable[..., None]):
    self.out = out
    self.fingerprint = fingerprint
    self.keep = keep
    self.fallback = fallback
    self.print = print_fn

  def manager(self, loop: str):
    import orbax.checkpoint as ocp  # noqa: PLC0415
    opts = ocp.CheckpointManagerOptions(max_to_keep=self.keep, create=True)
    return ocp.CheckpointManager(
        (self.out / "checkpoints" / loop).resolve(), options=opts)

  def fresh(self, loop: str):
    """A manager for a loop that must not have checkpoints yet."""
    manager = self.manager(loop)
    if manager.latest_step() is not None:
      manager.close()
      raise CheckpointError(
          f"{self.out} already holds checkpoints for loop {loop!r}; pass "
          "--resume to continue or --overwrite to start again")
    return manager

  def save(self, manager, loop: str, step: int, state: Any) -> None:
    import orbax.checkpoint as ocp  # noqa: PLC0415
    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        meta=ocp.args.JsonSave({"fingerprint": self.fingerprint,
                                "loop": loop, "step": step})))

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

  def restore_latest(self, loop: str, template):
    """``(manager, state, step)`` from the newest checkpoint of ``loop``
    (state and step None when there is none); with ``--fallback``, a
    corrupt one is moved to ``corrupt_checkpoints/`` (never deleted) and
    the one before it is tried."""
    while True:
      manager = self.manager(loop)
      latest = manager.latest_step()
      if latest is None:
        return manager, None, None
      try:
        state, _ = self._restore(manager, latest, template, loop)
        return manager, state, int(latest)
      except CorruptCheckpoint as e:
        older = [s for s in manager.all_steps() if s < latest]
        manager.close()
        if not self.fallback:
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
