"""SOPHON's trapping run, replicated, and what it takes to cover the grid
(issue 27 item 2; no paper table: the spec's toy study, section 7.5 run F).

Rows, each the full :mod:`experiments.sophon_digits` pipeline (pre-training,
protection with KL-from-uniform, the paper protocol at the calibrated rate
and the saturated lr 1e-2 row, a small attack grid read against scratch)
over ``--seeds`` runs:

* ``run_f``: the spec's run F as it was run -- one restricted domain
  (noise_shift), one simulated environment: full fine-tuning with plain SGD
  at 0.1, the effective step of the attacker it was evaluated with (SGD
  momentum 0.9 at lr 1e-2, no calibration). The spec found full
  fine-tuning trapped at chance while a head-only probe recovered
  (0.33 -> 0.76).
* ``one_environment``: the same single environment at the effective step
  of the calibrated attacker (the protocol's rate, as in every other row).
* ``all_environments``: the same domain, every mode (full, reinit_head,
  head) x {SGD at the effective step, Adam, RMSprop at --env-adam-lr}.
* ``two_domains``: all environments, noise_shift and glyphs: the two
  domains' meta-gradients averaged.

Each row reports the protocol's final restricted accuracy against scratch
and the original (the 2-sd rule), intactness, the grid's protected -
scratch per attack at the last budget (head-only included) and the
updates the guard rolled back.

  python -m experiments.sophon_trapping
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np

from experiments import _claims, _cli, _plots, _config, _runner, _sophon_report
from experiments import sophon_digits as sd
from immunojax.eval import curves as ev_curves

Row = Literal["run_f", "one_environment", "all_environments", "two_domains"]
ONE_ENVIRONMENT = {"domains": ("noise_shift",), "env_modes": ("full",),
                   "env_optimizers": ("sgd",)}
ROWS: dict[str, dict] = {
    "run_f": {**ONE_ENVIRONMENT, "calibrate": False, "attack_lr": 1e-2,
              "env_sgd_lr": 0.1},
    "one_environment": ONE_ENVIRONMENT,
    "all_environments": {"domains": ("noise_shift",)},
    "two_domains": {"domains": ("noise_shift", "glyphs")},
}
# The spec's run F (one seed, 270 test images): full fine-tuning at lr 1e-2
# after 20 epochs, and the head-only probe after 20 epochs.
SPEC_RUN_F = {"full_lr_0.01": 0.10, "head_only_lr_0.01": 0.76}


@dataclasses.dataclass(frozen=True)
class Config(sd.Config):
  rows: tuple[Row, ...] = ("run_f", "one_environment", "all_environments",
                           "two_domains")
  grid_optimizers: tuple[_config.Optimizer, ...] = ("momentum", "adam")
  grid_lrs: tuple[float, ...] = (1e-2,)

  def __post_init__(self):
    super().__post_init__()
    _config.require(self, positive=("rows",))


QUICK = {**sd.QUICK, "rows": ("one_environment", "all_environments")}


def row_config(cfg: Config, row: str) -> Config:
  """The row's overrides on ``cfg`` (its grid, seeds and sizes kept)."""
  return dataclasses.replace(cfg, **ROWS[row])


def run_row(cfg: Config, run: _runner.Run, row: str, rate) -> dict:
  """Every seed of one row: the protocol and grid per domain, summarised as
  :func:`experiments.sophon_digits.summarise_domain` does."""
  c = row_config(cfg, row)
  original, restricted, guard = sd.load_domains(c)
  runs = []
  for i in range(c.seeds):
    r = sd.one_seed(c, run, c.seed + i, restricted, original, guard, rate,
                    prefix=f"{row}/")
    rate = r["rate"]
    runs.append(r)
  envs, grid = runs[0]["environments"], runs[0]["grid"]
  domains = {n: sd.summarise_domain(c, runs, n, grid, envs)
             for n in restricted}
  drop = [r["original_accuracy"]["original"]
          - r["original_accuracy"]["protected"] for r in runs]
  return {"rate": rate, "calibration": runs[0]["calibration"],
          "environments": [e.as_dict() for e in envs],
          "domains": domains,
          "intactness_drop": ev_curves.mean_std(drop),
          "original_accuracy": {s: ev_curves.mean_std(
              [r["original_accuracy"][s] for r in runs])
              for s in ("original", "protected")},
          "rolled_back": [r["rolled_back"] for r in runs]}


def verdicts(cfg: Config, row: dict) -> dict:
  """Per domain: whether full fine-tuning is trapped (the protocol's
  protected mean <= 0.20 and below scratch by more than 2 sd at the end),
  and per grid attack whether the protected start is below scratch by more
  than 2 sd at the last budget ("below"), no different, or "above"."""
  b = str(cfg.budgets[-1])
  out = {}
  for name, d in row["domains"].items():
    a = d["after_finetune"]
    p, s = a["protected"], a["scratch"]
    trapped = (p["mean"] <= 0.20 and p["mean"] < s["mean"]
               and ev_curves.differs(p, s))
    per_attack = {}
    for lab, rec in d["grid_vs_scratch"].items():
      dp = rec["delta_protected"][b]
      if dp["mean"] is None:
        per_attack[lab] = "n/a"
        continue
      per_attack[lab] = (
          "no difference" if not ev_curves.differs(dp, {"mean": 0.0})
          else "below" if dp["mean"] < 0 else "above")
    out[name] = {"full_finetuning_trapped": bool(trapped),
                 "vs_scratch_per_attack": per_attack}
  return out


def claims(rows: dict) -> list[dict]:
  """The spec's run F claim and the paper's reason to simulate several
  fine-tuning methods (§2.1), graded on this run's rows."""
  def trapped(row):
    return (rows[row]["verdicts"]["noise_shift"]["full_finetuning_trapped"]
            if row in rows else None)

  def ends(row):
    if row not in rows:
      return f"{row} not run"
    a = rows[row]["domains"]["noise_shift"]["after_finetune"]
    return (f"{row}: protected {_claims.mean_sd(a['protected'])} vs scratch "
            f"{_claims.mean_sd(a['scratch'])}")

  def intact(row):
    return (rows[row]["intactness_drop"]["mean"] <= _sophon_report.INTACT_POINTS
            if row in rows else None)

  return [
      _claims.graded(
          "The spec's run F: one simulated environment (full SGD at the "
          "attacker's effective step) traps full fine-tuning at chance, with "
          "no intactness loss", {"run F trapped": trapped("run_f"),
                                 "run F intact": intact("run_f")},
          figure=ends("run_f") + " (noise_shift accuracy after fine-tuning)"),
      _claims.graded(
          "Simulating several fine-tuning methods traps full fine-tuning "
          "where one does not (§2.1)",
          {"all environments trap it": trapped("all_environments"),
           "one environment at the same rate does not":
           None if trapped("one_environment") is None
           else not trapped("one_environment"),
           "all environments intact": intact("all_environments")},
          figure=ends("all_environments") + "; " + ends("one_environment"))]


def _fmt(s: dict) -> str:
  return f"{s['mean']:.3f} ± {s['std']:.3f}"


def _end(curve: dict) -> str:
  return f"{curve['mean'][-1]:.3f} ± {curve['std'][-1]:.3f}"


def notes(cfg: Config, rows: dict) -> list[str]:
  b = str(cfg.budgets[-1])
  out = []
  for row, r in rows.items():
    for name, d in r["domains"].items():
      a = d["after_finetune"]
      v = r["verdicts"][name]
      heads = [(lab, rec["delta_protected"][b])
               for lab, rec in d["grid_vs_scratch"].items()
               if lab.endswith(" head")]
      rb = sum(x["rolled_back"] for x in r["rolled_back"])
      n = sum(x["logged_updates"] for x in r["rolled_back"])
      out.append(
          f"{row}, {name}: after {cfg.epochs} epochs at lr {r['rate']:g} "
          f"protected {_fmt(a['protected'])}, scratch {_fmt(a['scratch'])}, "
          f"original {_fmt(a['original'])} -> full fine-tuning "
          f"{'trapped' if v['full_finetuning_trapped'] else 'not trapped'}"
          f" (at lr {cfg.robustness_lr:g}: protected "
          f"{_end(d['robustness_row']['protected'])}, scratch "
          f"{_end(d['robustness_row']['scratch'])}); "
          "head-only protected - scratch at " + b + " steps: "
          + "; ".join(f"{lab} {dp['mean']:+.3f} ± {dp['std']:.3f} "
                      f"({v['vs_scratch_per_attack'][lab]})"
                      for lab, dp in heads)
          + f"; intactness drop {_fmt(r['intactness_drop'])}; "
          f"{rb} of {n} logged updates rolled back.")
  if "run_f" in rows:
    d = rows["run_f"]["domains"]["noise_shift"]
    p = d["after_finetune"]["protected"]
    heads = [rec["delta_protected"][b]["mean"]
             for lab, rec in d["grid_vs_scratch"].items()
             if lab.endswith(" head") and
             rec["delta_protected"][b]["mean"] is not None]
    trapped = rows["run_f"]["verdicts"]["noise_shift"][
        "full_finetuning_trapped"]
    out.append(
        f"The spec's run F {'is' if trapped else 'is NOT'} reproduced: full "
        f"fine-tuning ends at {_fmt(p)} (the spec's single run: "
        f"{SPEC_RUN_F['full_lr_0.01']:.2f}, at chance); the head-only attacks"
        " end " + ("below" if heads and max(heads) < 0 else "at or above")
        + " scratch (protected - scratch "
        + ", ".join(f"{h:+.3f}" for h in heads) + "; the spec's head-only "
        f"probe recovered to {SPEC_RUN_F['head_only_lr_0.01']:.2f}).")
  if "one_environment" in rows and "all_environments" in rows:
    t = rows["one_environment"]["verdicts"]["noise_shift"][
        "vs_scratch_per_attack"]
    a = rows["all_environments"]["verdicts"]["noise_shift"][
        "vs_scratch_per_attack"]
    fixed = [lab for lab in t if t[lab] != "below" and a.get(lab) == "below"]
    lost = [lab for lab in t if t[lab] == "below" and a.get(lab) != "below"]
    out.append("Adding environments: attacks that were not below scratch "
               "with one environment and are with all: "
               + (", ".join(fixed) or "none")
               + "; attacks that lost it: " + (", ".join(lost) or "none")
               + ".")
  return out


def _plot(cfg: Config, run: _runner.Run, rows: dict) -> None:
  panels = [(row, name) for row, r in rows.items() for name in r["domains"]]
  fig, axes = run.new_figure(ncols=len(panels),
                             figsize=(4.2 * len(panels), 3.6), squeeze=False,
                             sharey=True)
  x = np.arange(cfg.epochs + 1)
  for ax, (row, name) in zip(axes[0], panels):
    d = rows[row]["domains"][name]
    _plots.mean_sd_curves(ax, x, d["curves"], d["curves_sd"], sd.STARTS)
    ax.axhline(0.1, color="gray", lw=0.8, ls="-.", label="chance")
    ax.set(title=f"{row}: {name} (lr {rows[row]['rate']:g})",
           xlabel="fine-tuning epoch", ylim=(0, 1))
    ax.grid(alpha=0.3)
  axes[0][0].set_ylabel("restricted-domain test accuracy (fraction)")
  axes[0][0].legend(fontsize=8)
  fig.suptitle("Is full fine-tuning trapped, and by which simulated "
               "environments? (mean ± sd over seeds)", fontsize=9)
  run.save_figure(fig, "trapping")


def experiment(cfg: Config, run: _runner.Run) -> dict:
  rows, rate = {}, None
  for row in cfg.rows:            # one calibration serves the calibrated rows
    calibrated = row_config(cfg, row).calibrate
    r = run_row(cfg, run, row, rate if calibrated else None)
    if calibrated:
      rate = r["rate"]
    r["verdicts"] = verdicts(cfg, r)
    rows[row] = r
  out = {"rows": rows, "calibration": next(
      (r["calibration"] for r in rows.values()
       if (r["calibration"] or {}).get("met") is not None), None),
         "spec_run_f": SPEC_RUN_F}
  out["notes"] = notes(cfg, rows)
  out["claims"] = claims(rows)
  for row, r in rows.items():
    d = r["domains"]["noise_shift"]
    run.figure(f"{row}: noise_shift restricted acc. after {cfg.epochs} "
               "epochs, protected", _fmt(d["after_finetune"]["protected"]),
               note=f"full fine-tuning, SGD momentum 0.9 at lr {r['rate']:g} "
               f"({'fixed' if row_config(cfg, row).calibrate is False else 'calibrated'}"
               f"); scratch {_fmt(d['after_finetune']['scratch'])}; "
               f"{cfg.seeds} seeds" + ("; the spec's run F (one seed) ended "
               f"at {SPEC_RUN_F['full_lr_0.01']:.2f}, its head-only probe at "
               f"{SPEC_RUN_F['head_only_lr_0.01']:.2f}" if row == "run_f"
               else ""))
  for line in out["notes"]:
    run.print("  " + line)
  _plot(cfg, run, rows)
  return out


main = _cli.entry_point("sophon_trapping", Config, experiment, quick=QUICK,
                        description=__doc__.splitlines()[0], x64=False)

if __name__ == "__main__":
  raise SystemExit(main())
