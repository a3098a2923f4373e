"""Benchmark the spectrum paths: exact Hessian, closed-form Gram, Lanczos,
power iteration and scipy's eigsh over the same jitted HVP.

  python -m benchmarks.spectrum --quick --out results/benchmarks/spectrum.json

Prints one line per measurement and a summary with the ratios the targets are
stated in; writes ``--out`` (records + summary) and a PNG beside it.
Float64 throughout (this script enables it for its own process).
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from benchmarks import _common
from immunojax import models, spectral


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


def main(argv=None):
  args = _common.parser(__doc__.splitlines()[0],
                        "results/benchmarks/spectrum.json").parse_args(argv)
  jax.config.update("jax_enable_x64", True)
  quick, smoke = args.quick or args.smoke, args.smoke
  repeats = args.repeats or (1 if smoke else 2 if quick else 3)
  log = lambda s: print(s, flush=True)
  records = []
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
  png = _common.plot_lines(path, panels)
  log(f"wrote {png}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
