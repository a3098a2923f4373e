"""IMMA (Zheng & Yeh, ECCV 2024) and multi-concept MIMA (AAAI 2025).

Immunize a text-to-image denoiser against adaptation: learn parameters from
which re-learning (or personalising) a concept is hard. Spec:
``shared/specs/imma_mima.md``.

  merge    MIMA's Merge layer: ``phi_star`` (the closed-form least-squares
           merge of cross-attention key/value weights), ``concept_merge``,
           ``average_merge``, ``single``
  erase    the UCE closed-form concept erasure the re-learning setting
           starts from
  bilevel  ``mima``, ``imma`` and the ``max_ascent`` baseline, each in the
           paper's unrolled scheme or the released alternating one

Not the condition-number paper's bilevel baseline (``cond_num``): that one
probes a linear head; this one simulates diffusion fine-tuning.
"""

from immunojax.methods.imma.bilevel import (SCHEMES, AlternatingState, imma,
                                            inner_optimizer, lower_optimizer,
                                            max_ascent, mima, released)
from immunojax.methods.imma.erase import erase_concepts, uce_kernel
from immunojax.methods.imma.merge import (KV_KERNELS, Merge, average_merge,
                                          check_keys, concept_merge,
                                          phi_star, single)

__all__ = ["AlternatingState", "KV_KERNELS", "Merge", "SCHEMES",
           "average_merge", "check_keys", "concept_merge", "erase_concepts",
           "imma", "inner_optimizer", "lower_optimizer", "max_ascent", "mima",
           "phi_star", "released", "single", "uce_kernel"]
