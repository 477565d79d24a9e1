"""The one model config dataclass, its presets, and reading a Hugging Face `config.json`.

Every Gemma quirk is a named field so that Gemma 1, 2, 3 and 4 (text) are the same code with different numbers
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
    # Gemma 4 text (transformers `models/gemma4/modeling_gemma4.py`, Tunix `tunix/models/gemma4/model.py`). Each
    # default reproduces Gemma 1-3. Gemma 4's attention scale is 1 (HF `self.scaling = 1.0`: the QK-norm sets the
    # size of q.k), which is query_pre_attn_scalar = 1; its final softcap is final_logit_softcap (30).
    norm_plus_one: bool = True  # RMSNorm scale (1 + w); False: w (Gemma4RMSNorm, weights stored around 1)
    per_layer_input_dim: int = 0  # P of per-layer embeddings (PLE, HF hidden_size_per_layer_input); 0: none
    per_layer_vocab_size: int | None = None  # rows of the PLE table (HF vocab_size_per_layer_input); None: V
    num_kv_shared_layers: int = 0  # the last this many layers reuse the k/v of the last earlier same-type layer
    global_head_dim: int | None = None  # head dim of the global layers (HF global_head_dim); None: head_dim
    num_global_kv_heads: int | None = None  # kv heads of the global layers (HF: only with attention_k_eq_v)
    attention_k_eq_v: bool = False  # global layers have no v projection: the raw k projection is the value
    use_value_norm: bool = False  # RMSNorm over H without scale on values (HF v_norm, with_scale=False)
    global_rope_fraction: float = 1.0  # proportional RoPE on global layers: rotate this share of H/2 angles
    double_wide_mlp: bool = False  # the KV-shared layers' MLP hidden is 2F (HF use_double_wide_mlp)
    use_layer_scalar: bool = False  # each layer's output (the whole residual stream) times a stored scalar [1]
    # Gemma 4 mixture of experts (26B-A4B; HF enable_moe_block): every layer adds a routed expert MLP next to its
    # dense MLP (gemma_jax/model.py `_moe`). 0: no experts (a dense model).
    num_experts: int = 0  # E, experts per layer (HF num_experts)
    top_k_experts: int = 0  # A, experts each token is routed to (HF top_k_experts)
    moe_hidden_dim: int = 0  # M, hidden size of each expert's gelu MLP (HF moe_intermediate_size)

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
        if self.layer_list and not (self.use_post_norms and self.use_qk_norm):
            raise ValueError("Gemma 4 features need use_post_norms and use_qk_norm (a Gemma 4 config)")
        if not 0 <= self.num_kv_shared_layers < self.num_layers:
            raise ValueError(f"num_kv_shared_layers must be in [0, num_layers), got {self.num_kv_shared_layers}")
        if self.num_experts and not (0 < self.top_k_experts <= self.num_experts and self.moe_hidden_dim > 0):
            raise ValueError(f"a mixture of experts needs 0 < top_k_experts <= num_experts and moe_hidden_dim > 0; "
                             f"got {self.top_k_experts}, {self.num_experts}, {self.moe_hidden_dim}")

    @property
    def layer_list(self) -> bool:
        """Gemma 4: layers differ in shape (head dim, kv heads, no k/v, MLP width), so params["layers"] is a list
        of per-layer dicts and the forward pass unrolls the layers (gemma_jax/model.py `_layer_kinds`)."""
        return (not self.norm_plus_one or bool(self.per_layer_input_dim) or bool(self.num_kv_shared_layers)
                or self.global_head_dim is not None or self.num_global_kv_heads is not None or self.attention_k_eq_v
                or self.use_value_norm or self.global_rope_fraction != 1.0 or self.double_wide_mlp
                or self.use_layer_scalar or bool(self.num_experts))

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

# Gemma 4 dense text towers: Tunix 0.1.7 `tunix/models/gemma4/model.py` ModelConfig.gemma4_e2b / gemma4_e4b /
# gemma4_31b and its ModelConfig defaults, which agree with transformers 5.12.1 Gemma4TextConfig defaults:
# global head dim 512 (Tunix global_key_size, HF global_head_dim), proportional RoPE on global layers rotating 1/4
# of the angles (global_rope_proportion / partial_rotary_factor 0.25), RoPE bases 10k local / 1M global, vocabulary
# and PLE vocabulary 262,144, final softcap 30 (Tunix default; HF's default is None, the published files set it).
# KV sharing: Tunix frac_shared_layers 20/35 (E2B: 20 layers) and 18/42 (E4B: 18). Double-wide MLP: Tunix
# override_kv_shared_ffw_hidden = 2 * hidden_dim, set for E2B only. 31B: Tunix num_global_kv_heads 4 with
# k_eq_v_global, no PLE. Layer pattern: Tunix attention_pattern (E2B 4 local : 1 global, others 5 : 1).
# 12B ("Gemma 4 12B Unified", model_type gemma4_unified): the text_config of google/gemma-4-12B-it's config.json
# (48 layers, D 3840, F 15360, 16 heads, 8 kv heads, global layers 1 kv head with k = v, window 1024, 5 : 1 pattern,
# no PLE, no KV sharing); transformers 5.12.1 runs it as Gemma4UnifiedForCausalLM, whose text layers are
# Gemma4TextModel's without PLE (tests/test_gemma4.py counts both and checks the logits of a tiny one).
_GEMMA4 = dict(vocab_size=262_144, head_dim=256, query_pre_attn_scalar=1.0, final_logit_softcap=30.0,
               use_post_norms=True, use_qk_norm=True, rope_base=1_000_000.0, rope_local_base=10_000.0,
               norm_plus_one=False, global_head_dim=512, use_value_norm=True, global_rope_fraction=0.25,
               use_layer_scalar=True)
GEMMA4_E2B = GemmaConfig(num_layers=35, embed_dim=1536, hidden_dim=1536 * 4, num_heads=8, num_kv_heads=1,
                         sliding_window=512, sliding_window_pattern=5, per_layer_input_dim=256,
                         num_kv_shared_layers=20, double_wide_mlp=True, **_GEMMA4)
GEMMA4_E4B = GemmaConfig(num_layers=42, embed_dim=2560, hidden_dim=2560 * 4, num_heads=8, num_kv_heads=2,
                         sliding_window=512, sliding_window_pattern=6, per_layer_input_dim=256,
                         num_kv_shared_layers=18, **_GEMMA4)
GEMMA4_31B = GemmaConfig(num_layers=60, embed_dim=5376, hidden_dim=5376 * 4, num_heads=32, num_kv_heads=16,
                         num_global_kv_heads=4, attention_k_eq_v=True, sliding_window=1024, sliding_window_pattern=6,
                         **_GEMMA4)
GEMMA4_12B = GemmaConfig(num_layers=48, embed_dim=3840, hidden_dim=3840 * 4, num_heads=16, num_kv_heads=8,
                         num_global_kv_heads=1, attention_k_eq_v=True, sliding_window=1024, sliding_window_pattern=6,
                         **_GEMMA4)

# The mixture of experts: the text_config of the published google/gemma-4-26B-A4B(-it) config.json (Tunix
# ModelConfig.gemma4_26b_a4b agrees): 30 layers 5 local : 1 global, D 2816, dense MLP 2112 next to 128 experts
# of hidden 704 with top-8 routing, 16 heads, 8 kv heads (global: 2, with k = v), window 1024, no PLE.
GEMMA4_26B_A4B = GemmaConfig(num_layers=30, embed_dim=2816, hidden_dim=2112, num_heads=16, num_kv_heads=8,
                             num_global_kv_heads=2, attention_k_eq_v=True, sliding_window=1024,
                             sliding_window_pattern=6, num_experts=128, top_k_experts=8, moe_hidden_dim=704,
                             **_GEMMA4)

# Every Gemma 4 feature at tiny size: 6 layers with pattern 3 (layers 2 and 5 global), window 8 < test length,
# the last 3 layers KV-shared (layer 3 reads layer 1's k/v, layer 4 too, layer 5 reads layer 2's), global head
# dim 32 != 16 with 1 kv head and k = v, proportional RoPE, double-wide shared MLPs, PLE of width 8.
TINY_GEMMA4 = GemmaConfig(
    num_layers=6, embed_dim=64, hidden_dim=96, num_heads=4, num_kv_heads=2, sliding_window=8,
    sliding_window_pattern=3, per_layer_input_dim=8, num_kv_shared_layers=3,
    num_global_kv_heads=1, attention_k_eq_v=True, double_wide_mlp=True,
    **{**_GEMMA4, "vocab_size": 512, "head_dim": 16, "global_head_dim": 32},
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
# Gemma 4 text fields (transformers Gemma4TextConfig).
_HF_GEMMA4_KEYS = {
    "vocab_size_per_layer_input", "hidden_size_per_layer_input", "num_global_key_value_heads", "global_head_dim",
    "attention_k_eq_v", "num_kv_shared_layers", "enable_moe_block", "use_double_wide_mlp", "num_experts",
    "top_k_experts", "moe_intermediate_size",
}
# Keys of a multimodal `gemma4` config.json next to its text_config (vision and audio towers are not read).
_HF_GEMMA4_MM_KEYS = _HF_GEMMA3_MM_KEYS | {
    "audio_config", "audio_token_id", "boa_token_id", "boi_token_id", "eoa_token_index", "eoi_token_id",
    "image_token_id", "video_token_id", "chunk_size_feed_forward", "id2label", "label2id", "is_encoder_decoder",
    "output_attentions", "output_hidden_states", "problem_type", "return_dict",
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
    if model_type == "gemma4_unified_text":  # Gemma 4 12B's text model: Gemma4TextModel's layers without PLE
        raw, model_type = {**raw, "model_type": "gemma4_text"}, "gemma4_text"
    if model_type in ("gemma4", "gemma4_unified"):  # multimodal: the text embedding is the text vocabulary already
        unknown = sorted(k for k in raw if k not in _HF_GEMMA4_MM_KEYS)
        if unknown or not isinstance(raw.get("text_config"), dict):
            raise ValueError(f"{source}: a {model_type!r} config needs a text_config dict; unknown field(s) {unknown}")
        dtype_top = raw.get("dtype") or raw.get("torch_dtype")
        raw = {**({"dtype": dtype_top} if dtype_top else {}), **raw["text_config"], "model_type": "gemma4_text"}
        model_type = raw["model_type"]
        source = f"{source} (text_config)"
    if model_type not in ("gemma", "gemma2", "gemma3_text", "gemma4_text"):
        raise ValueError(f"{source}: model_type must be 'gemma' or 'gemma2', got {model_type!r}; Gemma 3: "
                         "'gemma3_text' (or 'gemma3' with a text_config)")
    known = _HF_KNOWN_KEYS | (_HF_GEMMA4_KEYS if model_type == "gemma4_text" else set())
    unknown = sorted(k for k in raw if k not in known)
    if unknown:
        raise ValueError(f"{source}: unknown config field(s) {unknown}; this loader reads Gemma 1, 2, 3 and 4 only")

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
    if model_type == "gemma4_text":
        return _gemma4_from_hf(raw, source, kw)
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


def _gemma4_layer_types(raw, L):
    """(sliding_window_pattern, layer_types) as GemmaConfig fields: a pattern when the file's layer_types is one
    (global iff (i + 1) % p == 0), else the explicit tuple. transformers' default: pattern 6, last layer global."""
    layer_types = raw.get("layer_types")
    if layer_types is None:
        layer_types = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(L)]
        layer_types[-1] = "full_attention"
    layer_types = tuple(layer_types)
    if "full_attention" in layer_types:
        p = layer_types.index("full_attention") + 1
        if layer_types == tuple("full_attention" if (i + 1) % p == 0 else "sliding_attention" for i in range(L)):
            return p, None
    return 0, layer_types


def _gemma4_from_hf(raw, source, kw):
    """The Gemma 4 part of config_from_hf (transformers Gemma4TextConfig; dense, or experts in every layer with
    enable_moe_block)."""
    moe = {}
    if raw.get("enable_moe_block"):
        for key in ("num_experts", "top_k_experts", "moe_intermediate_size"):
            if not raw.get(key):
                raise ValueError(f"{source}: enable_moe_block is set but {key!r} is missing")
        moe = dict(num_experts=int(raw["num_experts"]), top_k_experts=int(raw["top_k_experts"]),
                   moe_hidden_dim=int(raw["moe_intermediate_size"]))
    if raw.get("use_bidirectional_attention") == "all":
        raise ValueError(f"{source}: use_bidirectional_attention 'all' is not supported (causal LM only)")
    # use_bidirectional_attention "vision" only changes image tokens' masks: text is causal either way.
    if raw.get("sliding_window") is None:
        raise ValueError(f"{source}: missing required config field 'sliding_window'")
    rope = raw.get("rope_parameters") or {}
    full = rope.get("full_attention") or {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                                          "rope_theta": 1_000_000.0}
    local = rope.get("sliding_attention") or {"rope_type": "default", "rope_theta": 10_000.0}
    if local.get("rope_type", "default") != "default" or full.get("rope_type") not in ("default", "proportional"):
        raise ValueError(f"{source}: RoPE types {local.get('rope_type')!r} (sliding) / {full.get('rope_type')!r} "
                         "(full) not supported (default / proportional)")
    proportional = full["rope_type"] == "proportional"
    H = kw["head_dim"]
    global_H = raw.get("global_head_dim", 512) or H  # HF: global layers use global_head_dim when it is set
    if not proportional and global_H != H:
        raise ValueError(f"{source}: default RoPE on full_attention layers with global_head_dim {global_H} != "
                         f"head_dim {H} (transformers sizes that RoPE by head_dim)")
    k_eq_v = bool(raw.get("attention_k_eq_v", False))
    global_K = raw.get("num_global_key_value_heads") if k_eq_v else None  # HF reads it only with k_eq_v
    P = int(raw.get("hidden_size_per_layer_input", 256) or 0)
    ple_vocab = int(raw.get("vocab_size_per_layer_input", 262_144))
    pattern, layer_types = _gemma4_layer_types(raw, kw["num_layers"])
    return GemmaConfig(
        query_pre_attn_scalar=1.0, final_logit_softcap=raw.get("final_logit_softcapping"),
        sliding_window=int(raw["sliding_window"]), sliding_window_pattern=pattern, layer_types=layer_types,
        use_post_norms=True, use_qk_norm=True, norm_plus_one=False, use_value_norm=True, use_layer_scalar=True,
        **{**kw, "rope_base": float(full.get("rope_theta", 1_000_000.0))},
        rope_local_base=float(local.get("rope_theta", 10_000.0)),
        rope_scaling=float(full.get("factor", 1.0)) if proportional else 1.0,
        global_rope_fraction=float(full.get("partial_rotary_factor", 1.0)) if proportional else 1.0,
        per_layer_input_dim=P, per_layer_vocab_size=None if not P or ple_vocab == kw["vocab_size"] else ple_vocab,
        num_kv_shared_layers=int(raw.get("num_kv_shared_layers", 0)),
        global_head_dim=None if global_H == H else int(global_H),
        num_global_kv_heads=None if global_K in (None, kw["num_kv_heads"]) else int(global_K),
        attention_k_eq_v=k_eq_v, double_wide_mlp=bool(raw.get("use_double_wide_mlp", False)), **moe,
    )


def _gemma4_to_hf(cfg: GemmaConfig, out: dict) -> dict:
    if cfg.norm_plus_one or not (cfg.use_value_norm and cfg.use_layer_scalar) or cfg.query_pre_attn_scalar != 1.0:
        raise ValueError("transformers' Gemma 4 always has w-scaled norms, value norm, layer scalars and attention "
                         "scale 1 (norm_plus_one False, use_value_norm, use_layer_scalar, query_pre_attn_scalar 1)")
    if cfg.attn_logit_softcap is not None or cfg.local_layer_period:
        raise ValueError("a Gemma 4 config has no attention softcap and no local_layer_period")
    if cfg.num_global_kv_heads is not None and not cfg.attention_k_eq_v:
        raise ValueError("transformers' Gemma 4 uses num_global_key_value_heads only with attention_k_eq_v")
    if cfg.rope_scaling != 1.0 and cfg.global_rope_fraction == 1.0:
        raise ValueError("Gemma 4 RoPE scaling is exported only with proportional RoPE (global_rope_fraction < 1)")
    full = {"rope_type": "default", "rope_theta": cfg.rope_base}
    if cfg.global_rope_fraction != 1.0:
        full = {"rope_type": "proportional", "partial_rotary_factor": cfg.global_rope_fraction,
                "rope_theta": cfg.rope_base, **({"factor": cfg.rope_scaling} if cfg.rope_scaling != 1.0 else {})}
    local_base = cfg.rope_base if cfg.rope_local_base is None else cfg.rope_local_base
    out = {k: v for k, v in out.items() if k != "rope_theta"}
    out.update(
        architectures=["Gemma4ForCausalLM"], model_type="gemma4_text",
        final_logit_softcapping=cfg.final_logit_softcap,
        sliding_window=cfg.sliding_window if cfg.sliding_window is not None else 512,
        layer_types=["sliding_attention" if local else "full_attention" for local in cfg.is_local_layer],
        rope_parameters={"full_attention": full, "sliding_attention": {"rope_type": "default",
                                                                       "rope_theta": local_base}},
        hidden_size_per_layer_input=cfg.per_layer_input_dim,
        vocab_size_per_layer_input=cfg.per_layer_vocab_size or cfg.vocab_size,
        global_head_dim=cfg.global_head_dim or cfg.head_dim,
        num_global_key_value_heads=cfg.num_global_kv_heads, attention_k_eq_v=cfg.attention_k_eq_v,
        num_kv_shared_layers=cfg.num_kv_shared_layers, use_double_wide_mlp=cfg.double_wide_mlp,
        enable_moe_block=bool(cfg.num_experts), num_experts=cfg.num_experts or None,
        top_k_experts=cfg.top_k_experts or None, moe_intermediate_size=cfg.moe_hidden_dim or None,
    )
    return out


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
    if cfg.layer_list:
        return _gemma4_to_hf(cfg, out)
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
