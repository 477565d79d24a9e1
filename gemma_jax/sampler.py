"""Batched, jitted generation with a KV cache: greedy, temperature, top-k and top-p sampling, log-probs, stop ids.

`generate(params, cfg, prompts, ...)` left-pads the prompts to a length bucket, prefills them in one call
(`model.forward_hidden`), repeats each prompt's cache `num_samples` times (G samples share ONE prefill), then
decodes one token per step with `decode.decode_step` or `decode.decode_step_stacked` (per-layer buffers, ring
buffers for sliding-window layers) inside `lax.while_loop`s that exit as soon as every row has stopped: one loop
per segment of `decode_segment` steps, whose global-layer buffers hold just the slots that segment can reach
(`decode_segments`). Prefill and decode are one jitted function, compiled once per (prompt bucket, batch,
max_new_tokens, sampling mode, stop ids, decode_segment, decode_weights); temperature, top_p and the seed are
traced, so changing them does not recompile.

Decode weights (`decode_weights`; gemma_jax/decode.py): "per_layer" unstacks the layer weights and adapters into
one pytree per layer before the decode loop, a second copy of them while generating (GEMMA2_2B bf16 with rank-32
adapters: 4.2 GB), with gate and up transposed to output-major [F, D] (`decode.decode_layers`); "stacked" reads
each layer out of the stacked arrays inside every step, in a loop over the layers, with no copy (at most one group
of layers' slices at a time: Gemma 2 2 layers, Gemma 3 6). Gemma 4 keeps its layers apart already: "stacked" reads
them in place, and "per_layer" copies only gate and up (transposed). "auto", the default, picks per_layer on a
CPU, where it is measured faster (docs/performance.md, 'Decode weights'), and stacked on an accelerator (TPU,
GPU), where the copy's memory is the certain cost (a quarter of a 16 GB TPU v5e chip for GEMMA2_2B) and the speed
of the two has not been measured. Both give the same tokens (tested, and log-probs within 1e-5: the two compile to
differently fused float32 arithmetic).

Sampling follows Tunix 0.1.7 (`tunix/generate/sampler.py`, `sample_top_p`): logits are divided by the
temperature, then the top_k largest are kept (all of them when top_k is None or 0), then top-p keeps the sorted
tokens whose *preceding* cumulative probability is <= top_p (so the token that crosses top_p stays); the token is
drawn from what is left. Temperature 0 is greedy (argmax of the raw logits; top_k and top_p are ignored).

Randomness: row r (output order) at decode step t uses key fold_in(fold_in(key(seed), r), t). A row's draws
therefore depend only on the seed, its output row index and the step: `num_samples=G` gives the same tokens as
passing each prompt G times in a row, and the prompt bucket does not change the draws.

Log-probs returned for each sampled token (0 at padding):
    logprobs      log_softmax(logits / T)[token]: the temperature-scaled distribution *before* the top-k/top-p
                  filter. This is what Tunix's sampler returns and what GRPO recomputes with
                  `token_logprobs(..., temperature=T)`, so the two agree. Greedy (T = 0) uses T = 1.
    raw_logprobs  log_softmax(logits)[token]: under the model itself (temperature 1).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from gemma_jax import decode
from gemma_jax.config import GemmaConfig
from gemma_jax.model import forward_hidden, init_cache, lora_layer_slice, unembed


@dataclasses.dataclass
class SampleOutput:
    """Generation results as NumPy arrays; row i*G + g is sample g of prompt i (Tunix's order)."""

    tokens: np.ndarray  # [B*G, max_new_tokens] int32, right-padded with pad_id after the stop token
    logprobs: np.ndarray  # [B*G, max_new_tokens] float32, log_softmax(logits / T) at the token; 0 at padding
    raw_logprobs: np.ndarray  # [B*G, max_new_tokens] float32, log_softmax(logits) at the token; 0 at padding
    lengths: np.ndarray  # [B*G] int32, tokens up to and including the stop token
    stopped: np.ndarray  # [B*G] bool, True: ended on a stop id; False: truncated at max_new_tokens
    prompt_tokens: np.ndarray  # [B*G, P] int32, the prompts as fed: left-padded with pad_id to the bucket P
    prompt_mask: np.ndarray  # [B*G, P] bool, True at real prompt tokens


def bucket_length(n: int) -> int:
    """Prompt length bucket: the next power of two (at least 8) up to 128, then the next multiple of 128."""
    if n <= 128:
        return max(8, 1 << (max(n, 1) - 1).bit_length())
    return -(-n // 128) * 128


# ----------------------------------------------------------------------------------------------- sampling
def filter_logits(logits_BV, top_k=None, top_p=None):
    """Tunix's top-k-then-top-p filter in vocabulary order: kept logits unchanged, the rest -inf.

    top_k None or 0 keeps all; top_p None (or >= 1) keeps all. Ties at the k-th value go to the lower token id
    (`lax.top_k`'s order).
    """
    vals_BK, ids_BK = _candidates(logits_BV, top_k, top_p)
    rows_B1 = jnp.arange(logits_BV.shape[0])[:, None]
    return jnp.full(logits_BV.shape, -jnp.inf, logits_BV.dtype).at[rows_B1, ids_BK].set(vals_BK)


def _candidates(x_BV, top_k, top_p):
    """(sorted candidate logits [B,k] with filtered ones at -inf, their token ids [B,k])."""
    k = x_BV.shape[-1] if not top_k else min(int(top_k), x_BV.shape[-1])
    vals_BK, ids_BK = jax.lax.top_k(x_BV, k)
    if top_p is not None:
        probs_BK = jax.nn.softmax(vals_BK, axis=-1)
        # Exclusive cumulative mass: drop a token only when the tokens before it already exceed top_p.
        drop_BK = jnp.cumsum(probs_BK, axis=-1) - probs_BK > top_p
        vals_BK = jnp.where(drop_BK, -jnp.inf, vals_BK)
    return vals_BK, ids_BK


def argmax_first(x_BV):
    """jnp.argmax over the last axis (the first index of the maximum) for finite values, as a max and a min
    reduction: XLA's CPU backend runs these faster than argmax's paired (value, index) reduction
    (measurements: docs/performance.md, 'Greedy argmax')."""
    m_B1 = jnp.max(x_BV, axis=-1, keepdims=True)
    ids_V = jnp.arange(x_BV.shape[-1], dtype=jnp.int32)
    return jnp.min(jnp.where(x_BV == m_B1, ids_V, x_BV.shape[-1]), axis=-1)


def sample_logits(logits_BV, keys_B, temperature, *, top_k=None, top_p=None, greedy=False):
    """One token per row: argmax when greedy, else a draw from the filtered softmax(logits / T) with row keys.

    top_p is traced (a float or scalar array); whether a top-p filter exists at all must be static, so pass
    top_p=None for none. Returns (tokens [B] int32, logprobs [B] under logits / T, raw logprobs [B]).
    """
    logits_BV = logits_BV.astype(jnp.float32)
    if greedy:
        tok_B = argmax_first(logits_BV)
        scaled_BV = logits_BV
    else:
        scaled_BV = logits_BV / temperature
        draw = jax.vmap(jax.random.categorical)
        if not top_k and top_p is None:
            tok_B = draw(keys_B, scaled_BV).astype(jnp.int32)
        else:
            vals_BK, ids_BK = _candidates(scaled_BV, top_k, top_p)
            j_B = draw(keys_B, vals_BK)
            tok_B = jnp.take_along_axis(ids_BK, j_B[:, None], axis=-1)[:, 0].astype(jnp.int32)
    pick = lambda x_BV: jnp.take_along_axis(jax.nn.log_softmax(x_BV, -1), tok_B[:, None], -1)[:, 0]  # noqa: E731
    lp_B = pick(scaled_BV)
    raw_B = lp_B if greedy else pick(logits_BV)
    return tok_B, lp_B, raw_B


# ----------------------------------------------------------------------------------------------- generation
def _repeat_rows(x, G, axis=0):
    """Share one prefill across G samples: row i becomes rows i*G .. i*G+G-1."""
    return jnp.repeat(x, G, axis=axis)


def decode_segments(P: int, N: int, segment: int = 64) -> list[tuple[int, int]]:
    """[(last decode step + 1, cache capacity)] for the decode loop: steps t = 1 .. N-1 feed slot P + t - 1, run
    in segments of `segment` steps; a segment's global-layer buffers hold exactly the slots it can reach, so
    early steps do not attend over (or read) slots that cannot be written yet. Each segment is one compiled loop
    body, so the count stays small: the segment length doubles once there are more than four."""
    bounds, t = [], 1
    while t < N:
        step = segment * (1 << max(0, len(bounds) - 3))
        t = min(N, t + step)
        bounds.append((t, P + t - 1))
    return bounds


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "num_samples", "top_k", "greedy", "use_top_p",
                                             "stop_ids", "pad_id", "decode_segment", "decode_weights"))
def _generate_jit(params, lora, tokens_BP, mask_BP, seed, temperature, top_p, *, cfg, max_new_tokens, num_samples,
                  top_k, greedy, use_top_p, stop_ids, pad_id, decode_segment, decode_weights):
    B, P = tokens_BP.shape
    N, G = max_new_tokens, num_samples
    R = B * G
    # Prefill: the prompts fill a cache of exactly P slots, once per prompt (not per sample).
    h_BPD, cache = forward_hidden(params, tokens_BP, cfg, pad_mask_BT=mask_BP, cache=init_cache(cfg, B, P),
                                  lora=lora)
    logits_RV = _repeat_rows(unembed(params, h_BPD[:, -1:], cfg)[:, 0], G)  # left padding: last column is real
    axis = 0 if cfg.layer_list else 1  # Gemma 4: a tuple of per-layer [B,S,K,H] (None for KV-shared layers)
    cache = {k: jax.tree.map(lambda x: _repeat_rows(x, G, axis=axis), cache[k]) for k in ("k", "v")}
    offset_R = _repeat_rows(P - jnp.sum(mask_BP, axis=1, dtype=jnp.int32), G)
    row_keys = jax.vmap(jax.random.fold_in, (None, 0))(jax.random.key(seed), jnp.arange(R))
    stop_S = jnp.asarray(stop_ids, jnp.int32)
    L = cfg.num_layers
    if decode_weights == "stacked" and not cfg.layer_list:  # read in place by decode_step_stacked
        layers, lora_layers = params["layers"], None if lora is None else lora.layers
        step, from_prefill, grow = decode.decode_step_stacked, decode.stacked_from_prefill, decode.grow_stacked
    else:
        step, from_prefill, grow = decode.decode_step, decode.from_prefill, decode.grow
        layers = tuple(params["layers"]) if cfg.layer_list else decode.unstack_layers(params["layers"], L)
        if decode_weights == "per_layer":
            layers = decode.decode_layers(layers)
        if lora is not None and cfg.layer_list:  # Gemma 4's adapters are already per layer (None: no adapter)
            lora_layers = tuple(lora_layer_slice(lora.layers, i) for i in range(L))
        else:
            lora_layers = decode.unstack_layers(None if lora is None else lora.layers, L)
    lora_scale = 0.0 if lora is None else lora.scale

    def sample_step(t, logits_RV, state):
        keys_R = jax.vmap(jax.random.fold_in, (0, None))(row_keys, t)
        tok_R, lp_R, raw_R = sample_logits(logits_RV, keys_R, temperature, top_k=top_k,
                                           top_p=top_p if use_top_p else None, greedy=greedy)
        live_R = ~state["done"]
        put = lambda buf, x, fill: jax.lax.dynamic_update_index_in_dim(buf, jnp.where(live_R, x, fill), t, 1)  # noqa
        return {**state, "t": t + 1,
                "tokens": put(state["tokens"], tok_R, pad_id),
                "lp": put(state["lp"], lp_R, 0.0), "raw": put(state["raw"], raw_R, 0.0),
                "length": state["length"] + live_R.astype(jnp.int32),
                "done": state["done"] | (live_R & jnp.isin(tok_R, stop_S))}

    def body(state):
        t = state["t"]
        prev_R = jax.lax.dynamic_index_in_dim(state["tokens"], t - 1, 1, keepdims=False)
        logits_RV, buffers = step(params, layers, lora_layers, lora_scale, prev_R, P + t - 1, offset_R,
                                  state["buffers"], cfg)
        return sample_step(t, logits_RV, {**state, "buffers": buffers})

    state = {"t": jnp.int32(0), "tokens": jnp.full((R, N), pad_id, jnp.int32),
             "lp": jnp.zeros((R, N), jnp.float32), "raw": jnp.zeros((R, N), jnp.float32),
             "length": jnp.zeros((R,), jnp.int32), "done": jnp.zeros((R,), bool), "buffers": ()}
    state = sample_step(jnp.int32(0), logits_RV, state)
    segments = decode_segments(P, N, decode_segment)
    for i, (t_end, capacity) in enumerate(segments):
        buffers = from_prefill(cache, cfg, capacity) if i == 0 else grow(state["buffers"], cfg, capacity)
        cond = lambda s, t_end=t_end: (s["t"] < t_end) & ~jnp.all(s["done"])  # noqa: E731
        state = jax.lax.while_loop(cond, body, {**state, "buffers": buffers})
    return state["tokens"], state["lp"], state["raw"], state["length"], state["done"]


def pad_prompts(prompts, *, pad_id=0, vocab_size=None, prompt_mask=None, bucket=None):
    """Left-pad prompts (a list of token lists, or an int array [B,T] with a bool mask) to a length bucket.

    With an array, the real tokens of each row are those where `prompt_mask` is True (default: != pad_id),
    in order. Returns (tokens [B,P] int32, mask [B,P] bool).
    """
    if prompt_mask is not None or isinstance(prompts, np.ndarray) or hasattr(prompts, "shape"):
        arr = np.asarray(prompts)
        if arr.ndim != 2:
            raise ValueError(f"prompts array must be [batch, length], got shape {arr.shape}")
        mask = arr != pad_id if prompt_mask is None else np.asarray(prompt_mask, bool)
        if mask.shape != arr.shape:
            raise ValueError(f"prompt_mask shape {mask.shape} != prompts shape {arr.shape}")
        prompts = [row[m].tolist() for row, m in zip(arr, mask)]
    if len(prompts) == 0:
        raise ValueError("prompts: need at least one prompt")
    rows = []
    for i, p in enumerate(prompts):
        p = np.asarray(p)
        if p.ndim != 1 or p.size == 0:
            raise ValueError(f"prompts[{i}]: expected a non-empty list of token ids, got shape {p.shape}")
        if not np.issubdtype(p.dtype, np.integer):
            raise ValueError(f"prompts[{i}]: token ids must be integers, got dtype {p.dtype}")
        if vocab_size is not None and (p.min() < 0 or p.max() >= vocab_size):
            raise ValueError(f"prompts[{i}]: token ids must be in [0, {vocab_size}), got {p.min()}..{p.max()}")
        rows.append(p.astype(np.int32))
    longest = max(len(r) for r in rows)
    P = bucket_length(longest) if bucket is None else int(bucket)
    if P < longest:
        raise ValueError(f"prompt_bucket {P} is shorter than the longest prompt ({longest} tokens)")
    tokens = np.full((len(rows), P), pad_id, np.int32)
    mask = np.zeros((len(rows), P), bool)
    for i, r in enumerate(rows):
        tokens[i, P - len(r):] = r
        mask[i, P - len(r):] = True
    return tokens, mask


DECODE_WEIGHTS = ("auto", "per_layer", "stacked")


def resolve_decode_weights(decode_weights: str, cfg: GemmaConfig, params) -> str:
    """"per_layer" or "stacked": `decode_weights` itself, or for "auto" the default (module docstring): per_layer
    on a CPU (the platform of the params' devices), else stacked."""
    if decode_weights not in DECODE_WEIGHTS:
        raise ValueError(f"decode_weights must be one of {DECODE_WEIGHTS}, got {decode_weights!r}")
    if decode_weights != "auto":
        return decode_weights
    devices = getattr(params["embed"], "devices", None)
    platform = next(iter(devices())).platform if devices else jax.default_backend()
    return "per_layer" if platform == "cpu" else "stacked"


def _check_options(max_new_tokens, temperature, top_k, top_p, num_samples, stop_ids, decode_segment):
    if int(max_new_tokens) < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and int(top_k) < 0:
        raise ValueError(f"top_k must be None, 0 (no filter) or positive, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if int(decode_segment) < 1:
        raise ValueError(f"decode_segment must be >= 1, got {decode_segment}")
    if int(num_samples) < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if any(int(s) != s for s in stop_ids):
        raise ValueError(f"stop_ids must be integers, got {stop_ids}")


def generate(params, cfg: GemmaConfig, prompts, *, max_new_tokens: int, temperature: float = 1.0, top_k=None,
             top_p=None, stop_ids=(1,), seed: int = 0, num_samples: int = 1, lora=None, pad_id: int = 0,
             prompt_mask=None, prompt_bucket=None, decode_segment: int = 64,
             decode_weights: str = "auto") -> SampleOutput:
    """Generate up to `max_new_tokens` tokens after each prompt, `num_samples` samples per prompt.

    prompts: a list of token-id lists, or an int array [B,T] (real tokens where `prompt_mask`, default != pad_id).
    temperature 0 is greedy. top_k / top_p as in Tunix (see the module docstring); None disables each.
    stop_ids: a row ends after emitting any of them (the stop token is kept and counted in `lengths`); later
        positions are pad_id with log-prob 0.
    prompt_bucket: pad prompts to exactly this length (default: `bucket_length` of the longest prompt).
    decode_segment: decode steps per segment (see `decode_segments`): smaller reads fewer unwritten cache slots
        in the global layers but compiles more loop bodies.
    decode_weights: "per_layer" (a second copy of the layer weights while decoding; Gemma 4: of gate and up),
        "stacked" (no copy) or "auto": per_layer on a CPU, where it is faster, stacked on a TPU or GPU (module
        docstring). The same tokens either way, log-probs within 1e-5.
    Returns a SampleOutput whose rows i*G .. i*G+G-1 belong to prompt i.
    """
    stop_ids = tuple(int(s) for s in ([stop_ids] if np.isscalar(stop_ids) else stop_ids))
    _check_options(max_new_tokens, temperature, top_k, top_p, num_samples, stop_ids, decode_segment)
    decode_weights = resolve_decode_weights(decode_weights, cfg, params)
    tokens_BP, mask_BP = pad_prompts(prompts, pad_id=pad_id, vocab_size=cfg.vocab_size, prompt_mask=prompt_mask,
                                     bucket=prompt_bucket)
    greedy = float(temperature) == 0.0
    use_top_p = not greedy and top_p is not None and top_p < 1.0
    out = _generate_jit(params, lora, jnp.asarray(tokens_BP), jnp.asarray(mask_BP), jnp.uint32(seed),
                        jnp.float32(1.0 if greedy else temperature), jnp.float32(top_p if use_top_p else 1.0),
                        cfg=cfg, max_new_tokens=int(max_new_tokens), num_samples=int(num_samples),
                        top_k=None if greedy or not top_k else int(top_k), greedy=greedy, use_top_p=use_top_p,
                        stop_ids=stop_ids, pad_id=int(pad_id), decode_segment=int(decode_segment),
                        decode_weights=decode_weights)
    tokens, lp, raw, lengths, stopped = jax.device_get(out)
    G = int(num_samples)
    return SampleOutput(tokens=tokens, logprobs=lp, raw_logprobs=raw, lengths=lengths, stopped=stopped,
                        prompt_tokens=np.repeat(tokens_BP, G, axis=0), prompt_mask=np.repeat(mask_BP, G, axis=0))
