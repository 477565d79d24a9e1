"""Test-only bridge to Tunix: build `tunix.models.gemma.model.Gemma` holding exactly our weights.

Tunix is the reference we check against, never a runtime dependency. Its Gemma differs from ours in layout only:
q_einsum [N,D,H], kv_einsum [2,K,D,H] (or qkv_einsum [3,N,D,H] when K == N), attn_vec_einsum [N,H,D],
mlp gate_proj/up_proj [D,F] and down_proj [F,D] kernels, norms `scale`. Tunix hard-codes the query scale to
head_dim**-0.5, so parity configs must have query_pre_attn_scalar == head_dim. Gemma 3 and Gemma 4
(`tunix.models.gemma3`, `tunix.models.gemma4`) have bridges of their own below.
"""

import jax.numpy as jnp
import numpy as np
from flax import nnx
from tunix.models.gemma import model as tunix_gemma

from gemma_jax.model import layer_kinds


def tunix_config(cfg):
    if cfg.query_pre_attn_scalar != cfg.head_dim:
        raise ValueError("Tunix scales queries by head_dim**-0.5: use query_pre_attn_scalar == head_dim")
    local, glob = tunix_gemma.AttentionType.LOCAL_SLIDING, tunix_gemma.AttentionType.GLOBAL
    return tunix_gemma.ModelConfig(
        num_layers=cfg.num_layers, num_embed=cfg.vocab_size, embed_dim=cfg.embed_dim, hidden_dim=cfg.hidden_dim,
        num_heads=cfg.num_heads, head_dim=cfg.head_dim, num_kv_heads=cfg.num_kv_heads,
        final_logit_softcap=cfg.final_logit_softcap, use_post_attn_norm=cfg.use_post_norms,
        use_post_ffw_norm=cfg.use_post_norms,
        attention_types=tuple(local if is_local else glob for is_local in cfg.is_local_layer),
        attn_logits_soft_cap=cfg.attn_logit_softcap, sliding_window_size=cfg.sliding_window,
    )


def to_tunix(params, cfg):
    """A Tunix Gemma nnx module with our params copied in (float32 numpy copies, no sharing)."""
    model = tunix_gemma.Gemma(tunix_config(cfg), rngs=nnx.Rngs(params=0))
    p = lambda x: jnp.asarray(np.asarray(x, np.float32))  # noqa: E731
    lay = params["layers"]
    model.embedder.input_embedding.value = p(params["embed"])
    model.final_norm.scale.value = p(params["final_norm"])
    for i, layer in enumerate(model.layers):
        attn = layer.attn
        q_NDH = np.transpose(np.asarray(lay["q"][i]), (1, 0, 2))
        k_KDH = np.transpose(np.asarray(lay["k"][i]), (1, 0, 2))
        v_KDH = np.transpose(np.asarray(lay["v"][i]), (1, 0, 2))
        if attn.use_qkv_einsum:
            attn.qkv_einsum.w.value = p(np.stack([q_NDH, k_KDH, v_KDH]))
        else:
            attn.q_einsum.w.value = p(q_NDH)
            attn.kv_einsum.w.value = p(np.stack([k_KDH, v_KDH]))
        attn.attn_vec_einsum.w.value = p(lay["o"][i])
        layer.mlp.gate_proj.kernel.value = p(lay["gate"][i])
        layer.mlp.up_proj.kernel.value = p(lay["up"][i])
        layer.mlp.down_proj.kernel.value = p(lay["down"][i])
        layer.pre_attention_norm.scale.value = p(lay["attn_norm"][i])
        layer.pre_ffw_norm.scale.value = p(lay["ffw_norm"][i])
        if cfg.use_post_norms:
            layer.post_attn_norm.scale.value = p(lay["post_attn_norm"][i])
            layer.post_ffw_norm.scale.value = p(lay["post_ffw_norm"][i])
    return model


def tunix_logits(model, tokens_BT, pad_mask_BT=None):
    """Full-sequence logits from Tunix's Gemma with its own helpers for positions and the causal mask."""
    from tunix.rl import common

    tokens_BT = jnp.asarray(tokens_BT)
    if pad_mask_BT is None:
        pad_mask_BT = jnp.ones(tokens_BT.shape, bool)
    pad_mask_BT = jnp.asarray(pad_mask_BT)
    positions = common.build_positions_from_mask(pad_mask_BT)
    attn_mask = common.make_causal_attn_mask(pad_mask_BT)
    logits, _ = model(tokens_BT, positions, None, attn_mask)
    return np.asarray(logits)


class IdTokenizer:
    """The minimal tokenizer Tunix's Sampler accepts: text is whitespace-separated token ids (so we feed it the
    exact ids we feed ours). bos_id 2 is prepended by Tunix and de-duplicated with the prompt's own <bos>."""

    def encode(self, text):
        return [int(t) for t in text.split()]

    def decode(self, ids):
        return " ".join(str(int(i)) for i in ids)

    def bos_id(self):
        return 2

    def eos_id(self):
        return 1

    def pad_id(self):
        return 0


def tunix_gemma3_config(cfg):
    """Tunix's Gemma 3 ModelConfig (text only, float32) for our config.

    Tunix fixes the layer pattern (5 sliding : 1 global, cycled) and derives the query scale from head_dim or
    embed_dim // num_heads, so the config must have sliding_window_pattern 6 and one of those two scalars."""
    from tunix.models.gemma3 import model as tunix_gemma3

    qpa = tunix_gemma3.QueryPreAttentionNormalisation
    if cfg.query_pre_attn_scalar == cfg.head_dim:
        norm = qpa.BY_ONE_OVER_SQRT_HEAD_DIM
    elif cfg.query_pre_attn_scalar == cfg.embed_dim // cfg.num_heads:
        norm = qpa.BY_ONE_OVER_SQRT_EMBED_DIM_DIV_NUM_HEADS
    else:
        raise ValueError("Tunix's Gemma 3 query scale is head_dim**-0.5 or (embed_dim // num_heads)**-0.5")
    if cfg.sliding_window_pattern != 6 or cfg.layer_types is not None:
        raise ValueError("Tunix's Gemma 3 cycles 5 sliding : 1 global layers: use sliding_window_pattern 6")
    return tunix_gemma3.ModelConfig(
        num_layers=cfg.num_layers, num_embed=cfg.vocab_size, embed_dim=cfg.embed_dim, hidden_dim=cfg.hidden_dim,
        num_heads=cfg.num_heads, head_dim=cfg.head_dim, num_kv_heads=cfg.num_kv_heads,
        sliding_window_size=cfg.sliding_window, local_base_frequency=int(cfg.rope_local_base),
        global_base_frequency=int(cfg.rope_base), global_scale_factor=cfg.rope_scaling, query_pre_attn_norm=norm,
        param_dtype=jnp.float32,
    )


def to_tunix_gemma3(params, cfg):
    """Tunix's Gemma 3 (`tunix.models.gemma3.model.Gemma3`) holding our weights: the layout of `to_tunix`, plus
    `_query_norm` / `_key_norm` scales and `post_attention_norm`."""
    from tunix.models.gemma3 import model as tunix_gemma3

    tcfg = tunix_gemma3_config(cfg)
    model = tunix_gemma3.Gemma3(tcfg, rngs=nnx.Rngs(params=0))
    p = lambda x: jnp.asarray(np.asarray(x, np.float32))  # noqa: E731
    lay = params["layers"]
    model.embedder.input_embedding.value = p(params["embed"])
    model.final_norm.scale.value = p(params["final_norm"])
    for i, layer in enumerate(model.layers):
        attn = layer.attn
        q_NDH = np.transpose(np.asarray(lay["q"][i]), (1, 0, 2))
        k_KDH = np.transpose(np.asarray(lay["k"][i]), (1, 0, 2))
        v_KDH = np.transpose(np.asarray(lay["v"][i]), (1, 0, 2))
        if attn.use_qkv_einsum:
            attn.qkv_einsum.w.value = p(np.stack([q_NDH, k_KDH, v_KDH]))
        else:
            attn.q_einsum.w.value = p(q_NDH)
            attn.kv_einsum.w.value = p(np.stack([k_KDH, v_KDH]))
        attn.attn_vec_einsum.w.value = p(lay["o"][i])
        attn._query_norm.scale.value = p(lay["q_norm"][i])
        attn._key_norm.scale.value = p(lay["k_norm"][i])
        layer.mlp.gate_proj.kernel.value = p(lay["gate"][i])
        layer.mlp.up_proj.kernel.value = p(lay["up"][i])
        layer.mlp.down_proj.kernel.value = p(lay["down"][i])
        layer.pre_attention_norm.scale.value = p(lay["attn_norm"][i])
        layer.post_attention_norm.scale.value = p(lay["post_attn_norm"][i])
        layer.pre_ffw_norm.scale.value = p(lay["ffw_norm"][i])
        layer.post_ffw_norm.scale.value = p(lay["post_ffw_norm"][i])
    return model


def tunix_gemma4_config(cfg):
    """Tunix's Gemma 4 ModelConfig (text, float32; with cfg.num_experts its MoE) for our config, refusing what Tunix
    cannot express.

    Tunix always has w-scaled norms with eps 1e-6, the value norm, attention scale 1 and no attention softcap;
    its PLE table has the main vocabulary's rows; local layers rotate every angle; KV-shared layers read layer
    num_unshared - 1 (global) or num_unshared - 2 (local), so the last two unshared layers must be local then global."""
    from tunix.models.gemma4 import model as tunix_gemma4

    if cfg.norm_plus_one or not cfg.use_value_norm or cfg.query_pre_attn_scalar != 1.0 or cfg.norm_eps != 1e-6:
        raise ValueError("Tunix's Gemma 4 has w norms (eps 1e-6), the value norm and attention scale 1")
    if cfg.attn_logit_softcap is not None or cfg.per_layer_vocab_size not in (None, cfg.vocab_size):
        raise ValueError("Tunix's Gemma 4 has no attention softcap and a PLE table of the main vocabulary's rows")
    local, glob = tunix_gemma4.AttentionType.LOCAL_SLIDING, tunix_gemma4.AttentionType.GLOBAL
    tcfg = tunix_gemma4.ModelConfig(
        num_layers=cfg.num_layers, num_embed=cfg.vocab_size, embed_dim=cfg.embed_dim, hidden_dim=cfg.hidden_dim,
        num_heads=cfg.num_heads, head_dim=cfg.head_dim, num_kv_heads=cfg.num_kv_heads,
        final_logit_softcap=cfg.final_logit_softcap, sliding_window_size=cfg.sliding_window,
        per_layer_input_dim=cfg.per_layer_input_dim, num_global_kv_heads=cfg.num_global_kv_heads,
        global_key_size=cfg.global_head_dim or cfg.head_dim,
        attention_pattern=tuple(local if is_local else glob for is_local in cfg.is_local_layer),
        frac_shared_layers=cfg.num_kv_shared_layers / cfg.num_layers,
        global_rope_proportion=cfg.global_rope_fraction, local_rope_proportion=1.0,
        k_eq_v_global=cfg.attention_k_eq_v,
        override_kv_shared_ffw_hidden=2 * cfg.hidden_dim if cfg.double_wide_mlp else None,
        local_base_frequency=int(cfg.rope_local_base), global_base_frequency=int(cfg.rope_base),
        global_scale_factor=cfg.rope_scaling, param_dtype=jnp.float32,
        enable_moe=bool(cfg.num_experts), num_experts=cfg.num_experts or None,
        num_experts_per_tok=cfg.top_k_experts or None, expert_dim=cfg.moe_hidden_dim or None,
    )
    sources = tunix_gemma4.create_kv_cache_sharing_patterns(
        cfg.num_layers, tcfg.frac_shared_layers, True, True, tcfg.attention_pattern)
    ours = [i if k.has_kv else k.kv_source for i, k in enumerate(layer_kinds(cfg))]
    if sources != ours:
        raise ValueError(f"Tunix's Gemma 4 shares k/v from layers {sources}, ours from {ours}")
    return tcfg


def to_tunix_gemma4(params, cfg):
    """Tunix's Gemma 4 (`tunix.models.gemma4.model.Gemma4`) holding our weights. Layout: q_einsum [N,D,H],
    kv_einsum [2,K,D,H] or (k = v global layers) k_einsum [K,D,H], attn_vec_einsum [N,H,D]; PLE in the embedder
    (per_layer_input_embedding [V,L,P], per_layer_model_projection [D,L,P]) and per layer (per_layer_input_gate
    [D,P], per_layer_projection [P,D]); the layer scalar is skip_scale. KV-shared layers keep Tunix's unused random
    k/v weights."""
    from tunix.models.gemma4 import model as tunix_gemma4

    model = tunix_gemma4.Gemma4(tunix_gemma4_config(cfg), rngs=nnx.Rngs(params=0))
    p = lambda x: jnp.asarray(np.asarray(x, np.float32))  # noqa: E731
    heads_first = lambda w: np.transpose(np.asarray(w), (1, 0, 2))  # noqa: E731  [D,N,H] -> [N,D,H]
    emb = model.embedder
    emb.input_embedding.value = p(params["embed"])
    model.final_norm.scale.value = p(params["final_norm"])
    if cfg.per_layer_input_dim:
        emb.per_layer_input_embedding.value = p(params["per_layer_embed"])
        emb.per_layer_model_projection.w.value = p(params["per_layer_proj"])
        emb.per_layer_projection_norm.scale.value = p(params["per_layer_proj_norm"])
    for layer, w in zip(model.layers, params["layers"]):
        attn = layer.attn
        attn.q_einsum.w.value = p(heads_first(w["q"]))
        attn._query_norm.scale.value = p(w["q_norm"])
        attn.attn_vec_einsum.w.value = p(w["o"])
        if "k" in w:
            if "v" in w:
                attn.kv_einsum.w.value = p(np.stack([heads_first(w["k"]), heads_first(w["v"])]))
            else:
                attn.k_einsum.w.value = p(heads_first(w["k"]))
            attn._key_norm.scale.value = p(w["k_norm"])
        layer.mlp.gate_proj.kernel.value = p(w["gate"])
        layer.mlp.up_proj.kernel.value = p(w["up"])
        layer.mlp.down_proj.kernel.value = p(w["down"])
        layer.pre_attention_norm.scale.value = p(w["attn_norm"])
        layer.post_attention_norm.scale.value = p(w["post_attn_norm"])
        layer.pre_ffw_norm.scale.value = p(w["ffw_norm"])
        layer.post_ffw_norm.scale.value = p(w["post_ffw_norm"])
        if cfg.per_layer_input_dim:
            layer.per_layer_input_gate.w.value = p(w["ple_gate"])
            layer.per_layer_projection.w.value = p(w["ple_proj"])
            layer.post_per_layer_input_norm.scale.value = p(w["ple_norm"])
        layer.skip_scale.value = p(w["layer_scalar"]) if "layer_scalar" in w else jnp.ones((1,), jnp.float32)
    return model
