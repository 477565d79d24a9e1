"""One way to score tokens: per-token log-probs (optionally the predictive entropy) of target tokens.

SFT's loss, GRPO's policy / reference / old log-probs and the probability reward's scoring all call
`target_logprobs` (from hidden states) or `token_logprobs` (from tokens, teacher forcing).

Logits are float32, Gemma 2's final softcap is applied, then they are divided by `temperature` (the sampler
draws from softmax(logits / T), so GRPO's ratio and KL must be taken under that distribution; Tunix
`rl/common.py: compute_per_token_logps(temperature=)` skips the division at T = 0 and T = 1, and so do we).

With a chunk size (`cfg.logits_chunk`, or `target_logprobs(chunk_size=)`), the [B, T, V] float32 logits are never
materialised, forward or backward: `_chunked_logprobs` scans the vocabulary C rows of the embedding at a time
with an online logsumexp, and its custom VJP recomputes each chunk's softmax to accumulate the gradients.

`shard` (a gemma_jax.sharding.ShardingCtx, static; None on one device) constrains the hidden states (rows split
like the batch), the logits or each chunk's logits (vocabulary over tp) and the vocabulary chunks of the embedding
(each chunk's rows over tp and width over fsdp, as the embedding itself, so no device ever holds the whole table).
"""

import functools

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from gemma_jax.config import GemmaConfig
from gemma_jax.model import ACT_BTD, ACT_BTV, constrain, forward_hidden, softcap, unembed

ACT_ND, ACT_NC = ("act_batch", "act_embed"), ("act_batch", "act_vocab")


def _scaled(logits, temperature: float):
    if temperature not in (0.0, 1.0):
        logits = logits / temperature
    return logits


def logprobs_from_logits(logits_BTV, targets_BT, temperature: float = 1.0, *, return_entropy: bool = False):
    """log softmax(logits / T)[target] per position: [B, T] float32 (and the entropy [B, T], when asked)."""
    logits_BTV = _scaled(logits_BTV.astype(jnp.float32), temperature)
    lse_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
    lp_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None].astype(jnp.int32), axis=-1)[..., 0] - lse_BT
    if not return_entropy:
        return lp_BT
    p_BTV = jnp.exp(logits_BTV - lse_BT[..., None])
    return lp_BT, lse_BT - jnp.sum(p_BTV * logits_BTV, axis=-1)


def target_logprobs(params, h_BTD, targets_BT, cfg: GemmaConfig, *, temperature: float = 1.0,
                    return_entropy: bool = False, chunk_size: int | None = None, shard=None):
    """log p(targets[b, t] | h[b, t]) through the tied unembedding: h are final-norm hidden states, one per
    target. Returns [B, T] float32, or (log-probs, entropy) with return_entropy.

    chunk_size: vocabulary rows per chunk (default cfg.logits_chunk); None in both scores through the full
    [B, T, V] logits, the reference the chunked path is tested against.
    shard: a ShardingCtx (module docstring) or None.
    """
    chunk = cfg.logits_chunk if chunk_size is None else chunk_size
    h_BTD = constrain(h_BTD, shard, ACT_BTD)
    if chunk is None:
        logits_BTV = constrain(unembed(params, h_BTD, cfg), shard, ACT_BTV)
        return logprobs_from_logits(logits_BTV, targets_BT, temperature, return_entropy=return_entropy)
    if chunk < 1:
        raise ValueError(f"chunk_size must be a positive number of vocabulary rows, got {chunk}")
    D = h_BTD.shape[-1]
    # T = 0 and T = 1 both score at T = 1, as _scaled does.
    inv_t = 1.0 if temperature in (0.0, 1.0) else 1.0 / temperature
    h_ND = constrain(h_BTD.reshape(-1, D), shard, ACT_ND)
    out = _chunked_logprobs(min(chunk, cfg.vocab_size), cfg.final_logit_softcap, inv_t, return_entropy, shard,
                            h_ND, params["embed"], targets_BT.reshape(-1).astype(jnp.int32))
    return jax.tree.map(lambda x: x.reshape(targets_BT.shape), out)


def token_logprobs(params, tokens_BT, cfg: GemmaConfig, *, pad_mask_BT=None, positions_BT=None, lora=None,
                   temperature: float = 1.0, segment_ids_BT=None, return_entropy: bool = False, shard=None):
    """Teacher forcing: log p(tokens[t+1] | tokens[:t+1]) for t in [0, T-1), a [B, T-1] float32 array (and the
    entropy [B, T-1] of each predictive distribution with return_entropy). shard: a ShardingCtx or None."""
    h_BTD, _ = forward_hidden(params, tokens_BT, cfg, positions_BT=positions_BT, pad_mask_BT=pad_mask_BT,
                              segment_ids_BT=segment_ids_BT, lora=lora, shard=shard)
    return target_logprobs(params, h_BTD[:, :-1], tokens_BT[:, 1:], cfg, temperature=temperature,
                           return_entropy=return_entropy, shard=shard)


def completion_logprobs(params, cfg: GemmaConfig, prompt_BP, prompt_mask_BP, completion_BC, completion_mask_BC, *,
                        lora=None, temperature: float = 1.0, return_entropy: bool = False, shard=None):
    """Per-token log-probs [B, C] of a completion given its prompt, in one forward pass.

    The prompt is left-padded and the completion right-padded, so their concatenation has no holes; positions
    count real tokens only. Only the C hidden states that predict completion tokens are unembedded. lora=None
    gives the reference policy: the same base weights with adapters off. shard: a ShardingCtx or None.
    """
    P, C = prompt_BP.shape[1], completion_BC.shape[1]
    tokens_BT = jnp.concatenate([prompt_BP, completion_BC], axis=1)
    mask_BT = jnp.concatenate([prompt_mask_BP, completion_mask_BC], axis=1).astype(bool)
    h_BTD, _ = forward_hidden(params, tokens_BT, cfg, pad_mask_BT=mask_BT, lora=lora, shard=shard)
    return target_logprobs(params, h_BTD[:, P - 1:P + C - 1], completion_BC, cfg, temperature=temperature,
                           return_entropy=return_entropy, shard=shard)


# ---- vocabulary-chunked scoring ----
# N = B*T scored positions, C vocabulary rows per chunk, J = ceil(V / C) chunks. The embedding is padded with
# zero rows to J*C; their logits are masked out of every sum. Chunk j holds the rows c*J + j (c < C), strided
# rather than contiguous: any partition of the vocabulary gives the same sums, and this one keeps each device's
# share of a tp-split embedding (contiguous rows) on that device, as the same share of every chunk.
# z = softcap(h . e_v) * inv_t are the logits the unchunked path would give; per position we keep, over the
# chunks seen so far, the running max m, s = sum exp(z - m) and (for the entropy) w = sum exp(z - m) * z, so
# logsumexp = m + log s and entropy = logsumexp - w / s, all in one pass.


def _chunks(embed_VD, C, shard):
    """The padded embedding as J strided chunks [J, C, D] (chunk j: rows c*J + j), and which rows are real."""
    V, D = embed_VD.shape
    J = -(-V // C)
    embed_VD = jnp.pad(embed_VD, ((0, J * C - V), (0, 0)))
    valid_JC = (jnp.arange(J * C) < V).reshape(C, J).T
    # Split within each chunk (the scan slices J), as the embedding is split: rows over tp, width over fsdp.
    return constrain(embed_VD.reshape(C, J, D).transpose(1, 0, 2), shard, (None, "vocab", "embed")), valid_JC


def _acc_dtype(h_ND):
    # float32, or float64 when the inputs are (tests check the algorithm in float64 under jax.enable_x64).
    return jnp.promote_types(h_ND.dtype, jnp.float32)


def _chunk_logits(h_ND, e_CD, cap, inv_t, shard):
    """(z [N, C], d z / d (h . e) [N, C]) for one chunk."""
    u_NC = jnp.einsum("ND,CD->NC", h_ND, e_CD, preferred_element_type=_acc_dtype(h_ND))
    u_NC = constrain(u_NC, shard, ACT_NC)
    if cap is None:
        return u_NC * inv_t, jnp.full_like(u_NC, inv_t)
    c_NC = softcap(u_NC, cap)
    return c_NC * inv_t, (1.0 - jnp.square(c_NC / cap)) * inv_t


def _target_logit(h_ND, embed_VD, targets_N, cap, inv_t):
    """(z of each target, d z / d (h . e_target)), from the target's embedding row alone."""
    e_ND = jnp.take(embed_VD, targets_N, axis=0)
    u_N = jnp.sum(h_ND.astype(_acc_dtype(h_ND)) * e_ND.astype(_acc_dtype(h_ND)), axis=-1)
    if cap is None:
        return u_N * inv_t, jnp.full_like(u_N, inv_t)
    c_N = softcap(u_N, cap)
    return c_N * inv_t, (1.0 - jnp.square(c_N / cap)) * inv_t


def _lse_pass(C, cap, inv_t, with_entropy, shard, h_ND, embed_VD):
    """One scan over the chunks: (logsumexp [N], E_p[z] [N] or None); entropy = logsumexp - E_p[z]."""
    e_JCD, valid_JC = _chunks(embed_VD, C, shard)
    N = h_ND.shape[0]

    def step(carry, chunk):
        m_N, s_N, w_N = carry
        e_CD, valid_C = chunk
        z_NC, _ = _chunk_logits(h_ND, e_CD, cap, inv_t, shard)
        z_NC = jnp.where(valid_C, z_NC, -jnp.inf)
        m_new = jnp.maximum(m_N, jnp.max(z_NC, axis=-1))
        decay_N = jnp.exp(m_N - m_new)
        p_NC = jnp.exp(z_NC - m_new[:, None])  # exactly 0 on the padded rows
        s_N = s_N * decay_N + jnp.sum(p_NC, axis=-1)
        if with_entropy:
            # where(): 0 * -inf on a padded row would be nan.
            w_N = w_N * decay_N + jnp.sum(jnp.where(valid_C, p_NC * z_NC, 0.0), axis=-1)
        return (m_new, s_N, w_N), None

    acc = _acc_dtype(h_ND)
    init = (jnp.full((N,), -jnp.inf, acc), jnp.zeros((N,), acc), jnp.zeros((N,), acc))
    (m_N, s_N, w_N), _ = jax.lax.scan(step, init, (e_JCD, valid_JC))
    return m_N + jnp.log(s_N), (w_N / s_N if with_entropy else None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3, 4))
def _chunked_logprobs(C, cap, inv_t, with_entropy, shard, h_ND, embed_VD, targets_N):
    """log p(target) [N] (and the entropy [N] with with_entropy) without a [N, V] array."""
    lse_N, mean_z_N = _lse_pass(C, cap, inv_t, with_entropy, shard, h_ND, embed_VD)
    lp_N = _target_logit(h_ND, embed_VD, targets_N, cap, inv_t)[0] - lse_N
    return (lp_N, lse_N - mean_z_N) if with_entropy else lp_N


def _chunked_fwd(C, cap, inv_t, with_entropy, shard, h_ND, embed_VD, targets_N):
    # symbolic_zeros: the primals come with .perturbed, so LoRA training (embed frozen) skips the embedding's
    # gradient, a third of the backward matmuls.
    h_ND, embed_VD, targets_N, embed_grad = h_ND.value, embed_VD.value, targets_N.value, embed_VD.perturbed
    lse_N, mean_z_N = _lse_pass(C, cap, inv_t, with_entropy, shard, h_ND, embed_VD)
    lp_N = _target_logit(h_ND, embed_VD, targets_N, cap, inv_t)[0] - lse_N
    out = (lp_N, lse_N - mean_z_N) if with_entropy else lp_N
    # E_p[z] itself, not lse - entropy: that difference would lose digits in the backward pass.
    return out, (h_ND, embed_VD, targets_N, lse_N, mean_z_N, embed_grad)


def _chunked_bwd(C, cap, inv_t, with_entropy, shard, res, g):
    """With p = softmax(z): d lp / d z_v = [v = target] - p_v and d entropy / d z_v = -p_v (z_v - E_p[z]), so
    each chunk's cotangent on z is -p (g_lp + g_ent (z - E_p[z])); the [v = target] term goes through the
    target's own row. Chain through softcap and 1/T to u = h . e, then dh += du e and d e = du^T h per chunk."""
    h_ND, embed_VD, targets_N, lse_N, mean_z_N, embed_grad = res
    V, D = embed_VD.shape
    g_lp_N, g_ent_N = g if with_entropy else (g, None)
    if isinstance(g_lp_N, SymbolicZero):
        g_lp_N = jnp.zeros_like(lse_N)
    if isinstance(g_ent_N, SymbolicZero):
        g_ent_N = None
    e_JCD, valid_JC = _chunks(embed_VD, C, shard)

    def step(dh_ND, chunk):
        e_CD, valid_C = chunk
        z_NC, dz_du_NC = _chunk_logits(h_ND, e_CD, cap, inv_t, shard)
        p_NC = jnp.where(valid_C, jnp.exp(z_NC - lse_N[:, None]), 0.0)
        gz_NC = g_lp_N[:, None]
        if g_ent_N is not None:
            gz_NC = gz_NC + g_ent_N[:, None] * (z_NC - mean_z_N[:, None])
        du_NC = -p_NC * gz_NC * dz_du_NC
        dh_ND = constrain(dh_ND + jnp.einsum("NC,CD->ND", du_NC, e_CD, preferred_element_type=dh_ND.dtype), shard,
                          ACT_ND)
        de_CD = jnp.einsum("NC,ND->CD", du_NC, h_ND, preferred_element_type=dh_ND.dtype) if embed_grad else None
        return dh_ND, de_CD

    dh_ND, de_JCD = jax.lax.scan(step, constrain(jnp.zeros(h_ND.shape, _acc_dtype(h_ND)), shard, ACT_ND),
                                 (e_JCD, valid_JC))
    _, dzt_du_N = _target_logit(h_ND, embed_VD, targets_N, cap, inv_t)
    dut_N = g_lp_N * dzt_du_N
    dh_ND = dh_ND + dut_N[:, None] * jnp.take(embed_VD, targets_N, axis=0).astype(dh_ND.dtype)
    de_VD = None
    if embed_grad:
        de_VD = de_JCD.transpose(1, 0, 2).reshape(-1, D)[:V]  # back from strided chunks to rows
        de_VD = de_VD.at[targets_N].add(dut_N[:, None] * h_ND.astype(dh_ND.dtype))
        de_VD = de_VD.astype(embed_VD.dtype)
    return dh_ND.astype(h_ND.dtype), de_VD, None


_chunked_logprobs.defvjp(_chunked_fwd, _chunked_bwd, symbolic_zeros=True)
