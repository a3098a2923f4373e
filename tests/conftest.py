"""Test configuration: float64 on, so spectra can be checked to 1e-10.

The library never turns x64 on by itself; the tests own their process.
"""

import os
import sys
from pathlib import Path

from immunojax.xla_flags import avoid_cpu_scheduler_deadlock

avoid_cpu_scheduler_deadlock()   # before JAX starts its backend
# The suite is compile-bound (hundreds of small programs, each run briefly):
# LLVM's optimisation level 0 compiles them ~25% faster (the mima_digits
# --quick run: 81 s against 109 s). Only the tests do this; experiments,
# benchmarks and the library keep XLA's default.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_backend_optimization_level=0").strip()

import jax  # noqa: E402
import pytest  # noqa: E402

from immunojax import compile_cache  # noqa: E402

jax.config.update("jax_enable_x64", True)

# One persistent compilation cache for the whole test run: every xdist
# worker and every experiment a test starts as a subprocess (through the
# environment) share it, and the next run starts warm. `pytest --cache-clear`
# empties .pytest_cache and so starts cold; IMMUNOJAX_COMPILE_CACHE=off
# turns it off.
if not compile_cache.disabled_by_environment():
  os.environ.setdefault(compile_cache.ENV, str(
      Path(__file__).resolve().parents[1] / ".pytest_cache" / "jax-compile"))
  compile_cache.enable()

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get(
    "IMMUNOJAX_SHARED", ROOT.parent / "shared")) / "data"


@pytest.fixture
def house_price_dir():
  d = SHARED_DATA / "house_price"
  if not (d / "train.csv").exists():
    pytest.skip(f"house-price data not found at {d} (expected ../shared "
                "beside the checkout, or set IMMUNOJAX_SHARED)")
  return d


def run_module(args, *, env=None, timeout=600, cwd=None):
  """Runs ``python -m ...`` in a subprocess (from the repository root, or
  ``cwd`` with the repository on ``PYTHONPATH``)."""
  import subprocess
  full_env = dict(os.environ)
  full_env.update(env or {})
  if cwd is not None:
    full_env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT), full_env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
  return subprocess.run([sys.executable, *args], cwd=cwd or ROOT,
                        env=full_env, capture_output=True, text=True,
                        timeout=timeout)
