"""Training: flags and stage defaults, distributed setup, the loop, checkpoints."""
