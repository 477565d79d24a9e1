"""The one model config dataclass, its presets, and reading a Hugging Face `config.json`.

Every Gemma quirk is a named field so that Gemma 1, 2 and 3 (text) are the same code with different numbers
(docs/reference.md#gemma-numerics). The config is frozen and hashable, so it can be a static argument of `jax.jit`.

Gemma 3 against Gemma 2 (transformers `models/gemma3/modeling_gemma3.py`, Tunix `tunix/models/gemma3/model.py`):
RMSNorm over head_dim on queries and keys before RoPE (`use_qk_norm`), 5 sliding : 1 global layers
(`sliding_window_pattern` 6, or an explicit `layer_types`), RoPE base 10k on sliding and 1M on global layers
(`rope_local_base`, `rope_base`), linear RoPE scaling x8 on the global layers of 4B/12B/27B (`rope_scaling`),
no softcaps. The vocabulary is 262,144 tokens; see `config_from_hf` for the 262,208-row multimodal embedding.
"""

import dataclasses
import json
import os

import jax.numpy as jnp

_LAYER_TYPES = ("sliding_attention", "full_attention")


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
    # Gemma 3: layer i is global iff (i + 1) % p == 0, the rest local (HF `sliding_window_pattern`, 6). 0: unused.
    sliding_window_pattern: int = 0
    # Explicit per-layer types, HF `layer_types` ("sliding_attention" / "full_attention"); overrides the two above.
    layer_types: tuple[str, ...] | None = None
    use_post_norms: bool = False  # Gemma 2: post-attention norm and post-ffw norm around each sub-block
    use_qk_norm: bool = False  # Gemma 3: (1 + w) RMSNorm over H on each query and key head, before RoPE
    rope_base: float = 10_000.0  # RoPE base of the global layers (of every layer when rope_local_base is None)
    rope_local_base: float | None = None  # Gemma 3: RoPE base of the sliding-window layers (10k; global 1M)
    rope_scaling: float = 1.0  # linear RoPE scaling on global layers: positions / factor (Gemma 3 4B+: 8)
    norm_eps: float = 1e-6
    param_dtype: str = "float32"  # dtype of the weights and activations; norms and softmax run in float32
    scan_layers: bool = True  # lax.scan over stacked layers: compile time flat in depth
    remat: bool = False  # rematerialise each layer in the backward pass (saves activation memory)
    # Score log-probs over this many vocabulary rows at a time (gemma_jax/scoring.py), so the [B, T, V] float32
    # logits never exist, forward or backward; None: the full logits. Recommended 8192 for the 256k-vocabulary
    # presets: a [B*T, 8192] float32 chunk is 32 KiB per token (1/31 of the full logits) and the chunk's
    # [tokens, 8192] x [8192, D] matmuls are still large enough to run at full speed.
    logits_chunk: int | None = None

    def __post_init__(self):
        if sum(bool(x) for x in (self.local_layer_period, self.sliding_window_pattern, self.layer_types)) > 1:
            raise ValueError("set at most one of local_layer_period, sliding_window_pattern and layer_types")
        if self.layer_types is not None:
            if len(self.layer_types) != self.num_layers or set(self.layer_types) - set(_LAYER_TYPES):
                raise ValueError(f"layer_types must give one of {_LAYER_TYPES} per layer ({self.num_layers}); "
                                 f"got {self.layer_types}")
            object.__setattr__(self, "layer_types", tuple(self.layer_types))  # hashable even if given a list
        if self.rope_scaling < 1.0:
            raise ValueError(f"rope_scaling must be >= 1, got {self.rope_scaling}")

    @property
    def is_local_layer(self) -> tuple[bool, ...]:
        """Which layers use the sliding window (Gemma 2: even layer indices; Gemma 3: all but every 6th)."""
        L = self.num_layers
        if self.sliding_window is None:
            return (False,) * L
        if self.layer_types is not None:
            return tuple(t == "sliding_attention" for t in self.layer_types)
        if self.sliding_window_pattern:
            return tuple((i + 1) % self.sliding_window_pattern != 0 for i in range(L))
        if self.local_layer_period:
            return tuple(i % self.local_layer_period == 0 for i in range(L))
        return (False,) * L

    @property
    def dtype(self):
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

# Gemma 3 text towers: Tunix 0.1.7 `tunix/models/gemma3/model.py` ModelConfig.gemma3_* and the published HF
# config.json files (google/gemma-3-*). Tunix's query scale for 27B is (embed_dim // num_heads) ** -0.5 = 168 ** -0.5,
# HF's query_pre_attn_scalar 168. The 4B/12B/27B HF files say vocab_size 262208 (image tokens padded in); the
# text vocabulary, Tunix's num_embed and these presets are 262144.
_GEMMA3 = dict(vocab_size=262_144, query_pre_attn_scalar=256, sliding_window_pattern=6, use_post_norms=True,
               use_qk_norm=True, rope_base=1_000_000.0, rope_local_base=10_000.0, head_dim=256)
GEMMA3_270M = GemmaConfig(num_layers=18, embed_dim=640, hidden_dim=2048, num_heads=4, num_kv_heads=1,
                          sliding_window=512, **_GEMMA3)
GEMMA3_1B = GemmaConfig(num_layers=26, embed_dim=1152, hidden_dim=6912, num_heads=4, num_kv_heads=1,
                        sliding_window=512, **_GEMMA3)
GEMMA3_4B = GemmaConfig(num_layers=34, embed_dim=2560, hidden_dim=10240, num_heads=8, num_kv_heads=4,
                        sliding_window=1024, rope_scaling=8.0, **_GEMMA3)
GEMMA3_12B = GemmaConfig(num_layers=48, embed_dim=3840, hidden_dim=15360, num_heads=16, num_kv_heads=8,
                         sliding_window=1024, rope_scaling=8.0, **_GEMMA3)
GEMMA3_27B = GemmaConfig(num_layers=62, embed_dim=5376, hidden_dim=21504, num_heads=32, num_kv_heads=16,
                         sliding_window=1024, rope_scaling=8.0, **{**_GEMMA3, "head_dim": 128,
                                                                   "query_pre_attn_scalar": 168})

# Every Gemma 3 feature at tiny size: 7 layers with pattern 6 (layers 0-4 and 6 sliding, 5 global), window 8
# shorter than test sequences, query_pre_attn_scalar 24 = embed_dim / num_heads (Tunix's 27B-style scale) !=
# head_dim 16, GQA, RoPE scaling on. Variants via dataclasses.replace (MQA, rope_scaling 1).
TINY_GEMMA3 = GemmaConfig(
    num_layers=7, embed_dim=96, hidden_dim=128, num_heads=4, num_kv_heads=2, head_dim=16, vocab_size=512,
    query_pre_attn_scalar=24, sliding_window=8, sliding_window_pattern=6, use_post_norms=True, use_qk_norm=True,
    rope_base=1_000_000.0, rope_local_base=10_000.0, rope_scaling=8.0,
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
    # Gemma 3 text (older files: rope_local_base_freq, sliding_window_pattern; transformers 5: _sliding_window_pattern)
    "rope_local_base_freq", "sliding_window_pattern", "_sliding_window_pattern",
}
# Keys of a multimodal `gemma3` config.json next to its text_config (the vision tower is not read).
_HF_GEMMA3_MM_KEYS = {
    "model_type", "text_config", "vision_config", "architectures", "boi_token_index", "eoi_token_index",
    "image_token_index", "mm_tokens_per_image", "initializer_range", "tie_word_embeddings", "transformers_version",
    "torch_dtype", "dtype", "bos_token_id", "eos_token_id", "pad_token_id", "_name_or_path", "use_cache",
}
GEMMA3_IMAGE_TOKEN_INDEX = 262_144  # transformers Gemma3Config default: the first id past the text vocabulary


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
    text_vocab = None
    if model_type == "gemma3":  # multimodal: read the text tower's config, keep the text vocabulary only
        unknown = sorted(k for k in raw if k not in _HF_GEMMA3_MM_KEYS)
        if unknown or not isinstance(raw.get("text_config"), dict):
            raise ValueError(f"{source}: a 'gemma3' config needs a text_config dict; unknown field(s) {unknown}")
        text_vocab = int(raw.get("image_token_index", GEMMA3_IMAGE_TOKEN_INDEX))
        dtype_top = raw.get("dtype") or raw.get("torch_dtype")
        raw = {"model_type": "gemma3_text", **({"dtype": dtype_top} if dtype_top else {}), **raw["text_config"]}
        model_type = raw["model_type"]
        source = f"{source} (text_config)"
    if model_type not in ("gemma", "gemma2", "gemma3_text"):
        raise ValueError(f"{source}: model_type must be 'gemma' or 'gemma2', got {model_type!r}; Gemma 3: "
                         "'gemma3_text' (or 'gemma3' with a text_config)")
    unknown = sorted(k for k in raw if k not in _HF_KNOWN_KEYS)
    if unknown:
        raise ValueError(f"{source}: unknown config field(s) {unknown}; this loader reads Gemma 1, 2 and 3 only")

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
        rope_base = 1_000_000.0 if model_type == "gemma3_text" else 10_000.0
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
    if model_type == "gemma3_text":
        return _gemma3_from_hf(raw, source, kw, text_vocab)
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


def _gemma3_rope(raw, source):
    """(global base, local base, global linear factor) from either layout: transformers 5 `rope_parameters`
    {"full_attention": {...}, "sliding_attention": {...}}, or older top-level `rope_theta`,
    `rope_local_base_freq` and `rope_scaling` (defaults as transformers' Gemma3TextConfig: 1M, 10k, none)."""
    params = raw.get("rope_parameters") if isinstance(raw.get("rope_parameters"), dict) else {}
    full = params.get("full_attention") or {}
    local = params.get("sliding_attention") or {}
    old_scaling = raw.get("rope_scaling") or {}
    glob = full.get("rope_theta") or raw.get("rope_theta") or params.get("rope_theta") or 1_000_000.0
    loc = local.get("rope_theta") or raw.get("rope_local_base_freq") or 10_000.0
    factor = 1.0
    for kind, p in (("full_attention", {**old_scaling, **full}), ("sliding_attention", local)):
        rope_type = p.get("rope_type", p.get("type", "default"))
        if rope_type == "linear" and kind == "full_attention":
            factor = float(p["factor"])
        elif rope_type != "default":
            raise ValueError(f"{source}: RoPE type {rope_type!r} on {kind} layers is not supported "
                             "(default, or linear on full_attention)")
    return float(glob), float(loc), factor


def _gemma3_from_hf(raw, source, kw, text_vocab):
    """The Gemma 3 part of config_from_hf. A multimodal file's embedding has vocab_size rows (262,208) of which
    the first image_token_index (262,144) are the text vocabulary: we keep those (text_vocab), as Tunix does."""
    if raw.get("attn_logit_softcapping") is not None:
        raise ValueError(f"{source}: attn_logit_softcapping is set, but transformers' Gemma 3 does not apply it")
    if raw.get("use_bidirectional_attention"):
        raise ValueError(f"{source}: use_bidirectional_attention is not supported (causal LM only)")
    L = kw["num_layers"]
    layer_types = raw.get("layer_types")
    pattern = raw.get("sliding_window_pattern") or raw.get("_sliding_window_pattern") or 6
    if layer_types is None:
        layer_types = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(L)]
    layer_types = tuple(layer_types)
    by_pattern = tuple("full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(L))
    rope_base, rope_local, factor = _gemma3_rope(raw, source)
    if text_vocab is not None and text_vocab < kw["vocab_size"]:
        kw = {**kw, "vocab_size": text_vocab}
    if raw.get("sliding_window") is None:
        raise ValueError(f"{source}: missing required config field 'sliding_window'")
    return GemmaConfig(
        query_pre_attn_scalar=float(raw.get("query_pre_attn_scalar", 256)),
        final_logit_softcap=raw.get("final_logit_softcapping"),
        sliding_window=int(raw["sliding_window"]),
        sliding_window_pattern=pattern if layer_types == by_pattern else 0,
        layer_types=None if layer_types == by_pattern else layer_types,
        use_post_norms=True, use_qk_norm=True,
        **{**kw, "rope_base": rope_base}, rope_local_base=rope_local, rope_scaling=factor,
    )


def _hf_number(x):
    """transformers 5 validates some fields as ints when they are whole numbers."""
    return int(x) if float(x).is_integer() else x


def _gemma3_to_hf(cfg: GemmaConfig, out: dict) -> dict:
    if not (cfg.use_post_norms and cfg.use_qk_norm) or cfg.attn_logit_softcap is not None or cfg.local_layer_period:
        raise ValueError("a Gemma 3 config needs post-norms and QK-norm, no attention softcap and no "
                         "local_layer_period")
    full = {"rope_type": "default", "rope_theta": cfg.rope_base}
    if cfg.rope_scaling != 1.0:
        full = {"rope_type": "linear", "factor": cfg.rope_scaling, "rope_theta": cfg.rope_base}
    local_base = cfg.rope_base if cfg.rope_local_base is None else cfg.rope_local_base
    out = {k: v for k, v in out.items() if k != "rope_theta"}
    out.update(
        architectures=["Gemma3ForCausalLM"], model_type="gemma3_text",
        query_pre_attn_scalar=_hf_number(cfg.query_pre_attn_scalar),
        final_logit_softcapping=cfg.final_logit_softcap, attn_logit_softcapping=None,
        sliding_window=cfg.sliding_window if cfg.sliding_window is not None else 4096,
        layer_types=["sliding_attention" if local else "full_attention" for local in cfg.is_local_layer],
        rope_parameters={"full_attention": full, "sliding_attention": {"rope_type": "default",
                                                                       "rope_theta": local_base}},
    )
    return out


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
    if cfg.use_qk_norm:
        return _gemma3_to_hf(cfg, out)
    if cfg.sliding_window_pattern or cfg.layer_types is not None or cfg.rope_local_base is not None \
            or cfg.rope_scaling != 1.0:
        raise ValueError("Gemma 3 layer patterns and RoPE settings need use_qk_norm (a Gemma 3 config)")
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
