"""immunojax: model immunization in JAX.

Layers (arrows point down only):
  immunojax.methods   condition-number immunization, SOPHON, IMMA/MIMA, GS-LoRA
  immunojax core      spectral, finetune, lora, attacks, losses, models
  immunojax.data      the only I/O in the package (bundled / generated data)
"""

__version__ = "0.1.0"
