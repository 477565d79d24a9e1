"""The configs the bench scripts compare on, by model family, and the Tunix model holding the same weights.

Gemma 2: TINY and MID from gemma_jax/config.py with query_pre_attn_scalar = head_dim (Tunix's Gemma hard-codes the
query scale to head_dim**-0.5). Gemma 3: TINY_GEMMA3 (its scalar 24 = embed_dim // num_heads, which Tunix's
Gemma 3 supports) and MID_GEMMA3 below, MID's sizes with every Gemma 3 feature of TINY_GEMMA3 kept: QK-norm,
sliding_window_pattern 6 (layers 0-4, 6, 7 sliding, 5 global), local/global RoPE bases, RoPE scaling x8.
The bench scripts put the repository root and tests/ on sys.path before importing this.
"""

import dataclasses

from gemma_jax.config import MID, TINY, TINY_GEMMA3, TINY_GEMMA4

MID_GEMMA3 = dataclasses.replace(
    TINY_GEMMA3, num_layers=8, embed_dim=512, hidden_dim=2048, num_heads=8, num_kv_heads=4, head_dim=64,
    vocab_size=8192, query_pre_attn_scalar=64, sliding_window=64,
)

MID_GEMMA4 = dataclasses.replace(
    TINY_GEMMA4, num_layers=8, embed_dim=512, hidden_dim=2048, num_heads=8, num_kv_heads=4, head_dim=64,
    vocab_size=8192, sliding_window=64, sliding_window_pattern=4, per_layer_input_dim=64, num_kv_shared_layers=4,
    global_head_dim=128,
)

MODELS = ("gemma2", "gemma3", "gemma4")

# How far apart two float32 implementations of the same config may be (max |logit difference|) for a bench script
# to call them the same computation: 1e-4, except MID_GEMMA4, where float32 rounding alone moves the 4 x 128 prefill
# logits (max |logit| 7.6) by 2.3e-4 (ours) and 4.1e-4 (Tunix) from our float64 forward (measured 2026-12-04;
# MID_GEMMA3: 0.8e-5 and 1.0e-5). The cause is Gemma 4's attention scale 1 after QK-norm (8x larger attention
# logits than a head_dim**-0.5 scale): with query_pre_attn_scalar 64 ours is 1.0e-5 from float64.
LOGIT_TOL = {"MID_GEMMA4": 1e-3}


def bench_configs(model):
    """{size: (row name, config)} for size TINY and MID of the model family, each Tunix-compatible."""
    if model == "gemma4":
        return {"TINY": ("TINY_GEMMA4", TINY_GEMMA4), "MID": ("MID_GEMMA4", MID_GEMMA4)}
    if model == "gemma3":
        return {"TINY": ("TINY_GEMMA3", TINY_GEMMA3), "MID": ("MID_GEMMA3", MID_GEMMA3)}
    if model == "gemma2":
        return {size: (size, dataclasses.replace(c, query_pre_attn_scalar=c.head_dim))
                for size, c in (("TINY", TINY), ("MID", MID))}
    raise ValueError(f"model must be one of {MODELS}, got {model!r}")


def to_tunix_model(params, cfg):
    """Tunix's Gemma (tunix.models.gemma), Gemma 3 (tunix.models.gemma3) or Gemma 4 (tunix.models.gemma4) holding
    our weights."""
    from tunix_utils import to_tunix, to_tunix_gemma3, to_tunix_gemma4

    if cfg.layer_list:
        return to_tunix_gemma4(params, cfg)
    return to_tunix_gemma3(params, cfg) if cfg.use_qk_norm else to_tunix(params, cfg)
