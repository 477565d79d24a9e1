"""One-token decoding over per-layer KV buffers: the inner step of gemma_jax.sampler's decode loop.

`model.forward(..., cache=...)` handles any number of new tokens against a stacked [L,B,S,K,H] cache under the
layer scan; that is what the prefill uses. Decoding one token per step inside a `while_loop` is different work,
and on XLA's CPU backend that general path spent most of its time copying: the scan copied each layer's weights
and each layer's cache slice out of the stacked arrays every step, and the one-query attention read every slot of
the cache in every layer (measurements: docs/performance.md, 'Sampler decode step'). Here instead:

- Weights, two ways (the sampler's `decode_weights`). Per layer (`decode_step`): they are unstacked into one
  pytree per layer once, before the loop (`unstack_layers`), and the layers are unrolled: a step reads each
  weight in place. This holds a second copy of the layer weights while generating (the stacked ones stay alive
  for the caller; GEMMA2_2B bf16 with rank-32 adapters: 4.2 GB). Stacked (`decode_step_stacked`): no copy; a
  `fori_loop` per run of repeated layer groups (`layer_groups`: Gemma 2 repeats (local, global), Gemma 3 five
  local and one global, then what is left) slices layer i out of the stacked [L, ...] arrays with the loop
  counter. A backend that cannot read a slice in place copies it; XLA's CPU backend does, and schedules all the
  slices of one loop body first, so one group's layers (Gemma 2: 2, Gemma 3: 6) are alive together, not all L.
  Slicing in the unrolled step instead does not work: the same scheduling made that all L layers, the copy
  again, with or without an optimization_barrier chaining each layer's slices to the previous layer's output
  (measurements: docs/performance.md, 'Decode weights'). The per-layer copy holds gate and up output-major
  ([F, D], `decode_layers`): XLA's CPU matmul runs the few-row products faster that way. Gemma 4 lists its layers
  (one pytree per layer already): `decode_step` reads them in place, with only gate and up copied (transposed)
  for decode_weights="per_layer" and nothing copied for "stacked".
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
    rope_tables,
    softcap,
    unembed,
)


def unstack_layers(tree, num_layers):
    """A pytree with a leading layer axis on every leaf -> a tuple of per-layer pytrees (None stays None)."""
    if tree is None:
        return (None,) * num_layers
    return tuple(jax.tree.map(lambda a, i=i: a[i], tree) for i in range(num_layers))


def decode_layers(layers):
    """The per-layer weights as `decode_step` reads them with decode_weights="per_layer": each layer's gate and up
    transposed to output-major [F, D] ("gate_FD", "up_FD"; model._mlp reads either form), the rest as given.
    For a few rows per step, XLA's CPU matmul reads a [D, F] weight more slowly than its [F, D] transpose: one
    [32, 512] x [512, 4096] product 1.04 ms against 0.70 ms, and MID_GEMMA4's B 32 decode step 35.9 -> 31.4 ms
    (docs/performance.md, 'Gate and up output-major in the decode loop'). The transposes are copies: free for
    Gemma 1-3, whose per-layer weights are copies already, and the gate and up weights once more for Gemma 4."""
    return tuple({**{k: v for k, v in w.items() if k not in ("gate", "up")},
                  "gate_FD": jnp.swapaxes(w["gate"], -1, -2), "up_FD": jnp.swapaxes(w["up"], -1, -2)}
                 for w in layers)


def buffer_lengths(cfg: GemmaConfig, capacity: int) -> tuple[int, ...]:
    """Per layer, the buffer length C: `capacity` for global layers, min(capacity, W) for local layers."""
    W = cfg.sliding_window
    return tuple(min(capacity, W) if local and W is not None else capacity for local in cfg.is_local_layer)


def layer_groups(cfg: GemmaConfig) -> tuple[tuple[int, int, int], ...]:
    """The layers as runs of one repeated group of kinds (local / global): ((first layer, group length p, repeats
    n), ...). Each run takes the shortest p whose repetition matches the remaining kinds (a partial last group
    allowed), n whole groups of it; the rest starts the next run. GEMMA2_2B: ((0, 2, 13),); GEMMA3_1B:
    ((0, 6, 4), (24, 1, 2)); Gemma 1: ((0, 1, L),)."""
    if cfg.layer_list:
        raise ValueError("the stacked decode path needs stacked layers; Gemma 4 (cfg.layer_list) keeps one pytree "
                         "per layer, which decode_step reads in place")
    kinds, out, start = cfg.is_local_layer, [], 0
    while start < len(kinds):
        rest = kinds[start:]
        p = next(p for p in range(1, len(rest) + 1) if all(rest[i] == rest[i % p] for i in range(len(rest))))
        out.append((start, p, len(rest) // p))
        start += p * (len(rest) // p)
    return tuple(out)


def _from_slots(x_SKH, C: int, P: int):
    """Buffers of C columns from a prefilled [..., S=P, K, H] cache whose P slots are all written: (k [..., K, H, C],
    v [..., K, C, H]) whose column j holds slot (P-1) - ((P-1-j) mod C) when that is >= 0 (a ring keeps the last C
    slots), else zeros. Called with the k and the v cache in turn; returns the layout for the one it was given."""
    slot_C = (P - 1) - np.mod(P - 1 - np.arange(C), C)
    return jnp.where((slot_C >= 0)[:, None, None], jnp.take(x_SKH, np.maximum(slot_C, 0), axis=-3), 0)


def _kv_from_prefill(k_SKH, v_SKH, C: int, P: int):
    return jnp.moveaxis(_from_slots(k_SKH, C, P), -3, -1), jnp.swapaxes(_from_slots(v_SKH, C, P), -3, -2)


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
        out.append(_kv_from_prefill(cache["k"][layer], cache["v"][layer], C, P))
    return tuple(out)


def stacked_from_prefill(cache, cfg: GemmaConfig, capacity: int):
    """`from_prefill` for `decode_step_stacked`: per run (start, p, n) of `layer_groups`, per position j in the group,
    the buffers of layers start + j, start + j + p, ... stacked: (k [n,B,K,H,C], v [n,B,K,C,H])."""
    P, C_L = cache["k"].shape[2], buffer_lengths(cfg, capacity)
    return tuple(tuple(_kv_from_prefill(cache["k"][s + j: s + n * p: p], cache["v"][s + j: s + n * p: p], C_L[s + j],
                                        P) for j in range(p)) for s, p, n in layer_groups(cfg))


def _grow_to(kv, C: int):
    """Buffers (k [..., H, C'], v [..., C', H]) lengthened to C columns with zeros (unchanged when C' >= C)."""
    k, v = kv
    by = C - v.shape[-2]
    if by <= 0:
        return kv
    return (jnp.pad(k, [(0, 0)] * (k.ndim - 1) + [(0, by)]), jnp.pad(v, [(0, 0)] * (v.ndim - 2) + [(0, by), (0, 0)]))


def grow(buffers, cfg: GemmaConfig, capacity: int):
    """Lengthen the linear buffers to `capacity` slots (zeros after the written ones); rings stay as they are."""
    return tuple(None if kv is None else _grow_to(kv, C) for kv, C in zip(buffers, buffer_lengths(cfg, capacity)))


def grow_stacked(buffers, cfg: GemmaConfig, capacity: int):
    """`grow` for the buffers of `stacked_from_prefill`."""
    C_L = buffer_lengths(cfg, capacity)
    return tuple(tuple(_grow_to(kv, C_L[s + j]) for j, kv in enumerate(group))
                 for (s, _, _), group in zip(layer_groups(cfg), buffers))


def _attend_one(cfg, x_B1D, w, lora_layer, scale, sin_cos, k_BKHC, v_BKCH, col, real_BC, shared=False,
                group=None):
    """One layer's attention for one new token per row: write its key/value at column `col`, then attend over the
    buffer's real columns. sin_cos: the layer's RoPE tables. Returns (output [B,1,D], (k, v)).
    shared (a Gemma 4 KV-shared layer): the buffers are its source layer's, already written this step; only the
    queries are computed here. group (decode_step_stacked): k and v are stacks [n,B,K,H,C], [n,B,K,C,H] of which
    this layer's buffers are entry `group`; the new column is written into the stacks, which are returned."""
    B = x_B1D.shape[0]
    if shared:
        K, H = k_BKHC.shape[1:3]
        placeholder = jnp.zeros((B, 1, K, H), x_B1D.dtype)  # gives _qkv the kv heads to group queries by
        q_B1KGH, _, _ = _qkv(cfg, x_B1D, w, lora_layer, scale, sin_cos, (placeholder, placeholder))
    else:
        q_B1KGH, k_B1KH, v_B1KH = _qkv(cfg, x_B1D, w, lora_layer, scale, sin_cos)
        lead, at = ((), ()) if group is None else ((None,), (group,))  # a leading axis of 1, written at `group`
        k_BKHC = jax.lax.dynamic_update_slice(
            k_BKHC, jnp.transpose(k_B1KH, (0, 2, 3, 1))[lead].astype(k_BKHC.dtype), at + (0, 0, 0, col))
        v_BKCH = jax.lax.dynamic_update_slice(
            v_BKCH, jnp.transpose(v_B1KH, (0, 2, 1, 3))[lead].astype(v_BKCH.dtype), at + (0, 0, col, 0))
    kv = (k_BKHC, v_BKCH)
    if group is not None:
        k_BKHC, v_BKCH = (jax.lax.dynamic_index_in_dim(x, group, 0, keepdims=False) for x in kv)
    q_BKGH = q_B1KGH[:, 0].astype(k_BKHC.dtype)
    s_BKGC = jnp.einsum("BKGH,BKHC->BKGC", q_BKGH, k_BKHC, preferred_element_type=jnp.float32)
    s_BKGC = softcap(s_BKGC, cfg.attn_logit_softcap)  # before masking, as in model._attention
    s_BKGC = jnp.where(real_BC[:, None, None, :], s_BKGC, MASK_VALUE)
    p_BKGC = jax.nn.softmax(s_BKGC, axis=-1).astype(v_BKCH.dtype)
    o_BKGH = jnp.einsum("BKGC,BKCH->BKGH", p_BKGC, v_BKCH)
    o_B1NH = o_BKGH.reshape(B, 1, cfg.num_heads, q_BKGH.shape[-1]).astype(x_B1D.dtype)
    return _project("o", "BTNH,NHD->BTD", o_B1NH, w["o"], lora_layer, scale), kv


def _real_columns(index, offset_B, lengths):
    """{C: [B,C] mask of the columns of a C-column buffer that hold real slots at step `index`} (module docstring)."""
    real = {}
    for C in lengths:
        slot_C = index - jnp.mod(index - jnp.arange(C), C)
        real[C] = slot_C[None, :] >= offset_B[:, None]
    return real


def decode_step(params, layers, lora_layers, lora_scale, tok_B, index, offset_B, buffers, cfg: GemmaConfig):
    """Feed one token per row at slot `index`; return (logits [B,V] float32, updated buffers).

    layers / lora_layers: from `unstack_layers` (lora_layers a tuple of None without adapters); params supplies the
    embedding and the final norm. offset_B: each row's count of left-padding slots (its position = slot - offset).
    """
    ropes = rope_tables(cfg, (index - offset_B)[:, None])
    x_B1D = embed(params, tok_B[:, None], cfg)
    ple_B1LP = per_layer_inputs(params, tok_B[:, None], x_B1D, cfg) if cfg.per_layer_input_dim else None
    sources = [k.kv_source for k in layer_kinds(cfg)] if cfg.layer_list else [-1] * cfg.num_layers
    real = _real_columns(index, offset_B, {kv[1].shape[2] for kv in buffers if kv is not None})
    new_buffers = []
    for i, (w, lora_layer, is_local, kv) in enumerate(zip(layers, lora_layers, cfg.is_local_layer, buffers)):
        shared = sources[i] >= 0
        k_BKHC, v_BKCH = new_buffers[sources[i]] if shared else kv
        C = v_BKCH.shape[2]
        col = jnp.mod(index, C)

        def attend(h, w=w, lora_layer=lora_layer, is_local=is_local, k=k_BKHC, v=v_BKCH, C=C, col=col,
                   shared=shared):
            return _attend_one(cfg, h, w, lora_layer, lora_scale, ropes[is_local], k, v, col, real[C], shared)

        x_B1D, kv = _block(cfg, x_B1D, w, lora_layer, lora_scale, attend,
                           None if ple_B1LP is None else ple_B1LP[:, :, i])
        new_buffers.append(kv)
    # KV-shared layers hand back None: their source's buffers are the ones carried to the next step.
    new_buffers = [None if s >= 0 else kv for s, kv in zip(sources, new_buffers)]
    h_B1D = rms_norm(x_B1D, params["final_norm"], cfg.norm_eps, cfg.norm_plus_one)
    logits_B1V = unembed(params, h_B1D, cfg)
    return logits_B1V[:, 0], tuple(new_buffers)


def decode_step_stacked(params, layers, lora_layers, lora_scale, tok_B, index, offset_B, buffers, cfg: GemmaConfig):
    """`decode_step` over the stacked weights, with no per-layer copy (module docstring); Gemma 1-3 only.

    layers / lora_layers: params["layers"] and lora.layers (or None) as they are, [L, ...] on every leaf. buffers:
    from `stacked_from_prefill` / `grow_stacked`. Each run (start, p, n) of `layer_groups` is one fori_loop over its
    n groups; its body runs the p layers of group g, reading layer start + g*p + j of every stacked array.
    """
    ropes = rope_tables(cfg, (index - offset_B)[:, None])
    x_B1D = embed(params, tok_B[:, None], cfg)
    real = _real_columns(index, offset_B, {kv[1].shape[-2] for group in buffers for kv in group})
    at = lambda tree, i: jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, 0, keepdims=False), tree)  # noqa

    def run_groups(g, carry, start, p):
        x_B1D, group_buffers = carry
        new = []
        for j, (k_n, v_n) in enumerate(group_buffers):
            i = start + g * p + j
            w, lora_layer = at(layers, i), None if lora_layers is None else at(lora_layers, i)
            C = v_n.shape[-2]

            def attend(h, w=w, lora_layer=lora_layer, is_local=cfg.is_local_layer[start + j], k=k_n, v=v_n, C=C):
                return _attend_one(cfg, h, w, lora_layer, lora_scale, ropes[is_local], k, v, jnp.mod(index, C),
                                   real[C], group=g)

            x_B1D, kv = _block(cfg, x_B1D, w, lora_layer, lora_scale, attend)
            new.append(kv)
        return x_B1D, tuple(new)

    new_buffers = []
    for (start, p, n), group_buffers in zip(layer_groups(cfg), buffers):
        body = lambda g, carry, start=start, p=p: run_groups(g, carry, start, p)  # noqa: E731
        x_B1D, group_buffers = jax.lax.fori_loop(0, n, body, (x_B1D, group_buffers))
        new_buffers.append(group_buffers)
    h_B1D = rms_norm(x_B1D, params["final_norm"], cfg.norm_eps, cfg.norm_plus_one)
    return unembed(params, h_B1D, cfg)[:, 0], tuple(new_buffers)
