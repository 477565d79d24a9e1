"""The one model config dataclass, its presets, and reading a Hugging Face `config.json`.

Every Gemma quirk is a named field so that Gemma 1 and Gemma 2 are the same code with different numbers
(REFERENCE.md §1). The config is frozen and hashable, so it can be a static argument of `jax.jit`.
"""

import dataclasses
import json
import os


@dataclasses.dataclass(frozen=True)
class GemmaConfig:
    num_layers: int
    embed_dim: int  # D
    hidden_dim: int  # F, MLP hidden size
    num_heads: int  # N, query heads
    num_kv_heads: int  # K, key/value heads (1 = MQA, N = MHA, else GQA)
    head_dim: int  # H
    vocab_size: int  # V
    query_pre_attn_scalar: float  # queries are scaled by this ** -0.5
    attn_logit_softcap: float | None = None  # tanh(x / c) * c on attention scores, before masking
    final_logit_softcap: float | None = None  # same on the output logits
    sliding_window: int | None = None  # window of the local layers, in positions
    local_layer_period: int = 0  # 0: all layers global; 2: layers 0, 2, 4, ... are local (Gemma 2)
    use_post_norms: bool = False  # Gemma 2: post-attention norm and post-ffw norm around each sub-block
    rope_base: float = 10_000.0
    norm_eps: float = 1e-6
    param_dtype: str = "float32"  # dtype of the weights and activations; norms and softmax run in float32
    scan_layers: bool = True  # lax.scan over stacked layers: compile time flat in depth
    remat: bool = False  # rematerialise each layer in the backward pass (saves activation memory)
    # Score log-probs over this many vocabulary rows at a time (gemma_jax/scoring.py), so the [B, T, V] float32
    # logits never exist, forward or backward; None: the full logits. Recommended 8192 for the 256k-vocabulary
    # presets: a [B*T, 8192] float32 chunk is 32 KiB per token (1/31 of the full logits) and the chunk's
    # [tokens, 8192] x [8192, D] matmuls are still large enough to run at full speed.
    logits_chunk: int | None = None

    @property
    def is_local_layer(self) -> tuple[bool, ...]:
        """Which layers use the sliding window (Gemma 2: even layer indices)."""
        if not self.local_layer_period or self.sliding_window is None:
            return (False,) * self.num_layers
        return tuple(i % self.local_layer_period == 0 for i in range(self.num_layers))

    @property
    def dtype(self):
        import jax.numpy as jnp

        return jnp.dtype(self.param_dtype)


GEMMA_2B = GemmaConfig(
    num_layers=18,
    embed_dim=2048,
    hidden_dim=16384,
    num_heads=8,
    num_kv_heads=1,
    head_dim=256,
    vocab_size=256_000,
    query_pre_attn_scalar=256,
)

GEMMA2_2B = GemmaConfig(
    num_layers=26,
    embed_dim=2304,
    hidden_dim=9216,
    num_heads=8,
    num_kv_heads=4,
    head_dim=256,
    vocab_size=256_000,
    query_pre_attn_scalar=256,
    attn_logit_softcap=50.0,
    final_logit_softcap=30.0,
    sliding_window=4096,
    local_layer_period=2,
    use_post_norms=True,
)

# Every Gemma 2 feature switched on at a size that compiles and runs in milliseconds on a CPU.
# The window (8) is shorter than test sequences, and query_pre_attn_scalar (24) differs from head_dim (16),
# so an implementation that ignores either is caught by the parity tests.
TINY = GemmaConfig(
    num_layers=4,
    embed_dim=64,
    hidden_dim=128,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    vocab_size=512,
    query_pre_attn_scalar=24,
    attn_logit_softcap=50.0,
    final_logit_softcap=30.0,
    sliding_window=8,
    local_layer_period=2,
    use_post_norms=True,
)

# Gemma 1 style (MQA, no softcaps, no window, no post-norms) at tiny size.
TINY_GEMMA1 = dataclasses.replace(
    TINY, num_kv_heads=1, query_pre_attn_scalar=16, attn_logit_softcap=None, final_logit_softcap=None,
    sliding_window=None, local_layer_period=0, use_post_norms=False,
)

# A mid-size config for benchmarks: big enough that matmuls dominate on a CPU.
MID = dataclasses.replace(
    TINY, num_layers=8, embed_dim=512, hidden_dim=2048, num_heads=8, num_kv_heads=4, head_dim=64,
    vocab_size=8192, query_pre_attn_scalar=64, sliding_window=64,
)


_HF_KNOWN_KEYS = {
    # keys we read
    "model_type", "num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
    "num_key_value_heads", "head_dim", "vocab_size", "query_pre_attn_scalar", "attn_logit_softcapping",
    "final_logit_softcapping", "sliding_window", "layer_types", "rope_theta", "rope_parameters", "rms_norm_eps",
    "torch_dtype", "dtype", "hidden_activation", "hidden_act",
    # keys we check or ignore on purpose (they do not change the forward pass we implement)
    "architectures", "attention_bias", "attention_dropout", "bos_token_id", "eos_token_id", "pad_token_id",
    "initializer_range", "max_position_embeddings", "transformers_version", "use_cache", "cache_implementation",
    "tie_word_embeddings", "sliding_window_size", "rope_scaling", "use_bidirectional_attention", "_name_or_path",
    "output_hidden_states", "return_dict", "torchscript", "id2label", "label2id", "chunk_size_feed_forward",
    "is_encoder_decoder", "tokenizer_class", "problem_type", "output_attentions", "task_specific_params",
}


def config_from_hf(path_or_dict, *, param_dtype: str | None = None) -> GemmaConfig:
    """Build a config from a Hugging Face Gemma / Gemma 2 `config.json` (a path to the file or its folder, or a dict).

    Accepts both layouts: older files with top-level `rope_theta`, and transformers-5 files with
    `rope_parameters.rope_theta`, `layer_types` and `dtype`. Unknown fields and missing required fields raise a
    ValueError naming the field, so a config from another architecture is never read as Gemma by accident.
    """
    source = "<dict>"
    if isinstance(path_or_dict, (str, os.PathLike)):
        path = os.fspath(path_or_dict)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        if not os.path.exists(path):
            raise FileNotFoundError(f"config.json not found: {path}")
        source = path
        with open(path) as f:
            try:
                raw = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: not valid JSON ({e})") from None
    else:
        raw = dict(path_or_dict)
    model_type = raw.get("model_type")
    if model_type not in ("gemma", "gemma2"):
        raise ValueError(f"{source}: model_type must be 'gemma' or 'gemma2', got {model_type!r}")
    unknown = sorted(k for k in raw if k not in _HF_KNOWN_KEYS)
    if unknown:
        raise ValueError(f"{source}: unknown config field(s) {unknown}; this loader reads Gemma and Gemma 2 only")

    def need(key):
        if key not in raw or raw[key] is None:
            raise ValueError(f"{source}: missing required config field {key!r}")
        return raw[key]

    act = raw.get("hidden_activation") or raw.get("hidden_act") or "gelu_pytorch_tanh"
    if act not in ("gelu_pytorch_tanh", "gelu"):
        # HF's Gemma 1 config says "gelu" but the model has always run the tanh approximation.
        raise ValueError(f"{source}: hidden_activation {act!r} is not supported (expected gelu_pytorch_tanh)")
    rope_base = raw.get("rope_theta")
    if rope_base is None and isinstance(raw.get("rope_parameters"), dict):
        rope_base = raw["rope_parameters"].get("rope_theta")
    if rope_base is None:
        rope_base = 10_000.0
    head_dim = need("head_dim")
    is_gemma2 = model_type == "gemma2"
    dtype = param_dtype or raw.get("dtype") or raw.get("torch_dtype") or "float32"
    dtype = {"bfloat16": "bfloat16", "float32": "float32", "float16": "float16"}.get(str(dtype), None)
    if dtype is None:
        raise ValueError(f"{source}: dtype must be float32, bfloat16 or float16")
    kw = dict(
        num_layers=need("num_hidden_layers"),
        embed_dim=need("hidden_size"),
        hidden_dim=need("intermediate_size"),
        num_heads=need("num_attention_heads"),
        num_kv_heads=need("num_key_value_heads"),
        head_dim=head_dim,
        vocab_size=need("vocab_size"),
        rope_base=float(rope_base),
        norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        param_dtype=dtype,
    )
    if not is_gemma2:
        return GemmaConfig(query_pre_attn_scalar=head_dim, **kw)
    layer_types = raw.get("layer_types")
    if layer_types is not None:
        expected = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(kw["num_layers"])]
        if list(layer_types) != expected:
            raise ValueError(f"{source}: layer_types must alternate sliding/full starting with sliding; "
                             f"got {layer_types}")
    return GemmaConfig(
        query_pre_attn_scalar=float(need("query_pre_attn_scalar")),
        attn_logit_softcap=raw.get("attn_logit_softcapping"),
        final_logit_softcap=raw.get("final_logit_softcapping"),
        sliding_window=need("sliding_window"),
        local_layer_period=2,
        use_post_norms=True,
        **kw,
    )


def config_to_hf(cfg: GemmaConfig) -> dict:
    """The `config.json` dict that transformers reads back as the same model."""
    gemma2 = cfg.use_post_norms
    out = {
        "architectures": ["Gemma2ForCausalLM" if gemma2 else "GemmaForCausalLM"],
        "model_type": "gemma2" if gemma2 else "gemma",
        "num_hidden_layers": cfg.num_layers,
        "hidden_size": cfg.embed_dim,
        "intermediate_size": cfg.hidden_dim,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "vocab_size": cfg.vocab_size,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_base,
        "hidden_activation": "gelu_pytorch_tanh",
        "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2,
        "tie_word_embeddings": True,
        "torch_dtype": cfg.param_dtype,
    }
    if gemma2:
        if cfg.local_layer_period not in (0, 2):
            raise ValueError("only local_layer_period 2 (Gemma 2 alternation) can be exported to transformers")
        out.update(
            # transformers 5 validates this field as an int when it is a whole number.
            query_pre_attn_scalar=(int(cfg.query_pre_attn_scalar) if float(cfg.query_pre_attn_scalar).is_integer()
                                   else cfg.query_pre_attn_scalar),
            attn_logit_softcapping=cfg.attn_logit_softcap,
            final_logit_softcapping=cfg.final_logit_softcap,
            sliding_window=cfg.sliding_window,
        )
    elif cfg.query_pre_attn_scalar != cfg.head_dim or cfg.attn_logit_softcap or cfg.final_logit_softcap:
        raise ValueError("a Gemma 1 config must have query_pre_attn_scalar == head_dim and no softcaps")
    return out
