"""An opt-in workaround for an XLA-CPU deadlock seen with jaxlib 0.10.2.

Symptom: a jitted, vmapped program with several eigendecompositions (our
batched condition-number training) sometimes never finishes; every XLA worker
thread is idle and the caller waits forever in ``block_until_ready``. Turning
off XLA-CPU's concurrency-optimized scheduler removed it in every trial here
(0/10 hangs against 8/10 without). The flag must be set before JAX starts its
CPU backend, so the library never sets it on import: call
:func:`avoid_cpu_scheduler_deadlock` first thing in your program. Our
experiments, benchmarks and tests do.
"""

from __future__ import annotations

import os

FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"


def avoid_cpu_scheduler_deadlock() -> bool:
  """Adds the flag to ``XLA_FLAGS`` unless the user set that option already.

  Returns:
    True if the flag was added. Has no effect once JAX's backend has started.
  """
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_cpu_enable_concurrency_optimized_scheduler" in flags:
    return False
  os.environ["XLA_FLAGS"] = f"{flags} {FLAG}".strip()
  return True
