"""Training: config, losses, the DeepSpeed engine, the loop and its callbacks."""
