"""house_price's report: Table 1's and Fig. 1's claims graded, the
findings on the direction rules and the attackers, and the two plots
(curves per method in ``order``, the lambda sweep)."""

from __future__ import annotations

import numpy as np

from experiments import _claims, _plots


def claims(methods: dict, success: dict) -> list[dict]:
  """Table 1's and Fig. 1's claims, graded on this run (pinv κ)."""
  rir = {m: v["rir"]["pinv"] for m, v in methods.items()}
  far = lambda m: (rir[m] >= _claims.RIR_FAR_ABOVE_ONE) if m in rir else None
  ours, ident = methods.get("cond_num"), methods["identity"]
  out = [_claims.graded(
      "Condition-number immunization succeeds by Def. 3.1 ((i) > 1, "
      "(ii) ≤ 1) with RIR ≫ 1 (Table 1)",
      {"Def. 3.1 met": success.get("cond_num", {}).get("weak"),
       f"RIR ≥ {_claims.RIR_FAR_ABOVE_ONE:g}": far("cond_num")},
      figure=(f"RIR {_claims.num(rir['cond_num'])}, (i) "
              f"{_claims.num(ours['kappa_ratio_harmful']['pinv'])}, (ii) "
              f"{_claims.num(ours['kappa_ratio_pretrain']['pinv'])} (pinv κ)"
              if ours else "cond_num not run"))]
  names = {"opt_kappa": "Opt κ", "r_ill_only": "R_ill only",
           "probe_ascent": "IMMA"}
  out.append(_claims.graded(
      "Only Opt κ and ours reach RIR ≫ 1; R_ill only and IMMA do not "
      "(Table 1)",
      {f"Opt κ RIR ≥ {_claims.RIR_FAR_ABOVE_ONE:g}": far("opt_kappa"),
       **{f"{names[m]} RIR < {_claims.RIR_FAR_ABOVE_ONE:g}":
          None if far(m) is None else not far(m)
          for m in ("r_ill_only", "probe_ascent")}},
      figure=", ".join(f"{names.get(m, m)} {_claims.num(rir[m])}" for m in names
                       if m in rir) + " (RIR, pinv κ)"))
  if ours:
    dh = ours["dh_norm_ratio_final"] / ident["dh_norm_ratio_final"]
    dp = ours["dp_norm_ratio_final"] / ident["dp_norm_ratio_final"]
    out.append(_claims.graded(
        "After immunization, gradient descent converges slower on the "
        "harmful task and faster on the pre-training task than on the raw "
        "inputs (Fig. 1)",
        {"D_H slower": dh > 1, "D_P faster": dp < 1},
        figure=f"distance ratio after the line-search steps ÷ identity's: "
        f"D_H {_claims.num(dh)}, D_P {_claims.num(dp)}"))
  return out


def rule_findings(cfg, by_rule: dict) -> list[str]:
  """Sentences on the opt_kappa vs cond_num ordering under each rule."""
  out = []
  for rule, table in by_rule.items():
    if "opt_kappa" in table and "cond_num" in table:
      o, c = table["opt_kappa"], table["cond_num"]
      lead = "opt_kappa" if o["rir"]["pinv"] > c["rir"]["pinv"] else "cond_num"
      out.append(
          f"Under the {rule} rule opt_kappa's RIR is {o['rir']['pinv']:.4g} "
          f"and cond_num's {c['rir']['pinv']:.4g} (pinv κ): {lead} leads" +
          (", the reverse of the paper's ordering" if lead == "opt_kappa"
           else ", the paper's ordering") +
          " (paper: cond_num 356.2 > opt_kappa 92.58, official estimator). "
          f"Cosine of each method's first regularizer step with the "
          f"steepest-descent direction of log κ(H_P) − log κ(H_H): "
          f"opt_kappa {o['direction_alignment_t0']:.3f}, cond_num "
          f"{c['direction_alignment_t0']:.3f}." +
          (f" Balanced weights: opt_kappa λ_H {o['lambdas']['lambda_h']:.3g}, "
           f"cond_num λ_H {c['lambdas']['lambda_h']:.3g}." if rule ==
           "balanced" else ""))
  if len(out) == 2:
    out.append(
        "Reading: with normalized directions every method takes steps of "
        "one length, so the method whose step points most straight at "
        "log κ gains most per step; opt_kappa differentiates the exact "
        "log κ(H_H) and log κ(H_P), while R_ill and R_well are surrogates "
        "(bounds on log κ) whose K⁺-preconditioned gradients point "
        "elsewhere (the cosines above). Under the balanced rule the step "
        "lengths differ per method (the λ above), the paper's setting; "
        "whether the paper's ordering returns is in the two rows above.")
  return out


def attacker_findings(methods: dict) -> list[str]:
  out = []
  if "cond_num" in methods:
    c, i = methods["cond_num"], methods["identity"]
    for task, want, name in (("dh", "slower", "D_H"), ("dp", "faster", "D_P")):
      r = c[f"{task}_norm_ratio_final"] / i[f"{task}_norm_ratio_final"]
      got = "slower" if r > 1 else "faster"
      out.append(
          f"Fig. 1, {name}: after the line-search steps cond_num's probe "
          f"distance is {r:.3g}× identity's, so probing is "
          + ("only marginally " if abs(np.log(r)) < np.log(1.1) else "")
          + f"{got} than on the raw inputs"
          + (", as the paper's Fig. 1 shows." if got == want
                           else f", contrary to the paper's Fig. 1 ({want})."))
    gd, gd0 = c["dh_gd_test_mse"], i["dh_gd_test_mse"]
    out.append(
        "A limit of the method: the closed-form least-squares attacker on the "
        f"immunized D_H features reaches test MSE "
        f"{c['dh_least_squares_test_mse']:.4g} against identity's "
        f"{i['dh_least_squares_test_mse']:.4g} (κ cannot slow a solver that "
        "does not iterate), and the exact-line-search GD attacker reaches "
        f"{gd:.4g} against identity's {gd0:.4g}" + (
            ", a better harmful error than on the raw inputs" if gd < gd0
            else "") + ".")
  return out


MARKERS = {"identity": "", "r_ill_only": "v", "opt_kappa": "s",
           "probe_ascent": "^", "cond_num": "o"}


def plot(run, curves, methods, cfg, order, title):
  fig, axes = run.new_figure(ncols=3, figsize=(15, 4.0))
  for ax, task, title in ((axes[0], "dp", "D_P (pre-training)"),
                          (axes[1], "dh", "D_H (harmful)")):
    for m in order:
      if m in curves:
        c = np.maximum(curves[m][task], 1e-300)
        ax.semilogy(c, label=m, lw=2.5 if m == "cond_num" else 1.3,
                    ls="--" if m == "identity" else "-",
                    marker=MARKERS[m], markevery=max(len(c) // 8, 1), ms=4)
    ax.set(title=f"{title}: exact-line-search GD probe", xlabel="step",
           ylabel=r"$\|w_t-w^*\|^2/\|w_0-w^*\|^2$")
    ax.grid(alpha=0.3)
  axes[1].legend(fontsize=8)
  names = [m for m in order if m in methods]
  x = np.arange(len(names))
  gd = [methods[m]["dh_gd_test_mse"] for m in names]
  ls = [methods[m]["dh_least_squares_test_mse"] for m in names]
  axes[2].bar(x - 0.2, gd, 0.4, label=f"GD, {cfg.linesearch_steps} "
              "line-search steps")
  axes[2].bar(x + 0.2, ls, 0.4, label="closed-form least squares")
  axes[2].set(xticks=x, title="D_H test MSE reached by the attacker",
              ylabel="test MSE (z-scored SalePrice)", yscale="log")
  axes[2].set_xticklabels(names, rotation=30, fontsize=8)
  axes[2].legend(fontsize=8)
  _plots.claim_title(fig, title)
  run.save_figure(fig, "fig1_linesearch")


def plot_sweep(run, sweep):
  if len(sweep) < 2:
    return
  lam = [r["lambda"] for r in sweep]
  fig, ax = run.new_figure(figsize=(5.5, 4.0))
  for key, label in (("rir", "RIR"), ("kappa_ratio_harmful", "(i) harmful"),
                     ("kappa_ratio_pretrain", "(ii) pre-training")):
    ax.loglog(lam, [r[key]["pinv"] for r in sweep], marker="o", label=label)
  ax.axhline(1.0, color="k", lw=0.7, ls=":")
  ax.set(xlabel="λ_P = λ_H (cond_num)", ylabel="ratio (pinv κ)",
         title="λ sweep, house price")
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3, which="both")
  run.save_figure(fig, "lambda_sweep")
