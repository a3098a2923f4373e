"""SOPHON non-fine-tunable learning on the bundled digits (Deng et al., IEEE
S&P 2024, the classification headline at CPU scale).

Original domain: one half of scikit-learn's digits (10 classes). Restricted
domains: the other half under a 1-pixel shift + noise (the spec's toy study
found the original model transfers there) and, in multi-domain mode, a
procedurally generated 10-class glyph set. An MLP is pre-trained on the
original domain, then protected with SOPHON (fine-tuning suppression with
simulated attackers sampled from declared environments, normal training
reinforcement, an original-accuracy guard that rolls back). Evaluation is
the attack harness: the paper's protocol (full fine-tuning, SGD momentum 0.9,
wd 1e-4, restricted accuracy per epoch) from scratch, original and protected
starts at a rate calibrated on a validation half (the largest at which the
original still ends clearly above scratch), then a grid of optimizers x
learning rates x {full, head re-initialised, head only}, every attack read
against scratch over ``--seeds`` independent runs.

  python -m experiments.sophon_digits
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from experiments import (_cli, _config, _options, _plots, _pretrain,
                         _runner, _sophon_report)
from immunojax import attacks, data, losses, models, parallel
from immunojax import optimizers as _optimizers
from immunojax.data import domains as doms
from immunojax.eval import curves as ev_curves, references
from immunojax.methods import sophon as sp

PAPER = {"scratch": 0.627, "original": 0.848, "protected": 0.152,
         "original_accuracy_original": 0.996,
         "original_accuracy_protected": 0.962}   # CAFormer, ImageNette->CIFAR-10
Domain = Literal["noise_shift", "glyphs"]
Loss = Literal["ice_code", "ice_paper", "kl_uniform", "negated_cross_entropy"]
Mode = Literal["full", "head", "reinit_head"]


@dataclasses.dataclass(frozen=True)
class Config(_options.Sophon):
  domains: tuple[Domain, ...] = dataclasses.field(
      default=("noise_shift",), metadata={
          "help": "restricted domains (noise_shift glyphs: the two-domain "
                  "ablation)"})
  loss: Loss = dataclasses.field(default="kl_uniform", metadata={
      "help": "the restricted loss (kl_uniform: the spec's trapping run)"})
  clip: float = 0.5
  first_order: bool = True
  seeds: int = dataclasses.field(default=3, metadata={
      "help": "independent runs (seed, seed + 1, ...): initialisation, "
              "pre-training, protection and attack batches all vary"})
  calibrate: bool = dataclasses.field(default=True, metadata={
      "help": "choose the protocol's attack rate by the calibration rule "
              "(false: --attack-lr) and simulate SGD at its effective step"})
  calibration_lrs: tuple[float, ...] = (1e-3, 3e-3, 1e-2)
  calibration_margin: float = dataclasses.field(default=0.1, metadata={
      "help": "the original must end this far above scratch"})
  robustness_lr: float = dataclasses.field(default=1e-2, metadata={
      "help": "the protocol's second, saturated row"})
  environments_per_update: int = dataclasses.field(default=1, metadata={
      "help": "the paper's N: simulated attacks per FTS update, averaged "
              "(spread over --devices)"})
  env_modes: tuple[Mode, ...] = ("full", "reinit_head", "head")
  env_optimizers: tuple[_config.Optimizer, ...] = ("sgd", "adam", "rmsprop")
  env_adam_lr: float = dataclasses.field(default=1e-2, metadata={
      "help": "rate of every adaptive environment (adam, rmsprop, ...): the "
              "grid's"})
  guard_drop: float = dataclasses.field(default=0.08, metadata={
      "help": "roll an update back when the guard-set accuracy falls more "
              "than this below the pre-trained model's"})
  grid_optimizers: tuple[_config.Optimizer, ...] = (
      "sgd", "momentum", "adam", "adagrad", "adadelta", "rmsprop")
  grid_lrs: tuple[float, ...] = (1e-3, 1e-2, 5e-2)
  grid_batches: tuple[int, ...] = (64,)
  grid_modes: tuple[Mode, ...] = ("full", "reinit_head", "head")
  grid_steps: int = 240
  budgets: tuple[int, ...] = (20, 60, 240)
  transfer_min: float = dataclasses.field(default=0.05, metadata={
      "help": "an attack transfers when the original beats scratch by more"})

  def __post_init__(self):
    super().__post_init__()
    _config.require(self, positive=(
        "domains", "clip", "seeds", "calibration_lrs", "calibration_margin",
        "robustness_lr", "env_modes", "env_optimizers", "grid_optimizers",
        "grid_lrs", "grid_batches", "grid_modes", "grid_steps", "budgets"),
        nonnegative=("guard_drop", "transfer_min"))
    if self.grid_steps % 20:
      raise ValueError(f"--grid-steps must be a multiple of 20, got "
                       f"{self.grid_steps}")
    if any(b % 20 or b > self.grid_steps for b in self.budgets):
      raise ValueError(f"--budgets must be multiples of 20 up to "
                       f"--grid-steps, got {self.budgets}")


QUICK = {"pretrain_epochs": 10, "loops": 100, "epochs": 4, "seeds": 2,
         "calibration_lrs": (3e-3, 1e-2), "env_optimizers": ("sgd",),
         "grid_optimizers": ("adam",), "grid_lrs": (1e-2,),
         "grid_modes": ("full", "head"), "grid_steps": 60,
         "budgets": (20, 60)}
MOMENTUM = 0.9      # the protocol's SGD momentum: effective step lr / 0.1


def load_domains(cfg: Config):
  original, shifted, guard = doms.digit_halves(seed=cfg.seed)
  table = {"noise_shift": shifted, "glyphs": doms.glyphs(seed=cfg.seed)}
  return original, {d: table[d] for d in cfg.domains}, guard


def environments(cfg: Config, sgd_lr: float) -> list[sp.Environment]:
  """Every mode x optimizer: SGD at ``sgd_lr`` (the attacker's effective
  step), the adaptive ones at ``--env-adam-lr``."""
  return [sp.Environment(m, v, sgd_lr if o == "sgd" else cfg.env_adam_lr)
          for m in cfg.env_modes
          for o, v in zip(cfg.env_optimizers,
                          _config.optimizer_values(cfg.env_optimizers))]


def covered(attack: attacks.Attack, envs: list[sp.Environment]) -> bool:
  """Whether a grid attack lies inside the simulated set: an environment of
  its mode and optimizer (momentum SGD counts as SGD at its effective step
  ``lr / (1 - 0.9)``) at a rate at least the attack's."""
  name, lr = attack.optimizer_name, attack.learning_rate
  if name == "momentum":
    name, lr = "sgd", lr / (1 - MOMENTUM)
  return lr is not None and any(
      e.mode == attack.mode and _optimizers.jsonable_name(e.optimizer) == name
      and e.learning_rate is not None and lr <= e.learning_rate * (1 + 1e-9)
      for e in envs)


def protect(cfg, run, apply, params, original, restricted, guard, envs,
            seed, prefix=""):
  acc = lambda p, x, y: float(models.accuracy(apply(p, x), y))
  guard_acc = acc(params, jnp.asarray(guard[0]), guard[1])
  imm = sp.sophon(
      apply=apply, environments=envs,
      restricted_loss=losses.RESTRICTED_LOSSES[cfg.loss],
      fts_optimizer=optax.chain(optax.clip_by_global_norm(cfg.clip),
                                optax.adam(cfg.fts_lr)),
      ntr_optimizer=optax.adam(cfg.ntr_lr), first_order=cfg.first_order,
      guard=sp.accuracy_guard(apply, jnp.asarray(guard[0]),
                              jnp.asarray(guard[1]),
                              guard_acc - cfg.guard_drop),
      environments_per_update=cfg.environments_per_update,
      environment_map=run.grid_map(parallel.sequential_map))
  key = jax.random.PRNGKey(seed + 3)
  k, b = cfg.inner_steps, cfg.batch_size

  def sample(d, t):
    blocks = [data.batch_block(jax.random.fold_in(key, i), xy, b, t, k)
              for i, xy in enumerate(d["restricted"])]
    orig = data.minibatch(jax.random.fold_in(key, 99), d["original"], b, t)
    return {"restricted": jax.tree_util.tree_map(lambda *a: jnp.stack(a),
                                                 *blocks),
            "original": jax.tree_util.tree_map(lambda a: a[None], orig)}

  arrays = {"restricted": [(jnp.asarray(r.x_train), jnp.asarray(r.y_train))
                           for r in restricted.values()],
            "original": (jnp.asarray(original.x_train),
                         jnp.asarray(original.y_train))}
  loop = f"{prefix}protect_s{seed}"
  state = run.fit(loop, imm, imm.init(params, key), sample, arrays,
                  cfg.loops, key=key, log_every=10,
                  desc=f"SOPHON seed {seed} ({len(restricted)} domain(s), "
                  f"{len(envs)} environments)", batch_spec=sp.BATCH_SPEC)
  logged = run.records(loop)
  rolled = {"logged_updates": len(logged),
            "rolled_back": sum(r.get("rolled_back", 0) for r in logged)}
  return imm.params(state), guard_acc, rolled


def target(apply, dom) -> attacks.Target:
  """Fine-tune on the restricted training set; the metric is the accuracy
  on the two halves of its test set, ``[validation, test]`` (a fixed
  split: attacks and rates are chosen on the first, scored on the
  second)."""
  n = len(dom.y_test)
  perm = np.random.default_rng(0).permutation(n)
  halves = [(jnp.asarray(dom.x_test[i]), jnp.asarray(dom.y_test[i]))
            for i in (np.sort(perm[:n // 2]), np.sort(perm[n // 2:]))]
  return attacks.Target(
      loss_fn=lambda p, b: losses.cross_entropy(apply(p, b[0]), b[1]),
      metric_fn=lambda p: jnp.stack([models.accuracy(apply(p, x), y)
                                     for x, y in halves]),
      train_data=(jnp.asarray(dom.x_train), jnp.asarray(dom.y_train)),
      head=("^head/",))


def protocol(cfg, run, starts, tgt, rates, epochs, seed):
  """SOPHON's paper protocol (full fine-tuning, SGD momentum 0.9, wd 1e-4,
  every epoch) at each rate: ``{start: (rates, epochs + 1, 2)}``."""
  c = references.paper_protocol(starts, tgt, learning_rate=list(rates),
                                batch_size=cfg.attack_batch, epochs=epochs,
                                seed=seed, attack_map=run.grid_map())
  return {s: np.asarray(m, float) for s, m in c.metric.items()}


def calibrate(cfg, run, init, pretrained, restricted, apply):
  """The protocol's rate, from the first seed's scratch and original on
  the validation half of the first domain."""
  name, dom = next(iter(restricted.items()))
  if not cfg.calibrate:
    return {"rule": "fixed (--calibrate false)", "attack_lr": cfg.attack_lr,
            "met": None}
  m = protocol(cfg, run, {"scratch": init, "original": pretrained},
               target(apply, dom), cfg.calibration_lrs, cfg.epochs, cfg.seed)
  out = references.calibrate(cfg.calibration_lrs, m["scratch"][:, -1, 0],
                             m["original"][:, -1, 0],
                             margin=cfg.calibration_margin)
  out["domain"] = name
  return out


def label(a: attacks.Attack) -> str:
  return f"{a.optimizer_name} lr={a.learning_rate:g} bs={a.batch_size} {a.mode}"


def one_seed(cfg, run, seed, restricted, original, guard, rate, prefix=""):
  """Pre-train, protect and attack with one seed: per domain the
  protocol's curves and the grid's ``(attacks, checkpoints, 2)``
  (``prefix`` names its loops, e.g. an ablation row's)."""
  model = models.MLP((64, cfg.hidden, cfg.hidden // 2, 10),
                     rngs=nnx.Rngs(seed))
  apply, init = models.functional(model)
  spe = data.steps_per_epoch(len(original.x_train), 32)
  pretrained = _pretrain.classifier(
      run, apply, init, original, steps=cfg.pretrain_epochs * spe, lr=1e-3,
      batch_size=32, seed=seed + 1, desc=f"pre-training on half A (seed "
      f"{seed})", loop=f"{prefix}pretrain_s{seed}")
  if rate is None:
    calib = calibrate(cfg, run, init, pretrained, restricted, apply)
    rate = calib["attack_lr"]
  else:
    calib = None
  envs = environments(cfg, rate / (1 - MOMENTUM) if cfg.calibrate
                      else cfg.env_sgd_lr)
  protected, guard_acc, rolled = protect(cfg, run, apply, pretrained,
                                         original, restricted, guard, envs,
                                         seed, prefix)
  starts = {"scratch": init, "original": pretrained, "protected": protected}
  acc = lambda p: float(models.accuracy(apply(p, jnp.asarray(
      original.x_test)), original.y_test))
  grid = attacks.grid(optimizers=_config.optimizer_values(cfg.grid_optimizers),
                      learning_rates=cfg.grid_lrs,
                      batch_sizes=cfg.grid_batches, modes=cfg.grid_modes,
                      steps=(cfg.grid_steps,), seeds=(seed,))
  out = {"calibration": calib, "rate": rate, "environments": envs,
         "grid": grid, "rolled_back": rolled, "guard_accuracy": guard_acc,
         "original_accuracy": {s: acc(starts[s]) for s in
                               ("original", "protected")}, "domains": {}}
  for name, dom in restricted.items():
    tgt = target(apply, dom)
    prot = protocol(cfg, run, starts, tgt, (rate, cfg.robustness_lr),
                    cfg.epochs, seed)
    run.print(f"[seed {seed}, {name}] grid: {len(grid)} attacks x 3 starts")
    c = attacks.run_attacks(grid, starts, tgt, eval_every=20,
                            attack_map=run.grid_map())
    out["domains"][name] = {"protocol": prot, "grid": c}
  return out


def _stats(values):
  return ev_curves.mean_std([float(v) for v in values])


def summarise_domain(cfg, runs, name, grid, envs):
  """Seeds' protocol curves and the grid against scratch for one domain."""
  prot = {s: np.stack([r["domains"][name]["protocol"][s] for r in runs])
          for s in STARTS}           # (seeds, rates, epochs + 1, 2)
  curves = {s: ev_curves.mean_std(list(prot[s][:, 0, :, 1])) for s in STARTS}
  robust = {s: ev_curves.mean_std(list(prot[s][:, 1, :, 1])) for s in STARTS}
  p, sc = curves["protected"], curves["scratch"]
  spread = np.maximum(np.asarray(p["std"]), np.asarray(sc["std"]))
  below = bool(np.all(np.asarray(p["mean"])[1:]
                      <= np.asarray(sc["mean"])[1:] - 2 * spread[1:]))
  gm = {s: np.stack([r["domains"][name]["grid"].metric[s] for r in runs])
        for s in STARTS}             # (seeds, attacks, checkpoints, 2)
  steps = runs[0]["domains"][name]["grid"].steps["protected"]
  labels = [label(a) for a in grid]
  vs = references.deltas_vs_scratch(
      {s: gm[s][..., 0] for s in STARTS}, {s: gm[s][..., 1] for s in STARTS},
      steps, cfg.budgets, labels, transfer_min=cfg.transfer_min)
  inside = {label(a): covered(a, envs) for a in grid}
  b = str(cfg.budgets[-1])
  for lab, rec in vs["attacks"].items():
    rec["inside_environments"] = inside[lab]
  transferring_inside = [lab for lab, rec in vs["attacks"].items()
                         if rec["transfers"] and rec["inside_environments"]]
  old = attacks.summarize(runs[0]["domains"][name]["grid"]._replace(
      metric={s: m[..., 1] for s, m in
              runs[0]["domains"][name]["grid"].metric.items()}))
  return {
      "curves": {s: curves[s]["mean"] for s in STARTS},
      "curves_sd": {s: curves[s]["std"] for s in STARTS},
      "robustness_row": {s: robust[s] for s in STARTS},
      "after_finetune": {s: _stats(prot[s][:, 0, -1, 1]) for s in STARTS},
      "protected_below_scratch_2sd_every_epoch": below,
      "grid_vs_scratch": vs["attacks"],
      "worst_case_transferring": vs["worst_case_transferring"],
      "no_transfer": vs["no_transfer"],
      "inside_delta_protected_le_0": all(
          (vs["attacks"][lab]["delta_protected"][b]["mean"] or 0) <= 0
          for lab in transferring_inside),
      "transferring_inside": transferring_inside,
      "grid_worst_case_test_selected": {
          s: old[s]["within_budget"][str(cfg.grid_steps)] for s in STARTS}}


STARTS = ("scratch", "original", "protected")


def experiment(cfg: Config, run: _runner.Run) -> dict:
  original, restricted, guard = load_domains(cfg)
  runs, rate = [], None
  for i in range(cfg.seeds):
    r = one_seed(cfg, run, cfg.seed + i, restricted, original, guard, rate)
    rate = r["rate"]
    runs.append(r)
  calib, envs, grid = runs[0]["calibration"], runs[0]["environments"], \
      runs[0]["grid"]
  out = {"calibration": calib, "seeds": cfg.seeds,
         "environments": [e.as_dict() for e in envs],
         "original_accuracy": {s: _stats([r["original_accuracy"][s]
                                          for r in runs])
                               for s in ("original", "protected")},
         "rolled_back_of_logged_updates": [r["rolled_back"] for r in runs],
         "domains": {n: summarise_domain(cfg, runs, n, grid, envs)
                     for n in restricted}}
  for name in restricted:               # the first seed's grid, test half
    c = runs[0]["domains"][name]["grid"]
    c = c._replace(metric={s: m[..., 1] for s, m in c.metric.items()})
    run.write_json(f"{name}_grid_curves.json", _plots.curves_json(c))
    _plots.attack_curves(run, c, f"{name}_grid",
                         ylabel="restricted test accuracy (test half)",
                         title=f"robustness grid on {name}, seed {cfg.seed}")
  first = next(iter(out["domains"]))
  d0 = out["domains"][first]
  out.update(primary_domain=first, curves=d0["curves"],
             epochs=list(range(cfg.epochs + 1)),
             grid_worst_case=d0["grid_worst_case_test_selected"]["protected"][
                 "metric"],
             grid_vs_scratch=d0["grid_vs_scratch"],
             worst_case_transferring=d0["worst_case_transferring"])
  _sophon_report.report(cfg, run, out, rate, paper=PAPER)
  return out


main = _cli.entry_point("sophon_digits", Config, experiment, quick=QUICK,
                        description=__doc__.splitlines()[0], x64=False)

if __name__ == "__main__":
  raise SystemExit(main())
