"""Gemma 1 / Gemma 2 in plain JAX: config, model, sampler, sharding, checkpoints, tokenizer."""

from gemma_jax.config import GEMMA2_2B, GEMMA_2B, MID, TINY, TINY_GEMMA1, GemmaConfig, config_from_hf
from gemma_jax.model import (
    abstract_params,
    count_params,
    forward,
    forward_hidden,
    init_cache,
    init_params,
    token_logprobs,
)
from gemma_jax.tokenizer import Tokenizer


def load_checkpoint(path, *, dtype=None):
    """(cfg, params) from a Hugging Face safetensors folder or a Kaggle Flax/orbax Gemma checkpoint."""
    from gemma_jax.checkpoint import load_checkpoint as _load

    return _load(path, dtype=dtype)


def save_hf(path, cfg, params):
    """Write params as Hugging Face safetensors + config.json (transformers loads it)."""
    from gemma_jax.checkpoint import save_hf as _save

    return _save(path, cfg, params)


__all__ = [
    "GEMMA2_2B", "GEMMA_2B", "MID", "TINY", "TINY_GEMMA1", "GemmaConfig", "Tokenizer", "abstract_params",
    "config_from_hf", "count_params", "forward", "forward_hidden", "init_cache", "init_params", "load_checkpoint",
    "save_hf", "token_logprobs",
]
