"""deep_immunization's report: the claims graded (is a probe slower from
the immunized extractor than from theta_0?), the findings and the probe
plot. Probes are read in ``probe``'s order."""

from __future__ import annotations

import numpy as np

from experiments import _claims, _plots


def slower_than_theta0(probe: dict, name: str) -> dict:
  """Per probe: is ``name``'s accuracy after the first tenth of the run
  lower than theta0's by more than their spreads added (and, for the line
  search, its distance ratio higher)? A reading, not a test."""
  out = {}
  for p in probe:
    a, b = probe[p][name], probe[p]["theta0"]
    ea, eb = a["early_test_accuracy"], b["early_test_accuracy"]
    slower = ea["mean"] < eb["mean"] - (ea["std"] + eb["std"])
    if p == "line_search":
      da, db = a["final_distance_ratio"], b["final_distance_ratio"]
      slower = slower or da["mean"] > db["mean"] + da["std"] + db["std"]
    out[p] = bool(slower)
  return out


KEPT_POINTS = 2.0    # "D_P accuracy kept": within 2 points of θ_0's


def claims(methods: dict, probe: dict) -> list[dict]:
  """Table 3's and Fig. 3's claims for ``cond_num``, graded on this run
  (means over seeds; pinv κ)."""
  ours = methods.get("cond_num")
  if ours is None:
    return [_claims.claim("Table 3 / Fig. 3 (cond_num)", _claims.UNMEASURED,
                          "cond_num not run", "—")]
  rir = ours["rir_theta0"]["pinv"]["mean"]
  drop = 100 * (methods["theta0"]["dp_accuracy"]["mean"]
                - ours["dp_accuracy"]["mean"])
  slow = slower_than_theta0(probe, "cond_num")
  return [
      _claims.graded(
          "Immunizing a deep feature extractor raises RIR_θ0 above 1 while "
          "keeping its pre-training accuracy (Table 3)",
          {"RIR_θ0 > 1": rir > 1,
           f"D_P accuracy within {KEPT_POINTS:g} points of θ_0's":
           drop <= KEPT_POINTS},
          figure=f"RIR_θ0 {_claims.num(rir)} (pinv κ, mean over seeds), D_P "
          f"accuracy {-drop:+.1f} points vs θ_0"),
      _claims.graded(
          "A linear probe learns the harmful task slower from the immunized "
          "extractor than from θ_0 (Fig. 3)",
          {f"slower under the {p} probe (beyond the seeds' spread)": s
           for p, s in slow.items()},
          figure=", ".join(
              f"{p} early accuracy {_early(probe, p, 'cond_num')} vs θ_0 "
              f"{_early(probe, p, 'theta0')}" for p in probe))]


def _early(probe, p, start) -> str:
  return _claims.num(probe[p][start]["early_test_accuracy"]["mean"])


def findings(cfg, methods: dict, probe: dict, gram: dict) -> list[str]:
  out = []
  g0 = gram["theta0"]
  for m in cfg.methods:
    g = gram[m]
    d_max = np.log10(g["sigma_max"]["mean"] / g0["sigma_max"]["mean"])
    d_min = np.log10(g["sigma_min"]["mean"] / g0["sigma_min"]["mean"])
    via = "σ_min" if abs(d_min) > abs(d_max) else "σ_max"
    slow = slower_than_theta0(probe, m)
    verdict = ("slower than from θ_0 on " + ", ".join(
        p for p, s in slow.items() if s) if any(slow.values()) else
        "not slower than from θ_0 on any of the three probes (within the "
        "seed spread)")
    capped = [p for p in probe if probe[p][m]["final_test_accuracy"]["mean"]
              < probe[p]["theta0"]["final_test_accuracy"]["mean"]
              - probe[p][m]["final_test_accuracy"]["std"]
              - probe[p]["theta0"]["final_test_accuracy"]["std"]]
    if capped:
      verdict += (", and its final accuracy is lower too on "
                  + ", ".join(capped) + " (" + ", ".join(
                      f"{probe[p][m]['final_test_accuracy']['mean']:.3f} vs "
                      f"{probe[p]['theta0']['final_test_accuracy']['mean']:.3f}"
                      for p in capped) + "): the probe is capped, not only "
                  "slowed")
    out.append(
        f"{m}: κ of the harmful Gram moved mostly through {via} "
        f"(log10 change σ_max {d_max:+.2f}, σ_min {d_min:+.2f}; rank "
        f"{g['rank']['mean']:.1f} of {g['dim']} vs θ_0's "
        f"{g0['rank']['mean']:.1f}). Probing is {verdict} "
        f"(line-search distance ratio after {cfg.linesearch_steps} steps "
        f"{probe['line_search'][m]['final_distance_ratio']['mean']:.3g} vs "
        f"θ_0 {probe['line_search']['theta0']['final_distance_ratio']['mean']:.3g}; "
        f"tuned-Adam accuracy at step {cfg.probe_steps // 10} "
        f"{probe['tuned_adam'][m]['early_test_accuracy']['mean']:.3f} vs "
        f"{probe['tuned_adam']['theta0']['early_test_accuracy']['mean']:.3f}).")
  lrs = sorted(cfg.probe_lrs)
  for p in ("tuned_sgd", "tuned_adam"):
    edge = {n: q["best_learning_rate"] for n, q in probe[p].items()
            if len(lrs) > 1 and any(lr in (lrs[0], lrs[-1])
                                    for lr in q["best_learning_rate"])}
    if edge:
      out.append(f"{p}: the best learning rate sits at an edge of the grid "
                 f"{lrs} for " + ", ".join(f"{n} {v}" for n, v in edge.items())
                 + "; a wider grid could change that start's curve (features "
                 "whose σ_max grew want a smaller rate).")
  if "cond_num" in cfg.methods:
    if not any(slower_than_theta0(probe, "cond_num").values()):
      out.append("The paper's Fig. 3 claim (the immunized extractor is "
                 "probed more slowly) does not hold in this setting: "
                 "RIR_θ0 rises, but no probe is slower from the cond_num "
                 "extractor than from θ_0.")
    else:
      out.append("The cond_num extractor is probed more slowly than θ_0 on "
                 "at least one probe, as the paper's Fig. 3 claims.")
  return out


def plot_probes(run, cfg, probe, claim: str = ""):
  fig, axes = run.new_figure(ncols=4, figsize=(18, 3.9))
  titles = {"line_search": "ℓ2 probe, exact line search",
            "tuned_sgd": "softmax probe, SGD (best lr per start)",
            "tuned_adam": "softmax probe, Adam (best lr per start)"}
  names = list(probe["line_search"])
  colors = {n: _plots.style(n)["color"] for n in names}
  for ax, p in zip(axes, probe):
    for n in names:
      q = probe[p][n]
      mean = np.asarray(q["test_accuracy"]["mean"])
      std = np.asarray(q["test_accuracy"]["std"])
      ax.plot(q["steps"], mean, color=colors[n], lw=2.2 if n == "cond_num"
              else 1.2, ls="--" if n == "theta0" else "-",
              label=f"{n} (mean of {cfg.num_seeds} seeds)")
      ax.fill_between(q["steps"], mean - std, mean + std, color=colors[n],
                      alpha=0.15)
    ax.axhline(cfg.probe_threshold, color="k", lw=0.7, ls=":",
               label=f"threshold {cfg.probe_threshold:g}")
    ax.set(title=titles[p], xlabel="probe step",
           ylabel="D_H accuracy (test half)")
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=7)
  for n in names:
    q = probe["line_search"][n]
    axes[3].semilogy(q["steps"], q["distance_ratio"]["mean"], color=colors[n],
                     ls="--" if n == "theta0" else "-", label=n)
  axes[3].set(title="ℓ2 probe: ||w_t − w*||² / ||w*||²", xlabel="probe step")
  axes[3].legend(fontsize=7)
  axes[3].grid(alpha=0.3)
  if claim:
    _plots.claim_title(fig, claim)
  run.save_figure(fig, "probe_curves")
