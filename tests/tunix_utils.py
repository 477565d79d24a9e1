"""Test-only bridge to Tunix: build `tunix.models.gemma.model.Gemma` holding exactly our weights.

Tunix is the reference we check against, never a runtime dependency. Its Gemma differs from ours in layout only:
q_einsum [N,D,H], kv_einsum [2,K,D,H] (or qkv_einsum [3,N,D,H] when K == N), attn_vec_einsum [N,H,D],
mlp gate_proj/up_proj [D,F] and down_proj [F,D] kernels, norms `scale`. Tunix hard-codes the query scale to
head_dim**-0.5, so parity configs must have query_pre_attn_scalar == head_dim.
"""

import jax.numpy as jnp
import numpy as np
from flax import nnx
from tunix.models.gemma import model as tunix_gemma


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
