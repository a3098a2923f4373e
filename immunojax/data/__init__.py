"""Data: the only I/O in the package (bundled, generated or user-given sets)."""

from immunojax.data.batches import (batch_block, batch_indices, minibatch,
                                    padded_batch_positions, steps_per_epoch,
                                    take)
from immunojax.data.digits import (Split, binary_digit_tasks, class_split,
                                    load_digits, stratified_indices)

__all__ = ["Split", "batch_block", "batch_indices", "binary_digit_tasks", "class_split",
           "load_digits", "minibatch", "padded_batch_positions", "steps_per_epoch",
           "stratified_indices", "take"]
