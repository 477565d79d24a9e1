"""Gemma 1, 2 and 3 (text) in plain JAX: config, model, scoring, sampler, sharding, checkpoints, tokenizer."""

from gemma_jax.checkpoint import load_checkpoint, save_hf, save_kaggle
from gemma_jax.config import (
    GEMMA2_2B,
    GEMMA3_1B,
    GEMMA3_4B,
    GEMMA3_12B,
    GEMMA3_27B,
    GEMMA3_270M,
    GEMMA_2B,
    MID,
    TINY,
    TINY_GEMMA1,
    TINY_GEMMA3,
    GemmaConfig,
    config_from_hf,
)
from gemma_jax.model import (
    abstract_params,
    count_params,
    forward,
    forward_hidden,
    init_cache,
    init_params,
)
from gemma_jax.scoring import token_logprobs
from gemma_jax.tokenizer import Tokenizer

__all__ = [
    "GEMMA2_2B", "GEMMA3_1B", "GEMMA3_4B", "GEMMA3_12B", "GEMMA3_27B", "GEMMA3_270M", "GEMMA_2B", "MID", "TINY",
    "TINY_GEMMA1", "TINY_GEMMA3", "GemmaConfig", "Tokenizer", "abstract_params",
    "config_from_hf", "count_params", "forward", "forward_hidden", "init_cache", "init_params", "load_checkpoint",
    "save_hf", "save_kaggle", "token_logprobs",
]
