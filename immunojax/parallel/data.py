"""Data parallelism: batches split over a mesh axis, the compiler reduces.

:func:`data_parallel` wraps any ``update(state, batch, key)`` (every
:class:`~immunojax.immunizer.Immunizer`'s, built *without* ``axis_name``) in
``jax.jit`` with sharding constraints: the batch is split along the mesh's
data axis, the state is replicated (or split along a model axis where a
``param_specs`` pattern says so), and XLA inserts the gradient all-reduce.
The caller's code does not change between 1 and N devices, and the result
equals the single-device one up to the order of floating-point sums.

For explicit per-device code (``shard_map``), build the immunizer with
``axis_name=`` instead: its gradients are then ``pmean``-ed over that axis.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from immunojax.masks import path_string
from immunojax.parallel.mesh import DATA

PyTree = Any


def _is_spec(x) -> bool:
  return isinstance(x, P)


def _leaf_spec(spec: P, leaf, mesh: Mesh, where: str) -> P:
  """``spec`` cut to the leaf's rank; a scalar, or a leaf with a split axis
  the devices do not divide, is replicated."""
  ndim = np.ndim(leaf)
  entries = tuple(spec)
  if len(entries) > ndim:
    if ndim == 0:
      return P()
    if any(s is not None for s in entries[ndim:]):
      raise ValueError(f"partition spec {spec} needs rank >= {len(entries)} "
                       f"but {where} has shape {np.shape(leaf)}")
    entries = entries[:ndim]
  for dim, names in zip(np.shape(leaf), entries):
    names = (names,) if isinstance(names, str) else (names or ())
    if dim % int(np.prod([mesh.shape[n] for n in names], dtype=int)):
      return P()
  return P(*entries)


def batch_shardings(batch: PyTree, mesh: Mesh, spec: PyTree = None
                    ) -> PyTree:
  """One :class:`NamedSharding` per leaf of ``batch``.

  Args:
    batch: the per-step batch pytree.
    mesh: the device mesh.
    spec: a :class:`PartitionSpec` for every leaf, or a pytree prefix of
      ``batch`` with one per subtree (e.g. SOPHON's ``{"restricted":
      P(None, None, "data"), "original": P(None, "data")}``). Default
      ``P("data")``: split the leading axis.

  A leaf whose split axis the devices do not divide is replicated (every
  device computes all of it): pick batch sizes the device count divides.
  """
  spec = P(DATA) if spec is None else spec

  def per_subtree(s, sub):
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: NamedSharding(
            mesh, _leaf_spec(s, leaf, mesh,
                             f"batch leaf {path_string(path)!r}")),
        sub)

  try:
    return jax.tree_util.tree_map(per_subtree, spec, batch, is_leaf=_is_spec)
  except ValueError as e:
    if "partition spec" in str(e):
      raise
    raise ValueError(f"batch spec {spec} is not a pytree prefix of the batch "
                     f"({jax.tree_util.tree_structure(batch)})") from None


def state_shardings(state: PyTree, mesh: Mesh,
                    param_specs: Mapping[str, P] | None = None) -> PyTree:
  """Replicated leaves, except those whose ``a/b/c`` path matches a regex
  of ``param_specs`` (``re.search``; the first match wins), which get its
  spec, e.g. ``{r"head/kernel": P(None, "model")}`` splits a large head's
  output axis (and its optimizer moments, whose paths end the same way)."""
  compiled = [(re.compile(k), v) for k, v in (param_specs or {}).items()]
  hits = {k.pattern: 0 for k, _ in compiled}

  def one(path, leaf):
    s = path_string(path)
    for pattern, spec in compiled:
      if pattern.search(s):
        hits[pattern.pattern] += 1
        if np.ndim(leaf) < len(spec):
          raise ValueError(f"param_specs {spec} for {pattern.pattern!r} "
                           f"needs rank >= {len(spec)}, but state leaf {s!r} "
                           f"has shape {np.shape(leaf)}")
        if _leaf_spec(spec, leaf, mesh, s) != spec:
          raise ValueError(f"state leaf {s!r} of shape {np.shape(leaf)} "
                           f"cannot be split as {spec} over mesh "
                           f"{dict(mesh.shape)}: a split axis is not "
                           "divisible by its devices")
        return NamedSharding(mesh, spec)
    return NamedSharding(mesh, P())

  out = jax.tree_util.tree_map_with_path(one, state)
  unused = [k for k, n in hits.items() if n == 0]
  if unused:
    paths = [path_string(p) for p, _ in
             jax.tree_util.tree_flatten_with_path(state)[0]]
    more = " ..." if len(paths) > 12 else ""
    raise ValueError(f"param_specs pattern(s) {unused} match no state leaf; "
                     f"paths are {paths[:12]}{more}")
  return out


def constrain(tree: PyTree, shardings: PyTree) -> PyTree:
  """``with_sharding_constraint`` leaf by leaf (inside ``jit``)."""
  return jax.tree_util.tree_map(jax.lax.with_sharding_constraint, tree,
                                shardings)


def split_batch(batch: PyTree, mesh: Mesh, spec: PyTree = None) -> PyTree:
  """Inside ``jit``: ``batch`` constrained to :func:`batch_shardings`, for
  hand-written loops that gather their batches in the program."""
  return constrain(batch, batch_shardings(batch, mesh, spec))


def data_parallel(update: Callable[[PyTree, PyTree, jax.Array],
                                   tuple[PyTree, dict]],
                  mesh: Mesh, *, batch_spec: PyTree = None,
                  param_specs: Mapping[str, P] | None = None,
                  donate_state: bool = False) -> Callable:
  """``jit(update)`` with its batch split over ``mesh``.

  Args:
    update: ``update(state, batch, key) -> (state, metrics)``, e.g.
      ``immunizer.update``.
    mesh: from :func:`immunojax.parallel.local_mesh` / ``global_mesh``.
    batch_spec: see :func:`batch_shardings` (default: leading axis over
      ``"data"``).
    param_specs: see :func:`state_shardings` (default: all replicated).
    donate_state: donate the input state's buffers to the output.

  Returns:
    ``step(state, batch, key) -> (state, metrics)``: one ``jax.jit`` per
    (state, batch) structure and shapes, with input and output shardings
    pinned; metrics are replicated.
  """
  compiled: dict = {}

  def step(state, batch, key):
    leaves = jax.tree_util.tree_leaves((state, batch))
    sig = (jax.tree_util.tree_structure((state, batch)),
           tuple(np.shape(x) for x in leaves))
    fn = compiled.get(sig)
    if fn is None:
      state_sh = state_shardings(state, mesh, param_specs)
      rep = NamedSharding(mesh, P())
      fn = compiled[sig] = jax.jit(
          update, in_shardings=(state_sh, batch_shardings(
              batch, mesh, batch_spec), rep),
          out_shardings=(state_sh, rep),
          donate_argnums=(0,) if donate_state else ())
    return fn(state, batch, key)

  return step


def per_device(update: Callable, mesh: Mesh, *, batch_spec: PyTree = None
               ) -> Callable:
  """``update`` run per device under ``shard_map``, for immunizers built
  with ``axis_name="data"`` (explicit collectives instead of the compiler's).

  Each device gets its slice of the batch (``batch_spec``, default the
  leading axis over ``"data"``; every split axis must divide evenly) and
  the replicated state; the immunizer ``pmean``-s its gradients over the
  axis. Built with ``check_vma=False``: with JAX's replication checking on,
  the gradient of a replicated parameter is already summed over devices
  and the immunizer's ``pmean`` would count it once per device.

  Returns:
    ``step(state, batch, key) -> (state, metrics)``, jitted.
  """
  spec = P(DATA) if batch_spec is None else batch_spec
  return jax.jit(jax.shard_map(update, mesh=mesh,
                               in_specs=(P(), spec, P()),
                               out_specs=(P(), P()), check_vma=False))


def shard_batch(batch: PyTree, mesh: Mesh, spec: PyTree = None) -> PyTree:
  """Places a host batch on the mesh, split as :func:`batch_shardings` says.

  In a single process ``batch`` is the global batch. With several
  processes each passes its *own* rows (its part of every split axis) and
  gets global arrays back (``jax.make_array_from_process_local_data``).
  """
  shardings = batch_shardings(batch, mesh, spec)
  if jax.process_count() == 1:
    return jax.device_put(batch, shardings)
  return jax.tree_util.tree_map(
      lambda s, x: jax.make_array_from_process_local_data(s, np.asarray(x)),
      shardings, batch)
