"""Opt-in: JAX's persistent compilation cache for programs that compile the
same functions run after run.

Most of a short experiment is XLA compilation of the same programs every
time. :func:`enable` points JAX's own persistent cache
(``jax_compilation_cache_dir``) at a directory and caches every program,
however quick to compile (JAX's default skips those under a second, which
is nearly all of ours). JAX keys each entry on the compiled program itself
(its HLO, so every option that changes the program, closed-over constants
included), the compile options, the backend, the JAX/jaxlib versions and
``XLA_FLAGS``: a changed option recompiles, an unchanged one loads.

Our experiments and benchmarks call :func:`enable` when they start (turn it
off with ``--no-compile-cache`` or ``IMMUNOJAX_COMPILE_CACHE=off``); the
library never turns it on by itself.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV = "IMMUNOJAX_COMPILE_CACHE"   # a directory, or off / 0 / false / no
_OFF = {"off", "0", "false", "no", "none", ""}


def default_directory() -> Path:
  """``$IMMUNOJAX_COMPILE_CACHE``, else ``$XDG_CACHE_HOME/immunojax/jax``
  (``~/.cache/immunojax/jax``)."""
  if os.environ.get(ENV, "").strip().lower() not in _OFF:
    return Path(os.environ[ENV]).expanduser()
  base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
  return Path(base) / "immunojax" / "jax"


def disabled_by_environment() -> bool:
  """``IMMUNOJAX_COMPILE_CACHE`` set to off / 0 / false / no."""
  return (ENV in os.environ
          and os.environ[ENV].strip().lower() in _OFF)


def entries(directory: str | Path) -> int:
  """Cached programs in ``directory`` (0 if it does not exist)."""
  d = Path(directory)
  return sum(1 for p in d.iterdir() if p.name.endswith("-cache")) \
      if d.is_dir() else 0


def enable(directory: str | Path | None = None) -> Path | None:
  """Turns JAX's persistent compilation cache on for this process.

  Args:
    directory: where entries go (created if missing); default
      :func:`default_directory`.

  Returns:
    The directory in use, or None when ``IMMUNOJAX_COMPILE_CACHE`` turns
    the cache off or the directory cannot be created (then nothing changes:
    programs compile as without a cache).
  """
  if directory is None and disabled_by_environment():
    return None
  path = Path(directory) if directory is not None else default_directory()
  try:
    path.mkdir(parents=True, exist_ok=True)
  except OSError:
    return None
  import jax  # noqa: PLC0415
  jax.config.update("jax_compilation_cache_dir", str(path))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
  return path
