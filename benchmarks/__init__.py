"""Benchmark scripts (``python -m benchmarks.<name>``)."""

from immunojax.xla_flags import avoid_cpu_scheduler_deadlock

avoid_cpu_scheduler_deadlock()   # before any benchmark starts JAX's backend
