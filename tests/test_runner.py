"""Experiment runner: CLI, configs, determinism, crash-resume, refusals."""

import json
import re
import shutil
from pathlib import Path

import pytest

from experiments import _config, quadratic, report
from experiments._cli import parse
from experiments._runner import KILL_ENV
from tests.conftest import ROOT, run_module


def summary(path):
  s = json.loads((Path(path) / "summary.json").read_text())
  s.pop("wall_seconds")
  return s


def test_help_lists_every_option_with_default():
  r = run_module(["-m", "experiments.quadratic", "--help"])
  assert r.returncode == 0
  options = r.stdout.split("options:", 1)[1]
  for flag, default in [("--num-examples", "4096"), ("--learning-rate", "0.01"),
                        ("--optimizer", "'adam'"), ("--seed", "0"),
                        ("--checkpoint-every", "50")]:
    assert flag in options
    assert f"[default: {default}]" in options.split(flag, 1)[1].split("\n  --", 1)[0]


@pytest.mark.parametrize("argv,needle", [
    (["--bogus", "1"], "--bogus"),
    (["--steps", "abc"], "--steps"),
    (["--optimizer", "lbfgs"], "--optimizer"),
    (["--learning-rate"], "--learning-rate"),
])
def test_bad_cli_options_fail_naming_the_option(argv, needle, capsys):
  with pytest.raises(SystemExit) as e:
    parse("quadratic", quadratic.Config, quadratic.QUICK, argv)
  assert e.value.code == 2
  assert needle in capsys.readouterr().err


def test_precedence_defaults_quick_file_cli(tmp_path):
  f = tmp_path / "c.yaml"
  f.write_text("steps: 77\nlearning_rate: 0.5\n")
  cfg, opts = parse("quadratic", quadratic.Config, quadratic.QUICK,
                    ["--quick", "--config", str(f), "--learning-rate", "0.25"])
  assert cfg.dim == quadratic.QUICK["dim"]          # quick over default
  assert cfg.steps == 77                            # file over quick
  assert cfg.learning_rate == 0.25                  # cli over file
  assert cfg.batch_size == 128                      # untouched default
  assert opts.quick
  j = tmp_path / "c.json"
  j.write_text(json.dumps({"config": {"optimizer": "sgd"}}))
  cfg, _ = parse("quadratic", quadratic.Config, {}, ["--config", str(j)])
  assert cfg.optimizer == "sgd"


@pytest.mark.parametrize("content,needle", [
    ({"stepz": 3}, "stepz"),
    ({"steps": "many"}, "steps"),
    ({"optimizer": "lbfgs"}, "optimizer"),
])
def test_bad_config_file_fails_naming_the_option(tmp_path, content, needle):
  f = tmp_path / "c.json"
  f.write_text(json.dumps(content))
  with pytest.raises(SystemExit, match=needle):
    parse("quadratic", quadratic.Config, {}, ["--config", str(f)])


def test_tuple_and_optional_types():
  import dataclasses
  from typing import Optional

  @dataclasses.dataclass(frozen=True)
  class C:
    sizes: tuple[int, ...] = (1, 2)
    limit: Optional[float] = None

  cfg = _config.resolve(C, quick=False, quick_overrides={}, file_values={
      "sizes": [3, 4, 5], "limit": "none"}, cli_values={})
  assert cfg.sizes == (3, 4, 5) and cfg.limit is None
  conv, _ = _config._converter(tuple[int, ...])
  assert conv("7,8") == (7, 8)


@pytest.mark.parametrize("values, needle", [
    ({"share": 0.0}, "--share must be > 0, got 0.0"),
    ({"share": 1.5}, "--share must be in [0, 1], got 1.5"),
    ({"rates": (0.1, -1.0)}, "--rates must be >= 0, got -1.0"),
    ({"rates": (0.1, float("nan"))}, "--rates must be >= 0, got nan"),
    ({"dim": 30}, "--dim 30 is not divisible by --heads 4"),
    ({"share": 1.0, "rates": (), "dim": 8}, None),
])
def test_require_names_the_option_and_its_range(values, needle):
  import dataclasses

  @dataclasses.dataclass(frozen=True)
  class C:
    share: float = 0.5
    rates: tuple[float, ...] = (0.1,)
    dim: int = 32
    heads: int = 4

  def check():
    _config.require(C(**values), positive=("share",), nonnegative=("rates",),
                    unit=("share",), divisible=(("dim", "heads"),))
  if needle is None:
    check()
  else:
    with pytest.raises(ValueError, match=re.escape(needle)):
      check()


def test_over_seeds_prefixes_all_but_the_first_seed(tmp_path, capsys):
  import dataclasses

  from experiments import _runner

  @dataclasses.dataclass(frozen=True)
  class C:
    seed: int = 0
  run = _runner.Run("t", C(), _runner.RunOptions(
      out=tmp_path, resume=False, overwrite=False, quiet=True, quick=True,
      checkpoint_every=5, keep_checkpoints=2))
  calls = run.over_seeds([4, 5, 6], lambda s, prefix: (s, prefix))
  assert calls == [(4, ""), (5, "seed_5/"), (6, "seed_6/")]
  assert "seed 6 (3/3)" in capsys.readouterr().out
  assert run.over_seeds([4], lambda s, prefix: prefix) == [""]


def test_run_directory_contents_and_determinism(tmp_path):
  a, b = tmp_path / "a", tmp_path / "b"
  assert quadratic.main(["--quick", "--out", str(a), "--quiet"]) == 0
  assert quadratic.main(["--quick", "--out", str(b), "--quiet"]) == 0
  for name in ("config.json", "metrics.jsonl", "summary.json", "report.md",
               "loss.png"):
    assert (a / name).exists(), name
  cfg = json.loads((a / "config.json").read_text())
  assert cfg["config"]["dim"] == quadratic.QUICK["dim"]
  assert cfg["versions"]["jax"] and cfg["versions"]["optax"] and cfg["devices"]
  assert summary(a) == summary(b)
  s = summary(a)
  assert s["relative_distance"] < 0.1
  assert "| final loss |" in (a / "report.md").read_text()
  lines = (a / "metrics.jsonl").read_text().splitlines()
  steps = [json.loads(x)["step"] for x in lines]
  assert steps == sorted(steps) and steps[-1] == quadratic.QUICK["steps"]


def test_sigkill_then_resume_equals_uninterrupted(tmp_path):
  clean, crashed = tmp_path / "clean", tmp_path / "crashed"
  args = ["-m", "experiments.quadratic", "--quick", "--quiet",
          "--checkpoint-every", "40"]
  r = run_module(args + ["--out", str(clean)])
  assert r.returncode == 0, r.stderr
  r = run_module(args + ["--out", str(crashed)], env={KILL_ENV: "120"})
  assert r.returncode == -9, (r.returncode, r.stderr)   # SIGKILL
  assert not (crashed / "summary.json").exists()
  r = run_module(args + ["--out", str(crashed), "--resume"])
  assert r.returncode == 0, r.stderr
  assert "resumed from step 120" in r.stdout
  a, b = summary(clean), summary(crashed)
  assert a.keys() == b.keys()
  for key in ("final_loss", "relative_distance", "kappa_dense"):
    assert abs(a[key] - b[key]) <= 1e-6 * max(1.0, abs(a[key]))
  assert max(abs(x - y) for x, y in zip(a["final_w"], b["final_w"])) <= 1e-6
  # metrics.jsonl has no duplicated steps after the resume.
  steps = [json.loads(x)["step"] for x in
           (crashed / "metrics.jsonl").read_text().splitlines()]
  assert len(steps) == len(set(steps))


def test_refuses_to_overwrite_or_resume_other_config(tmp_path, capsys):
  out = tmp_path / "run"
  assert quadratic.main(["--quick", "--out", str(out), "--quiet"]) == 0
  assert quadratic.main(["--quick", "--out", str(out), "--quiet"]) == 2
  assert "--overwrite" in capsys.readouterr().err
  assert quadratic.main(["--quick", "--out", str(out), "--quiet", "--resume",
                         "--steps", "10"]) == 2
  assert "differs in ['steps']" in capsys.readouterr().err
  assert quadratic.main(["--quick", "--out", str(out), "--quiet",
                         "--overwrite", "--steps", "20"]) == 0
  assert summary(out)["figures"]


def test_truncated_checkpoint_is_refused(tmp_path, capsys):
  out = tmp_path / "run"
  assert quadratic.main(["--quick", "--out", str(out), "--quiet"]) == 0
  latest = max((out / "checkpoints" / "fit").iterdir(),
               key=lambda p: int(p.name) if p.name.isdigit() else -1)
  for f in latest.rglob("*"):
    if f.is_file():
      f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2])
  assert quadratic.main(["--quick", "--out", str(out), "--quiet",
                         "--resume"]) == 2
  assert "is corrupt" in capsys.readouterr().err


def test_checkpoint_of_another_config_is_refused(tmp_path, capsys):
  a, b = tmp_path / "a", tmp_path / "b"
  assert quadratic.main(["--quick", "--out", str(a), "--quiet",
                         "--seed", "1"]) == 0
  assert quadratic.main(["--quick", "--out", str(b), "--quiet"]) == 0
  shutil.rmtree(b / "checkpoints")
  shutil.copytree(a / "checkpoints", b / "checkpoints")
  assert quadratic.main(["--quick", "--out", str(b), "--quiet",
                         "--resume"]) == 2
  assert "another config" in capsys.readouterr().err


def test_report_gathers_runs(tmp_path):
  for seed in (0, 1):
    assert quadratic.main(["--quick", "--out", str(tmp_path / f"s{seed}"),
                           "--quiet", "--seed", str(seed)]) == 0
  assert report.main([str(tmp_path)]) == 0
  text = (tmp_path / "README.md").read_text()
  assert text.count("| quadratic |") == 2 * 3
  assert "s0/loss.png" in text and "s1/report.md" in text


def test_no_pickle_in_saving_or_loading():
  for folder in ("immunojax", "experiments"):
    for path in (ROOT / folder).rglob("*.py"):
      src = path.read_text()
      assert "import pickle" not in src and "cloudpickle" not in src, path


def test_dashboard_keeps_notes_and_lists_skipped_experiments(tmp_path):
  run = tmp_path / "q"
  run.mkdir()
  (run / "summary.json").write_text(json.dumps({
      "experiment": "quadratic", "seed": 0, "quick": True, "wall_seconds": 1.0,
      "figures": [{"name": "final loss", "ours": 0.5, "paper": None,
                   "note": "exact least-squares optimum 0.4 | (no paper)"}],
      "notes": ["a note a reader needs"]}))
  (tmp_path / report.SKIPPED).write_text(json.dumps([{
      "experiment": "house_price", "reason": "needs --data-dir",
      "command": "python -m experiments.house_price --data-dir D"}]))
  assert report.main([str(tmp_path)]) == 0
  text = (tmp_path / "README.md").read_text()
  assert "exact least-squares optimum 0.4 \\| (no paper)" in text  # escaped
  assert "- a note a reader needs" in text
  assert "## Skipped" in text and "needs --data-dir" in text
  assert "`python -m experiments.house_price --data-dir D`" in text


@pytest.mark.parametrize("quick", [True, False])
def test_a_quick_run_never_stands_beside_a_paper_figure(tmp_path, quick):
  from experiments import _reports
  summary = {"experiment": "x", "seed": 0, "quick": quick,
             "wall_seconds": 1.0,
             "figures": [{"name": "acc", "ours": 0.5, "paper": 0.987,
                          "note": "n"}]}
  run = tmp_path / "r"
  run.mkdir()
  (run / "summary.json").write_text(json.dumps(summary))
  own = _reports.run_report(summary, run)
  assert report.main([str(tmp_path)]) == 0
  dash = (tmp_path / "README.md").read_text()
  for text in (own, dash):
    assert ("0.987" not in text) is quick
    assert ("Smoke size" in text) is quick


def test_optimizers_option_takes_names_and_import_paths(capsys):
  from experiments import attack_grid
  cfg, _ = parse("attack_grid", attack_grid.Config, attack_grid.QUICK,
                 ["--optimizers", "sgd,optax.lion,optax:adabelief"])
  values = _config.optimizer_values(cfg.optimizers)
  assert values[0] == "sgd"
  assert [v.name for v in values[1:]] == ["lion", "adabelief"]
  assert json.loads(json.dumps(_config.as_dict(cfg)))["optimizers"] == [
      "sgd", "optax.lion", "optax:adabelief"]
  for bad in ("optax.no_such_thing", "os.path.join", "bogus"):
    with pytest.raises(SystemExit):
      parse("attack_grid", attack_grid.Config, {}, ["--optimizers", bad])
    assert "--optimizers" in capsys.readouterr().err


def test_compile_cache_loads_what_it_can_and_recompiles_a_changed_program(
    tmp_path):
  """Experiments use JAX's persistent compilation cache: a rerun adds no
  entry and gives the same summary; an option that changes the program
  (here the array shapes) adds entries, and with --no-compile-cache none."""
  from immunojax import compile_cache
  cache = tmp_path / "cache"
  env = {compile_cache.ENV: str(cache)}

  def run(out, *extra):
    r = run_module(["-m", "experiments.quadratic", "--quick", "--quiet",
                    "--steps", "60", "--out", str(tmp_path / out), *extra],
                   env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    return compile_cache.entries(cache)

  first = run("a")
  assert first > 0
  assert run("b") == first                          # all loaded
  assert summary(tmp_path / "a") == summary(tmp_path / "b")
  assert run("c", "--dim", "12", "--no-compile-cache") == first
  assert run("d", "--dim", "12") > first            # a new program
