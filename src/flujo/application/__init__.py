"""The runner and the one place that writes checkpoints."""
