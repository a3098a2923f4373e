"""What bad input gets: one test per case, CLI cases through a subprocess.

Every refusal is one line naming the problem (exit 2 for usage errors, 1
for a diverged run), is found before anything is written where it can be,
and never deletes or overwrites what a user owns.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments import _runner
from immunojax import attacks, lora, spectral
from immunojax.finetune import finetune
from tests.conftest import run_module

QUAD = ["-m", "experiments.quadratic", "--quick", "--quiet"]


def quad(tmp_path, *args, out="run", env=None):
  return run_module(QUAD + ["--out", str(tmp_path / out), *args], env=env)


def one_line_error(r, code=2):
  assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
  err = r.stderr.strip().splitlines()
  assert err and err[-1].startswith(("error:", "python -m experiments")), err
  return err[-1]


# ------------------------------------------------------------- data loss
def test_overwrite_refuses_a_folder_that_is_not_ours(tmp_path):
  user = tmp_path / "run"
  (user / "sub").mkdir(parents=True)
  (user / "notes.txt").write_text("mine")
  (user / "sub" / "data.csv").write_text("1,2")
  msg = one_line_error(quad(tmp_path, "--overwrite"))
  assert "not a run directory of ours" in msg
  assert (user / "notes.txt").read_text() == "mine"
  assert (user / "sub" / "data.csv").exists()


def quad_in_process(tmp_path, *args, out="run"):
  from experiments import quadratic
  return quadratic.main(["--quick", "--quiet", "--out", str(tmp_path / out),
                         *args])


def test_overwrite_refuses_our_run_with_a_user_file_inside(tmp_path):
  assert quad_in_process(tmp_path) == 0
  (tmp_path / "run" / "notes.txt").write_text("mine")
  msg = one_line_error(quad(tmp_path, "--overwrite"))
  assert "notes.txt" in msg
  assert (tmp_path / "run" / "notes.txt").exists()
  (tmp_path / "run" / "notes.txt").unlink()
  assert quad_in_process(tmp_path, "--overwrite") == 0      # ours only: fine


def test_overwrite_of_the_working_directory_is_refused(tmp_path):
  (tmp_path / "keep.py").write_text("x = 1")
  r = run_module(QUAD + ["--out", ".", "--overwrite"], cwd=tmp_path)
  assert "not a run directory of ours" in one_line_error(r)
  assert (tmp_path / "keep.py").exists()


def test_metrics_hold_each_step_once_after_a_resume(tmp_path):
  # A loop without checkpoints re-runs on resume; its old records go.
  import dataclasses

  @dataclasses.dataclass(frozen=True)
  class C:
    seed: int = 0

  opts = dict(out=tmp_path, quiet=True, quick=True, checkpoint_every=5,
              keep_checkpoints=2)
  run = _runner.Run("t", C(), _runner.RunOptions(resume=False,
                                                 overwrite=False, **opts))
  step = lambda s, t: ({"w": s["w"] + 1.0}, {"x": jnp.asarray(float(t))})
  s0 = {"w": jnp.zeros(2)}
  run.loop("free", s0, step, 20, log_every=1, checkpoint=False)
  run.loop("saved", s0, step, 12, log_every=1)
  again = _runner.Run("t", C(), _runner.RunOptions(resume=True,
                                                   overwrite=False, **opts))
  again.loop("free", s0, step, 20, log_every=1, checkpoint=False)
  assert again.loop("saved", s0, step, 12, log_every=1)["w"][0] == 12
  recs = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text()
          .splitlines()]
  keys = [(r["loop"], r["step"]) for r in recs]
  assert len(keys) == len(set(keys)) == 32


# ------------------------------------------------ silently wrong results
def _house_csv(path, rows=700, bad_cell=False):
  rng = np.random.default_rng(0)
  import pandas as pd
  frame = pd.DataFrame({
      "Id": np.arange(rows), "MSZoning": np.where(np.arange(rows) % 2, "RL",
                                                   "RM"),
      "LotArea": rng.normal(size=rows), "GrLivArea": rng.normal(size=rows),
      "Street": rng.choice(["Pave", "Grvl"], rows),
      "SalePrice": rng.normal(size=rows)})
  if bad_cell:
    frame["GrLivArea"] = frame["GrLivArea"].astype(object)
    frame.loc[41, "GrLivArea"] = "abc"
  path.mkdir(parents=True, exist_ok=True)
  frame.to_csv(path / "train.csv", index=False)
  return path


@pytest.mark.parametrize("case,needle", [
    ("bad_cell", "line 43, column 'GrLivArea': 'abc' is not a number"),
    ("small", "has 50 rows for D_P"),
])
def test_house_price_csv_with_wrong_schema_is_refused(tmp_path, case, needle):
  d = _house_csv(tmp_path / "data", rows=100 if case == "small" else 700,
                 bad_cell=case == "bad_cell")
  r = run_module(["-m", "experiments.house_price", "--quick", "--quiet",
                  "--data-dir", str(d), "--out", str(tmp_path / "run")])
  assert needle in one_line_error(r)
  assert not (tmp_path / "run").exists()


def test_a_diverged_training_run_says_so(tmp_path):
  r = quad(tmp_path, "--optimizer", "sgd", "--learning-rate", "1e9")
  msg = one_line_error(r, code=1)
  assert "diverged" in msg and "at step" in msg and "lower the learning" in msg
  assert not (tmp_path / "run" / "summary.json").exists()


def test_a_diverged_attack_is_reported_not_scored():
  x = jax.random.normal(jax.random.PRNGKey(0), (64, 4))
  y = (x[:, 0] > 0).astype(jnp.int32)
  logits = lambda p, x: x @ p["head"]["kernel"]
  target = attacks.Target(
      lambda p, b: optax.softmax_cross_entropy_with_integer_labels(
          logits(p, b[0]), b[1]).mean() * 1e3,
      lambda p: jnp.mean(jnp.argmax(logits(p, x), -1) == y), (x, y))
  grid = attacks.grid(optimizers=("sgd",), learning_rates=(0.1, 1e306),
                      steps=(20,), modes=("full",))
  params = {"head": {"kernel": jnp.zeros((4, 2))}}
  curves = attacks.run_attacks(grid, {"p": params}, target, eval_every=10)
  assert curves.diverged["p"].tolist() == [False, True]
  assert np.isnan(curves.metric["p"][1, -1])           # not chance accuracy
  s = attacks.summarize(curves)["p"]
  assert s["diverged"] == [grid[1].label]
  assert s["within_budget"]["20"]["attack"] == grid[0].label
  from experiments._plots import curves_json
  json.dumps(curves_json(curves), allow_nan=False)     # valid JSON


@pytest.mark.parametrize("case", [
    "zero_matrix", "zero_start", "nan_matvec", "lora_rank", "final_update"])
def test_library_refuses_or_reports_degenerate_values(case):
  if case == "zero_matrix":
    assert float(spectral.condition_number(jnp.zeros((3, 3)))) == np.inf
    assert float(spectral.log_condition_number(jnp.zeros(3))) == np.inf
  elif case == "zero_start":
    with pytest.raises(ValueError, match="initial_vector is zero"):
      spectral.lanczos(lambda v: v, 4, 2, key=jax.random.PRNGKey(0),
                       initial_vector=jnp.zeros(4))
  elif case == "nan_matvec":
    with pytest.raises(FloatingPointError, match="NaN/Inf at step 0"):
      spectral.lanczos(lambda v: v * jnp.nan, 4, 2, key=jax.random.PRNGKey(0))
  elif case == "lora_rank":
    params = {"fc": {"kernel": jnp.ones((6, 5))}}
    ad = lora.init(params, lora.LoraConfig(r=2, target_modules=("fc",)),
                   key=jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="rank 2 but the LoraConfig says r=4"):
      lora.merge(params, ad, lora.LoraConfig(r=4, target_modules=("fc",)))
  else:   # the loss is finite at every step; the last update overflows
    loss = lambda w, b: jnp.sum(w * b)
    with pytest.raises(FloatingPointError, match="last step"):
      finetune(jnp.ones(2), loss, optax.sgd(1e308), jnp.full((1, 2), 1e10))


# ------------------------------------------------ late or unclear errors
@pytest.mark.parametrize("module,args,needle", [
    ("deep_immunization", ["--methods", "ourz"], "--methods"),
    ("house_price", ["--preconditioner", "bogus"], "--preconditioner"),
    ("attack_grid", ["--optimizers", "sgd,bogus"], "--optimizers"),
    ("attack_grid", ["--lora-rank", "0"], "--lora-rank"),
    ("attack_grid", ["--steps", "0"], "--steps"),
    ("quadratic", ["--batch-size", "0"], "--batch-size"),
    ("attack_grid", ["--learning-rates", "0.1,-1"], "--learning-rates"),
    ("quadratic", ["--learning-rat", "0.1"], "--learning-rat"),
    ("quadratic", ["--dim", "0"], "--dim"),
    ("quadratic", ["--keep-checkpoints", "0"], "--keep-checkpoints"),
    ("gs_lora_digits", ["--beta-ratio", "0.2,0.2"], "--beta-ratio"),
    ("gs_lora_digits", ["--missing-classes", "2"], "--missing-classes"),
    ("mima_digits", ["--concepts", "3,3"], "--concepts"),
    ("mima_digits", ["--attack-modes", "lora,dreambooth"], "--attack-modes"),
    ("mima_digits", ["--inner-optimizer", "adamx"], "--inner-optimizer"),
    ("mima_digits", ["--scheme", "alternating", "--inner-steps", "3"],
     "--inner-steps"),
    ("mima_digits", ["--inner-steps", "0"], "--inner-steps"),
    ("mima_digits", ["--prior-null", "1.5"], "--prior-null"),
    ("mima_digits", ["--prior-weights", "1,1"], "--prior-weights"),
    ("mima_digits", ["--collateral-digits", "8"], "--collateral-digits"),
    ("mima_digits", ["--uce-lambda", "0"], "--uce-lambda"),
    ("gs_lora_digits", ["--ratio", "1.5"], "--ratio"),
])
def test_options_are_validated_before_anything_is_written(tmp_path, module,
                                                           args, needle):
  r = run_module(["-m", f"experiments.{module}", "--quick", "--quiet", "--out",
                  str(tmp_path / "run"), *args])
  assert needle in one_line_error(r)
  assert not (tmp_path / "run").exists()


def test_resume_needs_a_run_to_resume(tmp_path):
  assert "does not exist" in one_line_error(quad(tmp_path, "--resume"))
  (tmp_path / "run").mkdir()
  assert "is empty" in one_line_error(quad(tmp_path, "--resume"))


@pytest.mark.parametrize("case", ["out_is_file", "out_under_file",
                                  "corrupt_config_json"])
def test_bad_output_locations(tmp_path, case):
  (tmp_path / "file").write_text("mine")
  if case == "out_is_file":
    msg = one_line_error(quad(tmp_path, out="file"))
    assert "is a file" in msg
  elif case == "out_under_file":
    msg = one_line_error(quad(tmp_path, out="file/run"))
    assert "cannot write the run directory" in msg
  else:
    assert quad_in_process(tmp_path) == 0
    (tmp_path / "run" / "config.json").write_text("{trunc")
    msg = one_line_error(quad(tmp_path, "--resume"))
    assert "config.json is missing or unreadable" in msg
  assert (tmp_path / "file").read_text() == "mine"


@pytest.mark.parametrize("name,text,needle", [
    ("c.json", '{"steps": 3,\n "dim": }', "c.json line 2 is not valid JSON"),
    ("c.yaml", "steps: 3\ndim: [1\n", "c.yaml line 3 is not valid YAML"),
])
def test_malformed_config_files_name_the_line(tmp_path, name, text, needle):
  (tmp_path / name).write_text(text)
  assert needle in one_line_error(quad(tmp_path, "--config",
                                       str(tmp_path / name)))


def test_corrupt_checkpoint_is_named_and_fallback_is_opt_in(tmp_path, capsys):
  assert quad_in_process(tmp_path, "--checkpoint-every", "100") == 0
  ckpts = tmp_path / "run" / "checkpoints" / "fit"
  latest = max(int(p.name) for p in ckpts.iterdir() if p.name.isdigit())
  for f in (ckpts / str(latest)).rglob("*"):
    if f.is_file():
      f.write_bytes(b"garbage")
  (tmp_path / "run" / "summary.json").unlink()
  r = quad(tmp_path, "--checkpoint-every", "100", "--resume")
  msg = one_line_error(r)
  assert f"checkpoint step {latest} of loop 'fit' is corrupt" in msg
  assert "--fallback" in msg and len(r.stderr) < 600
  assert "Event loop is closed" not in r.stderr
  assert quad_in_process(tmp_path, "--checkpoint-every", "100", "--resume",
                         "--fallback") == 0
  assert f"resumed from step {latest - 100}" in capsys.readouterr().out
  assert (tmp_path / "run" / "corrupt_checkpoints" / f"fit-{latest}").is_dir()
  assert (tmp_path / "run" / "summary.json").exists()


def test_report_survives_summaries_with_missing_fields(tmp_path):
  from experiments import report
  (tmp_path / "a").mkdir()
  (tmp_path / "a" / "summary.json").write_text(json.dumps(
      {"experiment": "x", "figures": [{"name": "only a name"}]}))
  (tmp_path / "b").mkdir()
  (tmp_path / "b" / "summary.json").write_text("[1, 2]")
  assert report.main([str(tmp_path)]) == 0
  assert "only a name" in (tmp_path / "README.md").read_text()
  (tmp_path / "README.md").write_text("my own notes")
  assert report.main([str(tmp_path)]) == 2          # not ours: kept
  assert (tmp_path / "README.md").read_text() == "my own notes"


@pytest.mark.parametrize("fn,needle", [
    (lambda: spectral.condition_number(jnp.eye(3, dtype=jnp.int32)), "int32"),
    (lambda: spectral.eigenvalues(jnp.zeros((0, 0))), "0 x 0"),
    (lambda: spectral.condition_number(jnp.zeros((0,))), "empty"),
    (lambda: spectral.gram(jnp.ones((3, 2), jnp.int32)), "int32"),
    (lambda: spectral.hessian_matrix(lambda p: (jnp.sum(p ** 2), {}),
                                     jnp.ones(3)), "tuple"),
])
def test_spectral_bad_dtypes_shapes_and_losses(fn, needle):
  with pytest.raises(ValueError, match=needle):
    fn()
