"""Benchmark scripts run at --smoke size and write their contract.

Timings are reported by the scripts, never asserted here.
"""

import json

import pytest


@pytest.mark.parametrize("name,keys", [
    ("cond_num", ["cond_num_seconds_with_compile",
                  "cond_num_steps_per_second"]),
    ("bilevel", ["second_order_overhead", "remat_memory_ratio"]),
    ("attack_spread", ["spread_speedup", "max_curve_difference",
                       "extra_compile_s"]),
    ("spectrum", ["lanczos_overhead_vs_hvp", "closed_form_speedup_vs_hessian",
                  "lanczos_speedup_vs_eigsh_at_largest",
                  "certified_speedup_vs_power", "certified_relative_error",
                  "true_relative_error", "power_true_relative_error",
                  "mixed_precision_time_ratio", "restarted_memory_ratio",
                  "restarted_time_ratio"]),
])
def test_benchmark_quick_writes_summary(tmp_path, name, keys):
  import importlib
  module = importlib.import_module(f"benchmarks.{name}")
  out = tmp_path / f"{name}.json"
  assert module.main(["--smoke", "--out", str(out)]) == 0
  payload = json.loads(out.read_text())
  for key in keys:
    assert isinstance(payload["summary"][key], float), key
  assert payload["records"] and "targets_met" in payload["summary"]
  if name == "attack_spread":     # one device here: the same program's curves
    assert payload["summary"]["max_curve_difference"] == 0.0
  if name != "cond_num":
    assert out.with_suffix(".png").exists()


def test_peers_without_torch_says_how_to_install(capsys):
  """benchmarks.peers is not run here (torch, PyHessian); without them it
  names the extra and exits 0."""
  import importlib.util
  if importlib.util.find_spec("torch") and importlib.util.find_spec(
      "pyhessian"):
    pytest.skip("torch and PyHessian are installed: run benchmarks.peers "
                "by hand")
  from benchmarks import peers
  assert peers.main(["--smoke"]) == 0
  assert 'pip install -e ".[peers]"' in capsys.readouterr().out
