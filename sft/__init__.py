"""LoRA supervised fine-tuning: chat-template batches (batches.py), the masked loss (loss.py), HParams, the train
step and the loop (train.py). The command is cli/sft.py; the optimizer and checkpoints it shares with GRPO are in
train/."""
