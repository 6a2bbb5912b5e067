"""Train state, update steps, the training loop, checkpoints and metric writers."""
