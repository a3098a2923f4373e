"""Every experiment module at --quick size: runs, writes its contract."""

import json
import os

import numpy as np
import pytest

from conftest import run_module

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
  # Pre-trained features make digits 5-9 at least as easy as scratch.
  assert s["attacks"]["pretrained"]["within_budget"]["60"]["metric"] >= \
      s["attacks"]["scratch"]["within_budget"]["60"]["metric"] - 0.05
  curves = json.loads((out / "attack_curves.json").read_text())
  assert len(curves["attacks"]) == 12 and len(curves["metric"]["scratch"][0]) == 4
  assert (out / "attack_curves.png").exists()
  assert s["dp_accuracy"] > 0.9


def test_house_price_quick_contract(tmp_path, house_price_dir):
  from experiments import house_price
  out = tmp_path / "hp"
  assert house_price.main(["--quick", "--out", str(out), "--quiet",
                           "--data-dir", str(house_price_dir)]) == 0
  s = load(out)
  assert set(s["methods"]) == {"identity", "r_ill_only", "opt_kappa",
                               "probe_ascent", "cond_num"}
  for m, v in s["methods"].items():
    for key in ("rir", "kappa_ratio_harmful", "kappa_ratio_pretrain"):
      assert set(v[key]) == {"pinv", "official"}, (m, key)
  ours = s["methods"]["cond_num"]
  assert ours["rir"]["pinv"] > 10 and ours["kappa_ratio_pretrain"]["pinv"] < 1
  assert ours["rir"]["pinv"] == pytest.approx(
      ours["kappa_ratio_harmful"]["pinv"] / ours["kappa_ratio_pretrain"]["pinv"])
  # Def. 3.1(c): an invertible theta keeps the best D_P head's quality.
  assert ours["dp_test_mse_best_head"] == pytest.approx(
      s["methods"]["identity"]["dp_test_mse_best_head"], rel=1e-3)
  # Both direction rules, each method flagged with the one it used; the
  # balanced weights match the task gradient, so they differ per method.
  assert set(s["rules"]) == {"normalized", "balanced"}
  for rule, table in s["rules"].items():
    for m, v in table.items():
      assert v["normalized"] is (rule == "normalized"), (rule, m)
      assert -1 <= v["direction_alignment_t0"] <= 1
  bal = s["rules"]["balanced"]
  assert bal["cond_num"]["lambdas"]["lambda_h"] != pytest.approx(
      bal["opt_kappa"]["lambdas"]["lambda_h"], rel=0.1)
  assert all(set(v) == {"weak", "strong"} for v in s["success_def_3_1"].values())
  assert len(s["preamble"]) == 3 and any("normalized" in n for n in s["notes"])
  report = (out / "report.md").read_text()
  assert report.splitlines()[2].startswith("> RIR")
  assert "closed-form" in report and "| identity rir" not in report
  for png in ("fig1_linesearch", "lambda_sweep"):
    assert (out / f"{png}.png").exists()


def test_house_price_without_data_names_the_option(tmp_path, capsys):
  from experiments import house_price
  assert house_price.main(["--quick", "--out", str(tmp_path / "x"),
                           "--quiet"]) == 2
  assert "--data-dir" in capsys.readouterr().err
  assert not (tmp_path / "x").exists()
  assert "data-dir" in house_price.unavailable_reason(None)


def test_digit_pairs_quick_contract(tmp_path):
  from experiments import digit_pairs
  out = tmp_path / "dp"
  assert digit_pairs.main(["--quick", "--out", str(out), "--quiet"]) == 0
  s = load(out)
  for m in digit_pairs.QUICK["methods"]:
    v = s["methods"][m]
    assert 0 <= v["success_pairs"]["pinv"] <= 90 and v["mean_rir"]["pinv"] > 0
    m_ = v["log_rir_matrix"]["pinv"]
    assert len(m_) == 10 and m_[3][3] is None
    assert v["success_pairs"]["pinv"] + len(v["failed_pairs"]["pinv"]) == 90
    assert v["pairs_strong_success"]["pinv"] <= v["success_pairs"]["pinv"]
    assert v["normalized"] is True
    assert s["pairs_strong_success"][m] == v["pairs_strong_success"]
  assert s["methods"]["cond_num"]["success_pairs"]["pinv"] >= 80
  # The study grid: one cell per (tasks, optimizer, rule, ratio, budget).
  q = digit_pairs.QUICK
  assert len(s["grid"]) == (len(q["grid_tasks"]) * len(q["grid_optimizers"])
                            * 2 * len(q["grid_ratios"]) * len(q["grid_budgets"]))
  assert {c["rule"] for c in s["grid"]} == {"normalized", "balanced"}
  for c in s["grid"]:
    assert c["normalized"] is (c["rule"] == "normalized")
    assert c["problems"] == q["grid_seeds"] * q["grid_pairs"]
    assert c["diverged_pairs"] == 0 and 0 <= c["dp_accuracy"] <= 1
    for est in ("pinv", "official"):
      st = c[est]
      assert st["mean_rir"] > 0 and st["median_rir"] > 0
      assert 0 <= st["pairs_ii_at_most_1"] <= q["grid_pairs"]
      assert 0 <= st["pairs_strong_success"] <= st["pairs_i_at_least_10"]
  assert set(s["grid_main_effects"]) == set(digit_pairs.GRID_FACTORS)
  assert any(n.startswith("Conclusion of the grid") for n in s["notes"])
  assert len(s["preamble"]) == 3
  for png in ("log_rir_heatmaps", "study_grid"):
    assert (out / f"{png}.png").exists()


def test_deep_immunization_quick_contract(tmp_path):
  from experiments import deep_immunization as di
  out = tmp_path / "di"
  assert di.main(["--quick", "--out", str(out), "--quiet"]) == 0
  s = load(out)
  seeds = di.QUICK["num_seeds"]
  assert set(s["methods"]) == {"theta0", *di.QUICK["methods"]}
  assert s["methods"]["theta0"]["dp_accuracy"]["mean"] > 0.9
  ours = s["methods"]["cond_num"]
  assert ours["rir_theta0"]["pinv"]["mean"] > 1
  assert ours["dp_accuracy"]["mean"] > 0.9
  assert ours["trained_with"] == "pinv" and ours["normalized"] is True
  for start, v in s["methods"].items():
    assert v["rank"]["mean"] <= v["dim"]
    assert 0 < v["sigma_min"]["mean"] <= v["sigma_max"]["mean"], start
  for probe in ("line_search", "tuned_sgd", "tuned_adam"):
    for start in s["methods"]:
      q = s["probe"][probe][start]
      acc = q["test_accuracy"]
      assert len(acc["mean"]) == len(acc["std"]) == len(q["steps"]) == 11
      assert all(0 <= a <= 1 for a in acc["mean"]) and q["steps_to_threshold"]["of"] == seeds
      if probe != "line_search":
        assert len(q["best_learning_rate"]) == seeds
  ls = s["probe"]["line_search"]["theta0"]["distance_ratio"]["mean"]
  assert ls[0] == 1.0 and ls[-1] < 1.0        # the probe converges
  assert any("Probing is" in n for n in s["notes"])
  assert (out / "probe_curves.png").exists()


def test_estimator_option_reaches_the_method(tmp_path):
  from experiments import digit_pairs
  out = tmp_path / "dp"
  assert digit_pairs.main(["--quick", "--out", str(out), "--quiet", "--epochs",
                           "1", "--methods", "cond_num", "--estimator",
                           "official", "--grid", "false"]) == 0
  s = load(out)
  assert s["methods"]["cond_num"]["trained_with"] == "official"
  with pytest.raises(SystemExit):
    digit_pairs.main(["--quick", "--out", str(tmp_path / "x"), "--estimator",
                      "svd"])
  assert not (tmp_path / "x").exists()


def test_sophon_digits_quick_contract(tmp_path):
  from experiments import sophon_digits
  out = tmp_path / "sd"
  assert sophon_digits.main(["--quick", "--out", str(out), "--quiet",
                             "--loops", "40", "--env-modes",
                             "reinit_head,head", "--env-optimizers", "sgd",
                             "--pretrain-epochs", "10", "--epochs", "3",
                             "--grid-optimizers", "adam", "--grid-modes",
                             "head", "--domains", "noise_shift,glyphs"]) == 0
  s = load(out)
  assert s["seeds"] == 2
  assert s["original_accuracy"]["original"]["mean"] > 0.9
  assert s["wall_seconds"] > 0
  # the calibration rule read the validation half: pre-training transfers
  c = s["calibration"]
  assert c["attack_lr"] in (3e-3, 1e-2) and len(c["per_rate"]) == 2
  assert c["original"] > c["scratch"]
  assert set(s["curves"]) == {"scratch", "original", "protected"}
  assert 0 <= s["grid_worst_case"] <= 1
  for name in ("noise_shift", "glyphs"):          # two domains at once
    d = s["domains"][name]
    assert len(d["curves"]["scratch"]) == len(d["curves_sd"]["scratch"]) == 4
    (lab, rec), = d["grid_vs_scratch"].items()    # one attack: adam, head
    assert lab == "adam lr=0.01 bs=64 head"
    assert set(rec["delta_protected"]) == {"20", "60"}
    assert rec["delta_protected"]["60"]["of"] == 2
    assert rec["inside_environments"] is False    # head/adam not simulated
    assert d["grid_worst_case_test_selected"]["protected"]["metric"] \
        is not None
  assert set(s["targets"]) >= {"intactness within 3 points"}
  assert (out / "paper_protocol.png").exists()


def test_sophon_trapping_quick_contract(tmp_path):
  from experiments import sophon_trapping as st
  out = tmp_path / "st"
  assert st.main(["--quick", "--out", str(out), "--quiet", "--loops", "30",
                  "--pretrain-epochs", "8", "--epochs", "2",
                  "--env-modes", "full,head", "--grid-steps", "40",
                  "--budgets", "20,40"]) == 0
  s = load(out)
  assert set(s["rows"]) == {"one_environment", "all_environments"}
  trap, full = s["rows"]["one_environment"], s["rows"]["all_environments"]
  # the spec's run F structure: one environment, full SGD
  assert [(e["mode"], e["optimizer"]) for e in trap["environments"]] == [
      ("full", "sgd")]
  assert len(full["environments"]) == 2                # full, head x sgd
  assert trap["rate"] == full["rate"]                  # one calibration
  for r in (trap, full):
    v = r["verdicts"]["noise_shift"]
    assert isinstance(v["full_finetuning_trapped"], bool)
    assert set(v["vs_scratch_per_attack"].values()) <= {
        "below", "above", "no difference", "n/a"}
    assert len(r["rolled_back"]) == 2
  assert any(n.startswith("Adding environments") for n in s["notes"])
  assert (out / "trapping.png").exists()


def test_sophon_denoiser_quick_contract(tmp_path):
  from experiments import sophon_denoiser as sdn
  out = tmp_path / "sdn"
  assert sdn.main(["--quick", "--out", str(out), "--quiet", "--loops", "20",
                   "--inner-steps", "4", "--hidden", "64"]) == 0
  s = load(out)
  assert set(s["at_epochs"]) == {"1", "4"}
  assert set(s["protected_vs_scratch"].values()) <= {"above", "below",
                                                     "no difference"}
  assert len(s["curves"]["protected"]) == len(s["curves_sd"]["scratch"]) == 5
  assert s["simulated_steps_vs_first_epoch"]["inner_steps"] == 4
  assert any("shorter than the attacker's first epoch" in n
             for n in s["notes"])                       # 4 < one epoch
  assert len(s["rolled_back_of_logged_updates"]) == 2
  assert set(s["targets"]) >= {"original-domain MSE within 10 %"}
  assert (out / "finetune_mse.png").exists()
  assert sdn.main(["--quick", "--out", str(tmp_path / "bad"), "--t-max",
                   "2000"]) == 2
  assert not (tmp_path / "bad").exists()       # nothing written


def test_sophon_covered_reads_momentum_as_its_effective_step():
  from experiments import sophon_digits as sd
  from immunojax import attacks
  from immunojax.methods import sophon as sp
  envs = [sp.Environment("full", "sgd", 0.03),
          sp.Environment("full", "adam", 1e-2)]
  a = lambda o, lr, m="full": attacks.Attack(o, lr, 64, m, 10)
  assert sd.covered(a("momentum", 3e-3), envs)        # 3e-3 / 0.1 = 0.03
  assert not sd.covered(a("momentum", 1e-2), envs)    # 0.1 > 0.03
  assert sd.covered(a("sgd", 1e-2), envs)
  assert sd.covered(a("adam", 1e-2), envs)
  assert not sd.covered(a("adam", 5e-2), envs)
  assert not sd.covered(a("adam", 1e-3, "head"), envs)
  assert not sd.covered(a("rmsprop", 1e-3), envs)


# The GS-LoRA experiments share ViT programs (gs_lora_relearning's and
# gs_lora_regimes' quick sizes: the pre-training epoch, the bounded-forget
# task run): one xdist worker runs the three in turn, so a later one loads
# from the suite's compile cache what an earlier compiled, instead of both
# workers compiling it at once (pyproject's --dist loadgroup).
GS_LORA_GROUP = pytest.mark.xdist_group("gs_lora")


def _run_at_default_optimisation(module: str, out) -> None:
  """``--quick`` in its own process at XLA's default optimisation: the ViT
  runs are bound by running, not compiling, and the suite's level 0
  (conftest) made gs_lora_digits 1.8x slower (153 s against 81 s cold on 2
  workers)."""
  flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split()
                   if "xla_backend_optimization_level" not in f)
  r = run_module(["-m", f"experiments.{module}", "--quick", "--out",
                  str(out), "--quiet"], env={"XLA_FLAGS": flags})
  assert r.returncode == 0, r.stderr[-3000:]


@GS_LORA_GROUP
def test_gs_lora_digits_quick_contract(tmp_path):
  from experiments import gs_lora_digits as g
  out = tmp_path / "gs"
  _run_at_default_optimisation("gs_lora_digits", out)
  s = load(out)
  assert s["pretrained"]["test_accuracy"] > 60     # margin-on, quick size
  for method in g.METHODS:
    for regime in ("ratio", "few_shot", "missing"):
      r = s["methods"][method][regime]
      for key in ("acc_r", "acc_f", "acc_o", "h_mean"):
        assert len(r[key]) == 4, (method, regime, key)
      assert r["acc_o"][0] is None and r["acc_o"][1] is not None
      assert 0 < r["trainable_share"] <= 100 and r["wall_seconds"] > 0
      assert ("acc_m" in r) == (regime == "missing")
  gl = s["methods"]["gs_lora"]["ratio"]
  assert gl["trainable_share"] < 5 and len(gl["zeroed_groups"]) == 4
  assert len(gl["group_norms"][0]) == 2                  # quick depth 2
  assert s["methods"]["finetune"]["ratio"]["zeroed_groups"] is None
  assert "ratio" in s["methods"]["gs_lora_released_alpha"]
  # the retrained model never saw the forget classes' training images
  assert s["methods"]["retrain"]["ratio"]["acc_f"][0] <= 1.0
  rl = s["relearning"]
  assert set(rl["best_attack_curve"]) == {"never_saw", "original", "gs_lora",
                                          "gs_lora_pp"}
  assert len(rl["steps"]) == len(rl["best_attack_curve"]["gs_lora"])
  assert rl["selection"] == "validation"      # never chosen on the test half
  assert all(isinstance(v, bool) or v is None for v in s["targets"].values())
  for png in ("tasks.png", "group_norms.png", "relearning.png"):
    assert (out / png).exists()


@GS_LORA_GROUP
def test_gs_lora_relearning_quick_contract(tmp_path):
  from experiments import gs_lora_relearning as g
  out = tmp_path / "glr"
  _run_at_default_optimisation("gs_lora_relearning", out)
  s = load(out)
  starts = {"original", "never_saw", *g.QUICK["variants"]}
  assert set(s["relearning"]) == set(s["depth"]) == starts
  for start in starts:
    for probe in g.QUICK["probes"]:
      row = s["relearning"][start][probe]
      assert len(row["curve"]["mean"]) == len(s["steps"])
      assert set(row) >= {"curve", "steps_to_50", "rho"}
      assert len(row["rho"]["per_seed"]) == len(g.QUICK["seeds"])
    assert 0 <= s["depth"][start]["linear_probe_accuracy"]["mean"] <= 1
    assert set(s["variants"][start]) >= {"acc_f", "acc_r", "h_mean",
                                         "relearn_50"}
  # rho is 0 at never-saw and 1 at the original wherever it is defined
  for ref, want in (("never_saw", 0.0), ("original", 1.0)):
    for v in s["relearning"][ref]["head_only"]["rho"]["per_seed"]:
      assert v is None or abs(v - want) < 1e-9
  assert (out / "relearning.png").exists()


def test_relearning_aggregate_and_target_by_hand():
  from experiments import gs_lora_relearning as g
  cfg = g.Config(probes=("head_only",), relearn_step=50, probe_steps=100)

  def seed(u, n, d, acc_f):
    probe = lambda v: {"head_only": {"curve": [0.0, v], "at_step": v,
                                     "steps_to_50": 50 if v >= 0.5 else None}}
    return {"probes": {"original": probe(u), "never_saw": probe(n),
                       "x": probe(d)},
            "scores": {"original": {"acc_r": 95.0, "acc_f": 95.0},
                       "never_saw": {"acc_r": 95.0, "acc_f": 0.0},
                       "x": {"acc_r": 94.0, "acc_f": acc_f, "h_mean": 90.0}},
            "depth": {"original": 0.9, "never_saw": 0.5, "x": 0.6},
            "steps": [0, 50], "pretrained_acc_r": 95.0}
  agg = g.aggregate(cfg, [seed(0.9, 0.1, 0.2, 0.0), seed(0.8, 0.2, 0.3, 0.5)])
  rho = agg["relearning"]["x"]["head_only"]["rho"]
  np.testing.assert_allclose(rho["per_seed"], [0.125, 1 / 6])
  np.testing.assert_allclose(rho["mean"], (0.125 + 1 / 6) / 2)
  assert agg["relearning"]["never_saw"]["head_only"]["steps_to_50"][
      "censored"] == 2
  assert g.target(cfg, agg)["met_by"] == ["x"]     # |0.25 - 0.15| <= 0.15
  agg = g.aggregate(cfg, [seed(0.9, 0.1, 0.5, 0.0), seed(0.8, 0.2, 0.3, 0.5)])
  assert g.target(cfg, agg)["met_by"] == []        # 0.4 - 0.15 > 0.15


@GS_LORA_GROUP
def test_gs_lora_regimes_quick_contract(tmp_path):
  from experiments import gs_lora_regimes as g
  out = tmp_path / "glg"
  _run_at_default_optimisation("gs_lora_regimes", out)
  s = load(out)
  assert set(s["alpha_by_regime"]) == set(g.QUICK["regimes"])
  for regime, ch in s["alpha_by_regime"].items():
    assert f"{ch['alpha']:g}" in s["alpha_sweep"][regime][ch["forget"]]
    assert set(s["alpha_sweep"][regime]) == {"bounded", "bounded_each"}
    for by_alpha in s["alpha_sweep"][regime].values():
      for row in by_alpha.values():
        assert len(row["acc_f"]["mean"]) == 4 == len(row["h_mean"]["sd"])
        assert len(row["forget_class_acc"]) == len(g.QUICK["seeds"])
        assert set(row["h_overall"]) == {"mean", "sd"}
  assert set(s["few_shot_hard"]) == {"gs_lora", "gs_lora_pp"}
  assert len(s["hard_verdict"]["per_task"]) == 4
  assert (out / "regimes.png").exists()


def test_setting_choice_and_hard_verdict_by_hand():
  from experiments import gs_lora_regimes as g
  row = lambda f, h, sd=0.5: {"acc_f": {"mean": f},
                              "h_overall": {"mean": h, "sd": sd}}
  # 0.1 has the best H; 1 misses Acc_f; 0.01 is 2 points below (> 2 sd).
  f, a, rule = g.choose_setting({"bounded": {
      "0.01": row([0, 0.5], 90), "0.1": row([0, 0.9], 92),
      "1": row([0, 3.0], 95)}})
  assert (f, a) == ("bounded", "0.1") and "no different" in rule
  # inside 2 sd of the best: the largest alpha; the released term first.
  f, a, _ = g.choose_setting({"bounded": {"0.1": row([0, 0], 92, 1.0),
                                          "1": row([0, 0], 91.5, 1.0)},
                              "bounded_each": {"1": row([0, 0], 93, 1.0)}})
  assert (f, a) == ("bounded", "1")
  # the released term misses Acc_f: ours is chosen.
  f, a, _ = g.choose_setting({"bounded": {"1": row([48, 0], 95)},
                              "bounded_each": {"0.01": row([0, 0], 80)}})
  assert (f, a) == ("bounded_each", "0.01")
  f, a, rule = g.choose_setting({"bounded": {"0.1": row([2, 9], 1),
                                             "1": row([5, 4], 1)}})
  assert (f, a) == ("bounded", "1") and "no setting" in rule
  acc = lambda m, sd: {"acc_f": {"mean": m, "sd": sd}}
  v = g.hard_verdict({"gs_lora": acc([20, 10, 3], [2, 2, 1]),
                      "gs_lora_pp": acc([10, 8, 3], [3, 1, 1])})
  assert v["per_task"] == ["lower", "no difference", "no difference"]
  assert v["gs_lora_leaves_over_5"] == [True, True, False]
  cell = {"acc_f": {"mean": [0.0, 0.5]}}
  agg = {"alpha_by_regime": {"ratio": {
      "alpha": 1.0, "forget": "bounded",
      "acc_r_minus_pretrained": {"mean": [-1.0, -2.5]}}},
         "alpha_sweep": {"ratio": {"bounded": {"1": cell}}},
         "hard_verdict": v}
  t = g.targets(agg)
  assert t["ratio: Acc_f <= 1 % after every task (chosen setting)"]
  assert not t["ratio: Acc_r within 2 points of pre-trained after every "
               "task"]                                   # -2.5 on task 2
  assert not any(k.startswith("hard") and t[k] for k in t)  # task 2: no diff.


def test_mima_digits_quick_contract(tmp_path):
  from experiments import mima_digits as md
  out = tmp_path / "mima"
  assert md.main(["--quick", "--out", str(out), "--quiet"]) == 0
  s = load(out)
  assert set(s["methods"]) == set(md.METHODS) == {
      "none", "max", "imma_sequential", "imma_joint", "mima",
      "mima_average_merge"}
  checkpoints = len(s["attack_steps"])
  assert checkpoints == md.QUICK["attack_steps"] // md.QUICK["eval_every"] + 1
  for m, v in s["methods"].items():
    assert 0 <= v["retention_accuracy"] <= 1 and v["wall_seconds"] >= 0
    assert set(v["attacks"]) == {"lora/per_concept", "lora/joint",
                                 "phi_merge"}
    for a in v["attacks"].values():
      acc = a["concept_accuracy"]
      assert set(acc) == {"1", "3", "7"}
      assert all(len(c) == checkpoints for c in acc.values())
      assert a["worst_concept_accuracy"] == max(c[-1] for c in acc.values())
      assert a["wall_seconds"] > 0
  # every attack starts from the model it attacks: checkpoint 0 is the
  # unattacked model, the same for per-concept and joint scoring
  for m, v in s["methods"].items():
    first = [c[0] for c in v["attacks"]["lora/joint"]["concept_accuracy"].values()]
    assert first == pytest.approx(s["concept_accuracy_before_attack"][m],
                                  abs=1.5 / md.QUICK["samples"])
  assert set(s["targets"]) >= {"mima_well_below_none_at_every_checkpoint",
                                "mima_beats_imma_sequential_on_worst_concept",
                                "mima_retention_within_5pct_of_erased",
                                "mima_below_max_by_2sd",
                                "mima_below_imma_sequential_by_2sd",
                                "every_method_retention_matched"}
  assert {"phi_star_below_average_merge_by_2sd_on_phi_merge",
          "mima_worst_le_half_erased_lora_kv_every_checkpoint"} <= set(
              s["targets"])
  assert s["targets"]["mima_below_max_by_2sd"] is None      # one seed: no sd
  mv = s["displacement"]           # simulated vs evaluated attacker (issue 29)
  assert len(mv["simulated"]) == len(mv["evaluated"]) == 3
  assert all(x > 0 for x in mv["simulated"] + mv["evaluated"])
  assert s["displacement_ratio"] == pytest.approx(
      np.mean(mv["evaluated"]) / np.mean(mv["simulated"]))
  # issue 29's contract: mean and sd over seeds per checkpoint, the
  # phi_merge attack, the prior weight each method ran at
  assert set(s["attacks"]) == {"lora/per_concept", "lora/joint", "phi_merge"}
  for a, per_method in s["attacks"].items():
    assert set(per_method) == set(md.METHODS)
    for m, v in per_method.items():
      got = s["methods"][m]["attacks"][a]
      acc = np.asarray(list(got["concept_accuracy"].values()))
      assert v["worst_concept"]["mean"] == pytest.approx(acc.max(0).tolist())
      assert v["worst_concept"]["sd"] == [0.0] * checkpoints   # one seed
      assert len(v["selectivity"]["mean"]) == checkpoints
      if a != "lora/per_concept":      # worst concept over collateral
        assert v["selectivity"]["mean"] == pytest.approx(
            (acc.max(0) / np.asarray(got["collateral_accuracy"])).tolist())
  for m, v in s["methods"].items():   # phi* of unchanged copies: the model
    assert [c[0] for c in v["attacks"]["phi_merge"][
        "concept_accuracy"].values()] == pytest.approx(
            s["concept_accuracy_before_attack"][m],
            abs=1.5 / md.QUICK["samples"])
  rm = s["retention_matched"]
  assert rm["none"]["prior_weight"] is None
  assert all(rm[m]["prior_weight"] == md.Config.prior_weight
             and rm[m]["retention"] == s["methods"][m]["retention_accuracy"]
             for m in md.METHODS if m != "none")
  assert s["notes"] and (out / "concept_accuracy.png").exists()


def test_mima_sampler_gives_each_concept_k_lower_steps():
  import jax
  import jax.numpy as jnp
  from experiments import mima_digits as md
  from immunojax.data import prompts
  cfg = md.Config(**{**md.QUICK, "inner_steps": 3, "batch": 4})
  st = md.world(cfg)
  d = st.concept_data(cfg.concepts, cfg.concepts)
  b = md.make_sampler(st, cfg, jax.random.PRNGKey(0))((d, jnp.eye(3)), 7)
  assert b["lower"]["x"].shape == (3, 3, 4, 64)        # (slots, K, batch, .)
  assert b["upper"]["x"].shape == (3, 4, 64)
  for slot, digit in enumerate(cfg.concepts):          # one concept per slot
    want = prompts.concept_prompt(st.vocab, digit)
    np.testing.assert_array_equal(
        b["lower"]["tokens"][slot].reshape(-1, want.shape[0]),
        np.broadcast_to(want, (12, want.shape[0])))
  # the K steps draw different rows
  assert not np.array_equal(b["lower"]["x"][0, 0], b["lower"]["x"][0, 1])
  # --prior-null: the first rows of the prior batch carry the null prompt,
  # the rest their own digit's; the images are the same draw
  cfg_null = md.Config(**{**md.QUICK, "inner_steps": 3, "batch": 4,
                          "prior_null": 0.5})
  bn = md.make_sampler(st, cfg_null, jax.random.PRNGKey(0))((d, jnp.eye(3)),
                                                            7)
  toks = np.asarray(bn["prior"]["tokens"])
  np.testing.assert_array_equal(toks[:2], np.broadcast_to(
      np.asarray(st.null), (2, toks.shape[1])))
  np.testing.assert_array_equal(toks[2:], np.asarray(b["prior"]["tokens"])[2:])
  np.testing.assert_array_equal(bn["prior"]["x"], b["prior"]["x"])


def test_study_grid_helpers():
  import numpy as np
  from experiments import _digit_grid, digit_pairs
  for count in (2, 10, 20, 30):
    pairs = _digit_grid.stratified_pairs(digit_pairs.PAIRS, count)
    assert len(set(pairs)) == count and all(a != b for a, b in pairs)
    if count % 10 == 0:        # every digit equally often on each side
      assert np.bincount([a for a, _ in pairs], minlength=10).tolist() == \
          [count // 10] * 10
      assert np.bincount([b for _, b in pairs], minlength=10).tolist() == \
          [count // 10] * 10
  assert _digit_grid.stratified_pairs(digit_pairs.PAIRS, 90) == digit_pairs.PAIRS
  rng = np.random.default_rng(0)
  x = rng.normal(size=(50, 6))
  assert float(_digit_grid.gram_alignment(x, 2 * x)) == pytest.approx(1.0)
  assert float(_digit_grid.gram_alignment(x, x * np.arange(1, 7))) < 0.99
  # Diverged problems are counted, not averaged in.
  res = {"diverged": np.array([[False, True]]),
         "dp_accuracy": np.array([[0.9, 0.1]]),
         **{e: {"rir": np.array([[4.0, np.nan]]), "i": np.array([[12.0, 1.0]]),
                "ii": np.array([[0.5, 2.0]])} for e in ("pinv", "official")}}
  st = _digit_grid.cell_statistics(res, 2)
  assert st["diverged_pairs"] == 1 and st["dp_accuracy"] == pytest.approx(0.9)
  assert st["pinv"]["mean_rir"] == 4.0 and st["pinv"]["pairs_strong_success"] == 1


def test_cross_defense_quick_contract(tmp_path):
  from experiments import cross_defense as cd
  out = tmp_path / "cd"
  assert cd.main(["--quick", "--out", str(out), "--quiet"]) == 0
  s = load(out)
  assert set(s["families"]) == {"cond_num", "sophon", "gs_lora", "imma"}
  for r in ("U", "N", "S"):
    assert {"utility", "harm"} <= set(s["references"][r])
  # the references bracket the scale: N never saw the harm, U did
  assert s["references"]["U"]["harm"] > 0.9 > s["references"]["N"]["harm"]
  for name, d in s["defenses"].items():
    for key in ("claim", "utility", "harm", "worst_case", "rho", "sigma",
                "nra", "steps_to_threshold", "effort", "diverged",
                "grid_edge", "native", "seconds"):
      assert key in d, (name, key)
    for b in ("10", "30"):
      w = d["worst_case"][b]
      assert {"value", "ci", "attack"} <= set(w)
      assert w["value"] is None or 0 <= w["value"] <= 1
  assert s["grid"]["attacks"] == 8 and "wall_seconds" in s
  assert "Cross-defense table" in (out / "report.md").read_text()
  for png in ("recovery_curves.png", "forest.png", "modes.png"):
    assert (out / png).exists()
