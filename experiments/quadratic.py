"""Example experiment: fit least squares with mini-batch Adam.

Small and fast, it exercises everything the runner offers (config, --quick,
progress, metrics, checkpoints and --resume, plots, report) and doubles as a
check on the spectral core: the fitted Hessian's condition number is compared
with the closed-form one.

  python -m experiments.quadratic --quick
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from experiments import _runner  # noqa: E402
from immunojax import data, spectral  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Config:
  seed: int = dataclasses.field(default=0, metadata={"help": "PRNG seed"})
  num_examples: int = dataclasses.field(default=4096,
                                        metadata={"help": "rows of X"})
  dim: int = dataclasses.field(default=64, metadata={"help": "columns of X"})
  noise: float = dataclasses.field(default=0.1, metadata={"help": "label noise"})
  steps: int = dataclasses.field(default=3000, metadata={"help": "Adam steps"})
  batch_size: int = 128
  learning_rate: float = 1e-2
  optimizer: Literal["adam", "sgd"] = "adam"


QUICK = {"num_examples": 1024, "dim": 16, "steps": 300}


def make_problem(cfg: Config):
  kx, kw, kn = jax.random.split(jax.random.PRNGKey(cfg.seed), 3)
  x = jax.random.normal(kx, (cfg.num_examples, cfg.dim))
  w_true = jax.random.normal(kw, (cfg.dim, 1))
  y = x @ w_true + cfg.noise * jax.random.normal(kn, (cfg.num_examples, 1))
  return x, y


def run(cfg: Config, run: _runner.Run) -> dict:
  x, y = make_problem(cfg)
  opt = {"adam": optax.adam, "sgd": optax.sgd}[cfg.optimizer](cfg.learning_rate)
  loss = lambda w, xb, yb: spectral.mse_probe_loss(w, xb, yb) / xb.shape[0]

  @jax.jit
  def step_fn(state, step):
    idx = data.batch_indices(state["data_key"], cfg.num_examples,
                             cfg.batch_size, step)
    value, grad = jax.value_and_grad(loss)(state["w"], x[idx], y[idx])
    updates, opt_state = opt.update(grad, state["opt"], state["w"])
    new = {**state, "w": optax.apply_updates(state["w"], updates),
           "opt": opt_state}
    return new, {"loss": value}

  w0 = jnp.zeros((cfg.dim, 1))
  state = {"w": w0, "opt": opt.init(w0),
           "data_key": jax.random.PRNGKey(cfg.seed + 1)}
  state = run.loop("fit", state, lambda s, t: step_fn(s, jnp.asarray(t)),
                   cfg.steps, log_every=10, desc="fitting")
  w_star = jnp.linalg.lstsq(x, y)[0]
  final = float(loss(state["w"], x, y))
  optimum = float(loss(w_star, x, y))
  rel_dist = float(jnp.linalg.norm(state["w"] - w_star) / jnp.linalg.norm(w_star))
  h = spectral.hessian_matrix(loss, state["w"], x, y)
  kappa_dense = float(spectral.condition_number(h))
  kappa_closed = float(spectral.condition_number(spectral.gram(x)))
  run.figure("final loss", final, optimum, note="reference: exact least squares")
  run.figure("relative distance to w*", rel_dist)
  run.figure("kappa(H) via jax.hessian", kappa_dense, kappa_closed,
             note="reference: closed-form Gram")

  records = [r for r in map(__import__("json").loads,
                            (run.out / "metrics.jsonl").read_text().splitlines())
             if r["loop"] == "fit"]
  fig, ax = run.new_figure(figsize=(5, 3.5))
  ax.semilogy([r["step"] for r in records], [r["loss"] for r in records],
              label="mini-batch loss")
  ax.axhline(optimum, color="k", ls="--", label="least-squares optimum")
  ax.set(xlabel="step", ylabel="loss", title="quadratic fit")
  ax.legend()
  run.save_figure(fig, "loss")
  return {"final_loss": final, "optimum_loss": optimum,
          "relative_distance": rel_dist, "kappa_dense": kappa_dense,
          "kappa_closed_form": kappa_closed, "final_w": state["w"].ravel()}


main = _runner.entry_point("quadratic", Config, run, quick=QUICK,
                           description=__doc__.splitlines()[0])

if __name__ == "__main__":
  raise SystemExit(main())
