"""Several processes (hosts) as one JAX program.

Launch one process per host (per GPU node, e.g. one SLURM task per node);
each calls :func:`initialize` before anything else touches JAX. Afterwards
``jax.devices()`` lists every process's devices, :func:`global_mesh` spans
them, and only the primary process (index 0) should write files.
"""

from __future__ import annotations

import os

import jax

# Environment variables read when no argument is given (after ours, JAX's
# own cluster detection handles SLURM, Open MPI, Kubernetes, Cloud TPU).
COORDINATOR_ENV = "IMMUNOJAX_COORDINATOR_ADDRESS"
NUM_PROCESSES_ENV = "IMMUNOJAX_NUM_PROCESSES"
PROCESS_ID_ENV = "IMMUNOJAX_PROCESS_ID"


def _int_env(name: str) -> int | None:
  text = os.environ.get(name)
  if text in (None, ""):
    return None
  try:
    return int(text)
  except ValueError:
    raise ValueError(f"environment variable {name}={text!r} is not an "
                     "integer") from None


def initialize(coordinator_address: str | None = None,
               num_processes: int | None = None,
               process_id: int | None = None, *,
               local_device_ids=None) -> dict:
  """``jax.distributed.initialize`` with arguments from the call, or from
  ``IMMUNOJAX_COORDINATOR_ADDRESS`` / ``IMMUNOJAX_NUM_PROCESSES`` /
  ``IMMUNOJAX_PROCESS_ID``, or (all None) JAX's own cluster detection.

  Args:
    coordinator_address: ``host:port`` of process 0.
    num_processes: how many processes take part.
    process_id: this process's index, ``0 <= process_id < num_processes``.
    local_device_ids: restrict this process to these local devices.

  Returns:
    ``{"process_id", "num_processes", "local_devices", "devices"}``.

  Raises:
    ValueError: an inconsistent set of values (named), before any
      connection is attempted.
  """
  coordinator_address = coordinator_address or os.environ.get(
      COORDINATOR_ENV) or None
  if num_processes is None:
    num_processes = _int_env(NUM_PROCESSES_ENV)
  if process_id is None:
    process_id = _int_env(PROCESS_ID_ENV)
  given = [v is not None for v in (coordinator_address, num_processes,
                                   process_id)]
  if any(given) and not all(given):
    raise ValueError(
        "give all of coordinator_address, num_processes and process_id (or "
        f"{COORDINATOR_ENV}, {NUM_PROCESSES_ENV}, {PROCESS_ID_ENV}), or none "
        "of them to let JAX detect the cluster; got "
        f"coordinator_address={coordinator_address!r}, "
        f"num_processes={num_processes!r}, process_id={process_id!r}")
  if all(given):
    if ":" not in coordinator_address:
      raise ValueError(f"coordinator_address must be host:port, got "
                       f"{coordinator_address!r}")
    if num_processes < 1:
      raise ValueError(f"num_processes must be >= 1, got {num_processes}")
    if not 0 <= process_id < num_processes:
      raise ValueError(f"process_id must be in [0, {num_processes}), got "
                       f"{process_id}")
  jax.distributed.initialize(coordinator_address, num_processes, process_id,
                             local_device_ids=local_device_ids)
  return {"process_id": jax.process_index(),
          "num_processes": jax.process_count(),
          "local_devices": jax.local_device_count(),
          "devices": jax.device_count()}


def is_primary() -> bool:
  """True in the process that writes logs, checkpoints and results."""
  return jax.process_index() == 0
