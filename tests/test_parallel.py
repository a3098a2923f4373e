"""immunojax.parallel: meshes, data and grid parallelism, multi-process runs.

Multi-device checks run ``tests/parallel_worker.py`` in a subprocess with 8
simulated CPU devices (the count is fixed when JAX starts); multi-process
checks start two local processes on 127.0.0.1.
"""

import json
import math
import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import ROOT, run_module
from immunojax import parallel
from immunojax.methods import sophon as sp


def worker(group: str) -> dict:
  proc = run_module([str(ROOT / "tests" / "parallel_worker.py"), group],
                    timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def test_data_parallel_equals_one_device_on_8_devices():
  r = worker("data")
  assert r["devices"] == 8
  # ten Adam steps, float64: equal up to the order of the gradient sums
  assert r["data_parallel_params"] < 1e-12
  assert r["data_parallel_loss"] < 1e-12
  assert r["model_axis_params"] < 1e-12
  assert r["model_axis_head_spec"] == "P(None, 'model')"
  assert r["model_axis_adam_spec"] == "P(None, 'model')"   # moments follow
  assert r["shard_map_params"] < 1e-12       # the axis_name hook, per device
  assert "needs rank >= 3" in r["bad_spec_error"]


def test_axis_name_keeps_every_method_on_8_devices():
  """``per_device`` with ``axis_name="data"`` equals the one-device method
  after 10 float64 steps for every family, including the losses that do
  not split over examples (a feature Gram's kappa, SOPHON's support/query
  split, GS-LoRA's ReLU(BND - CE_f) over padded rows)."""
  r = worker("methods")
  assert len(r) == 11
  for name, (diff, moved) in r.items():
    assert moved > 1e-3, name          # the method did something
    assert diff < 1e-10, (name, diff)


def test_grid_parallel_jobs_equal_their_vmap():
  r = worker("grid")
  assert r["vmap_values"] < 1e-14 and r["vmap_grad"] < 1e-12
  assert r["sequential_switch"] == [3.0, 6.0, 6.0, 3.0, 6.0]
  assert r["harness_metric"] < 1e-12 and r["harness_loss"] < 1e-12
  # a call per device, round robin: the same program, the same numbers
  assert r["spread_metric"] == 0.0 and r["spread_loss"] == 0.0
  assert r["spread_devices"] == [1, 2, 3, 1, 2]
  assert r["sophon_params"] < 1e-12
  ref, got = r["sophon_environments"]
  assert ref == got and len(ref) == 4
  assert r["mima_params"] < 1e-12


def test_spectral_work_on_a_data_sharded_loss():
  r = worker("spectral")
  assert all(r["eig_converged"])
  np.testing.assert_allclose(r["eig_data_sharded"], r["eig_reference"],
                             rtol=1e-9)
  np.testing.assert_allclose(r["eig_basis_sharded"], r["eig_reference"],
                             rtol=1e-9)
  # a basis sharded like its start vector: 1/8 of the big leaf per device
  assert (r["basis_temp_bytes_sharded"]
          < 0.4 * r["basis_temp_bytes_replicated"])
  assert r["gram"] < 1e-10


# ------------------------------------------------------------ in process
def test_mesh_errors_name_the_problem():
  with pytest.raises(ValueError, match="xla_force_host_platform_device_count"):
    parallel.local_mesh(jax.local_device_count() + 1)
  with pytest.raises(ValueError, match="positive int"):
    parallel.local_mesh(0)
  with pytest.raises(ValueError, match="give a shape"):
    parallel.local_mesh(1, axis_names=("data", "model"))
  with pytest.raises(ValueError, match="does not fit"):
    parallel.local_mesh(1, axis_names=("data", "model"), shape=(2, 1))
  mesh = parallel.local_mesh(1)
  with pytest.raises(ValueError, match="no axis 'model'"):
    parallel.size(mesh, "model")
  vm = parallel.sharded_vmap(mesh)
  with pytest.raises(ValueError, match="0 or None"):
    vm(jnp.sin, in_axes=1)(jnp.ones((2, 2)))
  with pytest.raises(ValueError, match="one leading size"):
    vm(jnp.add)(jnp.ones(2), jnp.ones(3))


def test_initialize_validates_before_connecting(monkeypatch):
  for var in (parallel.distributed.COORDINATOR_ENV,
              parallel.distributed.NUM_PROCESSES_ENV,
              parallel.distributed.PROCESS_ID_ENV):
    monkeypatch.delenv(var, raising=False)
  with pytest.raises(ValueError, match="give all of"):
    parallel.initialize("127.0.0.1:1234")
  with pytest.raises(ValueError, match="host:port"):
    parallel.initialize("localhost", 2, 0)
  with pytest.raises(ValueError, match=r"process_id must be in \[0, 2\)"):
    parallel.initialize("127.0.0.1:1234", 2, 2)
  monkeypatch.setenv(parallel.distributed.NUM_PROCESSES_ENV, "two")
  with pytest.raises(ValueError, match="not an integer"):
    parallel.initialize()


def test_spread_calls_on_one_device_are_the_calls():
  f = jax.jit(lambda a, b: (jnp.sin(a) * b, a.sum()))
  calls = [(f, (jnp.linspace(0, 1, 3) + i, 2.0)) for i in range(3)]
  for devices in (None, jax.devices()[:1]):
    got = parallel.spread_calls(calls, devices)
    for (fn, args), out in zip(calls, got):
      assert isinstance(out[0], np.ndarray)
      np.testing.assert_array_equal(out[0], fn(*args)[0])
  with pytest.raises(ValueError, match="devices is empty"):
    parallel.spread_calls(calls, [])


def test_harness_refuses_devices_with_a_sharded_map():
  from immunojax import attacks  # noqa: PLC0415
  target = attacks.Target(loss_fn=lambda p, b: jnp.sum(p * b),
                          metric_fn=lambda p: jnp.sum(p),
                          train_data=jnp.ones((4, 2)))
  grid = [attacks.Attack("sgd", 0.1, 2, "full", 2)]
  with pytest.raises(ValueError, match="pass one of them"):
    attacks.run_attacks(grid, {"p": jnp.zeros(2)}, target, eval_every=1,
                        attack_map=parallel.sharded_vmap(
                            parallel.local_mesh(1)),
                        devices=jax.devices())


def test_sequential_map_equals_vmap():
  f = lambda a, b, c: jnp.sin(a) * b + c
  a, b = jnp.linspace(0, 1, 4), jnp.arange(4.0)
  np.testing.assert_allclose(
      parallel.sequential_map(f, in_axes=(0, 0, None))(a, b, 2.0),
      jax.vmap(f, in_axes=(0, 0, None))(a, b, 2.0), rtol=1e-15)


def test_data_parallel_on_one_device_is_plain_jit():
  from immunojax import immunizer     # noqa: PLC0415
  loss = lambda p, b: jnp.mean((b[0] @ p - b[1]) ** 2)
  imm = immunizer.supervised(loss, optax.sgd(0.1))
  x = jax.random.normal(jax.random.PRNGKey(0), (8, 3))
  batch, key = (x, x @ jnp.ones(3)), jax.random.PRNGKey(1)
  state = imm.init(jnp.zeros(3), key)
  a, _ = jax.jit(imm.update)(state, batch, key)
  b, _ = parallel.data_parallel(imm.update, parallel.local_mesh(1))(
      state, batch, key)
  np.testing.assert_array_equal(a.params, b.params)


def test_sophon_averages_its_simulated_environments():
  rng = np.random.default_rng(0)
  params = {"body": {"kernel": jnp.asarray(rng.normal(size=(3, 4)))},
            "head": {"kernel": jnp.asarray(rng.normal(size=(4, 3)))}}
  apply = lambda p, x: jnp.tanh(x @ p["body"]["kernel"]) @ p["head"]["kernel"]
  batch = {"restricted": (jnp.asarray(rng.normal(size=(1, 3, 10, 3))),
                          jnp.asarray(rng.integers(0, 3, (1, 3, 10)))),
           "original": (jnp.asarray(rng.normal(size=(1, 10, 3))),
                        jnp.asarray(rng.integers(0, 3, (1, 10))))}
  envs = [sp.Environment("full", "sgd", 0.3),
          sp.Environment("head", "adam", 0.01)]
  key = jax.random.PRNGKey(3)

  def delta(n, k):
    imm = sp.sophon(apply=apply, environments=envs, environments_per_update=n,
                    fts_optimizer=optax.sgd(1.0), ntr_optimizer=optax.sgd(0.0))
    new, m = jax.jit(imm.update)(imm.init(params, k), batch, k)
    return jax.tree_util.tree_map(jnp.subtract, params, new.params), m

  both, m = delta(3, key)
  singles = [delta(1, k) for k in jax.random.split(key, 3)]
  want = jax.tree_util.tree_map(lambda *g: sum(g) / 3,
                                *[d for d, _ in singles])
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(
      a, b, rtol=1e-10, atol=1e-14), both, want)
  assert m["environment"].shape == (3,)
  assert [int(e) for e in m["environment"]] == [
      int(s["environment"]) for _, s in singles]
  with pytest.raises(ValueError, match="environments_per_update"):
    sp.sophon(apply=apply, environments=envs, environments_per_update=0)


# ------------------------------------------------- experiments, processes
TIMINGS = ("seconds", "time")


def differences(a, b, path=""):
  """(relative difference, path) of every number; inf where they differ
  in anything but float round-off. Timing entries are skipped."""
  out = []
  if isinstance(a, dict) and isinstance(b, dict):
    for k in sorted(set(a) | set(b)):
      if not any(t in k for t in TIMINGS):
        out += differences(a.get(k), b.get(k), f"{path}/{k}")
  elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
    for i, (x, y) in enumerate(zip(a, b)):
      out += differences(x, y, f"{path}[{i}]")
  elif isinstance(a, float) and isinstance(b, float):
    out.append((abs(a - b) / max(abs(a), abs(b), 1e-300), path))
  elif a != b:
    out.append((math.inf, path))
  return out


def assert_same_summary(a_dir, b_dir, rtol=1e-9):
  a, b = (json.loads((d / "summary.json").read_text()) for d in (a_dir, b_dir))
  worst = max(differences(a, b), default=(0.0, ""))
  assert worst[0] <= rtol, worst


def test_devices_option_gives_the_one_device_summary(tmp_path):
  outs = {}
  for n in (1, 2):
    outs[n] = tmp_path / f"d{n}"
    proc = run_module(["-m", "experiments.quadratic", "--quick", "--quiet",
                       "--devices", str(n), "--out", str(outs[n])])
    assert proc.returncode == 0, proc.stderr[-2000:]
  assert_same_summary(outs[1], outs[2])
  cfg = json.loads((outs[2] / "config.json").read_text())
  assert len(cfg["devices"]) >= 2
  proc = run_module(["-m", "experiments.quadratic", "--quick", "--devices",
                     "3", "--out", str(tmp_path / "d3")],
                    env={"XLA_FLAGS":
                         "--xla_force_host_platform_device_count=2"})
  assert proc.returncode == 2
  assert "--devices 3" in proc.stderr and "2 local" in proc.stderr
  assert not (tmp_path / "d3").exists()          # nothing written


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_run_one_experiment(tmp_path):
  out = tmp_path / "two"
  env = dict(os.environ, IMMUNOJAX_NUM_PROCESSES="2",
             IMMUNOJAX_COORDINATOR_ADDRESS=f"127.0.0.1:{_free_port()}")
  procs = [subprocess.Popen(
      [sys.executable, "-m", "experiments.quadratic", "--quick", "--quiet",
       "--distributed", "--out", str(out)], cwd=ROOT,
      env=dict(env, IMMUNOJAX_PROCESS_ID=str(i)), stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True) for i in range(2)]
  results = [p.communicate(timeout=300) for p in procs]
  for p, (_, err) in zip(procs, results):
    assert p.returncode == 0, err[-2000:]
  assert "wrote" in results[0][0] and "wrote" not in results[1][0]
  one = tmp_path / "one"
  proc = run_module(["-m", "experiments.quadratic", "--quick", "--quiet",
                     "--out", str(one)])
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert_same_summary(one, out)
  records = (out / "metrics.jsonl").read_text().splitlines()
  assert len(records) == len((one / "metrics.jsonl").read_text().splitlines())
  assert (out / "checkpoints").is_dir()
