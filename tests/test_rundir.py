"""A run directory has one owner: the lock and the atomic files
(experiments/_rundir.py), through subprocesses."""

import json
import os
import signal
import subprocess
import sys
import time

from conftest import ROOT
from experiments import _rundir, report

RUN = [sys.executable, "-m", "experiments.quadratic", "--quick", "--quiet",
       "--steps", "1500", "--checkpoint-every", "100"]


def start(out, *extra, env=None):
  return subprocess.Popen(RUN + ["--out", str(out), *extra], cwd=ROOT,
                          env={**os.environ, **(env or {})},
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)


def finish(proc):
  out, err = proc.communicate(timeout=300)
  return proc.returncode, out, err


def wait_for_lock(out, proc, timeout=120):
  t = time.time()
  while not _rundir.is_locked(out):
    assert proc.poll() is None, proc.communicate()
    assert time.time() - t < timeout, "the run never took its lock"
    time.sleep(0.05)


def summary(out):
  s = json.loads((out / "summary.json").read_text())
  s.pop("wall_seconds")
  return s


def test_two_runs_on_one_out_one_runs_the_other_is_refused(tmp_path):
  out = tmp_path / "q"
  a, b = start(out), start(out, "--seed", "1")   # at the same moment
  (ra, _, ea), (rb, _, eb) = finish(a), finish(b)
  assert sorted([ra, rb]) == [0, 2], (ea, eb)
  loser = ea if ra == 2 else eb
  assert "is in use by another run (pid" in loser
  assert "wait for it, or pick another --out" in loser
  seed = 0 if ra == 0 else 1
  config = json.loads((out / "config.json").read_text())   # valid JSON
  assert config["seed"] == seed and summary(out)["seed"] == seed
  steps = [json.loads(x)["step"] for x in
           (out / "metrics.jsonl").read_text().splitlines()]
  assert len(steps) == len(set(steps))
  alone = tmp_path / "alone"
  rc, _, err = finish(start(alone, "--seed", str(seed)))
  assert rc == 0, err
  assert summary(out) == summary(alone)


def test_resume_or_overwrite_of_a_live_run_is_refused_and_kill_frees_it(
    tmp_path):
  out = tmp_path / "q"
  holder = start(out)
  wait_for_lock(out, holder)
  t = time.time()                       # its first checkpoint, then freeze
  while not any((out / "checkpoints").glob("*/*")):
    assert holder.poll() is None, holder.communicate()
    assert time.time() - t < 120, "the run never saved a checkpoint"
    time.sleep(0.005)
  os.kill(holder.pid, signal.SIGSTOP)   # alive and holding the lock, but it
  # cannot finish (and free it) before the two runs below try to take it
  for flag in ("--resume", "--overwrite"):
    rc, _, err = finish(start(out, flag))
    assert rc == 2 and "is in use by another run" in err, err
  os.kill(holder.pid, signal.SIGKILL)                 # no clean-up at all
  holder.wait()
  assert (out / _rundir.LOCK).exists() and not _rundir.is_locked(out)
  t = time.time()
  rc, _, err = finish(start(out, "--resume"))
  assert rc == 0, err
  assert time.time() - t < 120
  assert summary(out)["figures"]


def _read_while_writing(path, atomic: bool) -> tuple[int, int]:
  """A writer process replaces ``path`` 200 times (a 1.5 MB summary) while
  this process reads it; returns (reads, unparseable reads)."""
  writer = subprocess.Popen([sys.executable, "-c", f"""
import json
from pathlib import Path
from experiments._rundir import write_atomic
p = Path({str(path)!r})
payload = json.dumps({{"experiment": "x", "figures": [
    {{"name": "f" * 50, "ours": i}} for i in range(20000)]}})
for _ in range(200):
  write_atomic(p, payload) if {atomic} else p.write_text(payload)
"""], cwd=ROOT)
  reads = bad = 0
  while writer.poll() is None:
    try:
      json.loads(path.read_text())
      reads += 1
    except json.JSONDecodeError:
      bad += 1
  assert writer.returncode == 0
  return reads, bad


def test_a_reader_never_sees_half_a_json(tmp_path, capsys):
  run = tmp_path / "results" / "run"
  run.mkdir(parents=True)
  path = run / "summary.json"
  path.write_text(json.dumps({"experiment": "x"}))
  reads, bad = _read_while_writing(path, atomic=False)
  assert bad > 0          # the harness does catch plain writes mid-way
  reads, bad = _read_while_writing(path, atomic=True)
  assert reads > 100 and bad == 0
  # The dashboard reads through the same files and writes atomically too.
  assert report.main([str(tmp_path / "results")]) == 0
  assert "skipping unreadable" not in capsys.readouterr().out


def test_report_lists_a_live_run_as_in_progress(tmp_path):
  out = tmp_path / "results" / "q"
  holder = start(out)
  try:
    wait_for_lock(out, holder)
    assert report.main([str(tmp_path / "results")]) == 0
    text = (tmp_path / "results" / "README.md").read_text()
    assert "## In progress" in text and "`q`" in text
  finally:
    holder.kill()
    holder.wait()
