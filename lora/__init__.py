"""LoRA adapters as their own pytree (see lora/adapters.py)."""

from lora.adapters import DEFAULT_TARGETS, LoRA, init_lora, merge

__all__ = ["DEFAULT_TARGETS", "LoRA", "init_lora", "merge"]
