"""SOPHON for a denoiser (Deng et al., IEEE S&P 2024, the generation mode at
CPU scale): a tiny DDPM-style noise predictor on the bundled digits,
protected against fine-tuning on a restricted image domain with the
denial-of-service loss.

Original domain: half of the digits; restricted domain: the procedural glyph
set (a different image family, as CelebA is to CIFAR-100). The denoiser is an
MLP on ``[x_t, sinusoidal features of t]`` predicting ``eps`` (linear beta
schedule, T = 1000, every timestep; the released code fixes t = 1). SOPHON
drives the simulated attacker's noise prediction to zero on the restricted
domain (``MSE(eps_hat, 0)``) while NTR keeps the original denoising loss; a
guard rolls back updates that raise the original test MSE more than 10%.
Metric: restricted-domain test denoising MSE after fine-tuning from scratch,
original and protected starts (a model that predicts zero scores 1.0).

  python -m experiments.sophon_denoiser
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from experiments import _cli, _config, _options, _pretrain, _runner
from immunojax import attacks, data, losses, models
from immunojax.data import diffusion, domains as doms
from immunojax.methods import sophon as sp

PAPER = {"scratch": 0.479, "original": 0.445, "protected": 0.705}  # CIFAR-100 -> CelebA
Loss = Literal["denial_of_service", "negated_mse"]


@dataclasses.dataclass(frozen=True)
class Config(_options.Sophon):
  hidden: int = 256
  pretrain_epochs: int = 60
  loops: int = 1000
  inner_steps: int = 10
  fts_lr: float = 3e-4
  ntr_lr: float = 1e-3
  env_sgd_lr: float = 0.05
  attack_lr: float = 1e-3
  loss: Loss = "denial_of_service"
  guard_ratio: float = dataclasses.field(default=1.1, metadata={
      "help": "roll back updates whose original test MSE exceeds this "
              "multiple of the pre-trained model's"})

  def __post_init__(self):
    super().__post_init__()
    _config.require(self, positive=("guard_ratio",))


QUICK = {"pretrain_epochs": 10, "loops": 60, "epochs": 4}


def pairs(dom, seed):
  train = diffusion.denoising_pairs(dom.x_train, seed=seed, copies=4)
  test = diffusion.denoising_pairs(dom.x_test, seed=seed + 1, copies=2)
  return tuple(map(jnp.asarray, train)), tuple(map(jnp.asarray, test))


def experiment(cfg: Config, run: _runner.Run) -> dict:
  original, _, _ = doms.digit_halves(seed=cfg.seed)
  restricted = doms.glyphs(seed=cfg.seed)
  (o_train, o_test), (r_train, r_test) = (pairs(original, cfg.seed + 10),
                                          pairs(restricted, cfg.seed + 20))
  model = models.MLP((64 + 16, cfg.hidden, cfg.hidden, 64),
                     rngs=nnx.Rngs(cfg.seed), activation=jax.nn.silu)
  apply, init = models.functional(model)
  mse_on = lambda d: jax.jit(lambda p: losses.mse(apply(p, d[0]), d[1]))
  original_mse, restricted_mse = mse_on(o_test), mse_on(r_test)
  loss = lambda p, b: losses.mse(apply(p, b[0]), b[1])
  spe = data.steps_per_epoch(len(o_train[0]), 64)
  pretrained = _pretrain.fit(run, loss, init, o_train,
                             steps=cfg.pretrain_epochs * spe, lr=1e-3,
                             batch_size=64, seed=cfg.seed + 1,
                             desc="pre-training the denoiser")
  base = float(original_mse(pretrained))
  imm = sp.sophon(
      apply=apply, restricted_loss=losses.RESTRICTED_LOSSES[cfg.loss],
      inner_loss=losses.mse, original_loss=losses.mse,
      environments=[sp.Environment("full", "sgd", cfg.env_sgd_lr),
                    sp.Environment("full", "adam", cfg.env_adam_lr)],
      fts_optimizer=optax.chain(optax.clip_by_global_norm(0.5),
                                optax.adam(cfg.fts_lr)),
      ntr_optimizer=optax.adam(cfg.ntr_lr),
      guard=sp.Guard(lambda p: -original_mse(p), -cfg.guard_ratio * base))
  key = jax.random.PRNGKey(cfg.seed + 3)
  k, b = cfg.inner_steps, cfg.batch_size

  def sample(d, t):
    block = data.batch_block(key, d[0], b, t, k)
    orig = data.minibatch(jax.random.fold_in(key, 1), d[1], b, t)
    return {"restricted": jax.tree_util.tree_map(lambda a: a[None], block),
            "original": jax.tree_util.tree_map(lambda a: a[None], orig)}

  state = run.fit("protect", imm, imm.init(pretrained, key), sample,
                  (r_train, o_train), cfg.loops, key=key,
                  desc="SOPHON (denoiser, DoS)", batch_spec=sp.BATCH_SPEC)
  protected = imm.params(state)
  logged = run.records("protect")
  starts = {"scratch": init, "original": pretrained, "protected": protected}
  target = attacks.Target(loss_fn=loss, metric_fn=restricted_mse,
                          train_data=r_train, higher_is_better=False)
  rspe = data.steps_per_epoch(len(r_train[0]), cfg.attack_batch)
  attack = attacks.Attack("adam", cfg.attack_lr, cfg.attack_batch, "full",
                          cfg.epochs * rspe)
  curves = attacks.run_attacks([attack], starts, target, eval_every=rspe,
                               attack_map=run.grid_map())
  per = {s: [float(v) for v in curves.metric[s][0]] for s in starts}
  out = {"restricted_mse_after_finetune": {s: per[s][-1] for s in starts},
         "restricted_mse_before_finetune": {s: per[s][0] for s in starts},
         "curves": per, "epochs": list(range(cfg.epochs + 1)),
         "original_test_mse": {"original": base,
                               "protected": float(original_mse(protected))},
         "rolled_back_of_logged_updates": {
             "logged_updates": len(logged),
             "rolled_back": sum(r.get("rolled_back", 0) for r in logged)},
         "paper": PAPER}
  after = out["restricted_mse_after_finetune"]
  out["target_protected_above_scratch_and_original"] = bool(
      after["protected"] > max(after["scratch"], after["original"]))
  for s in starts:
    run.figure(f"restricted denoising MSE after {cfg.epochs} epochs, {s}",
               after[s], PAPER[s], note="paper: DDPM CIFAR-100 -> CelebA, 20 "
               "epochs; ours: MLP denoiser digits -> glyphs, Adam")
  for s in ("original", "protected"):
    run.figure(f"original-domain test MSE, {s} model",
               out["original_test_mse"][s])
  run.print("  target protected > scratch and original: "
            f"{'met' if out['target_protected_above_scratch_and_original'] else 'MISSED'}")
  fig, ax = run.new_figure(figsize=(5.5, 3.8))
  for s, c in (("scratch", "k"), ("original", "tab:blue"),
               ("protected", "tab:red")):
    ax.plot(out["epochs"], per[s], marker="o", ms=3, color=c, label=s)
  ax.axhline(1.0, color="gray", ls=":", lw=0.8, label="predicts zero")
  ax.set(xlabel="fine-tuning epoch (Adam)", ylabel="restricted test MSE",
         title="denoiser fine-tuned on glyphs")
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3)
  run.save_figure(fig, "finetune_mse")
  return out


main = _cli.entry_point("sophon_denoiser", Config, experiment, quick=QUICK,
                        description=__doc__.splitlines()[0], x64=False)

if __name__ == "__main__":
  raise SystemExit(main())
