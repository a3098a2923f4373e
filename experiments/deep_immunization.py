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

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from experiments import _plots, _runner  # noqa: E402
from immunojax import attacks, data, masks, models  # noqa: E402
from immunojax.finetune import masked_optimizer  # noqa: E402
from immunojax.methods import condition as cond  # noqa: E402

PAPER = {"ours": 3.467, "opt_kappa": 1.527, "r_ill_only": 1.057}  # R18 / Cars


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
  methods: tuple[str, ...] = ("r_ill_only", "opt_kappa", "ours")
  num_groups: int = 20
  group_size: int = 100
  probe_steps: int = 300
  probe_lrs: tuple[float, ...] = (0.01, 0.1, 1.0)


QUICK = {"pretrain_steps": 300, "immunize_steps": 300, "methods": ("ours",),
         "num_groups": 5, "probe_steps": 100, "probe_lrs": (0.1, 1.0)}


def run(cfg: Config, run: _runner.Run) -> dict:
  primary = data.class_split(range(5), seed=cfg.seed)
  harmful = data.class_split(range(5, 10), seed=cfg.seed)
  model = models.MLP((64, cfg.hidden, cfg.hidden, 5), rngs=nnx.Rngs(cfg.seed))
  apply, init = models.functional(model)
  init = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), init)

  def features(p, x):
    h = jax.nn.relu(x @ p["layers"][0]["kernel"] + p["layers"][0]["bias"])
    return jax.nn.relu(h @ p["layers"][1]["kernel"] + p["layers"][1]["bias"])

  def logits(p, x):
    return features(p, x) @ p["head"]["kernel"] + p["head"]["bias"]

  def xent(p, batch):
    x, y = batch
    return optax.softmax_cross_entropy_with_integer_labels(logits(p, x), y).mean()

  f64 = lambda a: jnp.asarray(a, jnp.float64)
  xp, yp = f64(primary.x_train), jnp.asarray(primary.y_train)
  xh = f64(harmful.x_train)
  acc = lambda p: float(models.accuracy(logits(p, f64(primary.x_test)),
                                        primary.y_test))

  opt = optax.adam(3e-3)

  @jax.jit
  def pretrain(state, t, xp, yp):
    idx = data.batch_indices(state["key"], xp.shape[0], cfg.batch_size, t)
    loss, g = jax.value_and_grad(xent)(state["params"], (xp[idx], yp[idx]))
    u, s = opt.update(g, state["opt"], state["params"])
    return ({**state, "params": optax.apply_updates(state["params"], u),
             "opt": s}, {"loss": loss})

  state = {"params": init, "opt": opt.init(init),
           "key": jax.random.PRNGKey(cfg.seed + 1)}
  state = run.loop("pretrain", state,
                   lambda s, t: pretrain(s, jnp.asarray(t), xp, yp),
                   cfg.pretrain_steps, desc="pre-training theta_0")
  theta0 = state["params"]
  # The last feature block and the head move; the first block is frozen.
  trainable = masks.mask_from_patterns(theta0, ("^layers/1/", "^head/"))
  inner = masked_optimizer(optax.sgd(cfg.learning_rate, momentum=0.9),
                           trainable)

  key = jax.random.PRNGKey(cfg.seed + 7)
  results = {"identity": {"rir_theta0": 1.0, "dp_accuracy": acc(theta0),
                          "kappa_ratio_harmful": 1.0,
                          "kappa_ratio_pretrain": 1.0}}
  immunized = {}
  for method in cfg.methods:
    @jax.jit
    def step(state, t, xp, yp, xh, method=method):
      idx = data.batch_indices(state["key"], xp.shape[0], cfg.batch_size, t)
      ih = data.batch_indices(jax.random.fold_in(state["key"], 1), xh.shape[0],
                              cfg.batch_size, t)
      g, m = cond.deep_objective_grads(
          state["params"], features, xent, (xp[idx], yp[idx]), xh[ih],
          method=method, lambda_p=cfg.lambda_p, lambda_h=cfg.lambda_h)
      u, s = inner.update(g, state["opt"], state["params"])
      return ({**state, "params": optax.apply_updates(state["params"], u),
               "opt": s}, m)

    st = {"params": theta0, "opt": inner.init(theta0),
          "key": jax.random.PRNGKey(cfg.seed + 2)}
    st = run.loop(method, st, lambda s, t: step(s, jnp.asarray(t), xp, yp, xh),
                  cfg.immunize_steps, desc=f"immunizing ({method})")
    p = st["params"]
    immunized[method] = p
    rir = {}
    for est in ("pinv", "official"):
      rir[est] = cond.rir_over_groups(
          lambda x: features(p, x), lambda x: features(theta0, x), xp, xh,
          key=key, num_groups=cfg.num_groups, group_size=cfg.group_size,
          estimator=est)
    results[method] = {"rir_theta0": rir["pinv"]["rir"],
                       "rir_theta0_std": rir["pinv"]["rir_std"],
                       "kappa_ratio_harmful": rir["pinv"]["kappa_ratio_harmful"],
                       "kappa_ratio_pretrain": rir["pinv"]["kappa_ratio_pretrain"],
                       "rir_theta0_official": rir["official"]["rir"],
                       "dp_accuracy": acc(p),
                       "estimator": "pinv (rank-aware); *_official: the code's"}
    run.print(f"  {method:11s} RIR_theta0 {results[method]['rir_theta0']:.4g} "
              f"(official {results[method]['rir_theta0_official']:.4g}) D_P acc "
              f"{results[method]['dp_accuracy']:.4f} (theta_0 "
              f"{results['identity']['dp_accuracy']:.4f})")

  # Linear probing on frozen features of D_H (Fig. 3 analogue).
  xht, yht = f64(harmful.x_test), jnp.asarray(harmful.y_test)
  probe_params = lambda p: {"body": {"layers": p["layers"]},
                            "head": {"kernel": jnp.zeros((cfg.hidden, 5)),
                                     "bias": jnp.zeros(5)}}
  probe_logits = lambda q, x: features(q["body"], x) @ q["head"]["kernel"] + \
      q["head"]["bias"]
  target = attacks.Target(
      loss_fn=lambda q, b: optax.softmax_cross_entropy_with_integer_labels(
          probe_logits(q, b[0]), b[1]).mean(),
      metric_fn=lambda q: models.accuracy(probe_logits(q, xht), yht),
      train_data=(xh, jnp.asarray(harmful.y_train)), head=("head",))
  grid = attacks.grid(optimizers=("sgd", "momentum", "adam"),
                      learning_rates=cfg.probe_lrs, batch_sizes=(64,),
                      modes=("head",), steps=(cfg.probe_steps,))
  starts = {"theta0": probe_params(theta0),
            **{m: probe_params(p) for m, p in immunized.items()}}
  curves = attacks.run_attacks(grid, starts, target,
                               eval_every=cfg.probe_steps // 10)
  probe = attacks.summarize(curves)
  (run.out / "probe_curves.json").write_text(json.dumps(_plots.curves_json(curves)))
  _plots.attack_curves(run, curves, "probe_curves", ylabel="D_H test accuracy",
                       title="linear probing on frozen features (D_H)")
  early = int(curves.steps["theta0"][2])
  for name in starts:
    m = curves.metric[name]
    results.setdefault("identity" if name == "theta0" else name, {}).update(
        probe_best_accuracy_final=float(jnp.nanmax(m[:, -1])),
        probe_best_accuracy_early=float(jnp.nanmax(m[:, 2])),
        probe_mean_accuracy_early=float(jnp.nanmean(m[:, 2])))
  for m in ("identity",) + tuple(cfg.methods):
    r = results[m]
    if m != "identity":
      run.figure(f"{m} RIR_theta0 (pinv κ)", r["rir_theta0"], PAPER.get(m),
                 note="paper: ResNet18 / Stanford Cars, official estimator")
      run.figure(f"{m} RIR_theta0 (official estimator)", r["rir_theta0_official"],
                 PAPER.get(m))
    run.figure(f"{m} D_P test accuracy", r["dp_accuracy"])
    run.figure(f"{m} mean probe accuracy on D_H at step {early}",
               r["probe_mean_accuracy_early"])
  return {"methods": results, "probe": probe, "paper_rir_theta0": PAPER,
          "dp_accuracy_drop_points": {
              m: 100 * (results["identity"]["dp_accuracy"] - results[m]["dp_accuracy"])
              for m in cfg.methods}}


main = _runner.entry_point("deep_immunization", Config, run, quick=QUICK,
                           description=__doc__.splitlines()[0])

if __name__ == "__main__":
  raise SystemExit(main())
