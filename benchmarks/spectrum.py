"""Benchmark the spectrum paths: exact Hessian, closed-form Gram, Lanczos,
power iteration and scipy's eigsh over the same jitted HVP.

  python -m benchmarks.spectrum --quick --out results/benchmarks/spectrum.json
  python -m benchmarks.spectrum --params 1e6 --out spectrum_1m.json

``--params`` runs only the top-of-the-spectrum comparison on a 784-2w-w-10
MLP (784-1024-512-10 at 1.33M): the certified solver (its default restarted
basis of 20, a full basis of 150, and the default on a float32 copy of the
network: float32 products, float64 basis), fixed-step Lanczos, power iteration
with PyHessian's stopping rule and scipy's eigsh, each against a long
reference run certified to 1e-10.

Prints one line per measurement and a summary with the ratios the targets are
stated in; writes ``--out`` (records + summary) and a PNG beside it.
Float64 throughout (this script enables it for its own process).
"""

from __future__ import annotations

import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from flax import nnx

from benchmarks import _common
from immunojax import losses, models, spectral


def width_for(num_params, depth=2, d_in=64, d_out=10):
  """Smallest hidden width giving at least ``num_params`` parameters."""
  w = 1
  while models.mlp_size([d_in] + [w] * depth + [d_out]) < num_params:
    w += 1
  return w


ACCURACY = 1e-10  # relative accuracy of the time-to-accuracy comparison


def rel(a, b):
  return abs(float(a) - float(b)) / max(abs(float(b)), 1e-300)


def hvp_timer(loss, params, *data):
  flat, unravel = ravel_pytree(params)

  @jax.jit
  def one(flat, v):
    f = lambda z: loss(unravel(z), *data)
    return jax.jvp(jax.grad(f), (flat,), (v,))[1]

  return one, flat


def bench_operator(name, size, loss, params, data, *, k, repeats, exact,
                   power_steps, records, log):
  """Times every path on one loss; returns the records it added."""
  dim = spectral.num_params(params)
  key = jax.random.PRNGKey(0)
  one_hvp, flat = hvp_timer(loss, params, *data)
  v = jnp.ones(dim) / np.sqrt(dim)
  _, hvp_first, hvp_t = _common.timed(one_hvp, flat, v, repeats=max(repeats, 5))
  base = {"family": name, "size": size, "dim": dim}
  records.append({**base, "method": "hvp", "run_s": hvp_t,
                  "compile_s": hvp_first - hvp_t})
  out = {}
  if exact:
    f = jax.jit(lambda p: spectral.eigenvalues(
        spectral.hessian_matrix(loss, p, *data)))
    ev, first, t = _common.timed(f, params, repeats=repeats)
    out["exact"] = (float(ev[-1]), float(ev[0]), first, t)
  steps = min(k, dim)
  lz = jax.jit(lambda p, key: spectral.lanczos(
      spectral.hvp(loss, p, *data), dim, steps, key=key))
  res, first, t = _common.timed(lz, params, key, repeats=repeats)
  out["lanczos"] = (float(res.ritz_values[-1]), float(res.ritz_values[0]), first, t)
  pw = jax.jit(lambda p, key: spectral.power_iteration(
      spectral.hvp(loss, p, *data), dim, key=key, max_steps=power_steps,
      tol=1e-13))
  pres, first, t = _common.timed(pw, params, key, repeats=max(1, repeats // 2))
  out["power"] = (float(pres.eigenvalue), float("nan"), first, t)
  power_meta = {"steps": int(pres.num_steps), "converged": bool(pres.converged)}
  ref = out["exact"][0] if exact else out["lanczos"][0]
  # Time to equal accuracy. Ritz values of T's leading j x j block are those
  # of j-step Lanczos from the same start, so one run gives the history.
  alphas, betas = np.asarray(res.alphas), np.asarray(res.betas)
  tops = [np.linalg.eigvalsh(np.diag(alphas[:j]) + np.diag(betas[:j - 1], 1)
                             + np.diag(betas[:j - 1], -1))[-1]
          for j in range(1, steps + 1)]
  errs = [rel(t, ref) for t in tops]
  j_star = next((j + 1 for j, e in enumerate(errs) if e <= ACCURACY), steps)
  lz_j = jax.jit(lambda p, key: spectral.lanczos(
      spectral.hvp(loss, p, *data), dim, j_star, key=key).ritz_values[-1])
  top_j, first, t = _common.timed(lz_j, params, key, repeats=repeats)
  out["lanczos_to_tol"] = (float(top_j), float("nan"), first, t)
  # scipy's ARPACK driving the same jitted HVP (one host round trip a matvec).
  import scipy.sparse.linalg as spla  # noqa: PLC0415
  calls = [0]

  def host_hvp(u):
    calls[0] += 1
    return np.asarray(one_hvp(flat, jnp.asarray(u.ravel())))

  op = spla.LinearOperator((dim, dim), dtype=np.float64, matvec=host_hvp)

  def eigsh():
    calls[0] = 0
    return spla.eigsh(op, k=1, which="LA", tol=ACCURACY,
                      ncv=min(dim - 1, 20), v0=np.ones(dim))[0][0]
  val, first, t = _common.timed(eigsh, repeats=max(1, repeats // 2))
  out["eigsh"] = (float(val), float("nan"), first, t)
  for method, (top, bottom, first, t) in out.items():
    rec = {**base, "method": method, "run_s": t, "compile_s": max(first - t, 0.0),
           "lambda_max": top, "lambda_min": bottom,
           "rel_err_vs_reference": rel(top, ref),
           "reference": "exact" if exact else "lanczos"}
    if method == "lanczos":
      rec.update(num_steps=steps, overhead_vs_hvp=t / (steps * hvp_t),
                 residual=float(res.residuals[-1]))
    if method == "power":
      rec.update(**power_meta)
    if method == "lanczos_to_tol":
      rec.update(num_steps=j_star, tol=ACCURACY)
    if method == "eigsh":
      rec.update(tol=ACCURACY, matvecs=calls[0])
    records.append(rec)
    log(f"  {name:6s} size={size:<8d} dim={dim:<8d} {method:8s} "
        f"run={t:9.4f}s compile={max(first - t, 0):7.3f}s "
        f"lambda_max={top:.10g} rel_err={rec['rel_err_vs_reference']:.1e}")
  return out


def probe_case(dim, n, key):
  """Linear-probe quadratic on correlated features: Hessian = F^T F."""
  k1, k2 = jax.random.split(key)
  mix = jnp.eye(dim) + 0.3 * jax.random.normal(k1, (dim, dim)) / np.sqrt(dim)
  feats = jax.random.normal(k2, (n, dim)) @ mix
  return feats, jnp.zeros((n, 1))


# ---------------------------------------------------------------------------
# The top of a real network's spectrum, to a certified tolerance.

CERTIFIED_TOL = 1e-6
POWER_TOL = 1e-6       # PyHessian's rule at the tolerance the issue measured
POWER_MAX_ITER = 1000
FIXED_STEPS = 60       # the fixed-step Lanczos run
FULL_MAX_STEPS = 150   # the full basis the issue sized (1.6 GB at 1.33M)


def widths_for(num_params, d_in=784, d_out=10):
  """``(2w, w)`` hidden widths of the smallest ``d_in-2w-w-d_out`` MLP with
  at least ``num_params`` parameters (784-1024-512-10 has 1,333,770)."""
  w = 1
  while models.mlp_size([d_in, 2 * w, w, d_out]) < num_params:
    w += 1
  return 2 * w, w


def pyhessian_power(matvec, v0, *params, tol, max_iter):
  """Power iteration with PyHessian's stopping rule
  (``hessian.eigenvalues``): stop when ``|l_t - l_{t-1}| / (|l_{t-1}| +
  1e-6) < tol``. Returns ``(eigenvalue, iterations)``."""
  _, op = jax.linearize(lambda v: matvec(v, *params), v0)
  unit = lambda v: spectral.tree_vdot(v, v) ** -0.5
  v = jax.tree_util.tree_map(lambda x: x * unit(v0), v0)

  def cond(c):
    _, lam, prev, it = c
    return (it < max_iter) & ((it < 2) | (jnp.abs(lam - prev)
                                          / (jnp.abs(prev) + 1e-6) >= tol))

  def body(c):
    v, lam, _, it = c
    hv = op(v)
    new = spectral.tree_vdot(hv, v)
    return jax.tree_util.tree_map(lambda x: x * unit(hv), hv), new, lam, it + 1

  _, lam, _, it = jax.lax.while_loop(
      cond, body, (v, jnp.zeros(()), jnp.zeros(()), jnp.asarray(0)))
  return lam, it


def memory_bytes(compiled):
  """XLA's own account of a compiled program's memory: temporaries plus
  arguments plus outputs (``compiled.memory_analysis()``), no run needed."""
  mem = compiled.memory_analysis()
  return int(mem.temp_size_in_bytes + mem.argument_size_in_bytes
             + mem.output_size_in_bytes)


def certified_top(num_params, *, records, log, light=False):
  """Every top-eigenvalue path on one network and one HVP; returns summary
  figures. Float64 network unless a record says float32. ``light`` (the
  test suite's --smoke) skips what no contract key needs: the float32 floor,
  the tight-basis memory account, fixed-step Lanczos and eigsh."""
  h1, h2 = widths_for(num_params)
  apply, params = models.functional(models.MLP(
      [784, h1, h2, 10], rngs=nnx.Rngs(0), activation=jnp.tanh))
  params = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), params)
  kx, ky, kv = jax.random.split(jax.random.PRNGKey(1), 3)
  x = jax.random.normal(kx, (512, 784), jnp.float64)
  y = jax.random.randint(ky, (512,), 0, 10)
  loss = lambda p, x, y: losses.cross_entropy(apply(p, x), y)
  mv = spectral.hessian_matvec(loss)
  v0 = spectral.random_vector(kv, params)
  dim = spectral.num_params(params)
  base = {"family": "certified_top", "size": num_params, "dim": dim,
          "network": f"784-{h1}-{h2}-10 tanh MLP, softmax CE, 512 N(0,1) "
                     "inputs, random labels"}
  log(f"[certified top eigenvalue: 784-{h1}-{h2}-10, {dim} parameters, "
      "batch 512]")

  def add(method, t, first, **fields):
    rec = {**base, "method": method, "run_s": t,
           "compile_s": max(first - t, 0.0), **fields}
    records.append(rec)
    log(f"  {method:22s} run={t:8.3f}s compile={max(first - t, 0):6.2f}s "
        + " ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}"
                   for k, v in fields.items()))
    return rec

  # The HVP itself: pytree-native against the same product behind a
  # flatten/unflatten pair (what a flat basis costs) and the flat-API hvp.
  flat0, unravel = ravel_pytree(v0)
  hvp_tree = jax.jit(lambda v, p: jax.linearize(
      lambda u: mv(u, p, x, y), v0)[1](v))
  _, f1, t_tree_full = (None, 0.0, float("nan")) if light else \
      _common.timed(hvp_tree, v0, params, repeats=2)
  _, lin = jax.linearize(lambda u: mv(u, params, x, y), v0)
  lin_tree = jax.jit(lin)
  _, f2, t_tree = _common.timed(lin_tree, v0, repeats=3)
  lin_flat = jax.jit(lambda u: ravel_pytree(lin(unravel(u)))[0])
  _, f3, t_flat = _common.timed(lin_flat, flat0, repeats=3)
  add("hvp_pytree", t_tree, f2, note="linearized once; per product")
  add("hvp_flat_wrapped", t_flat, f3,
      flatten_overhead=t_flat / t_tree - 1)
  if not light:
    add("hvp_pytree_with_linearize", t_tree_full, f1)

  def solver(p, xx, v, **kw):
    return spectral.top_eigenvalues(mv, v, p, xx, y, **kw)

  # Reference: a long restarted run to a 1e-10 certificate.
  # 1e-10: the rounding floor of the bound (~2e-12 relative at 1M
  # float64 parameters) leaves 1e-12 out of reach.
  ref_fn = jax.jit(lambda p, v: solver(p, x, v, tol=1e-10, max_steps=600,
                                       basis_size=40))
  t = time.perf_counter()
  ref = ref_fn(params, v0)
  ref_val = float(ref.values[0])
  add("reference", time.perf_counter() - t, time.perf_counter() - t,
      note="one call, compile included",
      lambda_max=ref_val, certified_relative_error=float(
          ref.relative_bounds[0]), converged=bool(ref.converged),
      matvecs=int(ref.num_matvecs), tol=1e-10, basis_size=40)

  def run_solver(method, p, xx, v, **kw):
    # One compilation serves the memory account and the timed runs.
    t = time.perf_counter()
    compiled = jax.jit(lambda p, xx, v: solver(p, xx, v, **kw)).lower(
        p, xx, v).compile()
    compile_s = time.perf_counter() - t
    res, first, t = _common.timed(compiled, p, xx, v, repeats=1)
    rec = add(method, t, first + compile_s,
              lambda_max=float(res.values[0]),
              certified_relative_error=float(res.relative_bounds[0]),
              residual_relative=float(res.residuals[0] / res.values[0]),
              true_relative_error=rel(res.values[0], ref_val),
              converged=bool(res.converged), matvecs=int(res.num_matvecs),
              restarts=int(res.num_restarts), tol=kw["tol"],
              peak_bytes=memory_bytes(compiled))
    return rec, res

  # The solver as a user gets it (restarted, basis of 20), the full basis
  # the issue sized, and the default on a float32 copy of the network.
  full_steps = 48 if light else FULL_MAX_STEPS   # smoke: 3 chunks, not 10
  default, _ = run_solver("certified", params, x, v0, tol=CERTIFIED_TOL,
                          max_steps=4 * FULL_MAX_STEPS)
  full, full_res = run_solver("certified_full_basis", params, x, v0,
                              tol=CERTIFIED_TOL, max_steps=full_steps,
                              basis_size=full_steps)
  # The full basis sized to exactly the steps it used: the fairest memory
  # comparison (a user cannot know that number in advance).
  steps_used = int(full_res.num_matvecs) - 2
  full_tight_bytes = float("nan") if light else memory_bytes(jax.jit(
      lambda p, xx, v: solver(p, xx, v, tol=CERTIFIED_TOL,
                              max_steps=steps_used,
                              basis_size=steps_used)).lower(
                                  params, x, v0).compile())
  to32 = lambda t: jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), t)
  mixed, _ = run_solver("certified_mixed_f32", to32(params), to32(x),
                        to32(v0), tol=CERTIFIED_TOL,
                        max_steps=4 * FULL_MAX_STEPS)
  # The float32 floor: ask for far more than float32 products can give.
  floor = {"certified_relative_error": None, "true_relative_error": None}
  if not light:
    floor, _ = run_solver("certified_mixed_f32_floor", to32(params),
                          to32(x), to32(v0), tol=1e-10,
                          max_steps=FULL_MAX_STEPS)

  power_fn = jax.jit(lambda p, v: pyhessian_power(
      mv, v, p, x, y, tol=POWER_TOL, max_iter=POWER_MAX_ITER))
  (p_val, p_it), first, t_power = _common.timed(power_fn, params, v0,
                                                repeats=1)
  power = add("power_pyhessian_rule", t_power, first,
              lambda_max=float(p_val), iterations=int(p_it),
              true_relative_error=rel(p_val, ref_val), tol=POWER_TOL,
              stopped_by="max_iter" if int(p_it) >= POWER_MAX_ITER
              else "rule")

  if not light:
    fixed_and_eigsh(spectral.hvp(loss, params, x, y), dim, kv, flat0,
                    lin_flat, ref_val, add)
  return {
      "certified_speedup_vs_power": t_power / default["run_s"],
      "certified_relative_error": default["certified_relative_error"],
      "true_relative_error": default["true_relative_error"],
      "power_true_relative_error": power["true_relative_error"],
      "mixed_precision_time_ratio": mixed["run_s"] / default["run_s"],
      "mixed_precision_certified_relative_error":
          mixed["certified_relative_error"],
      "mixed_precision_true_relative_error": mixed["true_relative_error"],
      "mixed_precision_floor_relative_bound":
          floor["certified_relative_error"],
      "mixed_precision_floor_true_relative_error":
          floor["true_relative_error"],
      "restarted_memory_ratio": default["peak_bytes"] / full["peak_bytes"],
      "restarted_memory_ratio_vs_tight_full_basis":
          default["peak_bytes"] / full_tight_bytes,
      "restarted_time_ratio": default["run_s"] / full["run_s"],
      "restarted_certified_relative_error":
          default["certified_relative_error"],
      "full_basis_speedup_vs_power": t_power / full["run_s"],
      "full_basis_certified_relative_error": full["certified_relative_error"],
      "certified_seconds": default["run_s"],
      "full_basis_seconds": full["run_s"],
      "power_seconds": t_power,
      "power_iterations": power["iterations"],
      "certified_matvecs": default["matvecs"],
      "full_basis_matvecs": full["matvecs"],
      "reference_certified_relative_error": float(ref.relative_bounds[0]),
      "hvp_flatten_overhead": t_flat / t_tree - 1,
      "certified_params": dim,
  }


def fixed_and_eigsh(flat_hvp, dim, key, flat0, lin_flat, ref_val, add):
  """Fixed-step Lanczos (the flat-vector API, the issue's 60 steps) and
  scipy's ARPACK driving the same linearised product from the host."""
  fixed_fn = jax.jit(lambda key: spectral.lanczos(
      flat_hvp, dim, FIXED_STEPS, key=key))
  fres, first, t_fixed = _common.timed(fixed_fn, key, repeats=1)
  add("lanczos_fixed_60_flat", t_fixed, first,
      lambda_max=float(fres.ritz_values[-1]),
      true_relative_error=rel(fres.ritz_values[-1], ref_val),
      residual_relative=float(fres.residuals[-1] / fres.ritz_values[-1]),
      matvecs=FIXED_STEPS)
  import scipy.sparse.linalg as spla  # noqa: PLC0415
  calls = [0]

  def host_hvp(u):
    calls[0] += 1
    return np.asarray(lin_flat(jnp.asarray(u.ravel())))

  op = spla.LinearOperator((dim, dim), dtype=np.float64, matvec=host_hvp)

  def eigsh():
    calls[0] = 0
    return spla.eigsh(op, k=1, which="LA", tol=CERTIFIED_TOL, ncv=20,
                      v0=np.asarray(flat0))[0][0]
  val, first, t = _common.timed(eigsh, repeats=1)
  add("scipy_eigsh", t, first, lambda_max=float(val), matvecs=calls[0],
      true_relative_error=rel(val, ref_val), tol=CERTIFIED_TOL,
      hvp="flat-wrapped (host round trip per product)")


def certified_targets(s):
  """The issue's targets, each as met/missed (all figures are reported)."""
  big = s["certified_params"] >= 1_000_000
  scope = "" if big else f" (measured at {s['certified_params']} params; " \
      "the target is stated at >= 1M)"
  return {
      "certified <= 1e-6 in <= 1/2 of power iteration's time" + scope:
          s["certified_relative_error"] <= 1e-6
          and s["certified_speedup_vs_power"] >= 2,
      "mixed precision: certified 1e-6 at <= 0.6x the float64 time" + scope:
          s["mixed_precision_certified_relative_error"] <= 1e-6
          and s["mixed_precision_time_ratio"] <= 0.6,
      "restarted: memory <= 1/4 of the full basis, time <= 1.5x" + scope:
          s["restarted_memory_ratio"] <= 0.25
          and s["restarted_time_ratio"] <= 1.5
          and s["restarted_certified_relative_error"] <= 1e-6,
  }


def certified_panel(records):
  series = {}
  for r in records:
    if r["family"] == "certified_top" and r["method"] != "reference":
      xs, ys = series.get(r["method"], ((), ()))
      series[r["method"]] = (xs + (r["dim"],), ys + (r["run_s"],))
  return ("top eigenvalue of a 784-2w-w-10 MLP", "parameters", series)


def main(argv=None):
  p = _common.parser(__doc__.splitlines()[0],
                     "results/benchmarks/spectrum.json")
  p.add_argument("--params", type=float, nargs="+", default=None,
                 help="run only the certified top-eigenvalue comparison on "
                      "784-2w-w-10 MLPs of at least these many parameters "
                      "(e.g. --params 1e6)")
  args = p.parse_args(argv)
  _common.start(args)
  if args.params and any(n < 100 or n > 5e7 for n in args.params):
    p.error(f"--params must lie in [100, 5e7], got {args.params}")
  jax.config.update("jax_enable_x64", True)
  quick, smoke = args.quick or args.smoke, args.smoke
  repeats = args.repeats or (1 if smoke else 2 if quick else 3)
  log = lambda s: print(s, flush=True)
  records = []
  if args.params:
    sizes = sorted(int(n) for n in args.params)
    figures = {n: certified_top(n, records=records, log=log) for n in sizes}
    summary = dict(figures[sizes[-1]])
    summary["by_size"] = {str(n): f for n, f in figures.items()}
    summary["targets_met"] = certified_targets(summary)
    path = _common.finish(args.out, records, summary)
    log(f"wrote {_common.plot_lines(path, [certified_panel(records)])}")
    return 0
  key = jax.random.PRNGKey(0)

  log("[linear probe: Hessian = F^T F (one output) or kron(F^T F, I_C)]")
  probe_dims = [100] if smoke else [100, 1000] if quick else [100, 1000, 5000]
  # N=100 is the paper's RIR_theta0 group size (N < D: the small Gram wins);
  # N=2000 > D leaves both paths one D x D eigh.
  for n_samples in (100, 2000):
    for d in probe_dims:
      feats, y = probe_case(d, n_samples, key)
      w0 = jnp.zeros((d, 1))
      family = f"probe_n{n_samples}"
      closed = jax.jit(spectral.gram_eigenvalues)
      ev, first, t = _common.timed(closed, feats, repeats=repeats)
      records.append({"family": family, "size": d, "dim": d,
                      "method": "closed_form", "run_s": t,
                      "compile_s": first - t, "lambda_max": float(ev[-1])})
      log(f"  {family} size={d:<6d} closed   run={t:9.4f}s "
          f"compile={first - t:7.3f}s lambda_max={float(ev[-1]):.10g}")
      bench_operator(family, d, spectral.mse_probe_loss, w0, (feats, y),
                     k=100, repeats=repeats,
                     exact=d <= (1000 if quick else 5000),
                     power_steps=5000, records=records, log=log)
  # A 10-output head: the Hessian is kron(F^T F, I_10); jax.hessian sees
  # 10 D parameters, the closed form still decomposes one D x D Gram.
  classes = 10
  for d in ([100] if smoke else [100, 200] if quick else [100, 200, 400]):
    feats, _ = probe_case(d, 2000, key)
    y = jnp.zeros((2000, classes))
    closed = jax.jit(lambda f: jnp.repeat(spectral.gram_eigenvalues(f), classes))
    ev, first, t = _common.timed(closed, feats, repeats=repeats)
    dense = jax.jit(lambda f: spectral.eigenvalues(spectral.hessian_matrix(
        spectral.mse_probe_loss, jnp.zeros((d, classes)), f, y)))
    ev2, first2, t2 = _common.timed(dense, feats, repeats=repeats)
    for m, tt, ff, e in (("closed_form", t, first, ev), ("exact", t2, first2, ev2)):
      records.append({"family": "probe_c10", "size": d, "dim": d * classes,
                      "method": m, "run_s": tt, "compile_s": ff - tt,
                      "lambda_max": float(e[-1]),
                      "rel_err_vs_reference": rel(e[-1], ev2[-1])})
    log(f"  probe_c10 D={d:<5d} closed={t:.4f}s exact={t2:.4f}s "
        f"speedup={t2 / t:.1f}x lambda_max agree={rel(ev[-1], ev2[-1]):.1e}")

  log("[MLP: tanh, 2 hidden layers, softmax cross-entropy, 512 samples]")
  mlp_sizes = [1_000] if smoke else [1_000, 10_000, 100_000] if quick \
      else \
      [1_000, 10_000, 100_000, 1_000_000]
  k1, k2, _ = jax.random.split(key, 3)
  x = jax.random.normal(k1, (512, 64))
  y = jax.random.randint(k2, (512,), 0, 10)
  for size in mlp_sizes:
    mlp_loss, params = _common.mlp(0, width_for(size))
    bench_operator("mlp", size, mlp_loss, params, (x, y),
                   k=50 if quick else 100, repeats=repeats,
                   exact=spectral.num_params(params) <= (1_100 if quick else 5_000),
                   power_steps=3000, records=records, log=log)

  def pick(family, size, method, field):
    for r in records:
      if (r["family"], r["size"], r["method"]) == (family, size, method):
        return r.get(field)
    return None

  big = max(mlp_sizes)
  def speedup(family, size):
    return pick(family, size, "exact", "run_s") / pick(family, size,
                                                       "closed_form", "run_s")

  c10 = max(r["size"] for r in records if r["family"] == "probe_c10")
  d_ref = 1000 if 1000 in probe_dims else max(probe_dims)   # smoke: 100
  summary = {
      "lanczos_overhead_vs_hvp": pick("mlp", big, "lanczos", "overhead_vs_hvp"),
      "lanczos_overhead_vs_hvp_at_params": pick("mlp", big, "lanczos", "dim"),
      "lanczos_overhead_vs_hvp_by_size": {
          str(s): pick("mlp", s, "lanczos", "overhead_vs_hvp")
          for s in mlp_sizes},
      # D = 1000 with the paper's RIR_theta0 group size (N = 100 < D).
      "closed_form_speedup_vs_hessian": speedup("probe_n100", d_ref),
      "closed_form_speedup_vs_hessian_n2000": speedup("probe_n2000", d_ref),
      f"closed_form_speedup_vs_hessian_10_outputs_D{c10}": speedup("probe_c10",
                                                                  c10),
      "lanczos_top_eigenvalue_seconds_at_largest": pick("mlp", big, "lanczos",
                                                        "run_s"),
      "lanczos_vs_power_rel_diff_at_largest": rel(
          pick("mlp", big, "lanczos", "lambda_max"),
          pick("mlp", big, "power", "lambda_max")),
      # Same accuracy (1e-10 relative): the fewest Lanczos steps reaching it
      # against ARPACK with tol=1e-10 on the same jitted HVP.
      "lanczos_speedup_vs_eigsh_at_largest": pick("mlp", big, "eigsh", "run_s")
      / pick("mlp", big, "lanczos_to_tol", "run_s"),
      "lanczos_speedup_vs_eigsh_by_size": {
          str(s): pick("mlp", s, "eigsh", "run_s")
          / pick("mlp", s, "lanczos_to_tol", "run_s") for s in mlp_sizes},
      "lanczos_steps_to_1e-10_at_largest": pick("mlp", big, "lanczos_to_tol",
                                                "num_steps"),
      "eigsh_matvecs_at_largest": pick("mlp", big, "eigsh", "matvecs"),
      "largest_mlp_params": pick("mlp", big, "lanczos", "dim"),
      "quick": quick,
  }
  targets = {
      "lanczos_overhead_vs_hvp <= 1.5 (1e5+ params)":
          summary["lanczos_overhead_vs_hvp"] <= 1.5,
      "closed_form_speedup_vs_hessian >= 50 (D=1000, N=100)":
          summary["closed_form_speedup_vs_hessian"] >= 50,
      "lanczos faster than eigsh at 1e-10": summary[
          "lanczos_speedup_vs_eigsh_at_largest"] > 1,
  }
  if big >= 1_000_000:
    targets["top eigenvalue of 1e6-param MLP < 30 s"] = \
        summary["lanczos_top_eigenvalue_seconds_at_largest"] < 30
    targets["Lanczos vs power <= 1e-6 rel"] = \
        summary["lanczos_vs_power_rel_diff_at_largest"] <= 1e-6
  certified = certified_top(2_000 if smoke else 100_000 if quick
                            else 1_000_000, records=records, log=log,
                            light=smoke)
  summary.update(certified)
  targets.update(certified_targets(certified))
  summary["targets_met"] = targets
  path = _common.finish(args.out, records, summary)
  panels = []
  for family, xlabel in (("probe_n100", "feature dim D"),
                         ("probe_n2000", "feature dim D"),
                         ("probe_c10", "head parameters D*C"),
                         ("mlp", "parameters")):
    series = {}
    for m in ("exact", "closed_form", "lanczos", "lanczos_to_tol", "power",
              "eigsh", "hvp"):
      pts = [(r["dim"], r["run_s"]) for r in records
             if r["family"] == family and r["method"] == m]
      if pts:
        series[m] = tuple(zip(*pts))
    panels.append((f"{family}: time to the top eigenvalue", xlabel, series))
  panels.append(certified_panel(records))
  png = _common.plot_lines(path, panels)
  log(f"wrote {png}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
