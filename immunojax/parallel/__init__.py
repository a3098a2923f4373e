"""Sharding over devices and hosts.

* :func:`local_mesh` / :func:`global_mesh`: the devices a run uses.
* :func:`data_parallel`: any ``update(state, batch, key)`` with its batch
  split over a mesh axis (``jit`` + sharding constraints; the compiler
  reduces the gradients).
* :func:`per_device`: the same with ``shard_map`` and an immunizer's
  ``axis_name`` collectives.
* :func:`sharded_vmap`: a ``vmap`` whose jobs (attackers, concepts,
  simulated environments) are spread over devices with ``shard_map``.
* :func:`spread_calls`: independent calls (start points, targets) placed
  round robin on devices and run at once.
* :func:`initialize` / :func:`is_primary`: several processes as one program.
* :func:`pmean`, :func:`global_sum`, :func:`weighted_mean`: the collectives
  an immunizer built with ``axis_name`` uses (the identity for None).
"""

from immunojax.parallel.collectives import (axis_index, axis_size,
                                            global_sum, pmean, psum,
                                            weighted_mean)
from immunojax.parallel.data import (batch_shardings, constrain,
                                     data_parallel, per_device, shard_batch,
                                     split_batch,
                                     state_shardings)
from immunojax.parallel.distributed import initialize, is_primary
from immunojax.parallel.grid import (MapFn, sequential_map, sharded_vmap,
                                     spread_calls)
from immunojax.parallel.mesh import (DATA, global_mesh, local_mesh,
                                     replicated, size)

__all__ = ["DATA", "MapFn", "axis_index", "axis_size", "batch_shardings",
           "constrain", "data_parallel", "global_mesh", "global_sum",
           "initialize", "is_primary", "local_mesh", "per_device", "pmean",
           "psum", "replicated", "sequential_map", "shard_batch",
           "sharded_vmap", "size", "split_batch", "spread_calls",
           "state_shardings", "weighted_mean"]
