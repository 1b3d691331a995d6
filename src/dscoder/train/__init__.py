"""Training: recipes (TOML), optimizer and schedule, the pre-training loop, checkpoints and HF export."""
