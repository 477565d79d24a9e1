"""One-token decoding over per-layer KV buffers: the inner step of gemma_jax.sampler's decode loop.

`model.forward(..., cache=...)` handles any number of new tokens against a stacked [L,B,S,K,H] cache under the
layer scan; that is what the prefill uses. Decoding one token per step inside a `while_loop` is different work,
and on XLA's CPU backend that general path spent most of its time copying: the scan copied each layer's weights
and each layer's cache slice out of the stacked arrays every step, and the one-query attention read every slot of
the cache in every layer (measurements: docs/performance.md, 'Sampler decode step'). Here instead:

- The weights are unstacked into one pytree per layer once, before the loop (`unstack_layers`), and the layers
  are unrolled: a step reads each weight in place. This holds a second copy of the layer weights while
  generating (the stacked ones stay alive for the caller).
- Each layer has its own key buffer [B,K,H,C] and value buffer [B,K,C,H]: the layouts in which the one-query
  scores (q [G,H] @ k [H,C]) and the weighted sum of values (p [G,C] @ v [C,H]) are plain batched matrix products
  with no transposed operand (keys stored [B,K,C,H] made the scores about 2x slower). A step writes the new
  token's key and value into the buffers first and then attends over them: the write is in place, because the old
  buffer has no other reader.
- A local (sliding-window) layer only ever needs the last W slots, so when the cache would be longer than W its
  buffer is a ring of W slots: Gemma 2 alternates local and global layers, so half the layers read W slots
  instead of the whole cache (Gemma 3: five layers in six, from `cfg.is_local_layer`). Each layer applies its
  own RoPE base/scaling and, for Gemma 3, QK-norm, through model._qkv. Global layers read a buffer of the
  current capacity, which the sampler grows in segments (`grow`) so that early steps do not read slots that
  cannot be filled yet.

Slots and positions: the sampler left-pads every prompt to the same length P, so slot i of row r holds the token
at position i - offset[r], where offset[r] is the row's number of padding slots; slot i is real iff
i >= offset[r]. Slot i of the sequence lives in buffer column i mod C (C = the buffer length; for a linear buffer
C exceeds every slot written, so the column is the slot). At step `index` (the slot being written), column j of a
buffer holds slot index - ((index - j) mod C): the most recent slot with that column. It is attended iff it is a
real slot (>= offset[r]; columns never written come out negative). The window needs no separate test: a ring
holds only slots within W of the query, and a linear buffer is used for a local layer only when C <= W.
"""

import jax
import jax.numpy as jnp
import numpy as np

from gemma_jax.config import GemmaConfig
from gemma_jax.model import (
    MASK_VALUE,
    _block,
    _project,
    _qkv,
    embed,
    layer_kinds,
    per_layer_inputs,
    rms_norm,
    softcap,
    unembed,
)


def unstack_layers(tree, num_layers):
    """A pytree with a leading layer axis on every leaf -> a tuple of per-layer pytrees (None stays None)."""
    if tree is None:
        return (None,) * num_layers
    return tuple(jax.tree.map(lambda a, i=i: a[i], tree) for i in range(num_layers))


def buffer_lengths(cfg: GemmaConfig, capacity: int) -> tuple[int, ...]:
    """Per layer, the buffer length C: `capacity` for global layers, min(capacity, W) for local layers."""
    W = cfg.sliding_window
    return tuple(min(capacity, W) if local and W is not None else capacity for local in cfg.is_local_layer)


def from_prefill(cache, cfg: GemmaConfig, capacity: int):
    """Per-layer buffers from a prefilled `model.init_cache` cache whose P slots are all written (index == P).

    Returns a tuple over layers of (k [B,K,H,C], v [B,K,C,H]) with C from `buffer_lengths(cfg, capacity)`:
    column j holds slot (P-1) - ((P-1-j) mod C) when that is >= 0 (a ring keeps the last C slots), else zeros.
    """
    P = next(k for k in cache["k"] if k is not None).shape[1]  # [L,B,S,K,H] stacked, or per layer [B,S,K,H]
    out = []
    for layer, C in enumerate(buffer_lengths(cfg, capacity)):
        if cache["k"][layer] is None:  # Gemma 4 KV-shared layer: it reads its source layer's buffers
            out.append(None)
            continue
        slot_C = (P - 1) - np.mod(P - 1 - np.arange(C), C)
        gather = lambda x_BSKH: jnp.where((slot_C >= 0)[None, :, None, None],  # noqa: E731
                                          x_BSKH[:, np.maximum(slot_C, 0)], 0)
        out.append((jnp.transpose(gather(cache["k"][layer]), (0, 2, 3, 1)),
                    jnp.transpose(gather(cache["v"][layer]), (0, 2, 1, 3))))
    return tuple(out)


def grow(buffers, cfg: GemmaConfig, capacity: int):
    """Lengthen the linear buffers to `capacity` slots (zeros after the written ones); rings stay as they are."""
    out = []
    for kv, C in zip(buffers, buffer_lengths(cfg, capacity)):
        if kv is None:
            out.append(None)
            continue
        k, v = kv
        grow_by = C - v.shape[2]
        out.append((jnp.pad(k, ((0, 0), (0, 0), (0, 0), (0, grow_by))),
                    jnp.pad(v, ((0, 0), (0, 0), (0, grow_by), (0, 0)))) if grow_by > 0 else (k, v))
    return tuple(out)


def _attend_one(cfg, x_B1D, w, lora_layer, scale, pos_B1, is_local, k_BKHC, v_BKCH, col, real_BC, shared=False):
    """One layer's attention for one new token per row: write its key/value at column `col`, then attend over the
    buffer's real columns. is_local (a Python bool) picks the layer's RoPE. Returns (output [B,1,D], (k, v)).
    shared (a Gemma 4 KV-shared layer): the buffers are its source layer's, already written this step; only the
    queries are computed here."""
    B = x_B1D.shape[0]
    if shared:
        K, H = k_BKHC.shape[1:3]
        placeholder = jnp.zeros((B, 1, K, H), x_B1D.dtype)  # gives _qkv the kv heads to group queries by
        q_B1KGH, _, _ = _qkv(cfg, x_B1D, w, lora_layer, scale, pos_B1, is_local, (placeholder, placeholder))
    else:
        q_B1KGH, k_B1KH, v_B1KH = _qkv(cfg, x_B1D, w, lora_layer, scale, pos_B1, is_local)
        k_BKHC = jax.lax.dynamic_update_slice(k_BKHC, jnp.transpose(k_B1KH, (0, 2, 3, 1)).astype(k_BKHC.dtype),
                                              (0, 0, 0, col))
        v_BKCH = jax.lax.dynamic_update_slice(v_BKCH, jnp.transpose(v_B1KH, (0, 2, 1, 3)).astype(v_BKCH.dtype),
                                              (0, 0, col, 0))
    q_BKGH = q_B1KGH[:, 0].astype(k_BKHC.dtype)
    s_BKGC = jnp.einsum("BKGH,BKHC->BKGC", q_BKGH, k_BKHC, preferred_element_type=jnp.float32)
    s_BKGC = softcap(s_BKGC, cfg.attn_logit_softcap)  # before masking, as in model._attention
    s_BKGC = jnp.where(real_BC[:, None, None, :], s_BKGC, MASK_VALUE)
    p_BKGC = jax.nn.softmax(s_BKGC, axis=-1).astype(v_BKCH.dtype)
    o_BKGH = jnp.einsum("BKGC,BKCH->BKGH", p_BKGC, v_BKCH)
    o_B1NH = o_BKGH.reshape(B, 1, cfg.num_heads, q_BKGH.shape[-1]).astype(x_B1D.dtype)
    return _project("o", "BTNH,NHD->BTD", o_B1NH, w["o"], lora_layer, scale), (k_BKHC, v_BKCH)


def decode_step(params, layers, lora_layers, lora_scale, tok_B, index, offset_B, buffers, cfg: GemmaConfig):
    """Feed one token per row at slot `index`; return (logits [B,V] float32, updated buffers).

    layers / lora_layers: from `unstack_layers` (lora_layers a tuple of None without adapters); params supplies the
    embedding and the final norm. offset_B: each row's count of left-padding slots (its position = slot - offset).
    """
    pos_B1 = (index - offset_B)[:, None].astype(jnp.int32)
    x_B1D = embed(params, tok_B[:, None], cfg)
    ple_B1LP = per_layer_inputs(params, tok_B[:, None], x_B1D, cfg) if cfg.per_layer_input_dim else None
    sources = [k.kv_source for k in layer_kinds(cfg)] if cfg.layer_list else [-1] * cfg.num_layers
    real = {}  # buffer length -> [B,C] mask of the columns holding real slots (at most two distinct lengths)
    new_buffers = []
    for i, (w, lora_layer, is_local, kv) in enumerate(zip(layers, lora_layers, cfg.is_local_layer, buffers)):
        shared = sources[i] >= 0
        k_BKHC, v_BKCH = new_buffers[sources[i]] if shared else kv
        C = v_BKCH.shape[2]
        if C not in real:
            slot_C = index - jnp.mod(index - jnp.arange(C), C)
            real[C] = slot_C[None, :] >= offset_B[:, None]
        col = jnp.mod(index, C)

        def attend(h, w=w, lora_layer=lora_layer, is_local=is_local, k=k_BKHC, v=v_BKCH, C=C, col=col,
                   shared=shared):
            return _attend_one(cfg, h, w, lora_layer, lora_scale, pos_B1, is_local, k, v, col, real[C], shared)

        x_B1D, kv = _block(cfg, x_B1D, w, lora_layer, lora_scale, attend,
                           None if ple_B1LP is None else ple_B1LP[:, :, i])
        new_buffers.append(kv)
    # KV-shared layers hand back None: their source's buffers are the ones carried to the next step.
    new_buffers = [None if s >= 0 else kv for s, kv in zip(sources, new_buffers)]
    h_B1D = rms_norm(x_B1D, params["final_norm"], cfg.norm_eps, cfg.norm_plus_one)
    logits_B1V = unembed(params, h_B1D, cfg)
    return logits_B1V[:, 0], tuple(new_buffers)
