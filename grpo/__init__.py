"""GRPO: advantages, the loss and its variants, rollouts, the learner loop, held-out evaluation. The command is
cli/grpo.py."""
