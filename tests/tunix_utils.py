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
