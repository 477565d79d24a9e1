"""Per-device memory estimate of LoRA training and sampling, and a table to print it.

`estimate_bytes` counts, for one device of a ("data", "fsdp", "tp") mesh laid out by gemma_jax/sharding.py's
rules (with its divisibility fallback, so the sharded sizes are exact):
    base_params   every weight of gemma_jax.model.param_specs in `param_dtype` (frozen: no grads, no moments)
    lora_params   A and B of each adapter (gemma_jax.model.lora_specs) in `lora_dtype`
    grads         one gradient per LoRA parameter, same dtype
    optimizer     AdamW: float32 first and second moments per LoRA parameter + an int32 step count; SGD: 0
    activations   what the backward pass of a LoRA step keeps alive at its peak (below)
    kv_cache      gemma_jax.model.init_cache(cfg, cache_batch, cache_len): k and v [L,B,S,K,H] + pos, valid, index
                  (the sampler's per-layer decode buffers hold at most this: local layers keep only the window)
    decode_weights  with decode_weights="per_layer": the per-layer copy of the layer weights and adapters that
                  the sampler's decode loop reads (gemma_jax.decode.unstack_layers), alive while sampling next to
                  the stacked originals; "stacked": the slices of one group of p layers (decode.layer_groups:
                  Gemma 2 p = 2, Gemma 3 p = 6 of the L layers), which a backend that copies a slice before a
                  matmul (XLA's CPU backend does) may hold together; Gemma 4 (listed layers, read in place):
                  "per_layer" its gate and up weights (the decode loop's transposed copies), "stacked" 0
All but the activations are exact sums of array sizes; activations are a model of what XLA keeps, checked
against `compiled.memory_analysis().temp_size_in_bytes` in tests/test_memory.py (within the factor stated there).

Activations, with b = batch / (data * fsdp) rows per device and heads, kv heads, mlp and vocab split by tp.
Per layer, the tensors the backward pass of a LoRA step reads (the base weights are frozen, so the input of a
plain matmul is not needed, only the inputs of LoRA's A, of the nonlinearities and of the attention products):
    [b,T,D]   x 4 or 6 in float32: the block input, the input of each RMSNorm (2 or 4), the attention output
    [b,T,D]   x 2 in the param dtype: the two normed inputs that feed the LoRA A matrices (q/kv, gate/up)
    [b,T,F]   x 7: gate, up, gelu(gate), the product, gelu-tanh's intermediates; + 1 with a "down" adapter
    [b,T,N+2K,H]: q and k after RoPE and v (the score and value products)
    [b,N,T,T] x 4 in float32 + a bool mask: raw scores, tanh (softcap), masked scores, softmax
    [b,T,R]   per adapter: x A (for B's gradient)
Without remat all L layers keep theirs; with per-layer remat only each layer's input [b,T,D] is kept and one
layer's set is rebuilt (plus as much again in gradient temporaries) during its backward. The head adds the
logits: [b,T,V] float32 x 2 (the softcapped logits and their gradient: the log-prob is taken as logit - logsumexp,
no log-softmax kept); at V = 256k that is the biggest single term (2 x 2048 tokens on one device: 8.4 GB). With
fsdp > 1 the unembedding also gathers the device's vocabulary rows of the embedding at full width, [V/tp, D].
With vocabulary chunks (cfg.logits_chunk = C, gemma_jax/scoring.py) the head holds instead one chunk's
[b*T, C/tp] float32 x 4 (logits, softcap slope, probabilities, their cotangent) and the zero-padded, strided copy
of the device's embedding shard [ceil(V/C)*C/tp, D/fsdp] that the chunks are sliced from.
The head's buffers are dead before the layers' backward starts, so the peak is
    saved layers + max(head, layer working set).
The counts below were read off XLA's buffer assignment for a float32 step on a CPU (and, for the sharded head,
of the full-size bf16 steps of bench/memory_report.py on a fake 8-device mesh; docs/full_size.md).
XLA's CPU backend computes bf16 in float32: a bf16 step on a CPU also holds float32 copies that a TPU or GPU does
not make. `cpu_f32_copies=True` adds them, so the estimate can be checked against a CPU compile: the device's
shard of every layer weight in float32 (converted once, outside the layer scan), the saved layer inputs [L,b,T,D]
again in float32, and the head's embedding copy (gathered rows or padded chunks) in float32, once unchunked and
twice chunked.
Gemma 4 (layers of different shapes): weights, activations and the KV cache are counted layer by layer in each
layer's shapes (gemma_jax.model.layer_kinds: the global layers' head dim and kv heads, the KV-shared layers'
double-wide MLP, no keys/values or cache of their own); the peak's working set is the largest layer's. The
per-layer-embedding inputs ([b,T,L,P], P = 256 at E2B) are not counted. A mixture of experts (computed densely
over its E experts, gemma_jax/model.py `_moe`) adds per layer its [b,T,E,M] expert tensors (E split by tp, as its
weights are) x (MLP_COPIES + 1: the combine-weighted product), three more [b,T,D] float32 norm inputs and the
router's [b,T,E] float32 logits and probabilities; its expert weights are counted with the other weights.
"""

import math
import types

import jax
import numpy as np

from gemma_jax.config import GemmaConfig
from gemma_jax.decode import layer_groups
from gemma_jax.model import ParamSpec, layer_kinds, lora_specs, param_specs
from gemma_jax.sharding import CACHE_AXES, MESH_AXES, logical_to_spec

# How many tensors of each kind the backward pass keeps, read off XLA's buffer assignment of a float32 LoRA step
# on one CPU device (tests/test_memory.py checks the total against memory_analysis()).
LOGIT_COPIES = 2  # [b,T,V] f32: the softcapped logits and the gradient flowing back (gemma_jax/scoring.py)
MLP_COPIES = 7  # [b,T,F]: gate, up, gelu(gate), their product, and gelu-tanh's intermediates (x^3, tanh, 1 - tanh^2)
SCORE_COPIES = 4  # [b,N,T,T] f32: raw scores, tanh (softcap), masked scores, softmax; + a bool mask
CHUNK_COPIES = 4  # [b*T, C/tp] f32 per vocabulary chunk: logits, softcap slope, probabilities, their cotangent


def _mesh(mesh_shape: dict):
    """The stand-in for a jax Mesh that sharding.logical_to_spec needs: only its axis sizes."""
    unknown = sorted(set(mesh_shape) - set(MESH_AXES))
    if unknown:
        raise ValueError(f"mesh_shape has unknown axes {unknown}; expected a subset of {MESH_AXES}")
    return types.SimpleNamespace(shape={a: int(mesh_shape.get(a, 1)) for a in MESH_AXES})


def shard_bytes(shape, axes, dtype, mesh_shape: dict) -> int:
    """Bytes of one device's shard of an array with these logical axes (sharding.py's rules and fallback)."""
    mesh = _mesh(mesh_shape)
    spec = logical_to_spec(tuple(axes), tuple(shape), mesh)
    local = 1
    for size, names in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = () if names is None else (names if isinstance(names, tuple) else (names,))
        local *= size // math.prod(mesh.shape[n] for n in names)
    return local * np.dtype(dtype).itemsize


def _split(n: int, parts: int) -> int:
    """Size of one device's piece when sharding propagates a split of n over `parts` (replicated if indivisible)."""
    return n // parts if parts > 1 and n % parts == 0 else n


def activation_bytes(cfg: GemmaConfig, *, dtype, batch: int, seq_len: int, mesh_shape: dict, remat: bool,
                     lora_rank: int, lora_targets, cpu_f32_copies: bool = False) -> dict:
    """The activation terms of `estimate_bytes` (see the module docstring for what is counted); the head is
    chunked when cfg.logits_chunk is set."""
    m = _mesh(mesh_shape).shape
    b, T = _split(batch, m["data"] * m["fsdp"]), seq_len
    tp = m["tp"]
    D, L, N, V = cfg.embed_dim, cfg.num_layers, _split(cfg.num_heads, tp), _split(cfg.vocab_size, tp)
    it, f32 = np.dtype(dtype).itemsize, 4
    norms = 4 if cfg.use_post_norms else 2

    def layer_terms(F, K, H, own_kv):
        """The per-layer terms of a layer with MLP width F, K kv heads of dim H; own_kv False: a KV-shared
        layer, whose keys and values are its source layer's (counted there)."""
        F, K = _split(F, tp), _split(K, tp)
        terms = {
            "residual stream [b,T,D] f32": (norms + 2) * b * T * D * f32,
            "LoRA inputs [b,T,D]": 2 * b * T * D * it,
            "mlp [b,T,F]": (MLP_COPIES + ("down" in lora_targets)) * b * T * F * it,
            "q,k,v [b,T,N+2K,H]": b * T * (N + 2 * K * own_kv) * H * it,
            "scores [b,N,T,T]": b * N * T * T * (SCORE_COPIES * f32 + 1),
            "lora x@A [b,T,R]": len(lora_targets) * b * T * lora_rank * it,
        }
        if cfg.num_experts:
            E = _split(cfg.num_experts, tp)
            terms["experts [b,T,E,M]"] = (MLP_COPIES + 1) * b * T * E * cfg.moe_hidden_dim * it
            terms["moe norms, router"] = 3 * b * T * D * f32 + 2 * b * T * cfg.num_experts * f32
        return sum(terms.values())

    if cfg.layer_list:  # Gemma 4: each layer in its own shapes (layer_kinds)
        layers = [layer_terms(k.hidden, k.kv_heads, k.head_dim, k.has_kv) for k in layer_kinds(cfg)]
    else:
        layers = [layer_terms(cfg.hidden_dim, cfg.num_kv_heads, cfg.head_dim, True)] * L
    one_layer = max(layers)
    upcast = int(cpu_f32_copies and it < f32)
    if cfg.logits_chunk is None:
        logits = LOGIT_COPIES * b * T * V * f32
        embed_copy = V * D * (it + upcast * f32) if m["fsdp"] > 1 else 0  # rows gathered to full width
    else:
        C = min(cfg.logits_chunk, cfg.vocab_size)
        rows = -(-cfg.vocab_size // C) * C
        logits = CHUNK_COPIES * b * T * _split(C, tp) * f32
        embed_copy = (shard_bytes((rows, cfg.embed_dim), ("vocab", "embed"), dtype, mesh_shape)
                      + 2 * upcast * shard_bytes((rows, cfg.embed_dim), ("vocab", "embed"), np.float32, mesh_shape))
    head = logits + embed_copy
    # The head's buffers die before the layers' backward starts, so the peak holds the larger of the two phases.
    if remat:
        saved, working = L * b * T * D * (it + upcast * f32), max(head, 2 * one_layer)  # one layer rebuilt + grads
    else:
        saved, working = sum(layers), max(head, one_layer)
    weights_f32 = 0
    if upcast:
        weights_f32 = sum(shard_bytes(s.shape, s.axes, np.float32, mesh_shape)
                          for s in _spec_leaves(param_specs(cfg)["layers"]) if "norm" not in s.axes)
    out = {"layer_each": one_layer, "layers_saved": saved, "logits": logits, "head": head,
           "cpu_f32_weights": weights_f32, "total": saved + working + weights_f32}
    return out


def estimate_bytes(cfg: GemmaConfig, *, param_dtype="bfloat16", lora_rank: int, lora_targets=("q", "kv", "gate",
                   "up", "down"), lora_dtype="float32", optimizer: str = "adamw", batch: int, seq_len: int,
                   mesh_shape: dict | None = None, remat: bool = True, cache_batch: int | None = None,
                   cache_len: int | None = None, decode_weights: str = "per_layer",
                   cpu_f32_copies: bool = False) -> dict:
    """Bytes per device of each part of a LoRA train step and of a sampling KV cache (see the module docstring).

    Returns {"base_params", "lora_params", "grads", "optimizer", "activations", "activations_no_remat",
    "activations_remat", "train_total", "kv_cache", "decode_weights", "sample_total"}: train_total = params +
    LoRA + grads + optimizer + activations (with `remat` as given); sample_total = base + LoRA + decode_weights
    (for the sampler's `decode_weights`, "per_layer" or "stacked") + KV cache for `cache_batch` rows of
    `cache_len` tokens (default: batch and seq_len).
    cpu_f32_copies: add the float32 copies XLA's CPU backend makes of a bf16 step (module docstring)."""
    mesh_shape = dict(mesh_shape or {})
    if optimizer not in ("adamw", "sgd"):
        raise ValueError(f"optimizer must be 'adamw' or 'sgd', got {optimizer!r}")
    specs = param_specs(cfg)
    # Gemma 1-3 stack the layers ({name: [L, ...]}); Gemma 4 lists them (one dict per layer): leaves cover both.
    base = sum(shard_bytes(s.shape, s.axes, param_dtype, mesh_shape) for s in _spec_leaves(specs))
    lora = sum(shard_bytes(s.shape, s.axes, lora_dtype, mesh_shape)
               for s in _spec_leaves(lora_specs(cfg, lora_rank, lora_targets)))
    lora_f32 = lora * 4 // np.dtype(lora_dtype).itemsize
    opt = 2 * lora_f32 + 4 if optimizer == "adamw" else 0
    act = {r: activation_bytes(cfg, dtype=param_dtype, batch=batch, seq_len=seq_len, mesh_shape=mesh_shape,
                               remat=r, lora_rank=lora_rank, lora_targets=lora_targets,
                               cpu_f32_copies=cpu_f32_copies)["total"]
           for r in (False, True)}
    cb, cl = cache_batch or batch, cache_len or seq_len
    if cfg.layer_list:  # Gemma 4: [B,S,K,H] per layer that computes its own keys/values, in its own shapes
        kv = sum(2 * shard_bytes((cb, cl, k.kv_heads, k.head_dim), CACHE_AXES["k"][1:], param_dtype, mesh_shape)
                 for k in layer_kinds(cfg) if k.has_kv)
    else:
        kv = 2 * shard_bytes((cfg.num_layers, cb, cl, cfg.num_kv_heads, cfg.head_dim), CACHE_AXES["k"],
                             param_dtype, mesh_shape)
    cache = (kv + shard_bytes((cb, cl), CACHE_AXES["pos"], np.int32, mesh_shape)
             + shard_bytes((cb, cl), CACHE_AXES["valid"], np.bool_, mesh_shape) + 4)
    out = {"base_params": base, "lora_params": lora, "grads": lora, "optimizer": opt,
           "activations": act[remat], "activations_no_remat": act[False], "activations_remat": act[True],
           "kv_cache": cache}
    out["train_total"] = base + 2 * lora + opt + act[remat]
    out["decode_weights"] = _decode_weight_bytes(cfg, decode_weights, specs, lora, param_dtype, mesh_shape)
    out["sample_total"] = base + lora + out["decode_weights"] + cache
    return out


def _decode_weight_bytes(cfg, decode_weights, specs, lora, param_dtype, mesh_shape) -> int:
    """The `decode_weights` term of estimate_bytes (module docstring); lora: the adapters' bytes."""
    if decode_weights not in ("per_layer", "stacked"):
        raise ValueError(f"decode_weights must be 'per_layer' or 'stacked', got {decode_weights!r}")
    if cfg.layer_list:  # Gemma 4: listed layers read in place; per_layer copies gate and up (transposed)
        if decode_weights == "stacked":
            return 0
        return sum(shard_bytes(w[n].shape, w[n].axes, param_dtype, mesh_shape)
                   for w in specs["layers"] for n in ("gate", "up"))
    copy = sum(shard_bytes(s.shape, s.axes, param_dtype, mesh_shape) for s in _spec_leaves(specs["layers"])) + lora
    if decode_weights == "per_layer":
        return copy
    group = max(p for _, p, _ in layer_groups(cfg))
    return copy * group // cfg.num_layers  # every layer (and its adapters) has the same shape in Gemma 1-3


def _spec_leaves(tree) -> list:
    """The ParamSpecs of a spec tree (dicts, lists, tuples; None entries skipped)."""
    return [x for x in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, ParamSpec)) if isinstance(x, ParamSpec)]


def format_bytes(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def format_table(rows: dict, columns=None) -> str:
    """A text table: one row per estimate part, one column per named estimate ({column: estimate_bytes(...)})."""
    columns = list(columns or rows)
    keys = list(next(iter(rows.values())))
    width = max(12, *(len(c) for c in columns))
    lines = ["part".ljust(22) + "".join(c.rjust(width + 2) for c in columns)]
    for k in keys:
        lines.append(k.ljust(22) + "".join(format_bytes(rows[c][k]).rjust(width + 2) for c in columns))
    return "\n".join(lines)
