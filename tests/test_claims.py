"""Claims and verdicts (experiments._claims), the thresholds beside each
experiment's claims, and the dashboard that shows them."""

import json

import pytest

from experiments import _claims, report


@pytest.mark.parametrize("checks,verdict", [
    ({"a": True, "b": True}, _claims.HOLDS),
    ({"a": True, "b": False}, _claims.PARTLY),
    ({"a": False, "b": False}, _claims.NOT_HERE),
    ({"a": False, "b": None}, _claims.NOT_HERE),      # None: not measured
    ({"a": True, "b": None}, _claims.HOLDS),
    ({"a": None}, _claims.UNMEASURED),
])
def test_graded_verdicts(checks, verdict):
  c = _claims.graded("a claim", checks, figure="f")
  assert c["verdict"] == verdict and c["figure"] == "f"
  failed = [k for k, v in checks.items() if v is False]
  assert all(k in c["reason"] for k in failed)
  if verdict == _claims.PARTLY:
    assert c["reason"].startswith("yes: a") and "not: b" in c["reason"]


def test_an_unmet_requirement_makes_the_claim_untestable_not_half_true():
  c = _claims.graded("c", {"a": True}, figure="f",
                     requires={"references differ": False})
  assert c["verdict"] == _claims.NOT_HERE
  assert "untestable here, not: references differ" in c["reason"]
  c = _claims.graded("c", {"a": False, "b": True}, figure="f",
                     requires={"references differ": True})
  assert c["verdict"] == _claims.PARTLY
  assert "references differ" not in c["reason"]


def test_claim_and_check_refuse_what_is_not_a_claim():
  with pytest.raises(ValueError, match="verdict 'maybe'"):
    _claims.claim("x", "maybe", "r", "f")
  with pytest.raises(ValueError, match="needs its text"):
    _claims.claim("", _claims.HOLDS, "r", "f")
  with pytest.raises(ValueError, match="must be a list"):
    _claims.check({"claim": "x"})
  with pytest.raises(ValueError, match="claim, verdict, reason, figure"):
    _claims.check([{"claim": "x", "verdict": _claims.HOLDS}])
  ok = _claims.claim("x", _claims.PARTLY, "r", "f")
  assert _claims.check([ok]) == [ok]


@pytest.mark.parametrize("a,b,want", [
    ({"mean": 0.1, "std": 0.02}, {"mean": 0.6, "std": 0.05}, "below"),
    ({"mean": 0.6, "std": 0.02}, {"mean": 0.1, "std": 0.05}, "above"),
    # 0.09 apart, the larger sd 0.05: inside 2 sd
    ({"mean": 0.50, "std": 0.01}, {"mean": 0.59, "std": 0.05},
     "no difference"),
    ({"mean": None, "std": None}, {"mean": 0.5, "std": 0.0}, None),
])
def test_relation_is_the_two_sd_rule(a, b, want):
  assert _claims.relation(a, b) == want


def test_run_refuses_a_summary_without_claims(tmp_path):
  from experiments._rundir import RunOptions
  from experiments._runner import Run
  from experiments.quadratic import Config
  opts = RunOptions(out=tmp_path, resume=False, overwrite=False, quiet=True,
                    quick=True, checkpoint_every=50, keep_checkpoints=1)
  run = Run("quadratic", Config(), opts)
  with pytest.raises(ValueError, match="no 'claims'"):
    run.finish({"x": 1})
  s = run.finish({"claims": [_claims.claim("c", _claims.HOLDS, "r", "f")]})
  assert s["claims"][0]["verdict"] == "holds"
  assert "## Claims" in (tmp_path / "report.md").read_text()


def _rir_method(rir, i, ii):
  return {"rir": {"pinv": rir}, "kappa_ratio_harmful": {"pinv": i},
          "kappa_ratio_pretrain": {"pinv": ii}, "dh_norm_ratio_final": 1.2,
          "dp_norm_ratio_final": 0.5}


def test_house_price_claims_read_rir_against_ten():
  from experiments import _house_price_report
  ident = {**_rir_method(1.0, 1.0, 1.0), "dh_norm_ratio_final": 1.0,
           "dp_norm_ratio_final": 1.0}
  methods = {"identity": ident, "cond_num": _rir_method(12.0, 3.0, 0.5),
             "opt_kappa": _rir_method(9.9, 2.0, 0.5),
             "r_ill_only": _rir_method(1.5, 9.0, 6.0),
             "probe_ascent": _rir_method(2.0, 1.0, 0.5)}
  success = {"cond_num": {"weak": True}}
  ours, only, fig1 = _house_price_report.claims(methods, success)
  assert ours["verdict"] == "holds"
  assert only["verdict"] == "partly" and "not: Opt κ RIR ≥ 10" in \
      only["reason"]
  assert fig1["verdict"] == "holds"
  methods["cond_num"] = _rir_method(9.0, 3.0, 0.5)
  assert _house_price_report.claims(methods, success)[0]["verdict"] == "partly"


def test_digit_pairs_claims_need_every_pair():
  from experiments import digit_pairs
  n = len(digit_pairs.PAIRS)
  m = lambda ok, rir: {"success_pairs": {"pinv": ok},
                       "mean_rir": {"pinv": rir}}
  c = digit_pairs.claims({"cond_num": m(n, 70.0), "opt_kappa": m(58, 70.0),
                          "r_ill_only": m(0, 1.9),
                          "probe_ascent": m(digit_pairs.FEW_PAIRS + 1, 1.8)})
  assert c[0]["verdict"] == "holds"
  assert c[1]["verdict"] == "partly" and "IMMA" in c[1]["reason"]
  c = digit_pairs.claims({"cond_num": m(n - 1, 5.2)})
  assert c[0]["verdict"] == "does not hold here"
  assert c[1]["verdict"] == "not measured"


def _mean(m, s=0.0):
  return {"mean": m, "std": s}


def test_sophon_digits_claims_use_the_two_sd_rule():
  from experiments import _sophon_report
  dom = {"after_finetune": {"protected": _mean(0.17, 0.04),
                            "scratch": _mean(0.61, 0.03),
                            "original": _mean(0.85, 0.01)},
         "protected_below_scratch_2sd_every_epoch": False,
         "worst_case_transferring": {"delta_protected": _mean(0.05, 0.03)}}
  out = {"domains": {"noise_shift": dom},
         "original_accuracy": {"original": _mean(0.97),
                               "protected": _mean(0.95)}}
  suppress, intact = _sophon_report.claims(out)
  assert suppress["verdict"] == "partly"
  assert "not: noise_shift: below scratch − 2 sd" in suppress["reason"]
  assert intact["verdict"] == "holds"
  out["original_accuracy"]["protected"] = _mean(0.93)
  assert _sophon_report.claims(out)[1]["verdict"] == "does not hold here"
  dom["worst_case_transferring"] = {"delta_protected": _mean(0.07, 0.03)}
  dom["after_finetune"]["protected"] = _mean(0.55, 0.04)   # inside 2 sd
  assert _sophon_report.claims(out)[0]["verdict"] == "does not hold here"


def test_mima_claims_read_the_targets():
  from experiments import _mima_report
  att = lambda w: {"worst_concept_accuracy": w}
  ms = {m: {"attacks": {"lora": att(w), "full": att(w)},
            "retention_accuracy": r}
        for m, w, r in (("none", 1.0, 0.97), ("mima", 0.4, 0.79),
                        ("imma_sequential", 0.6, 0.37))}
  out = {"methods": ms, "targets": {
      "none_relearns_every_concept": True,
      "mima_well_below_none_at_every_checkpoint": False,
      "mima_beats_imma_sequential_on_worst_concept": True,
      "mima_retention_within_5pct_of_erased": False}}
  relearn, joint, keep = _mima_report.claims(out)
  assert relearn["verdict"] == "does not hold here"
  out["targets"]["none_relearns_every_concept"] = False
  relearn = _mima_report.claims(out)[0]
  assert relearn["verdict"] == "does not hold here"
  assert "something to protect" in relearn["reason"]
  assert joint["verdict"] == "holds" and "0.4 vs sequential IMMA 0.6" in \
      joint["figure"]
  assert keep["verdict"] == "does not hold here"


def test_mima_half_of_erased_counts_checkpoints_where_the_erased_relearned():
  from experiments import _mima_report
  curve = lambda *m: {"worst_concept": {"mean": list(m)}}
  out = {"attacks": {
      # step 0 and the erased model below 0.5 are never checked
      "lora/joint": {"none": curve(0.9, 0.4, 0.8, 1.0),
                     "mima": curve(0.9, 0.9, 0.3, 0.6)},
      "full/joint": {"none": curve(0.0, 1.0, 1.0, 1.0),   # not a K/V attack
                     "mima": curve(0.0, 1.0, 1.0, 1.0)},
      "phi_merge": {"none": curve(0.0, 0.5, 0.6, 0.6),
                    "mima": curve(0.0, 0.25, 0.3, 0.39)}}}
  half = _mima_report.half_of_erased(out, eval_every=50)
  # checked: lora 0.8 (0.3 met), 1.0 (0.6 not); phi_merge 0.5, 0.6, 0.6
  # (0.25 and 0.3 met, 0.39 not)
  assert half["checked"] == 5 and half["met"] == 3
  assert half["worst"] == ("phi_merge", 150, 0.39, 0.6)   # ratio 0.65
  out["attacks"]["lora/joint"]["mima"] = curve(0.9, 0.9, 0.3, 0.4)
  out["attacks"]["phi_merge"]["mima"] = curve(0.0, 0.25, 0.3, 0.3)
  assert _mima_report.half_of_erased(out, eval_every=50)["met"] == 5
  out["attacks"] = {"ti/joint": out["attacks"]["full/joint"]}
  assert _mima_report.half_of_erased(out, eval_every=50) == {
      "checked": 0, "met": 0, "worst": None}


def _summary(root, name, claims, *, quick=False, figures=(), png=None):
  d = root / name
  root.mkdir(exist_ok=True)
  d.mkdir(parents=True)
  (d / "summary.json").write_text(json.dumps({
      "experiment": name, "seed": 0, "quick": quick, "wall_seconds": 1.0,
      "figures": list(figures), "claims": claims}))
  (d / "config.json").write_text(json.dumps(
      {"versions": {"immunojax": "abc123", "jax": "0.10.2"}}))
  if png:
    (d / f"{png}.png").write_bytes(b"\x89PNG")
  return d


@pytest.fixture
def stored(tmp_path, monkeypatch):
  """The dashboard's stored full-run verdicts, from a file the test owns."""
  path = tmp_path / "full_verdicts.json"
  monkeypatch.setattr(report, "FULL_VERDICTS", path)
  return path


def test_dashboard_sections_verdicts_and_links(tmp_path, stored):
  stored.write_text(json.dumps({
      "sophon_digits": {"claims": [_claims.claim(
          "SOPHON claim", _claims.PARTLY, "r", "f")],
          "versions": {"immunojax": "full123"}},
      "mima_digits": {"claims": [_claims.claim(
          "MIMA claim", _claims.NOT_HERE, "stored reason", "stored fig")],
          "versions": {"immunojax": "full123"}}}))
  tmp_path = tmp_path / "results"
  hold = _claims.claim("SOPHON claim", _claims.HOLDS, "why", "0.17 vs 0.61")
  part = _claims.claim("GS-LoRA claim", _claims.PARTLY, "yes: a — not: b",
                       "Acc_f 0")
  _summary(tmp_path, "sophon_digits", [hold], png="paper_protocol",
           figures=[{"name": "protected", "ours": 0.17, "paper": 0.152,
                     "note": "n"}])
  _summary(tmp_path, "gs_lora_digits", [part], png="tasks")
  _summary(tmp_path, "cross_defense", [], figures=[])
  cd = json.loads((tmp_path / "cross_defense" / "summary.json").read_text())
  cd["tables"] = [{"title": "Cross-defense table (budget 100 steps)",
                   "markdown": "| start | rho |\n|---|---|\n| sophon | 0.1 |"}]
  (tmp_path / "cross_defense" / "summary.json").write_text(json.dumps(cd))
  (tmp_path / report.SKIPPED).write_text(json.dumps([{
      "experiment": "house_price", "reason": "needs --data-dir",
      "command": "python -m experiments.house_price --data-dir D"}]))
  (tmp_path / report.FAILED).write_text(json.dumps([{
      "experiment": "mima_digits", "exit": 1,
      "command": "python -m experiments.mima_digits --quick"}]))
  assert report.main([str(tmp_path)]) == 0
  text = (tmp_path / "README.md").read_text()
  heads = [line for line in text.splitlines() if line.startswith("## ")]
  assert heads[0].startswith("## Cross-defense table")      # at the top
  order = ["Cross-defense", "Condition-number", "SOPHON", "GS-LoRA", "IMMA",
           "The harness", "Failed", "Skipped", "Appendix: every figure"]
  at = [next(i for i, h in enumerate(heads) if key in h) for key in order]
  assert at == sorted(at), heads
  assert "| sophon | 0.1 |" in text
  assert ("| SOPHON claim | [sophon_digits](sophon_digits/report.md) | "
          "**holds** | partly | why | 0.17 vs 0.61 |") in text
  assert ("| GS-LoRA claim | [gs_lora_digits](gs_lora_digits/report.md) | "
          "**partly** | — |") in text
  # not run here: the stored full run's verdict, reason and figure
  assert ("| MIMA claim | mima_digits | not run | does not hold here | "
          "stored reason | stored fig |") in text
  assert "commit full123" in text
  assert '<img src="sophon_digits/paper_protocol.png"' in text
  assert '<img src="gs_lora_digits/tasks.png"' in text
  assert "| sophon_digits | protected | 0.17 | 0.152 | n |" in text
  assert "`python -m experiments.sophon_digits` (3 min 53 s)" in text
  assert "| mima_digits | 1 | `python -m experiments.mima_digits --quick` |" \
      in text
  assert "needs --data-dir" in text
  assert "- mima_digits: not in this run (its stored full-run verdicts" in text
  assert "immunojax abc123" in text
  assert "Smoke size" not in text


def test_a_smoke_dashboard_marks_its_verdicts_and_drops_the_paper(tmp_path,
                                                                 stored):
  tmp_path = tmp_path / "results"
  hold = _claims.claim("SOPHON claim", _claims.HOLDS, "why", "f")
  _summary(tmp_path, "sophon_digits", [hold], quick=True,
           figures=[{"name": "protected", "ours": 0.17, "paper": 0.152,
                     "note": "n"}])
  assert report.main([str(tmp_path)]) == 0
  text = (tmp_path / "README.md").read_text()
  assert "Smoke size" in text and "| this run (smoke) |" in text
  assert "0.152" not in text


def test_a_smoke_run_prints_no_paper_figure_beside_its_numbers(tmp_path,
                                                              capsys):
  from experiments import quadratic
  assert quadratic.main(["--quick", "--out", str(tmp_path / "q")]) == 0
  printed = capsys.readouterr().out
  figures = [line for line in printed.splitlines() if ": ours " in line]
  assert figures and "the numbers mean nothing" in printed
  assert not any(" paper " in line for line in figures), figures


def test_reproduce_writes_the_dashboard_and_records_a_failure(tmp_path):
  import subprocess
  import sys
  out = tmp_path / "r"
  r = subprocess.run(
      [sys.executable, "-m", "experiments.reproduce", "--size", "quick",
       "--only", "quadratic,house_price", "--out", str(out),
       "--data-dir", str(tmp_path / "no_such_folder")],
      capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr
  assert "size quick" in r.stdout
  text = (out / "README.md").read_text()
  assert "| No paper (the runner's example)" in text
  assert "## Skipped" in text and "house_price" in text
  assert json.loads((out / report.FAILED).read_text()) == []
  r = subprocess.run([sys.executable, "-m", "experiments.reproduce",
                      "--quick", "--size", "full"], capture_output=True,
                     text=True, timeout=60)
  assert r.returncode == 2 and "contradict" in r.stderr


def test_showcase_and_full_sizes_are_declared_for_every_experiment():
  from experiments import _catalog
  for e in _catalog.EXPERIMENTS:
    assert e.paper in _catalog.PAPERS
    assert e.showcase is None or "--quick" not in e.showcase
    assert _catalog.size_args(e, "full") == []
  with pytest.raises(ValueError, match="not one of"):
    _catalog.size_args(_catalog.EXPERIMENTS[0], "huge")


def test_every_method_has_its_own_colour_and_references_one_look():
  from experiments import _plots
  colours = list(_plots.METHOD_COLORS.values())
  assert len(colours) == len(set(colours))
  ref_colours = {r["color"] for r in _plots.REFERENCES.values()}
  assert not ref_colours & set(colours)
  for alias, ref in _plots.ALIASES.items():
    assert _plots.style(alias) == _plots.REFERENCES[ref]
  assert _plots.style("no such method")["color"] not in colours
  for name, method in _plots.METHOD_SYNONYMS.items():
    assert _plots.style(name)["color"] == _plots.METHOD_COLORS[method]


def test_only_full_size_runs_are_stored(tmp_path, stored):
  c = [_claims.claim("a claim", _claims.HOLDS, "r", "f")]
  full = _summary(tmp_path, "sophon_digits", c)
  small = _summary(tmp_path, "gs_lora_digits", c)
  smoke = _summary(tmp_path, "mima_digits", c, quick=True)
  for d, argv in ((full, ["--out", "x", "--quiet", "--no-compile-cache"]),
                  (small, ["--out", "x", "--seeds", "0"]),
                  (smoke, ["--quick", "--out", "x"])):
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "argv": argv}))
  assert report.main([str(tmp_path), "--store-full-verdicts"]) == 0
  kept = json.loads(stored.read_text())
  assert list(kept) == ["sophon_digits"]
  assert kept["sophon_digits"]["claims"] == c
  assert report.full_verdicts() == kept
