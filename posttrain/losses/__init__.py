"""Loss functions: pure functions of tensors, each returning (loss, metrics)."""
