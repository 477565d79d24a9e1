"""What SFT and GRPO share: the optimizer step, training-state checkpoints, metrics logging, the memory planner."""
