"""Which experiment reproduces which paper: the order ``reproduce`` runs
them in, the dashboard's sections, each one's headline plot, and what its
full size costs (wall time on 2 cores with nothing else running, cold
compile cache, as the README's table says)."""

from __future__ import annotations

from typing import NamedTuple


class Experiment(NamedTuple):
  module: str
  paper: str           # a key of PAPERS
  full_time: str       # full size, 2 cores, cold compile cache
  headline: str        # the PNG (stem) the dashboard embeds
  # options of the showcase size; None: not in the showcase (too long for
  # it at any size whose verdicts equal the full run's)
  showcase: tuple[str, ...] | None = ()
  needs_data: bool = False
  # options the claims do not read (a full run with them still counts as
  # full for the stored verdicts)
  verdict_neutral: tuple[str, ...] = ()


PAPERS = {
    "cross_defense": "Cross-defense table (ours: all four families, one "
                     "model, one attack grid)",
    "cond_num": "Condition-number immunization (Zheng, Bai, Bullins, Yeh; "
                "ICML 2025)",
    "sophon": "SOPHON non-fine-tunable learning (Deng et al.; IEEE S&P 2024)",
    "gs_lora": "GS-LoRA / GS-LoRA++ continual forgetting (Zhao et al.; "
               "CVPR 2024 / T-PAMI)",
    "imma": "IMMA / MIMA immunization against re-learning (Zheng & Yeh)",
    "harness": "The harness (no paper)",
}

# In the order ``reproduce`` runs them (cheap checks first). The showcase
# (≤ 12 min on 2 cores) holds one experiment per paper at the smallest size
# whose verdicts equal the full run's, measured: digit_pairs without its
# study grid (the claims do not read it), sophon_digits with a one-rate
# grid, gs_lora_digits in the ratio regime with GS-LoRA alone (its headline
# claim; the baselines' and few-shot claims are then not measured), the
# cross-defense table at full size (two optimizers or two data sizes change
# its verdicts). The rest are left out to stay within 12 minutes
# (sophon_denoiser's time is its 1000-update protection loop: 5 fine-tuning
# epochs instead of 20 saved nothing; the others were not tried smaller);
# the dashboard shows their stored full-run verdicts.
EXPERIMENTS = (
    Experiment("quadratic", "harness", "23 s", "loss", showcase=None),
    Experiment("attack_grid", "harness", "161 s", "attack_curves",
               showcase=None),
    Experiment("house_price", "cond_num", "62 s", "fig1_linesearch",
               needs_data=True),
    Experiment("digit_pairs", "cond_num", "27 min 11 s", "log_rir_heatmaps",
               showcase=("--grid", "false"), verdict_neutral=("--grid",)),
    Experiment("deep_immunization", "cond_num", "98 s", "probe_curves",
               showcase=None),
    Experiment("sophon_digits", "sophon", "3 min 53 s", "paper_protocol",
               showcase=("--grid-lrs", "0.01")),
    Experiment("sophon_denoiser", "sophon", "4 min 20 s", "finetune_mse",
               showcase=None),
    Experiment("sophon_trapping", "sophon", "7 min 41 s", "trapping",
               showcase=None),
    Experiment("gs_lora_digits", "gs_lora", "7 min 28 s", "tasks",
               showcase=("--regimes", "ratio", "--methods", "gs_lora",
                         "--probe-modes", "full")),
    Experiment("gs_lora_relearning", "gs_lora", "14 min 24 s", "relearning",
               showcase=None),
    Experiment("gs_lora_regimes", "gs_lora", "16 min 9 s", "regimes",
               showcase=None),
    Experiment("mima_digits", "imma", "15 min 36 s", "concept_accuracy",
               showcase=None),
    Experiment("cross_defense", "cross_defense", "4 min 58 s",
               "recovery_curves"),
)

BY_MODULE = {e.module: e for e in EXPERIMENTS}


def size_args(e: Experiment, size: str) -> list[str]:
  """``e``'s options at ``size`` (``quick``, ``showcase`` or ``full``).

  Raises:
    ValueError: an unknown size.
  """
  if size == "quick":
    return ["--quick"]
  if size == "showcase":
    if e.showcase is None:
      raise ValueError(f"{e.module} is not in the showcase")
    return list(e.showcase)
  if size == "full":
    return []
  raise ValueError(f"size {size!r} is not one of quick, showcase, full")


def command(e: Experiment, size: str = "full") -> str:
  """The command that runs ``e`` at ``size`` (a showcase command of an
  experiment outside the showcase is its full one)."""
  if size == "showcase" and e.showcase is None:
    size = "full"
  return " ".join([f"python -m experiments.{e.module}"]
                  + (["--data-dir ../shared/data/house_price"]
                     if e.needs_data else []) + size_args(e, size))
