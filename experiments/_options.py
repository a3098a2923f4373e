"""Option groups several experiments share, declared once.

An experiment's ``Config`` inherits the groups it uses (``_config`` reads
inherited fields, so ``--help`` stays one flat list and every option keeps
its name); a group's defaults are overridden by redeclaring the field in
the experiment (dataclasses keep its position). Each group checks its own
ranges in ``__post_init__``; an experiment's ``__post_init__`` calls
``super().__post_init__()``.
"""

from __future__ import annotations

import dataclasses

from experiments import _config


@dataclasses.dataclass(frozen=True)
class Seeded:
  seed: int = 0

  def __post_init__(self):
    pass


@dataclasses.dataclass(frozen=True)
class Seeds(Seeded):
  """Several seeds, each run in turn (mean and sd over them): ``--seed`` is
  not read (gs_lora_relearning, gs_lora_regimes)."""
  seed: int = dataclasses.field(default=0, metadata={
      "help": "not read: each of --seeds runs in turn"})
  seeds: tuple[int, ...] = (0, 1, 2)

  def __post_init__(self):
    super().__post_init__()
    _config.require(self, nonnegative=("seeds",))
    if len(self.seeds) < 2 or len(set(self.seeds)) < len(self.seeds):
      raise ValueError(f"--seeds needs at least two distinct seeds (an sd), "
                       f"got {self.seeds}")


@dataclasses.dataclass(frozen=True)
class CondNum(Seeded):
  """The condition-number regularizers' weights, estimator and direction
  rule, and the training step (house_price, digit_pairs,
  deep_immunization)."""
  batch_size: int = 64
  learning_rate: float = 0.005
  lambda_p: float = 10.0
  lambda_h: float = 10.0
  estimator: _config.Estimator = _config.estimator_option()
  normalize: bool = _config.normalize_option()

  def __post_init__(self):
    super().__post_init__()
    _config.require(self, positive=("batch_size", "learning_rate"),
                    nonnegative=("lambda_p", "lambda_h"))


@dataclasses.dataclass(frozen=True)
class Probe(Seeded):
  """A probe attacker's budget, learning-rate grid and threshold
  (deep_immunization, gs_lora_digits)."""
  probe_steps: int = 100
  probe_lrs: tuple[float, ...] = (1e-3, 1e-2)
  probe_threshold: float = 0.5

  def __post_init__(self):
    super().__post_init__()
    _config.require(self, positive=("probe_steps", "probe_lrs"))


@dataclasses.dataclass(frozen=True)
class Sophon(Seeded):
  """SOPHON's alternating training and its paper protocol (sophon_digits,
  sophon_denoiser)."""
  hidden: int = 128
  pretrain_epochs: int = 40
  loops: int = 2000
  inner_steps: int = 20
  batch_size: int = 100
  fts_lr: float = 9e-4
  ntr_lr: float = 1.5e-3
  env_sgd_lr: float = 0.1
  env_adam_lr: float = 1e-3
  epochs: int = 20
  attack_lr: float = 0.01
  attack_batch: int = 64

  def __post_init__(self):
    super().__post_init__()
    _config.require(self, positive=(
        "hidden", "pretrain_epochs", "loops", "inner_steps", "batch_size",
        "fts_lr", "ntr_lr", "env_sgd_lr", "env_adam_lr", "epochs",
        "attack_lr", "attack_batch"))
    if self.batch_size < 2:
      raise ValueError("--batch-size must be >= 2 (support and query)")
