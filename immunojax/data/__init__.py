"""Data: the only I/O in the package (bundled, generated or user-given sets)."""

from immunojax.data.batches import batch_indices, steps_per_epoch, take

__all__ = ["batch_indices", "steps_per_epoch", "take"]
