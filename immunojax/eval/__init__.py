"""Evaluation protocols: pure functions every experiment, the cross-defense
table and a user's own study share.

* :mod:`~immunojax.eval.curves`: the strongest attacker (chosen on a
  validation split, or the test-chosen upper bound), steps to a
  threshold, the gap ratio, seed statistics and the 2-sd "no difference"
  rule.
* :mod:`~immunojax.eval.references`: SOPHON's paper protocol, curves read
  against scratch / original, per-attack deltas.
* :mod:`~immunojax.eval.continual`: a forgetting task's run and its
  Acc_r / Acc_f / Acc_o / H-mean.
* :mod:`~immunojax.eval.forgetting`: GS-LoRA's continual protocol (pre-training
  epochs, each method family's task run, the baselines' coefficients).
* :mod:`~immunojax.eval.relearning`: teaching removed classes back.
* :mod:`~immunojax.eval.generative`: a frozen judge of samples.
* :mod:`~immunojax.eval.probes`: linear probes on frozen features.
* :mod:`~immunojax.eval.displacement`: how far an attacker moves a model
  (simulated vs evaluated attacker).
* :mod:`~immunojax.eval.concepts`: multi-concept immunization (IMMA / MIMA):
  its batches, per-concept attack scores (worst concept, selectivity),
  mean and sd over seeds, the utility-matched prior weight.
* :mod:`~immunojax.eval.merge_attack`: each concept adapted alone, the copies
  merged (the attack a merge layer is for).
* :mod:`~immunojax.eval.text_to_image`: a text-to-image world on the digits
  (denoiser, frozen text encoder, UCE erasure, phi*'s keys, attack rows,
  the judge) and every concept attack of several models through the harness.
"""

from immunojax.eval import (concepts, continual, curves, displacement,
                            forgetting, generative, merge_attack, probes,
                            references, relearning, text_to_image)
from immunojax.eval.curves import (best_curve, differs, gap_ratio, mean_std,
                                   select, selected_curve, steps_to_threshold)

__all__ = ["best_curve", "concepts", "continual", "curves", "differs",
           "displacement", "forgetting", "gap_ratio", "generative",
           "mean_std", "merge_attack", "probes", "references", "relearning",
           "select", "selected_curve", "steps_to_threshold",
           "text_to_image"]
