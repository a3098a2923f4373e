"""immunojax: model immunization in JAX.

Layers (arrows point down only):
  immunojax.methods   one package per method, each a set of Immunizer factories
                      (cond_num; SOPHON, IMMA/MIMA and GS-LoRA to follow)
  immunojax.attacks   the attack harness and closed-form probe attackers
  immunojax core      immunizer (the method contract), finetune, modes,
                      optimizers, spectral, lora, masks, models
  immunojax.data      the only I/O in the package (bundled / generated data)
"""

__version__ = "0.1.0"
