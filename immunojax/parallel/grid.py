"""Grid parallelism: independent jobs (attackers, concepts, simulated
environments) spread over devices with ``shard_map``, and independent
calls spread over devices one call a device (:func:`spread_calls`).

A *map function* has ``jax.vmap``'s calling convention restricted to
``in_axes`` of 0 or None per argument: ``map_fn(fn, in_axes)(*args)``.
Methods and the attack harness take one (default :func:`jax.vmap`); pass
:func:`sharded_vmap`'s to run the same code over several devices.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from immunojax.parallel.mesh import DATA, size

PyTree = Any
MapFn = Callable[..., Callable]


def _axes(in_axes, num_args: int) -> tuple:
  axes = tuple(in_axes) if isinstance(in_axes, (tuple, list)) else \
      (in_axes,) * num_args
  if len(axes) != num_args:
    raise ValueError(f"in_axes has {len(axes)} entries for {num_args} "
                     "arguments")
  if any(a not in (0, None) for a in axes):
    raise ValueError(f"in_axes entries must be 0 or None, got {axes}")
  if all(a is None for a in axes):
    raise ValueError("in_axes maps no argument")
  return axes


def _length(args, axes) -> int:
  sizes = {jnp.shape(x)[0] for a, arg in zip(axes, args) if a == 0
           for x in jax.tree_util.tree_leaves(arg)}
  if len(sizes) != 1:
    raise ValueError(f"mapped arguments need one leading size, got "
                     f"{sorted(sizes)}")
  return sizes.pop()


def sequential_map(fn: Callable, in_axes: int | Sequence | None = 0
                   ) -> Callable:
  """Like ``jax.vmap(fn, in_axes)`` but one job after another
  (``lax.map``): each job keeps its own control flow, e.g. a ``lax.switch``
  on a per-job index runs one branch instead of all of them, and memory is
  that of one job."""
  def mapped(*args):
    axes = _axes(in_axes, len(args))
    _length(args, axes)
    xs = tuple(a if ax == 0 else None for a, ax in zip(args, axes))
    fixed = tuple(None if ax == 0 else a for a, ax in zip(args, axes))

    def one(x):
      return fn(*(xi if ax == 0 else f for xi, f, ax in zip(x, fixed, axes)))

    return jax.lax.map(one, xs)

  return mapped


def sharded_vmap(mesh: Mesh, *, axis: str = DATA,
                 local: MapFn = jax.vmap) -> MapFn:
  """A map function that splits the mapped axis over ``mesh[axis]``.

  Each device runs ``local(fn, in_axes)`` (``jax.vmap``, or
  :func:`sequential_map`) on its share; unmapped arguments are replicated.
  A mapped length that does not divide the device count is padded with
  copies of the last job, whose results are dropped.

  Args:
    mesh: the device mesh.
    axis: the mesh axis the jobs are split over.
    local: how each device maps over its share.

  Returns:
    ``map_fn(fn, in_axes=0) -> mapped``, differentiable and jit-able.
  """
  devices = size(mesh, axis)

  def map_fn(fn: Callable, in_axes: int | Sequence | None = 0) -> Callable:
    def mapped(*args):
      axes = _axes(in_axes, len(args))
      n = _length(args, axes)
      padded_n = math.ceil(n / devices) * devices

      def pad(x):
        if padded_n == n:
          return x
        extra = jnp.repeat(x[-1:], padded_n - n, axis=0)
        return jnp.concatenate([x, extra])

      args = tuple(jax.tree_util.tree_map(pad, a) if ax == 0 else a
                   for a, ax in zip(args, axes))
      specs = tuple(P(axis) if ax == 0 else P() for ax in axes)
      # The jobs are independent (no collectives inside): the check of
      # which values vary over the axis would only reject scans whose
      # carries start replicated and end per-job.
      out = jax.shard_map(local(fn, in_axes=axes), mesh=mesh,
                          in_specs=specs, out_specs=P(axis),
                          check_vma=False)(*args)
      return jax.tree_util.tree_map(lambda o: o[:n], out)

    return mapped

  map_fn.mesh = mesh            # callers that place calls themselves check
  return map_fn


def spread_calls(calls: Sequence[tuple[Callable, tuple]],
                 devices: Sequence[jax.Device] | None = None) -> list:
  """``[fn(*args) for fn, args in calls]`` as host (numpy) trees, every call
  dispatched before any result is read.

  Task parallelism for calls that are independent programs (each start
  point and target of an attack grid): call ``i``'s arguments are put on
  ``devices[i % len(devices)]``, so calls on different devices run at
  once. A jitted ``fn`` compiles once per device it meets; each device
  runs the same program, so the results are those of one device. On CPU,
  simulated devices (``jax_num_cpu_devices``) keep the cores busy where
  one small program alone does not.

  Args:
    calls: ``(fn, args)`` pairs; ``fn`` is usually jitted.
    devices: where the calls run, round robin. None: where ``fn`` puts them
      (the default device for uncommitted arrays).

  Returns:
    The outputs, in the order of ``calls``, as numpy arrays.
  """
  if devices is not None and not len(devices):
    raise ValueError("devices is empty (None runs every call where its "
                     "arguments are)")
  pending = []
  for i, (fn, args) in enumerate(calls):
    if devices is not None:
      args = jax.device_put(args, devices[i % len(devices)])
    pending.append(fn(*args))
  return [jax.device_get(out) for out in pending]
