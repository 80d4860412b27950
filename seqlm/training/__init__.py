"""A training run: its arguments, what it is (settings and global batch), the checks before heavy work, fitting it to
the card, the Trainer with its callbacks (throughput, samples, swanlab), and crash-safe checkpoints with their
conversion to another number of ranks."""
