"""Full-size experiment runs (``pytest -m slow``): the headline figures the
README and the closing notes quote, checked against what was measured.

Each run takes from under a minute to ~27 minutes on 2 cores (the README's
table); the default suite runs the --quick sizes
(tests/test_experiments.py) instead.
"""

import json

import pytest

from experiments import _catalog, report

pytestmark = pytest.mark.slow


def _run(module, tmp_path, *args):
  import importlib
  out = tmp_path / module
  assert importlib.import_module(f"experiments.{module}").main(
      ["--out", str(out), "--quiet", *args]) == 0
  return json.loads((out / "summary.json").read_text())


def test_house_price_full(tmp_path, house_price_dir):
  s = _run("house_price", tmp_path, "--data-dir", str(house_price_dir))
  m = s["methods"]["cond_num"]
  assert m["rir"]["pinv"] > 356.2            # paper's RIR (official estimator)
  assert m["kappa_ratio_pretrain"]["pinv"] < 1
  assert all(s["success_def_3_1"][k]["weak"] for k in ("cond_num", "opt_kappa"))
  assert set(s["rules"]) == {"normalized", "balanced"}


def test_digit_pairs_full(tmp_path):
  s = _run("digit_pairs", tmp_path)
  m = s["methods"]["cond_num"]
  assert m["success_pairs"]["pinv"] == 90
  assert 3 < m["mean_rir"]["pinv"] < 20      # measured 5.23; paper 70 (MNIST)
  assert len(s["grid"]) == 2 * 2 * 2 * 3 * 3   # tasks, opt, rule, ratio, budget
  assert all(c["problems"] == 3 * 20 for c in s["grid"])


def test_deep_immunization_full(tmp_path):
  s = _run("deep_immunization", tmp_path)
  m = s["methods"]["cond_num"]
  assert m["rir_theta0"]["pinv"]["mean"] > 3
  assert m["dp_accuracy"]["mean"] > 0.98
  assert set(s["probe"]) == {"line_search", "tuned_sgd", "tuned_adam"}


def test_attack_grid_full(tmp_path):
  s = _run("attack_grid", tmp_path)
  assert s["num_attacks"] == 96 and s["dp_accuracy"] > 0.98
  assert s["attacks"]["pretrained"]["within_budget"]["200"]["metric"] > 0.9


def test_sophon_digits_full(tmp_path):
  s = _run("sophon_digits", tmp_path)
  assert s["calibration"]["met"]          # the references differ
  assert s["original_accuracy"]["original"]["mean"] - \
      s["original_accuracy"]["protected"]["mean"] <= 0.03
  assert s["worst_case_transferring"] is not None


def test_gs_lora_digits_full(tmp_path):
  s = _run("gs_lora_digits", tmp_path)
  gl = s["methods"]["gs_lora"]["ratio"]
  pre = s["pretrained"]["per_task"]
  assert max(gl["acc_f"]) <= 1.0                 # forgotten after every task
  # measured: within 2.7 points (the 2-point target is missed on task 3)
  assert all(a >= p["acc_r"] - 3.0 for a, p in zip(gl["acc_r"], pre))
  assert max(gl["zeroed_groups"]) >= 2           # tuned alpha selects blocks
  assert max(s["methods"]["gs_lora_released_alpha"]["ratio"][
      "zeroed_groups"]) == 0                     # the released alpha does not
  assert gl["trainable_share"] < 5.0


def test_mima_digits_full(tmp_path):
  s = _run("mima_digits", tmp_path)
  ms = s["methods"]
  attacks = list(ms["none"]["attacks"])
  worst = {m: [ms[m]["attacks"][a]["worst_concept_accuracy"] for a in attacks]
           for m in ms}
  assert len(attacks) == 8 and s["targets"]["none_relearns_every_concept"]
  # measured (seed 0): mean worst-concept accuracy 0.572 for MIMA vs 1.0 for
  # the erased model; MIMA beats sequential IMMA in 5 of 8 attacks (the
  # every-attack target is missed), retention 0.790 vs 0.973 (missed)
  assert sum(worst["mima"]) / 8 < sum(worst["none"]) / 8 - 0.3
  assert sum(w < i for w, i in zip(worst["mima"],
                                   worst["imma_sequential"])) >= 5
  assert ms["mima"]["retention_accuracy"] > ms["imma_sequential"][
      "retention_accuracy"] + 0.2
  assert s["wall_seconds"] < 20 * 60


SHOWCASE = [e for e in _catalog.EXPERIMENTS if e.showcase is not None]


@pytest.mark.parametrize("entry", SHOWCASE, ids=[e.module for e in SHOWCASE])
def test_showcase_verdicts_equal_the_stored_full_runs(tmp_path, entry,
                                                      request):
  """The showcase size exists to show the full run's verdicts quickly: each
  claim's verdict at showcase size equals the stored full run's."""
  stored = report.full_verdicts().get(entry.module)
  if stored is None:
    pytest.skip(f"no stored full run of {entry.module}")
  args = list(entry.showcase)
  if entry.needs_data:
    args += ["--data-dir", str(request.getfixturevalue("house_price_dir"))]
  s = _run(entry.module, tmp_path, *args)
  full = {c["claim"]: c["verdict"] for c in stored["claims"]}
  here = {c["claim"]: c["verdict"] for c in s["claims"]}
  assert set(here) == set(full)
  assert here[s["claims"][0]["claim"]] != "not measured"    # the headline
  # a claim the showcase leaves unmeasured shows the stored full verdict
  assert {k: v for k, v in here.items() if v != "not measured"} == {
      k: full[k] for k, v in here.items() if v != "not measured"}
