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

# In the order ``reproduce`` runs them (cheap checks first).
EXPERIMENTS = (
    Experiment("quadratic", "harness", "23 s", "loss"),
    Experiment("attack_grid", "harness", "161 s", "attack_curves"),
    Experiment("house_price", "cond_num", "62 s", "fig1_linesearch",
               needs_data=True),
    Experiment("digit_pairs", "cond_num", "27 min 11 s", "log_rir_heatmaps",
               verdict_neutral=("--grid",)),
    Experiment("deep_immunization", "cond_num", "98 s", "probe_curves"),
    Experiment("sophon_digits", "sophon", "3 min 53 s", "paper_protocol"),
    Experiment("sophon_denoiser", "sophon", "4 min 20 s", "finetune_mse"),
    Experiment("sophon_trapping", "sophon", "7 min 41 s", "trapping"),
    Experiment("gs_lora_digits", "gs_lora", "7 min 28 s", "tasks"),
    Experiment("gs_lora_relearning", "gs_lora", "14 min 24 s", "relearning"),
    Experiment("gs_lora_regimes", "gs_lora", "16 min 9 s", "regimes"),
    Experiment("mima_digits", "imma", "15 min 36 s", "concept_accuracy"),
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
