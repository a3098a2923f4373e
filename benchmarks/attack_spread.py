"""Benchmark spreading an attack grid's calls over devices: one attack mode
on the IMMA/MIMA digits world, every start point and target a call, on one
device against round robin over N devices (simulated on CPU).

  python -m benchmarks.attack_spread --out results/benchmarks/attack_spread.json

``mima_digits``' grid is one attack per mode, so a sharded ``attack_map``
would pad it; :func:`immunojax.parallel.spread_calls` runs whole calls at once
instead. Every device runs the same program, so the curves must equal the
one-device ones. On CPU the N simulated devices share the machine's cores:
what spreading gains is the share of the cores one small program leaves
idle (the judge's DDIM sampling, most of an attack's time).
"""

from __future__ import annotations

import sys
import time

import jax
import numpy as np
from flax import nnx

from benchmarks import _common

SIZES = {   # dim, depth, sample steps, samples, attack steps, eval_every, starts
    "smoke": (16, 1, 2, 4, 2, 1, 2),
    "quick": (32, 1, 5, 16, 20, 10, 4),
    "full": (64, 2, 20, 64, 100, 50, 6),     # mima_digits' denoiser and judge
}


def main(argv=None):
  p = _common.parser(__doc__.splitlines()[0],
                     "results/benchmarks/attack_spread.json")
  p.add_argument("--devices", type=int, default=2,
                 help="devices to spread over (on CPU, simulated ones; "
                      "fewer when JAX started already) [default: 2]")
  args = p.parse_args(argv)
  if args.devices < 1:
    p.error("--devices must be >= 1")
  try:                          # before JAX starts its backend
    jax.config.update("jax_num_cpu_devices", args.devices)
  except RuntimeError:
    pass                        # started already (e.g. in the tests)
  _common.start(args)
  from immunojax import attacks, models  # noqa: PLC0415
  from immunojax.eval import text_to_image as t2i  # noqa: PLC0415
  size = "smoke" if args.smoke else "quick" if args.quick else "full"
  dim, depth, sample_steps, samples, steps, every, n_starts = SIZES[size]
  repeats = args.repeats or (1 if args.smoke else 3)
  devices = jax.local_devices()[:args.devices]
  log = lambda s: print(s, flush=True)

  world = t2i.DigitTextToImage(
      patch=4, dim=dim, context_dim=32, depth=depth, heads=4, timesteps=200,
      guidance=3.0, sample_steps=sample_steps, num_concepts=3, seed=0)
  key = jax.random.PRNGKey(0)
  starts = {f"start{i}": jax.tree_util.tree_map(
      lambda a, i=i: a + 0.01 * jax.random.normal(
          jax.random.fold_in(key, i), a.shape, a.dtype), world.init)
            for i in range(n_starts)}
  judge = models.MLP((64, 128, 10), rngs=nnx.Rngs(1))   # untrained: times
  apply, judge_params = models.functional(judge)
  feats, _ = models.functional(judge, "features")
  metric = world.judge_metric(lambda x: apply(judge_params, x),
                              lambda x: feats(judge_params, x))
  targets = t2i.attack_targets(world, metric, concepts=(1, 3, 7),
                               textual_inversion=False, collateral=(0, 2, 4),
                               lora_rank=2, copies=1, samples=samples, seed=0)
  if args.smoke:                # one program shape: one compilation
    targets = {k: t for k, t in targets.items() if k != "joint"}
  grid = [attacks.Attack("adam", 1e-3, 32, "kv", steps)]
  log(f"[{size}: denoiser dim {dim} depth {depth}, {n_starts} starts x "
      f"{len(targets)} targets, kv attack {steps} steps, judge every {every} "
      f"steps on {samples} samples x {sample_steps} DDIM steps; "
      f"{len(devices)} device(s): {[str(d) for d in devices]}]")

  def run(devs):
    return attacks.run_attacks(grid, starts, targets, eval_every=every,
                               devices=devs)

  firsts, curves = [], []
  for devs in (None, devices):        # the first call of each compiles
    t = time.perf_counter()
    curves.append(run(devs))
    firsts.append(time.perf_counter() - t)
  one, spread = curves
  one_s, spread_s = _common.interleaved([(run, None), (run, devices)],
                                        repeats=repeats)
  diff = max(float(np.nanmax(np.abs(one[t].metric[s] - spread[t].metric[s])))
             for t in targets for s in starts)
  same_nan = all(np.array_equal(np.isnan(one[t].metric[s]),
                                np.isnan(spread[t].metric[s]))
                 for t in targets for s in starts)
  calls = n_starts * len(targets)
  records = [{"devices": 1, "seconds": one_s, "first_call_s": firsts[0]},
             {"devices": len(devices), "seconds": spread_s,
              "first_call_s": firsts[1]}]
  log(f"  one device: {one_s:.2f} s ({calls} calls; first {firsts[0]:.1f} s)"
      f"  spread over {len(devices)}: {spread_s:.2f} s (first "
      f"{firsts[1]:.1f} s)  -> {one_s / spread_s:.2f}x")
  summary = {
      "spread_speedup": one_s / spread_s,
      "max_curve_difference": diff,
      "devices": len(devices), "calls": calls, "size": size,
      "extra_compile_s": (firsts[1] - spread_s) - (firsts[0] - one_s),
  }
  summary["targets_met"] = {
      "curves equal to one device's": diff == 0.0 and same_nan,
      f"spread over {len(devices)} devices >= 1.3x one device":
          len(devices) > 1 and summary["spread_speedup"] >= 1.3,
  }
  path = _common.finish(args.out, records, summary)
  png = _common.plot_lines(path, [(
      "an attack mode's calls: one device vs spread", "devices",
      {"kv attack, all starts and targets":
       ([r["devices"] for r in records], [r["seconds"] for r in records])})])
  log(f"wrote {png}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
