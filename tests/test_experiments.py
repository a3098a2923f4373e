"""Every experiment module at --quick size: runs, writes its contract."""

import json

import pytest

from experiments import attack_grid


def load(out):
  return json.loads((out / "summary.json").read_text())


def test_attack_grid_quick(tmp_path):
  out = tmp_path / "ag"
  assert attack_grid.main(["--quick", "--out", str(out), "--quiet"]) == 0
  s = load(out)
  assert s["num_attacks"] == 12
  for start in ("pretrained", "scratch"):
    best = s["attacks"][start]["within_budget"]["60"]["metric"]
    assert 0.5 < best <= 1.0           # the attackers do learn digits 5-9
  assert s["attacks"]["scratch"]["finetune_overhead_vs_scratch"] == 1.0
  curves = json.loads((out / "attack_curves.json").read_text())
  assert len(curves["attacks"]) == 12 and len(curves["metric"]["scratch"][0]) == 4
  assert (out / "attack_curves.png").exists()
  assert s["dp_accuracy"] > 0.9
