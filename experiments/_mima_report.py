"""mima_digits' report: the targets (2-sd comparisons over seeds, the
every-checkpoint target, retention matched), the paper's claims graded, the
notes, the figures and the worst-concept plot, and the summary blocks they
read (one seed's methods, the attacks over seeds). Methods are read in the
summary's order (``summary.methods``)."""

from __future__ import annotations

import numpy as np

from experiments import _claims, _plots
from immunojax.eval import concepts, curves as eval_curves


def summarize(cfg, curves, retention, imm_wall, attack_wall, *,
              order) -> dict:
  """One seed's ``methods.<method>.{retention_accuracy, wall_seconds,
  attacks.<attack>}`` (:func:`immunojax.eval.concepts.attack_scores` of
  every attack scope), in the method order ``order``."""
  names = [str(k) for k in cfg.concepts]
  methods = {}
  for m in order:
    per_attack = {}
    for mode, c in curves.items():
      for scope, arrays in c["scopes"].items():
        name = mode if mode == "phi_merge" else f"{mode}/{scope}"
        per_attack[name] = {**concepts.attack_scores(
            arrays[m], arrays["none"], c["collateral"][scope][m],
            concepts=names, per_concept=scope == "per_concept"),
            "diverged": c["diverged"][m],
            "wall_seconds": attack_wall[mode] / (
                len(c["scopes"]) * len(order))}
    methods[m] = {"retention_accuracy": retention[m],
                  "wall_seconds": imm_wall[m], "attacks": per_attack}
  steps = next(iter(curves.values()))["steps"]
  return {"methods": methods, "attack_steps": np.asarray(steps).tolist(),
          "attack_wall_seconds": attack_wall, "scheme": cfg.scheme}


def log_erased(run, before: dict, moved: dict) -> None:
  """The log's lines on the erased model: concept accuracy of samples
  before and after erasure, and how far each attacker moves it."""
  run.print(f"  concept accuracy of samples: pretrained "
            f"{before['pretrained'][:, 0].round(2).tolist()}, erased "
            f"{before['erased'][:, 0].round(2).tolist()}")
  run.print(f"  displacement of the erased model: simulated attacker "
            f"{np.mean(moved['simulated']):.4g}, evaluated attack "
            f"{np.mean(moved['evaluated']):.4g} ({moved['ratio']:.3g}x)")


def combine(runs: list[dict], seeds: list[int]) -> dict:
  """The summary of several seeds' runs: the first seed's in full (as a
  one-seed run), the others' methods, matched weights, displacement ratios
  and accuracies before attack (``per_seed``), and every attack's mean and
  sd over seeds (:func:`aggregate`)."""
  out = dict(runs[0])
  out.update({
      "seeds": seeds, "per_seed": runs[1:] and [
          {k: r[k] for k in ("methods", "retention_matched",
                             "displacement_ratio",
                             "concept_accuracy_before_attack")}
          for r in runs[1:]],
      "attacks": aggregate(runs)})
  return out


def aggregate(runs: list[dict]) -> dict:
  """``attacks.<attack>.<method>.{worst_concept, selectivity}``: mean and
  sd over seeds at every checkpoint (sd 0 with one seed)."""
  return {a: {m: {key: concepts.over_seeds(
      [r["methods"][m]["attacks"][a][key] for r in runs])
      for key in ("worst_concept", "selectivity")} for m in runs[0]["methods"]}
      for a in runs[0]["methods"]["none"]["attacks"]}


def targets(cfg, out) -> dict:
  ms = out["methods"]
  below, beats, checked = True, True, 0
  for a in ms["none"]["attacks"]:
    none = ms["none"]["attacks"][a]["concept_accuracy"]
    mima = ms["mima"]["attacks"][a]["concept_accuracy"]
    for k in none:
      for e, (wo, w) in enumerate(zip(none[k], mima[k])):
        # "well below" where the unprotected model has re-learned (>= 0.5):
        # at most half its accuracy
        if e > 0 and wo >= 0.5:
          checked += 1
          below &= w <= 0.5 * wo
    beats &= (ms["mima"]["attacks"][a]["worst_concept_accuracy"]
              < ms["imma_sequential"]["attacks"][a]["worst_concept_accuracy"])
  base = ms["none"]["retention_accuracy"]
  seeds = [ms] + [r["methods"] for r in out.get("per_seed") or []]
  score = {m: mean_worst_over_seeds(seeds, m) for m in ms}
  two_sd = {}
  for name, (m, other, attack) in {
      "mima_below_max_by_2sd": ("mima", "max", None),
      "mima_below_imma_sequential_by_2sd": ("mima", "imma_sequential", None),
      "phi_star_below_average_merge_by_2sd_on_phi_merge": (
          "mima", "mima_average_merge", "phi_merge")}.items():
    if attack is not None and attack not in ms["none"]["attacks"]:
      two_sd[name] = None
      continue
    x, y = (score[m], score[other]) if attack is None else (
        mean_worst_over_seeds(seeds, m, [attack]),
        mean_worst_over_seeds(seeds, other, [attack]))
    two_sd[name] = (None if len(seeds) < 2 else
                    bool(eval_curves.differs(x, y) and x["mean"] < y["mean"]))
  half = half_of_erased(out, cfg.eval_every)
  two_sd["mima_worst_le_half_erased_lora_kv_every_checkpoint"] = (
      half["met"] == half["checked"] if half["checked"] else None)
  matched = out.get("retention_matched", {})
  two_sd["every_method_retention_matched"] = bool(all(
      r["matched"] for m, r in matched.items() if m != "none"))
  return {**two_sd, "mima_well_below_none_at_every_checkpoint":
              bool(below) if checked else None,
          "mima_beats_imma_sequential_on_worst_concept": bool(beats),
          "mima_retention_within_5pct_of_erased":
              bool(ms["mima"]["retention_accuracy"] >= 0.95 * base),
          "none_relearns_every_concept": bool(all(
              ms["none"]["attacks"][a]["worst_concept_accuracy"] >= 0.5
              for a in ms["none"]["attacks"]))}


def half_of_erased(out, eval_every: int) -> dict:
  """The "at most half the erased model's" target on the seeds' mean curves:
  at every checkpoint after step 0 of the LoRA, K/V and phi_merge attacks
  where the erased model's worst concept has re-learned to >= 0.5, is
  MIMA's worst concept <= half of it? ``checked`` / ``met`` count those
  checkpoints; ``worst`` is the one with the largest MIMA / erased ratio
  as ``(attack, step, mima, erased)`` (None when none is checked)."""
  checked, met, worst, ratio = 0, 0, None, -1.0
  for a, per in out["attacks"].items():
    if not a.startswith(("lora/", "kv/", "phi_merge")):
      continue
    for e, (wo, w) in enumerate(zip(per["none"]["worst_concept"]["mean"],
                                    per["mima"]["worst_concept"]["mean"])):
      if e == 0 or wo < 0.5:
        continue
      checked += 1
      met += int(w <= 0.5 * wo)
      if w / wo > ratio:
        ratio, worst = w / wo, (a, e * eval_every, w, wo)
  return {"checked": checked, "met": met, "worst": worst}


def mean_worst_over_seeds(seeds: list[dict], method: str,
                          attacks_: list[str] | None = None) -> dict:
  """Mean and sd over seeds of ``method``'s mean (over ``attacks_``, default
  all) final worst-concept accuracy."""
  return eval_curves.mean_std([float(np.mean([
      ms[method]["attacks"][a]["worst_concept_accuracy"]
      for a in (attacks_ or ms[method]["attacks"])])) for ms in seeds])


def claims(out) -> list[dict]:
  """MIMA's and IMMA's claims, graded on this run's targets (the first
  seed's attacks; the 2-sd targets over seeds are in ``targets``)."""
  t, ms = out["targets"], out["methods"]
  attacks_ = list(ms["none"]["attacks"])
  mean_worst = {m: float(np.mean([ms[m]["attacks"][a]["worst_concept_accuracy"]
                                  for a in attacks_])) for m in ms}
  n = _claims.num
  return [
      _claims.graded(
          "Immunizing the erased concepts keeps fine-tuning from re-learning "
          "them: after each attack MIMA's concept accuracy stays well below "
          "the erased-only model's (MIMA Fig. 1)",
          {"MIMA ≤ half the erased model's accuracy wherever it re-learned":
           t["mima_well_below_none_at_every_checkpoint"]},
          requires={"the erased model re-learns every concept (≥ 0.5): "
                    "something to protect": t["none_relearns_every_concept"]},
          figure=f"mean worst-concept accuracy over {len(attacks_)} attacks: "
          f"MIMA {n(mean_worst['mima'])}, erased only {n(mean_worst['none'])}"
          + (f" (seed {out['seeds'][0]})" if out.get("seeds")
             else " (one seed)")),
      _claims.graded(
          "Immunizing the concepts jointly (MIMA) protects better than one "
          "after another (sequential IMMA)",
          {"MIMA's worst concept below sequential IMMA's in every attack":
           t["mima_beats_imma_sequential_on_worst_concept"]},
          figure=f"mean worst-concept accuracy MIMA {n(mean_worst['mima'])} "
          f"vs sequential IMMA {n(mean_worst['imma_sequential'])}"),
      _claims.graded(
          "Immunization keeps the model's other concepts",
          {"MIMA's retention within 5 % of the erased model's":
           t["mima_retention_within_5pct_of_erased"]},
          figure=f"retention MIMA {n(ms['mima']['retention_accuracy'])} vs "
          f"erased {n(ms['none']['retention_accuracy'])}")]


def notes(cfg, out) -> list[str]:
  ms = out["methods"]
  methods = list(ms)
  lines = [
      "Every figure: concept accuracy = share of DDIM samples (CFG "
      f"{cfg.guidance}, {cfg.sample_steps} steps, {cfg.samples} per concept) "
      "that a frozen MLP digit classifier (test accuracy "
      f"{out['classifier_test_accuracy']:.3f}) labels as the concept; "
      f"attacks: Adam, {len(out['seeds'])} seed(s), sklearn digits; the "
      "phi_merge attack adapts each concept's K/V alone and merges the "
      "copies with phi*.",
      f"Scheme: {cfg.scheme} ('unrolled' is the paper's Algorithm 1; "
      "'alternating' the released train.py).",
      "S^u = attn2.* for every method; S^l = the whole denoiser; the prior "
      "batch is real non-target digits; attacks use no prior preservation.",
      "No MIMA table value is available (spec §3.3): the 'paper' column is "
      "empty except IMMA's third-party-quoted Table 1 SGRs, which are for "
      "SD-1.4 artists, CLIP/DINO features, not comparable in scale."]
  mv = out["displacement"]
  lines.append(
      "Displacement ratio (evaluated ÷ simulated attacker, on the erased "
      f"model, mean over concepts): {out['displacement_ratio']:.3g} — "
      f"{mv['evaluated_attacker']} move it {np.mean(mv['evaluated']):.3g}, "
      f"the lower level ({mv['simulated_attacker']}) "
      f"{np.mean(mv['simulated']):.3g}. " + (
          "Far above 1, the hypergradient is -grad L + O(alpha): the bilevel "
          "part can change little over direct ascent."
          if out["displacement_ratio"] > 10 else
          "Near 1: the simulated attacker is about as strong as the "
          "evaluated one's first checkpoint."))
  t = out["targets"]
  if not t["none_relearns_every_concept"]:
    lines.append("The erased model does not re-learn every concept to 50% "
                 "within the attack budget, so 'well below' is checked only "
                 "where it does.")
  attacks_ = list(ms["none"]["attacks"])
  worst = {m: np.asarray([ms[m]["attacks"][a]["worst_concept_accuracy"]
                          for a in attacks_]) for m in methods}
  for i, a in enumerate(attacks_):
    lines.append(f"{a}: worst-concept accuracy after the attack "
                 + ", ".join(f"{m} {worst[m][i]:.2f}" for m in methods))
  lines.append("Mean over attacks of the worst-concept accuracy: " + ", ".join(
      f"{m} {worst[m].mean():.3f}" for m in methods) + ".")
  wins = int(np.sum(worst["mima"] < worst["imma_sequential"]))
  lines.append(f"MIMA beats sequential IMMA on the worst concept in {wins} of "
               f"{len(attacks_)} attacks.")
  for other in ("mima_average_merge", "max"):
    gap = float(np.mean(np.abs(worst["mima"] - worst[other])))
    if gap < 0.05:
      lines.append(f"MIMA and {other} protect alike here (mean |difference| "
                   f"of worst-concept accuracy over attacks {gap:.3f}).")
  if not t["mima_beats_imma_sequential_on_worst_concept"]:
    lines.append("MIMA does not beat sequential IMMA on the worst concept in "
                 "every attack: this contradicts the paper's central claim "
                 "at this scale (see the per-attack lines above).")
  base = ms["none"]["retention_accuracy"]
  lines.append("Retention (non-target digits' sample accuracy before any "
               "attack): " + ", ".join(f"{m} {ms[m]['retention_accuracy']:.3f}"
                                       for m in methods) + ".")
  if not t["mima_retention_within_5pct_of_erased"]:
    lines.append(f"MIMA's non-target accuracy is "
                 f"{100 * (1 - ms['mima']['retention_accuracy'] / base):.1f}% "
                 f"below the erased model's: the prior term (weight "
                 f"{cfg.prior_weight}) does not hold it within 5%.")
  seeds = [ms] + [r["methods"] for r in out.get("per_seed") or []]
  erased = [out["concept_accuracy_before_attack"]["none"]] + [
      r["concept_accuracy_before_attack"]["none"]
      for r in out.get("per_seed") or []
      if "concept_accuracy_before_attack" in r]
  lines.append(
      "Erasure (UCE): the erased model's concept sample accuracy before any "
      "attack, per seed: " + "; ".join(
          ", ".join(f"{a:.2f}" for a in acc) for acc in erased)
      + (" — where it is high the erasure failed and there is little left "
         "to protect." if any(max(acc) >= 0.5 for acc in erased) else "."))
  lines.append(
      f"Over {len(seeds)} seed(s), mean over attacks of the final worst-"
      "concept accuracy (mean ± sd): " + ", ".join(
          f"{m} {w['mean']:.3f} ± {w['std']:.3f}" for m, w in (
              (m, mean_worst_over_seeds(seeds, m)) for m in methods))
      + (" — one seed: no sd, the 2-sd targets are not measured."
         if len(seeds) < 2 else "."))
  for m, other, attack in (("mima", "max", None),
                           ("mima", "imma_sequential", None),
                           ("mima", "mima_average_merge", "phi_merge")):
    if attack is not None and attack not in ms["none"]["attacks"]:
      continue
    x = mean_worst_over_seeds(seeds, m, attack and [attack])
    y = mean_worst_over_seeds(seeds, other, attack and [attack])
    spread = 2 * max(x["std"], y["std"])
    verdict = ("no sd (one seed)" if len(seeds) < 2 else
               "MIMA lower by more than 2 sd" if (
                   y["mean"] - x["mean"] > spread) else "no difference")
    lines.append(
        f"{m} vs {other} ({attack or 'mean over attacks'}, final worst "
        f"concept): {x['mean']:.3f} vs {y['mean']:.3f}, difference "
        f"{y['mean'] - x['mean']:+.3f} against 2 sd = {spread:.3f}: "
        f"{verdict}; displacement ratio {out['displacement_ratio']:.3g}.")
  half = half_of_erased(out, cfg.eval_every)
  if half["checked"]:
    a, step, w, wo = half["worst"]
    lines.append(
        "MIMA <= half the erased model's worst-concept accuracy (LoRA, K/V "
        "and phi_merge attacks, seeds' mean, every checkpoint where the "
        f"erased model re-learned to >= 0.5): met at {half['met']} of "
        f"{half['checked']} checkpoints; farthest from it {a} at step "
        f"{step}, MIMA {w:.3f} vs erased {wo:.3f} (ratio {w / wo:.2f}, "
        f"target <= 0.5); displacement ratio "
        f"{out['displacement_ratio']:.3g}.")
  rm = out.get("retention_matched") or {}
  if any(r.get("swept") for r in rm.values()):
    lines.append(
        f"Prior weight per method (the smallest whose retention on a "
        f"selection draw reaches {cfg.retention_floor}): " + ", ".join(
            f"{m} {r['prior_weight']:g} (retention {r['retention']:.3f}"
            f"{'' if r['matched'] else ', NOT matched'})"
            for m, r in rm.items() if m != "none") + ".")
  if cfg.ascent_bound:
    ab = out["ascent_bound"]
    lines.append(f"Ascent bound: each concept's loss counts up to "
                 f"{ab['bound']:.4g} = {cfg.ascent_bound:g} x the erased "
                 f"model's clean concept loss {ab['clean_loss']:.4g}.")
  if cfg.sequential_budget == "total":
    lines.append("Sequential IMMA ran --immunize-steps / concepts outer steps "
                 "per concept: MIMA's total budget.")
  lines.append("wall_seconds per method is its immunization loop(s) "
               "including their compilation; per attack it is the attack "
               "mode's total time (per-concept and joint, six models) divided "
               "evenly.")
  return lines


def figures(cfg, run, out):
  ms = out["methods"]
  methods = list(ms)
  for a in ms["none"]["attacks"]:
    for m in ("none", "imma_sequential", "mima"):
      run.figure(f"{a}: worst-concept accuracy after {cfg.attack_steps} "
                 f"steps, {m}", ms[m]["attacks"][a]["worst_concept_accuracy"],
                 note="frozen-classifier accuracy of DDIM samples; digits "
                 "(every method in summary.json)")
  for m in methods:
    run.figure(f"retention (non-target sample accuracy), {m}",
               ms[m]["retention_accuracy"],
               note="frozen-classifier accuracy of DDIM samples of the "
               "non-target digit prompts, before any attack; digits; none = "
               "the erased model")


def plot(cfg, run, out):
  ms = out["methods"]
  methods = list(ms)
  attack_names = list(ms["none"]["attacks"])
  cols = 2
  rows = (len(attack_names) + 1) // cols
  fig, axes = run.new_figure(nrows=rows, ncols=cols,
                             figsize=(5.0 * cols, 3.2 * rows), squeeze=False)
  steps = out["attack_steps"]
  for ax, a in zip(axes.ravel(), attack_names):
    for m in methods:
      acc = np.asarray(list(ms[m]["attacks"][a]["concept_accuracy"].values()))
      st = _plots.style(m)
      if m == "none":
        st["label"] = "erased only (no immunization)"
      ax.plot(steps, np.nanmax(acc, axis=0), **st)
    ax.set(title=a, xlabel="attack step",
           ylabel="worst-concept sample accuracy", ylim=(-0.02, 1.02))
    ax.grid(alpha=0.3)
  axes.ravel()[0].legend(fontsize=7)
  for ax in axes.ravel()[len(attack_names):]:
    ax.axis("off")
  _plots.claim_title(fig, out["claims"][0]["claim"])
  run.save_figure(fig, "concept_accuracy")
