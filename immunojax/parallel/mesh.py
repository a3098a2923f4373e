"""Device meshes: which devices a sharded computation runs on.

A mesh is made once, by the program (an experiment's ``--devices N``, a
user's script), and handed to the functions of :mod:`immunojax.parallel`;
nothing in the library reads a global mesh.
"""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA = "data"


def local_mesh(num_devices: int | None = None, *,
               axis_names: Sequence[str] = (DATA,),
               shape: Sequence[int] | None = None) -> Mesh:
  """A mesh over the first ``num_devices`` devices of this process.

  Args:
    num_devices: how many local devices (None: all of them).
    axis_names: the mesh's axis names, e.g. ``("data",)`` or
      ``("data", "model")``.
    shape: the mesh's shape (its product must be ``num_devices``); default
      ``(num_devices,)`` for one axis name.

  Returns:
    A :class:`jax.sharding.Mesh` whose axes are ``Auto`` (sharding inside
    ``jit`` is propagated by the compiler).

  Raises:
    ValueError: more devices asked for than this process has (the message
      says how to simulate CPU devices), or a shape that does not match.
  """
  devices = jax.local_devices()
  return _mesh(devices, num_devices, axis_names, shape, "local")


def global_mesh(*, axis_names: Sequence[str] = (DATA,),
                shape: Sequence[int] | None = None) -> Mesh:
  """A mesh over every device of every process (after
  :func:`immunojax.parallel.initialize`), ordered by process."""
  devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
  return _mesh(devices, None, axis_names, shape, "global")


def _mesh(devices, num_devices, axis_names, shape, kind) -> Mesh:
  axis_names = tuple(axis_names)
  if not axis_names or len(set(axis_names)) != len(axis_names):
    raise ValueError(f"axis_names must be distinct and non-empty, got "
                     f"{axis_names}")
  n = len(devices) if num_devices is None else num_devices
  if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
    raise ValueError(f"num_devices must be a positive int, got {n!r}")
  if n > len(devices):
    raise ValueError(
        f"asked for {n} devices but this process has {len(devices)} {kind} "
        f"{devices[0].platform} device(s); on CPU, simulate more with "
        f"XLA_FLAGS=--xla_force_host_platform_device_count={n} or "
        f"jax.config.update('jax_num_cpu_devices', {n}) before JAX starts")
  if shape is None:
    if len(axis_names) != 1:
      raise ValueError(f"give a shape for the {len(axis_names)} axes "
                       f"{axis_names}")
    shape = (n,)
  shape = tuple(int(s) for s in shape)
  if len(shape) != len(axis_names) or int(np.prod(shape)) != n:
    raise ValueError(f"mesh shape {shape} does not fit {n} devices over axes "
                     f"{axis_names}")
  grid = np.asarray(devices[:n], dtype=object).reshape(shape)
  return Mesh(grid, axis_names,
              axis_types=(jax.sharding.AxisType.Auto,) * len(axis_names))


def replicated(mesh: Mesh) -> NamedSharding:
  """Every device holds the whole array."""
  return NamedSharding(mesh, PartitionSpec())


def size(mesh: Mesh, axis: str | None = None) -> int:
  """Devices along ``axis`` (None: the whole mesh)."""
  if axis is None:
    return int(mesh.devices.size)
  if axis not in mesh.shape:
    raise ValueError(f"mesh has no axis {axis!r}; its axes are "
                     f"{tuple(mesh.axis_names)}")
  return int(mesh.shape[axis])
