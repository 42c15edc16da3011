"""DeepSpeed engine setup, the training loop, checkpoints and metrics."""
