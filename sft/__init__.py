"""LoRA supervised fine-tuning: masked loss, our AdamW, the train step and loop."""
