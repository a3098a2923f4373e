"""Condition-number immunization of a deep extractor at CPU scale
(Zheng et al., ICML 2025, Table 3 / Fig. 3 analogue on the bundled digits).

theta_0: an MLP pre-trained on digits 0-4 (D_P). D_H: digits 5-9, a disjoint
task. Each method fine-tunes the last feature block and the head on
``L(D_P) + lambda_H R_ill(H~_H) + lambda_P R_well(H~_P)`` (or its baseline
variant); we report RIR_theta0 (Eq. 17: mean over 20 fixed, seeded,
un-augmented groups of 100, against a frozen theta_0 copy), the D_P test
accuracy, and linear-probe attack curves on D_H through the attack harness.

  python -m experiments.deep_immunization
"""

from __future__ import annotations

import dataclasses
import json
from typing import Literal

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from experiments import _cli, _config, _plots, _pretrain, _runner
from immunojax import attacks, data, losses, masks, models, spectral
from immunojax.methods import cond_num

PAPER = {"cond_num": 3.467, "opt_kappa": 1.527, "r_ill_only": 1.057}  # R18 / Cars
Method = Literal["cond_num", "r_ill_only", "opt_kappa"]


@dataclasses.dataclass(frozen=True)
class Config:
  seed: int = 0
  hidden: int = 64
  pretrain_steps: int = 800
  immunize_steps: int = 400
  batch_size: int = 100
  learning_rate: float = 0.05
  lambda_p: float = 1.0
  lambda_h: float = 1.0
  methods: tuple[Method, ...] = ("r_ill_only", "opt_kappa", "cond_num")
  estimator: _config.Estimator = _config.estimator_option()
  normalize: bool = _config.normalize_option()
  num_groups: int = 20
  group_size: int = 100
  probe_steps: int = 300
  probe_lrs: tuple[float, ...] = (0.01, 0.1, 1.0)

  def __post_init__(self):
    _config.require(self, positive=(
        "hidden", "pretrain_steps", "immunize_steps", "batch_size",
        "learning_rate", "num_groups", "group_size", "probe_steps",
        "probe_lrs", "methods"), nonnegative=("lambda_p", "lambda_h"))
    if self.probe_steps % 10:
      raise ValueError(f"--probe-steps must be a multiple of 10 (curves are "
                       f"evaluated 10 times), got {self.probe_steps}")


QUICK = {"pretrain_steps": 300, "immunize_steps": 300, "methods": ("cond_num",),
         "num_groups": 5, "probe_steps": 100, "probe_lrs": (0.1, 1.0)}


def experiment(cfg: Config, run: _runner.Run) -> dict:
  primary = data.class_split(range(5), seed=cfg.seed)
  harmful = data.class_split(range(5, 10), seed=cfg.seed)
  model = models.MLP((64, cfg.hidden, cfg.hidden, 5), rngs=nnx.Rngs(cfg.seed))
  apply, init = models.functional(model)
  features, _ = models.functional(model, "features")
  init = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), init)
  f64 = lambda a: jnp.asarray(a, jnp.float64)
  xp, yp = f64(primary.x_train), jnp.asarray(primary.y_train)
  xh = f64(harmful.x_train)
  acc = lambda p: float(models.accuracy(apply(p, f64(primary.x_test)),
                                        primary.y_test))
  task_loss = lambda p, b: losses.cross_entropy(apply(p, b[0]), b[1])

  theta0 = _pretrain.classifier(run, apply, init, primary,
                                steps=cfg.pretrain_steps, lr=3e-3,
                                batch_size=cfg.batch_size, seed=cfg.seed + 1,
                                dtype=jnp.float64, desc="pre-training theta_0")
  # The last feature block and the head move; the first block is frozen.
  trainable = masks.mask_from_patterns(theta0, ("^layers/1/", "^head/"))
  data_key = jax.random.PRNGKey(cfg.seed + 2)
  sample = lambda d, t: (
      data.minibatch(data_key, d[0], cfg.batch_size, t),
      data.minibatch(jax.random.fold_in(data_key, 1), d[1], cfg.batch_size, t))

  key = jax.random.PRNGKey(cfg.seed + 7)
  one = {"pinv": 1.0, "official": 1.0}
  results = {"identity": {"rir_theta0": one, "dp_accuracy": acc(theta0),
                          "kappa_ratio_harmful": one,
                          "kappa_ratio_pretrain": one}}
  immunized = {}
  for method in cfg.methods:
    imm = cond_num.deep.by_name(
        method, features_fn=features, task_loss=task_loss,
        lambda_p=cfg.lambda_p, lambda_h=cfg.lambda_h,
        optimizer=optax.sgd(cfg.learning_rate, momentum=0.9),
        trainable=trainable, normalize=cfg.normalize,
        estimator=spectral.estimator(cfg.estimator))
    st = run.fit(method, imm, imm.init(theta0, data_key), sample,
                 ((xp, yp), xh), cfg.immunize_steps,
                 desc=f"immunizing ({method})")
    p = immunized[method] = imm.params(st)
    rir = cond_num.rir_over_groups(
        lambda x: features(p, x), lambda x: features(theta0, x), xp, xh,
        key=key, num_groups=cfg.num_groups, group_size=cfg.group_size)
    results[method] = {"rir_theta0": rir["rir"],
                       "rir_theta0_std": rir["rir_std"],
                       "kappa_ratio_harmful": rir["kappa_ratio_harmful"],
                       "kappa_ratio_pretrain": rir["kappa_ratio_pretrain"],
                       "dp_accuracy": acc(p), "trained_with": cfg.estimator,
                       "normalized": cfg.normalize}
    r = results[method]
    run.print(f"  {method:11s} RIR_theta0 {r['rir_theta0']['pinv']:.4g} "
              f"(official {r['rir_theta0']['official']:.4g}) D_P acc "
              f"{r['dp_accuracy']:.4f} (theta_0 "
              f"{results['identity']['dp_accuracy']:.4f})")

  # Linear probing on frozen features of D_H (Fig. 3 analogue).
  xht, yht = f64(harmful.x_test), jnp.asarray(harmful.y_test)
  probe_params = lambda p: {"body": p,
                            "head": {"kernel": jnp.zeros((cfg.hidden, 5)),
                                     "bias": jnp.zeros(5)}}
  probe_logits = lambda q, x: features(q["body"], x) @ q["head"]["kernel"] + \
      q["head"]["bias"]
  target = attacks.Target(
      loss_fn=lambda q, b: losses.cross_entropy(probe_logits(q, b[0]), b[1]),
      metric_fn=lambda q: models.accuracy(probe_logits(q, xht), yht),
      train_data=(xh, jnp.asarray(harmful.y_train)), head=("^head/",))
  grid = attacks.grid(optimizers=("sgd", "momentum", "adam"),
                      learning_rates=cfg.probe_lrs, batch_sizes=(64,),
                      modes=("head",), steps=(cfg.probe_steps,))
  starts = {"identity": probe_params(theta0),
            **{m: probe_params(p) for m, p in immunized.items()}}
  curves = attacks.run_attacks(grid, starts, target,
                               eval_every=cfg.probe_steps // 10)
  probe = attacks.summarize(curves)
  (run.out / "probe_curves.json").write_text(json.dumps(_plots.curves_json(curves)))
  _plots.attack_curves(run, curves, "probe_curves", ylabel="D_H test accuracy",
                       title="linear probing on frozen features (D_H)")
  early = int(curves.steps["identity"][2])
  for name in starts:
    m = curves.metric[name]
    results[name].update(
        probe_best_accuracy_final=float(jnp.nanmax(m[:, -1])),
        probe_best_accuracy_early=float(jnp.nanmax(m[:, 2])),
        probe_mean_accuracy_early=float(jnp.nanmean(m[:, 2])))
  for m in ("identity",) + tuple(cfg.methods):
    r = results[m]
    if m != "identity":
      run.figure(f"{m} RIR_theta0 (pinv κ)", r["rir_theta0"]["pinv"],
                 PAPER.get(m),
                 note="paper: ResNet18 / Stanford Cars, official estimator")
      run.figure(f"{m} RIR_theta0 (official estimator)",
                 r["rir_theta0"]["official"], PAPER.get(m),
                 note="both official estimator; paper: ResNet18 / Stanford "
                 "Cars; ours: MLP, sklearn digits 5-9")
    run.figure(f"{m} D_P test accuracy", r["dp_accuracy"])
    run.figure(f"{m} mean probe accuracy on D_H at step {early}",
               r["probe_mean_accuracy_early"])
  return {"methods": results, "probe": probe, "paper_rir_theta0": PAPER,
          "dp_accuracy_drop_points": {
              m: 100 * (results["identity"]["dp_accuracy"] - results[m]["dp_accuracy"])
              for m in cfg.methods}}


main = _cli.entry_point("deep_immunization", Config, experiment, quick=QUICK,
                        description=__doc__.splitlines()[0])

if __name__ == "__main__":
  raise SystemExit(main())
