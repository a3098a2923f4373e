"""Choosing a method factory by name (for command lines), once."""

from __future__ import annotations

import inspect
from typing import Callable

from immunojax import _checks


def by_name(methods: dict[str, Callable], name: str, *args, **options):
  """``methods[name](*args, **subset)``, where ``subset`` holds the options
  that factory takes (e.g. a baseline without ``lambda_p`` is not given
  one).

  Raises:
    ValueError: unknown ``name``, or an option that no method takes.
  """
  _checks.check_choice(name, methods, "method")
  params = {f: inspect.signature(f).parameters for f in methods.values()}
  known = set().union(*params.values())
  unknown = set(options) - known
  if unknown:
    raise ValueError(f"unknown option(s) {sorted(unknown)}; the methods "
                     f"{sorted(methods)} take {sorted(known)}")
  factory = methods[name]
  return factory(*args, **{k: v for k, v in options.items()
                           if k in params[factory]})
