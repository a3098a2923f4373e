"""Experiment modules (``python -m experiments.<name>``); they own all I/O."""

from immunojax.xla_flags import avoid_cpu_scheduler_deadlock

avoid_cpu_scheduler_deadlock()   # before any experiment starts JAX's backend
