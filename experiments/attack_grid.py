"""Attack-harness demo: how fast does a grid of attackers learn a new task
from a pre-trained model versus from scratch?

Pre-train an MLP on digits 0-4 (D_P), then attack with a declared grid
(optimizers x learning rates x batch sizes x modes x steps x seeds) on the
harmful task digits 5-9, from the pre-trained model and from a fresh
initialisation. Reports, per start point, the best attacker's test accuracy
within each budget, steps to the threshold, and SOPHON's fine-tuning overhead
relative to training from scratch. A protected model from any method plugs in
as one more start point.

  python -m experiments.attack_grid --quick
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax.numpy as jnp
from flax import nnx

from experiments import _claims, _cli, _config, _plots, _pretrain, _runner
from immunojax import attacks, data, lora, losses, models


Mode = Literal["full", "head", "reinit_head", "lora"]


@dataclasses.dataclass(frozen=True)
class Config:
  seed: int = 0
  hidden: int = 64
  pretrain_steps: int = 600
  pretrain_lr: float = 3e-3
  optimizers: tuple[_config.Optimizer, ...] = (
      "sgd", "momentum", "nesterov", "adam", "adamw", "rmsprop", "adagrad",
      "adadelta")
  learning_rates: tuple[float, ...] = (1e-3, 1e-2, 1e-1)
  batch_sizes: tuple[int, ...] = (32,)
  modes: tuple[Mode, ...] = ("full", "head", "reinit_head", "lora")
  steps: tuple[int, ...] = (200,)
  seeds: tuple[int, ...] = (0,)
  eval_every: int = 20
  threshold: float = 0.9
  lora_rank: int = 4

  def __post_init__(self):
    _config.require(self, positive=(
        "hidden", "pretrain_steps", "pretrain_lr", "learning_rates",
        "batch_sizes", "steps", "eval_every", "lora_rank", "optimizers",
        "modes"), nonnegative=("seeds",))
    for k in self.steps:
      if k % self.eval_every:
        raise ValueError(f"--steps {k} is not a multiple of --eval-every "
                         f"{self.eval_every}")
    if self.lora_rank > self.hidden:
      raise ValueError(f"--lora-rank {self.lora_rank} exceeds --hidden "
                       f"{self.hidden}")


QUICK = {"pretrain_steps": 200, "optimizers": ("sgd", "adam"),
         "learning_rates": (1e-2, 1e-1), "modes": ("full", "head", "lora"),
         "steps": (60,), "eval_every": 20}


def experiment(cfg: Config, run: _runner.Run) -> dict:
  primary = data.class_split(range(5), seed=cfg.seed)
  harmful = data.class_split(range(5, 10), seed=cfg.seed)
  model = models.MLP((64, cfg.hidden, cfg.hidden, 5),
                     rngs=nnx.Rngs(cfg.seed))
  apply, init_params = models.functional(model)
  pretrained = _pretrain.classifier(run, apply, init_params, primary,
                                    steps=cfg.pretrain_steps,
                                    lr=cfg.pretrain_lr, batch_size=64,
                                    seed=cfg.seed + 1,
                                    desc="pre-training on digits 0-4")
  dp_acc = float(models.accuracy(apply(pretrained, primary.x_test),
                                 primary.y_test))

  xh, yh = jnp.asarray(harmful.x_test), jnp.asarray(harmful.y_test)
  target = attacks.Target(
      loss_fn=lambda p, b: losses.cross_entropy(apply(p, b[0]), b[1]),
      metric_fn=lambda p: models.accuracy(apply(p, xh), yh),
      train_data=(jnp.asarray(harmful.x_train), jnp.asarray(harmful.y_train)),
      head=("head",),
      lora_config=lora.LoraConfig(r=cfg.lora_rank, lora_alpha=2.0 * cfg.lora_rank,
                                  target_modules=("layers/.*/kernel",)))
  grid = attacks.grid(optimizers=_config.optimizer_values(cfg.optimizers),
                      learning_rates=cfg.learning_rates,
                      batch_sizes=cfg.batch_sizes, modes=cfg.modes,
                      steps=cfg.steps, seeds=cfg.seeds)
  run.print(f"[attack_grid] {len(grid)} attacks x 2 start points")
  curves = attacks.run_attacks(grid, {"pretrained": pretrained,
                                      "scratch": init_params},
                               target, eval_every=cfg.eval_every,
                               attack_map=run.grid_map())
  summary = attacks.summarize(curves, threshold=cfg.threshold)
  run.write_json("attack_curves.json", _plots.curves_json(curves))
  budget = str(max(cfg.steps))
  verdicts = claims(summary, budget)
  _plots.attack_curves(run, curves, ylabel="harmful test accuracy (digits 5-9)",
                       title=verdicts[0]["claim"])
  for start in ("pretrained", "scratch"):
    run.figure(f"best attacker accuracy from {start} ({budget} steps)",
               summary[start]["within_budget"][budget]["metric"])
  run.figure("fine-tuning overhead of pretrained vs scratch",
             summary["pretrained"].get("finetune_overhead_vs_scratch"),
             note=f"steps to {cfg.threshold:.0%} accuracy, ratio")
  run.figure("D_P test accuracy of the pre-trained model", dp_acc)
  return {"num_attacks": len(grid), "dp_accuracy": dp_acc, "attacks": summary,
          "claims": verdicts}


def claims(summary: dict, budget: str) -> list[dict]:
  """The premise every defense rests on, graded on this grid."""
  pre, scr = summary["pretrained"], summary["scratch"]
  t_pre, t_scr = pre["steps_to_threshold"], scr["steps_to_threshold"]
  best = lambda s: s["within_budget"][budget]["metric"]
  return [_claims.graded(
      "No paper (the harness): an undefended pre-trained model is a head "
      "start for the attacker — its best attack reaches the threshold in "
      "fewer steps than from scratch, and ends at least as high",
      {"fewer steps to the threshold":
       None if t_pre is None else (t_scr is None or t_pre < t_scr),
       f"best accuracy at {budget} steps ≥ scratch's": best(pre) >= best(scr)},
      figure=f"steps to threshold {t_pre} vs scratch {t_scr}; best accuracy "
      f"{_claims.num(best(pre))} vs {_claims.num(best(scr))}")]


main = _cli.entry_point("attack_grid", Config, experiment, quick=QUICK,
                        description=__doc__.splitlines()[0], x64=False)

if __name__ == "__main__":
  raise SystemExit(main())
