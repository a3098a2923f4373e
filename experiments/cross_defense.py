"""One table for four defense families: every defense on one classifier,
attacked by one grid, scored between "undefended" and "never trained".

An MLP on sklearn digits is pre-trained on all ten digits (U), on the seven
benign ones only (N: the same recipe, never saw the harm) and left at its
initialisation (S). The harm is recognising digits 1, 3 and 7 (the three
``mima_digits`` erases). Each registered defense (``immunojax.bench.
defenses``: condition number, SOPHON, GS-LoRA one request / per class,
IMMA, MIMA with the average merge) starts from U with the strongest knob
that keeps benign validation accuracy within ``--utility-tolerance`` points
of U's. Every start point is then attacked by the same grid (attacker mode
x optimizer x learning rate around the one that teaches N fastest x
harmful data), the worst case is chosen on a
validation split and re-run on fresh seeds, and ``immunojax.bench`` reads
the curves against U, N and S (rho, sigma, nra with bootstrap intervals,
steps to threshold, attacker effort, the family's own metric).

  python -m experiments.cross_defense [--quick]

An MLP, not the GS-LoRA ViT: every family acts on its layers (trunk
features for the condition number, a head for probes, kernels for LoRA),
and the full grid of 180 attacks on 9 start points fits the time budget.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments import (_cli, _config, _cross_defense_report, _options,
                         _pretrain, _runner)
from immunojax import attacks, eval as ev, lora, losses, models
from immunojax.bench import (curves as bc, defenses as bd, metrics,
                             table as bt)
from immunojax.data import load_digits
from immunojax.methods import cond_num

Mode = Literal["probe", "head", "reinit_head", "full", "lora"]
Size = Literal["4shot", "10pct", "100pct"]
NAMES = tuple(bd.DEFENSES)
BASE_LRS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1)


@dataclasses.dataclass(frozen=True)
class Config(_options.Seeded):
  hidden: int = 128
  harmful: tuple[int, ...] = (1, 3, 7)
  pretrain_steps: int = 1500
  pretrain_lr: float = 1e-3
  defenses: tuple[Literal[NAMES], ...] = NAMES
  defense_steps: int = 300
  defense_batch: int = 64
  utility_tolerance: float = dataclasses.field(default=2.0, metadata={
      "help": "points of benign validation accuracy a defense may lose to U"})
  knob_search: bool = dataclasses.field(default=True, metadata={
      "help": "try each defense's knobs strongest first (false: the middle "
              "one)"})
  modes: tuple[Mode, ...] = ("probe", "reinit_head", "full", "lora")
  optimizers: tuple[_config.Optimizer, ...] = (
      "momentum", "adam", "rmsprop", "optax.lion", "adadelta")
  lr_factors: tuple[float, ...] = dataclasses.field(
      default=(1 / 3, 1.0, 3.0), metadata={
          "help": "the grid's rates: the rate tuned on N times these"})
  sizes: tuple[Size, ...] = ("4shot", "10pct", "100pct")
  budgets: tuple[int, ...] = (10, 30, 100, 300)
  attack_benign: bool = dataclasses.field(default=True, metadata={
      "help": "the attacker's set holds as many examples of each benign "
              "class as of each harmful one (false: harmful only)"})
  confirm_seeds: int = 3
  attack_batch: int = 32
  lora_rank: int = 4

  def __post_init__(self):
    super().__post_init__()
    _config.require(self, positive=(
        "hidden", "harmful", "pretrain_steps", "pretrain_lr", "defenses",
        "defense_steps", "defense_batch", "modes", "optimizers", "lr_factors",
        "sizes", "budgets", "confirm_seeds", "attack_batch", "lora_rank"),
        nonnegative=("utility_tolerance",))
    if any(b % 10 for b in self.budgets):
      raise ValueError(f"--budgets must be multiples of 10, got "
                       f"{self.budgets}")
    if not set(self.harmful) < set(range(10)) or len(set(self.harmful)) \
        != len(self.harmful):
      raise ValueError(f"--harmful must be distinct digits 0-9, got "
                       f"{self.harmful}")


QUICK = {"pretrain_steps": 600, "defense_steps": 60, "knob_search": False,
         "modes": ("probe", "full"), "optimizers": ("momentum", "adam"),
         "lr_factors": (1.0, 3.0), "sizes": ("10pct",), "budgets": (10, 30),
         "confirm_seeds": 2}


# ------------------------------------------------------------------- data
def split(cfg: Config):
  """Harmful classes: half an attacker's pool, a quarter validation, a
  quarter test. Benign: 60 / 20 / 20 train / validation / test."""
  x, y = load_digits()
  rng = np.random.default_rng(cfg.seed)
  parts = {k: [] for k in ("pool", "h_val", "h_test", "b_train", "b_val",
                           "b_test")}
  for c in range(10):
    idx = rng.permutation(np.flatnonzero(y == c))
    n = len(idx)
    if c in cfg.harmful:
      cuts, names = (n // 2, 3 * n // 4), ("pool", "h_val", "h_test")
    else:
      cuts, names = (3 * n // 5, 4 * n // 5), ("b_train", "b_val", "b_test")
    for name, part in zip(names, np.split(idx, cuts)):
      parts[name].append(part)
  return {k: (jnp.asarray(x[np.sort(np.concatenate(v))]),
              jnp.asarray(y[np.sort(np.concatenate(v))]))
          for k, v in parts.items()}


def attack_sets(cfg: Config, pool, benign):
  """The attacker's training sets by size, stratified: ``k`` examples of
  each harmful class and, with ``--attack-benign``, ``k`` of each benign
  class too (the attacker teaches the harm back into a 10-way classifier;
  on harmful data alone the model collapses to a 3-way task that even a
  random initialisation learns in ten steps)."""
  rng = np.random.default_rng(cfg.seed + 7)
  n_h = int(np.sum(np.asarray(pool[1]) == cfg.harmful[0]))
  k = {"4shot": 4, "10pct": max(1, round(0.1 * n_h)), "100pct": n_h}
  sources = [(pool, cfg.harmful)]
  if cfg.attack_benign:
    sources.append((benign, tuple(c for c in range(10)
                                  if c not in cfg.harmful)))
  out = {}
  for size in cfg.sizes:
    xs, ys = [], []
    for (x, y), classes in sources:
      x, y = np.asarray(x), np.asarray(y)
      for c in classes:
        idx = rng.permutation(np.flatnonzero(y == c))[:k[size]]
        xs.append(x[idx])
        ys.append(y[idx])
    out[size] = (jnp.asarray(np.concatenate(xs)),
                 jnp.asarray(np.concatenate(ys)))
  return out


# ----------------------------------------------------------------- attacks
def targets(cfg: Config, apply, d, sets):
  """One named target per data size. The metric is a vector: per-example
  correctness on the harmful validation and test images, then the benign
  test accuracy (utility), so the worst case can be chosen on validation
  and bootstrapped on test."""
  nv = d["h_val"][0].shape[0]

  def metric(p, e):
    xv, yv, xt, yt, xb, yb = e
    right = lambda x, y: (jnp.argmax(apply(p, x), -1) == y).astype(
        jnp.float32)
    return jnp.concatenate([right(xv, yv), right(xt, yt),
                            jnp.mean(right(xb, yb))[None]])

  common = attacks.Target(
      loss_fn=lambda p, b: _ce(apply, p, b), metric_fn=metric,
      train_data=None, head=("^head/",),
      lora_config=lora.LoraConfig(r=cfg.lora_rank,
                                  lora_alpha=2.0 * cfg.lora_rank,
                                  target_modules=(r"layers/\d+/kernel",)),
      eval_data=(*d["h_val"], *d["h_test"], *d["b_test"]))
  return {s: common._replace(train_data=sets[s]) for s in cfg.sizes}, nv


def _ce(apply, p, b):
  return losses.cross_entropy(apply(p, b[0]), b[1])


def tune_rates(cfg, run, tgts, nv, start):
  """Per optimizer, the rate with which full fine-tuning teaches the harm
  fastest to ``start`` (the largest validation area under the curve on
  log(1 + steps), the middle data size): the grid is spread around it so
  the optimum is inside. ``start`` is N, the model that has something to
  learn -- on U every rate keeps the 0.99 it starts with, and the
  smallest rate "wins"."""
  size = cfg.sizes[len(cfg.sizes) // 2]
  values = _config.optimizer_values(cfg.optimizers)
  grid = [a for v in values for a in attacks.grid(
      optimizers=[v], learning_rates=BASE_LRS, modes=("full",),
      batch_sizes=(_batch(cfg, tgts[size]),), steps=(max(cfg.budgets),))]
  c = attacks.run_attacks(grid, {"N": start}, tgts[size], eval_every=10,
                          attack_map=run.grid_map())
  val = c.metric["N"][:, :, :nv].mean(-1)
  area = np.array([metrics.log_area(v, c.steps["N"]) for v in val])
  out = {}
  for v, spec in zip(values, cfg.optimizers):
    rows = [i for i, a in enumerate(grid) if a.optimizer is v]
    best = rows[int(np.nanargmax(np.where(np.isfinite(area[rows]),
                                          area[rows], -1)))]
    out[spec] = grid[best].learning_rate
  return out


def _batch(cfg, target):
  return min(cfg.attack_batch, int(target.train_data[0].shape[0]))


def attack_grid(cfg, rates, tgts):
  """``{size: [Attack]}``: modes x optimizers x rates around the tuned one."""
  out = {}
  for size, t in tgts.items():
    out[size] = [a for spec, v in zip(cfg.optimizers,
                                      _config.optimizer_values(cfg.optimizers))
                 for a in attacks.grid(
                     optimizers=[v], modes=cfg.modes,
                     learning_rates=[rates[spec] * f for f in cfg.lr_factors],
                     batch_sizes=(_batch(cfg, t),),
                     steps=(max(cfg.budgets),))]
  return out


def confirm(cfg, run, grid, tgts, start_params, sc: bt.StartCurves, nv,
            modes=None):
  """:func:`immunojax.bench.curves.confirm` at this config: each budget's
  validation-selected attack re-run on ``--confirm-seeds`` fresh seeds."""
  return bc.confirm(start_params, sc, grid=grid, targets=tgts,
                    budgets=cfg.budgets, seeds=cfg.confirm_seeds, nv=nv,
                    modes=modes, attack_map=run.grid_map())


def controls(cfg, run, grid, tgts, start_params, sc, d, nv):
  """The budget-B worst attack on shuffled-label harmful data and on
  benign data only: harm with no harmful signal, and whether the harm
  comes back by itself."""
  pick = metrics.select(sc.val, sc.steps, max(cfg.budgets))
  if pick is None:
    return {}
  size, attack = [(s, a) for s, lst in grid.items() for a in lst][pick[0]]
  x, y = tgts[size].train_data
  rng = np.random.default_rng(cfg.seed + 99)
  bx, by = d["b_train"]
  sel = rng.permutation(len(by))[:len(y)]
  out = {}
  for name, data_ in (("shuffled_labels", (x, jnp.asarray(rng.permutation(
      np.asarray(y))))), ("benign_only", (bx[sel], by[sel]))):
    c = attacks.run_attacks([attack], {"x": start_params},
                            tgts[size]._replace(train_data=data_),
                            eval_every=10, attack_map=run.grid_map())
    out[name] = float(np.nanmean(c.metric["x"][0, -1, nv:-1]))
  return out


# ---------------------------------------------------------------- defenses
def defend(cfg, run, problem, name, utility_of, target_utility):
  """Trains a defense from U with the strongest knob that keeps benign
  validation accuracy; returns ``(params, record)``."""
  d = bd.DEFENSES[name]
  knobs = d.knobs if cfg.knob_search else (d.knobs[len(d.knobs) // 2],)
  key = jax.random.PRNGKey(cfg.seed + 31)
  t0, tried = time.perf_counter(), []
  for i, knob in enumerate(knobs):
    params = problem.params
    for stage in d.build(problem, knob, steps=cfg.defense_steps,
                         batch_size=cfg.defense_batch, key=key):
      imm = stage.immunizer
      state = run.fit(f"{name}/knob{i}/{stage.name}", imm,
                      imm.init(params, key), stage.sample, stage.data,
                      stage.steps, key=key, desc=f"{name} {d.knob}={knob:g}")
      params = imm.params(state)
    util = utility_of(params)
    tried.append({"knob": knob, "benign_val_accuracy": util})
    if util >= target_utility or i == len(knobs) - 1:
      break
  return params, {"knob": d.knob, "value": knob, "tried": tried,
                  "utility_matched": bool(util >= target_utility),
                  "seconds": time.perf_counter() - t0}


def native(cfg, name, problem, params, d, rows):
  """The family's own metric."""
  kind = bd.DEFENSES[name].native
  acc = lambda p, s: float(models.accuracy(problem.apply(p, s[0]), s[1]))
  if kind == "rir":
    f = lambda p, s: problem.features(p, s[0])
    r = cond_num.relative_immunization_ratio(
        f(params, d["b_test"]), f(params, d["h_test"]),
        f(problem.params, d["b_test"]), f(problem.params, d["h_test"]),
        estimator="pinv")
    return {"rir_theta0": float(r.rir), "estimator": "pinv",
            "data": "trunk features, benign / harmful test images"}
  if kind == "none":
    return {}
  if kind == "overhead":
    return {"finetune_overhead_vs_scratch":
            rows[name]["steps_to_threshold"]["overhead_vs_S"],
            "protocol": "worst attack's steps to 0.9 W_U(B), over S's"}
  if kind == "acc_f":
    acc_f = 100 * acc(params, d["h_test"])
    pre_f = 100 * acc(problem.params, d["h_test"])
    acc_r = 100 * acc(params, d["b_test"])
    return {"acc_f": acc_f, "acc_r": acc_r,
            "h_mean": float(ev.continual.h_mean(acc_r, acc_f, pre_f))}
  u = bt.worst_curve(rows["__U__"])
  w = bt.worst_curve(rows["__self__"])
  return {"sgr_mean_percent": float(np.nanmean(ev.gap_ratio(u[1:], w[1:]))),
          "protocol": "SGR of the worst-case harmful accuracy vs U"}


# -------------------------------------------------------------- experiment
def experiment(cfg: Config, run: _runner.Run) -> dict:
  d = split(cfg)
  model = models.MLP((64, cfg.hidden, cfg.hidden // 2, 10),
                     rngs=nnx.Rngs(cfg.seed))
  apply, init = models.functional(model)
  features, _ = models.functional(model, "features")
  all_x = jnp.concatenate([d["b_train"][0], d["pool"][0]])
  all_y = jnp.concatenate([d["b_train"][1], d["pool"][1]])
  fit = lambda arrays, loop, desc: _pretrain.fit(
      run, lambda p, b: _ce(apply, p, b), init, arrays,
      steps=cfg.pretrain_steps, lr=cfg.pretrain_lr, batch_size=64,
      seed=cfg.seed + 1, desc=desc, loop=loop)
  U = fit((all_x, all_y), "pretrain_U", "U: all ten digits")
  N = fit(d["b_train"], "pretrain_N", "N: the seven benign digits")
  acc = lambda p, s: float(models.accuracy(apply(p, s[0]), s[1]))
  problem = bd.ClassifierProblem(
      apply=apply, features=features, params=U, head=("^head/",),
      lora_targets=(r"layers/\d+/kernel",), benign=d["b_train"],
      harmful=d["pool"], harmful_classes=tuple(cfg.harmful))
  target_util = acc(U, d["b_val"]) - cfg.utility_tolerance / 100
  starts = {"U": U, "N": N, "S": init}
  knobs = {}
  for name in cfg.defenses:
    starts[name], knobs[name] = defend(cfg, run, problem, name,
                                       lambda p: acc(p, d["b_val"]),
                                       target_util)
    run.print(f"[{name}] {knobs[name]['knob']} {knobs[name]['value']:g}: "
              f"benign test {acc(starts[name], d['b_test']):.3f}, harm "
              f"{acc(starts[name], d['h_test']):.3f}")
  sets = attack_sets(cfg, d["pool"], d["b_train"])
  tgts, nv = targets(cfg, apply, d, sets)
  rates = tune_rates(cfg, run, tgts, nv, N)
  grid = attack_grid(cfg, rates, tgts)
  n_attacks = sum(len(v) for v in grid.values())
  run.print(f"attack grid: {n_attacks} attacks x {len(starts)} start points")
  t0 = time.perf_counter()
  curves = {s: attacks.run_attacks(grid[s], starts, tgts[s], eval_every=10,
                                   attack_map=run.grid_map()) for s in grid}
  sc = {}
  for name, params in starts.items():
    sc[name] = confirm(cfg, run, grid, tgts, params,
                       bc.start_curves(grid, curves, name, nv), nv)
  attack_seconds = time.perf_counter() - t0
  refs = bt.References(sc["U"], sc["N"], sc["S"])
  rows = bt.table(list(sc.items()), refs, cfg.budgets)
  out = {"references": {}, "defenses": {}, "families": sorted(
      {bd.DEFENSES[n].family for n in cfg.defenses} - {"baseline"}),
         "grid": {"modes": list(cfg.modes), "optimizers": list(cfg.optimizers),
                  "rates_tuned_on_N": rates,
                  "rate_rule": "fastest full fine-tuning of N (validation "
                               "area on log steps, middle data size)",
                  "lr_factors": list(cfg.lr_factors),
                  "sizes": {s: int(sets[s][0].shape[0]) for s in cfg.sizes},
                  "budgets": list(cfg.budgets), "attacks": n_attacks,
                  "confirm_seeds": cfg.confirm_seeds,
                  "selection": "validation split (harmful classes); the test "
                               "split only scores",
                  "attack_seconds": attack_seconds}}
  for r in ("U", "N", "S"):
    out["references"][r] = {"utility": acc(starts[r], d["b_test"]),
                            "harm": acc(starts[r], d["h_test"]), **rows[r]}
  for name in cfg.defenses:
    dfn, row = bd.DEFENSES[name], rows[name]
    in_claim = (bt.row(confirm(cfg, run, grid, tgts, starts[name],
                               sc[name].only(dfn.claim), nv, dfn.claim),
                       refs, cfg.budgets) if dfn.claim else None)
    nat = native(cfg, name, problem, starts[name], d,
                 {**rows, "__U__": sc["U"], "__self__": sc[name]})
    out["defenses"][name] = {
        "family": dfn.family, "claim": list(dfn.claim),
        "utility": acc(starts[name], d["b_test"]),
        "harm": acc(starts[name], d["h_test"]), **row,
        "in_claim": None if in_claim is None else {
            k: in_claim[k] for k in ("worst_case", "rho", "nra")},
        "native": nat, "knob": knobs[name],
        "seconds": knobs[name]["seconds"],
        "controls": controls(cfg, run, grid, tgts, starts[name], sc[name], d,
                             nv)}
  out["references"]["U"]["controls"] = controls(cfg, run, grid, tgts, U,
                                                sc["U"], d, nv)
  _cross_defense_report.report(cfg, run, out, sc)
  return out


main = _cli.entry_point("cross_defense", Config, experiment, quick=QUICK,
                        description=__doc__.splitlines()[0], x64=False)

if __name__ == "__main__":
  raise SystemExit(main())
