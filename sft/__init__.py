"""LoRA supervised fine-tuning: chat-template batches (batches.py), the masked loss (loss.py), our AdamW (optim.py),
the train step and loop (train.py), per-step metrics (metrics.py) and `run.py --stage sft` (cli.py)."""
