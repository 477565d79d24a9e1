"""LoRA adapters as their own pytree (adapters.py), saved and loaded with checks (io.py), exported as a merged
Hugging Face model or a PEFT adapter (export.py, imported on demand)."""

from lora.adapters import DEFAULT_TARGETS, LoRA, concat_lora, count_trainable, init_lora, lora_shapes, merge
from lora.io import load_adapters, read_adapter_meta, save_adapters

__all__ = ["DEFAULT_TARGETS", "LoRA", "concat_lora", "count_trainable", "init_lora", "load_adapters", "lora_shapes",
           "merge", "read_adapter_meta", "save_adapters"]
