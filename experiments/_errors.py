"""The errors an experiment run reports, shared by the config, the run
directory and the runner (no imports: anything may raise them)."""

from __future__ import annotations


class UsageError(SystemExit):
  """A bad option or run directory: one line on stderr, exit code 2."""

  def __init__(self, message: str):
    super().__init__(2)
    self.message = message

  def __str__(self) -> str:
    return self.message


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be trusted (corrupt, or from another config)."""


class CorruptCheckpoint(CheckpointError):
  """A checkpoint whose files cannot be read."""


class DivergedError(RuntimeError):
  """A training loop produced NaN/Inf: the run stops and says so."""
