"""Gemma 1, 2, 3 and 4 (dense text) in plain JAX: weight specs (and which weights carry LoRA adapters), init, KV cache,
and the forward pass.

Dimension letters used in names and einsums throughout the project:
    B batch, T query length, S key length (cache capacity), D model width, N query heads, K kv heads,
    H head dim, F mlp hidden, V vocab, L layers, R LoRA rank, G group size, P per-layer input (Gemma 4),
    E experts, M expert hidden, A experts chosen per token (Gemma 4 mixture of experts).

Params are a plain dict pytree. Layer weights are stacked along a leading L axis so the layers can run under
`lax.scan` (compile time flat in depth):
    embed [V,D]; final_norm [D];
    layers: attn_norm [L,D], q [L,D,N,H], k [L,D,K,H], v [L,D,K,H], o [L,N,H,D], ffw_norm [L,D],
            gate [L,D,F], up [L,D,F], down [L,F,D], and for Gemma 2 post_attn_norm [L,D], post_ffw_norm [L,D];
            Gemma 3 adds q_norm [L,H], k_norm [L,H] (QK-norm, applied per head before RoPE).

Numerics follow transformers (`models/gemma/modeling_gemma.py`, `models/gemma2/modeling_gemma2.py`) and Tunix
(`tunix/models/gemma/model.py`), checked against both in tests/: embedding scaled by
sqrt(D) cast to the weight dtype, (1 + w) RMSNorm in float32, half-split RoPE, softcap before masking, a finite
mask value, float32 softmax, a position-based sliding window (q - W < k <= q), tied and softcapped unembedding.
Gemma 3 (transformers `models/gemma3/modeling_gemma3.py`): q/k RMSNorm then RoPE with the layer type's base and
linear scaling; which layers are local comes from `cfg.is_local_layer`.
Gemma 4 (transformers `models/gemma4/modeling_gemma4.py`; docs/reference.md#gemma-4-dense-text-models): layers of
different shapes, so params["layers"] is a list of per-layer dicts (`layer_kinds`, `_gemma4_param_specs`) and the
layers are unrolled (`_gemma4_layers`); P below is the per-layer-embedding width. The 26B-A4B mixture of experts
adds routed experts next to each layer's dense MLP (`_moe`).
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from gemma_jax.config import GemmaConfig

# Masked attention scores get this finite value (not -inf), so a fully padded query row stays finite.
MASK_VALUE = -2.3819763e38


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    shape: tuple[int, ...]
    axes: tuple[str | None, ...]  # logical axis names, mapped to mesh axes by gemma_jax/sharding.py
    init: str  # "normal" (fan-in scaled), "embed", "zeros" or "he_uniform" (LoRA A: uniform +-sqrt(6 / fan_in))
    fan_in: int = 1


def param_specs(cfg: GemmaConfig) -> dict:
    """Every weight declared once: shape, logical axes and init. init_params / abstract_params derive from this."""
    L, D, F, N, K, H, V = (cfg.num_layers, cfg.embed_dim, cfg.hidden_dim, cfg.num_heads, cfg.num_kv_heads,
                           cfg.head_dim, cfg.vocab_size)
    norm = ParamSpec((L, D), ("layers", "norm"), "zeros")
    layers = {
        "attn_norm": norm,
        "q": ParamSpec((L, D, N, H), ("layers", "embed", "heads", "head_dim"), "normal", D),
        "k": ParamSpec((L, D, K, H), ("layers", "embed", "kv_heads", "head_dim"), "normal", D),
        "v": ParamSpec((L, D, K, H), ("layers", "embed", "kv_heads", "head_dim"), "normal", D),
        "o": ParamSpec((L, N, H, D), ("layers", "heads", "head_dim", "embed"), "normal", N * H),
        "ffw_norm": norm,
        "gate": ParamSpec((L, D, F), ("layers", "embed", "mlp"), "normal", D),
        "up": ParamSpec((L, D, F), ("layers", "embed", "mlp"), "normal", D),
        "down": ParamSpec((L, F, D), ("layers", "mlp", "embed"), "normal", F),
    }
    if cfg.use_post_norms:
        layers["post_attn_norm"] = norm
        layers["post_ffw_norm"] = norm
    if cfg.use_qk_norm:  # replicated like every norm scale (sharding RULES["norm"])
        layers["q_norm"] = ParamSpec((L, H), ("layers", "norm"), "zeros")
        layers["k_norm"] = ParamSpec((L, H), ("layers", "norm"), "zeros")
    if cfg.layer_list:
        return _gemma4_param_specs(cfg)
    return {
        "embed": ParamSpec((V, D), ("vocab", "embed"), "embed", D),
        "final_norm": ParamSpec((D,), ("norm",), "zeros"),
        "layers": layers,
    }


@dataclasses.dataclass(frozen=True)
class LayerKind:
    """What one Gemma 4 layer looks like: sliding or global, its head dim H and kv heads K, whether its values are
    its raw keys (k_eq_v), its MLP hidden size F, and kv_source: the layer whose keys/values it attends with
    (itself, or for a KV-shared layer the last unshared layer of the same type, HF `store_full_length_kv`)."""
    local: bool
    head_dim: int
    kv_heads: int
    k_eq_v: bool
    hidden: int
    kv_source: int

    @property
    def has_kv(self):
        return self.kv_source < 0


def layer_kinds(cfg: GemmaConfig) -> tuple[LayerKind, ...]:
    """Per-layer shapes of a Gemma 4 config, read exactly as transformers' Gemma4TextAttention / Gemma4TextMLP:
    global layers use global_head_dim, and num_global_kv_heads with attention_k_eq_v; layers >= L - shared reuse
    the k/v of the last layer before them with the same type and (double_wide_mlp) have a 2F MLP.
    kv_source is -1 for a layer that computes its own keys/values."""
    L, first_shared = cfg.num_layers, cfg.num_layers - cfg.num_kv_shared_layers
    out = []
    for i, local in enumerate(cfg.is_local_layer):
        shared = i >= first_shared
        source = -1
        if shared:
            source = max(j for j in range(first_shared) if cfg.is_local_layer[j] == local)
        out.append(LayerKind(
            local=local,
            head_dim=cfg.head_dim if local or cfg.global_head_dim is None else cfg.global_head_dim,
            kv_heads=cfg.num_kv_heads if local or cfg.num_global_kv_heads is None else cfg.num_global_kv_heads,
            k_eq_v=cfg.attention_k_eq_v and not local,
            hidden=cfg.hidden_dim * (2 if cfg.double_wide_mlp and shared else 1),
            kv_source=source,
        ))
    assert len(out) == L
    return tuple(out)


def _gemma4_param_specs(cfg: GemmaConfig) -> dict:
    """Gemma 4: params["layers"] is a list of per-layer dicts (no L axis), because layers differ in shape.
    Norm scales are stored as transformers stores them (scale w, init 1; cfg.norm_plus_one False).
    PLE (per_layer_input_dim P > 0): per_layer_embed [Vp,L,P], per_layer_proj [D,L,P], per_layer_proj_norm [P];
    per layer ple_gate [D,P], ple_proj [P,D], ple_norm [D].
    Mixture of experts (num_experts E > 0), per layer: router [D,E], router_scale [D], per_expert_scale [E],
    experts_gate_up [E,D,2,M] (gate at index 0 of the pair axis, up at 1, as HF's fused gate_up_proj),
    experts_down [E,M,D], and the norms post_mlp_norm (dense MLP output), pre_moe_norm, post_moe_norm."""
    D, N, P, L = cfg.embed_dim, cfg.num_heads, cfg.per_layer_input_dim, cfg.num_layers
    norm_init = "zeros" if cfg.norm_plus_one else "ones"
    norm = ParamSpec((D,), ("norm",), norm_init)
    layers = []
    for kind in layer_kinds(cfg):
        H, K, F = kind.head_dim, kind.kv_heads, kind.hidden
        w = {"attn_norm": norm, "post_attn_norm": norm, "ffw_norm": norm, "post_ffw_norm": norm,
             "q": ParamSpec((D, N, H), ("embed", "heads", "head_dim"), "normal", D),
             "q_norm": ParamSpec((H,), ("norm",), norm_init),
             "o": ParamSpec((N, H, D), ("heads", "head_dim", "embed"), "normal", N * H)}
        if kind.has_kv:  # KV-shared layers have no k/v weights (HF: nor k_norm)
            w["k"] = ParamSpec((D, K, H), ("embed", "kv_heads", "head_dim"), "normal", D)
            w["k_norm"] = ParamSpec((H,), ("norm",), norm_init)
            if not kind.k_eq_v:
                w["v"] = ParamSpec((D, K, H), ("embed", "kv_heads", "head_dim"), "normal", D)
        w.update(gate=ParamSpec((D, F), ("embed", "mlp"), "normal", D),
                 up=ParamSpec((D, F), ("embed", "mlp"), "normal", D),
                 down=ParamSpec((F, D), ("mlp", "embed"), "normal", F))
        if P:
            w.update(ple_gate=ParamSpec((D, P), ("embed", "norm"), "normal", D),
                     ple_proj=ParamSpec((P, D), ("norm", "embed"), "normal", P), ple_norm=norm)
        if cfg.use_layer_scalar:
            w["layer_scalar"] = ParamSpec((1,), ("norm",), "ones")
        if cfg.num_experts:
            E, M = cfg.num_experts, cfg.moe_hidden_dim
            w.update(router=ParamSpec((D, E), ("embed", None), "normal", D),  # replicated: softmax, top-k read all E
                     router_scale=ParamSpec((D,), ("norm",), "ones"),
                     per_expert_scale=ParamSpec((E,), (None,), "ones"),
                     experts_gate_up=ParamSpec((E, D, 2, M), ("expert", "embed", "pair", "mlp"), "normal", D),
                     experts_down=ParamSpec((E, M, D), ("expert", "mlp", "embed"), "normal", M),
                     post_mlp_norm=norm, pre_moe_norm=norm, post_moe_norm=norm)
        layers.append(w)
    out = {"embed": ParamSpec((cfg.vocab_size, D), ("vocab", "embed"), "embed", D),
           "final_norm": norm, "layers": layers}
    if P:
        out.update(per_layer_embed=ParamSpec((cfg.per_layer_vocab_size or cfg.vocab_size, L, P),
                                             ("vocab", "layers", "norm"), "embed", P),
                   per_layer_proj=ParamSpec((D, L, P), ("embed", "layers", "norm"), "normal", D),
                   per_layer_proj_norm=ParamSpec((P,), ("norm",), norm_init))
    return out


# Logical axis name of each dimension letter of a weight (mapped to mesh axes by gemma_jax/sharding.py RULES).
AXIS_NAMES = {"L": "layers", "D": "embed", "F": "mlp", "N": "heads", "K": "kv_heads", "H": "head_dim", "R": "rank",
              "C": "pair"}


@dataclasses.dataclass(frozen=True)
class LoraTarget:
    """Where a LoRA adapter sits: the dimension letters of A and B per layer (A: the projection's input, then R;
    B: R, then its output) and the base weight(s) of param_specs()["layers"] that scale * A @ B is added to.
    C indexes `adds_to` (Tunix's fused kv adapter: one A, B [R,2,K,H], its C = 0 slice added to k, C = 1 to v)."""
    a: str
    b: str
    adds_to: tuple[str, ...]


# The weights that can carry an adapter: the LoRA layout is declared here once, and lora_delta (forward),
# sharding.lora_shardings, lora/ (init, merge, io) and train/memory.py all read it through lora_specs.
LORA_TARGETS = {
    "q": LoraTarget("DR", "RNH", ("q",)),
    "k": LoraTarget("DR", "RKH", ("k",)),
    "v": LoraTarget("DR", "RKH", ("v",)),
    "kv": LoraTarget("DR", "RCKH", ("k", "v")),
    "o": LoraTarget("NHR", "RD", ("o",)),
    "gate": LoraTarget("DR", "RF", ("gate",)),
    "up": LoraTarget("DR", "RF", ("up",)),
    "down": LoraTarget("FR", "RD", ("down",)),
}


def lora_target(name: str) -> LoraTarget:
    """The LORA_TARGETS entry of `name`; a ValueError listing the known targets for any other name."""
    if name not in LORA_TARGETS:
        raise ValueError(f"unknown LoRA target {name!r}; choose from {sorted(LORA_TARGETS)}")
    return LORA_TARGETS[name]


def lora_axes(name: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Logical axes of A and B of the adapter `name`, with the leading L axis."""
    t = lora_target(name)
    return tuple(AXIS_NAMES[c] for c in "L" + t.a), tuple(AXIS_NAMES[c] for c in "L" + t.b)


def lora_specs(cfg: GemmaConfig, rank: int, targets) -> dict:
    """name -> {"a": ParamSpec, "b": ParamSpec} of each adapter, in the order of `targets`: shapes with the leading
    L axis, logical axes, and init (A He-uniform with fan_in = its per-layer input size, B zeros, so a fresh
    adapter leaves the model unchanged). Raises for an unknown target and when two targets adapt the same base
    weight (the fused 'kv' with 'k' or 'v')."""
    sizes = {"L": cfg.num_layers, "D": cfg.embed_dim, "F": cfg.hidden_dim, "N": cfg.num_heads, "K": cfg.num_kv_heads,
             "H": cfg.head_dim, "R": rank}
    out, adapted = {}, {}
    for name in dict.fromkeys(targets):
        t = lora_target(name)
        for w in t.adds_to:
            if w in adapted:
                raise ValueError(f"LoRA targets {adapted[w]!r} and {name!r} both adapt {w!r}: use either the fused "
                                 "'kv' adapter or separate 'k'/'v', not both")
            adapted[w] = name
        if cfg.layer_list:
            out[name] = _gemma4_lora_specs(cfg, name, rank)
            continue
        a_axes, b_axes = lora_axes(name)
        size = {**sizes, "C": len(t.adds_to)}
        a_shape, b_shape = (tuple(size[c] for c in "L" + letters) for letters in (t.a, t.b))
        out[name] = {"a": ParamSpec(a_shape, a_axes, "he_uniform", math.prod(a_shape[1:-1])),
                     "b": ParamSpec(b_shape, b_axes, "zeros")}
    return out


def _gemma4_lora_specs(cfg: GemmaConfig, name: str, rank: int) -> dict:
    """Gemma 4: {"a": tuple over layers, "b": tuple over layers} of per-layer ParamSpecs (no L axis) in each
    layer's own shapes, None on layers that lack a weight the adapter adds to (k, v, kv on KV-shared layers; v, kv
    on k = v layers, whose values are the k projection and so follow a 'k' adapter)."""
    t = lora_target(name)
    a_axes, b_axes = (axes[1:] for axes in lora_axes(name))
    a_out, b_out = [], []
    for kind, w in zip(layer_kinds(cfg), param_specs(cfg)["layers"]):
        if any(x not in w for x in t.adds_to):
            a_out.append(None)
            b_out.append(None)
            continue
        size = {"D": cfg.embed_dim, "F": kind.hidden, "N": cfg.num_heads, "K": kind.kv_heads, "H": kind.head_dim,
                "R": rank, "C": len(t.adds_to)}
        a_shape, b_shape = (tuple(size[c] for c in letters) for letters in (t.a, t.b))
        a_out.append(ParamSpec(a_shape, a_axes, "he_uniform", math.prod(a_shape[:-1])))
        b_out.append(ParamSpec(b_shape, b_axes, "zeros"))
    return {"a": tuple(a_out), "b": tuple(b_out)}


def lora_layer_slice(lora_layers, i):
    """Layer i's adapters {name: {"a", "b"}} from stacked [L, ...] adapters or Gemma 4's per-layer tuples (names
    without an adapter on that layer left out); None without adapters."""
    if lora_layers is None:
        return None
    return {n: {"a": ab["a"][i], "b": ab["b"][i]} for n, ab in lora_layers.items() if ab["a"][i] is not None}


def _is_spec(x):
    return isinstance(x, ParamSpec)


def abstract_params(cfg: GemmaConfig) -> dict:
    """ShapeDtypeStructs of every weight: no memory allocated (use with jax.eval_shape / lowering)."""
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, cfg.dtype), param_specs(cfg), is_leaf=_is_spec)


def param_axes(cfg: GemmaConfig) -> dict:
    """Logical axis names of every weight, same tree as the params."""
    return jax.tree.map(lambda s: s.axes, param_specs(cfg), is_leaf=_is_spec)


def count_params(tree) -> int:
    return int(sum(math.prod(x.shape) for x in jax.tree.leaves(tree)))


def init_params(cfg: GemmaConfig, seed: int = 0) -> dict:
    """Random weights from a seed: fan-in scaled normals, embedding with std D^-0.5, norms zero (scale 1 + 0;
    Gemma 4's w-scaled norms and layer scalars: one)."""
    specs = param_specs(cfg)
    leaves, treedef = jax.tree.flatten(specs, is_leaf=_is_spec)
    keys = jax.random.split(jax.random.key(seed), len(leaves))

    def make(spec, key):
        if spec.init in ("zeros", "ones"):
            return jnp.full(spec.shape, spec.init == "ones", cfg.dtype)
        std = spec.fan_in ** -0.5
        return (std * jax.random.normal(key, spec.shape, jnp.float32)).astype(cfg.dtype)

    return jax.tree.unflatten(treedef, [make(s, k) for s, k in zip(leaves, keys)])


def init_cache(cfg: GemmaConfig, batch: int, max_len: int, dtype=None) -> dict:
    """An empty KV cache with room for `max_len` tokens per row.

    k, v [L,B,S,K,H]: keys and values by cache slot. pos [B,S]: the position of the token in each slot (the
    sliding window compares positions, not slots). valid [B,S]: whether a slot holds a real token (left padding
    does not). index: the next slot to write; all rows advance together, per-row positions differ.
    """
    dtype = dtype or cfg.dtype
    shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
    if cfg.layer_list:  # Gemma 4: a tuple over layers of [B,S,K,H] in each layer's shape; None for KV-shared layers
        shapes = [(batch, max_len, kind.kv_heads, kind.head_dim) if kind.has_kv else None for kind in layer_kinds(cfg)]
        k = v = tuple(None if s is None else jnp.zeros(s, dtype) for s in shapes)
    else:
        k = v = jnp.zeros(shape, dtype)
    return {
        "k": k,
        "v": v,
        "pos": jnp.zeros((batch, max_len), jnp.int32),
        "valid": jnp.zeros((batch, max_len), bool),
        "index": jnp.zeros((), jnp.int32),
    }


def rms_norm(x, w, eps, plus_one=True):
    """x * rsqrt(mean(x^2) + eps) * (1 + w), computed in float32, returned in x's dtype.
    plus_one False (Gemma 4): times w; w None: no scale (Gemma 4's value norm)."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    if w is None:
        return y.astype(x.dtype)
    return (y * ((1.0 + w.astype(jnp.float32)) if plus_one else w.astype(jnp.float32))).astype(x.dtype)


def rope_inv_freq(cfg: GemmaConfig, local: bool) -> np.ndarray:
    """RoPE inverse frequencies [H/2] (float32) of a local or global layer: base ** (-2i / H), divided by the
    linear scaling factor on global layers (HF `_compute_linear_scaling_rope_parameters`; Tunix `apply_rope`
    divides the angle by `scale_factor`, the same product).
    Gemma 4 global layers: H is global_head_dim, and with global_rope_fraction < 1 (HF `proportional` RoPE) only
    the first int(fraction * H / 2) angles rotate, with exponents still over H; the rest have frequency 0 (an
    identity rotation, HF `_compute_proportional_rope_parameters`)."""
    H = cfg.head_dim if local or cfg.global_head_dim is None else cfg.global_head_dim
    base = cfg.rope_local_base if local and cfg.rope_local_base is not None else cfg.rope_base
    if local or cfg.global_rope_fraction == 1.0:
        inv_freq = base ** (-np.arange(0, H, 2, dtype=np.float32) / H)
    else:
        angles = int(cfg.global_rope_fraction * H // 2)
        inv_freq = np.concatenate([base ** (-np.arange(0, 2 * angles, 2, dtype=np.float32) / H),
                                   np.zeros(H // 2 - angles, np.float32)])
    factor = 1.0 if local else cfg.rope_scaling
    return inv_freq if factor == 1.0 else (inv_freq / np.float32(factor)).astype(np.float32)


def rope_tables(cfg: GemmaConfig, positions_BT):
    """{is_local: (sin, cos)} [B,T,1,H/2] float32 of the local and the global layers' RoPE angles at these
    positions. Computed once per forward (or decode step), outside the layers: sin and cos evaluated inside each
    layer were recomputed per element of q and k, forward and backward (measurements: docs/performance.md,
    'RoPE tables')."""
    pos_BT1 = positions_BT.astype(jnp.float32)[..., None]
    local, glob = rope_inv_freq(cfg, True), rope_inv_freq(cfg, False)

    def sin_cos(inv_freq_h):
        angle_BTh = pos_BT1 * inv_freq_h
        return jnp.sin(angle_BTh)[:, :, None, :], jnp.cos(angle_BTh)[:, :, None, :]

    if np.array_equal(local, glob):  # Gemma 1/2: one RoPE for every layer
        both = sin_cos(glob)
        return {True: both, False: both}
    return {True: sin_cos(local), False: sin_cos(glob)}


def layer_rope(tables, is_local):
    """The (sin, cos) of a layer whose locality is a Python bool (unrolled layers) or a traced one (the scan)."""
    if isinstance(is_local, (bool, np.bool_)):
        return tables[bool(is_local)]
    if tables[True] is tables[False]:
        return tables[True]
    return tuple(jnp.where(is_local, a, b) for a, b in zip(tables[True], tables[False]))


def rope(x_BTNH, sin_cos):
    """Rotary embedding, half-split layout: the first half of H pairs with the second half.
    sin_cos: the layer's (sin, cos) [B,T,1,H/2] from `rope_tables` (base and scaling of the layer)."""
    sin, cos = sin_cos
    x1, x2 = jnp.split(x_BTNH.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x_BTNH.dtype)


def softcap(x, cap):
    return x if cap is None else jnp.tanh(x / cap) * cap


# Logical axes of the activations constrained at block boundaries (mapped by gemma_jax/sharding.py RULES).
ACT_BTD = ("act_batch", "act_seq", "act_embed")
ACT_BTF = ("act_batch", "act_seq", "act_mlp")
ACT_BTV = ("act_batch", "act_seq", "act_vocab")


def constrain(x, shard, axes):
    """x laid out as its logical `axes` say on shard's mesh (a gemma_jax.sharding.ShardingCtx); shard None: x."""
    return x if shard is None else shard.constrain(x, axes)


def lora_delta(name, x, lora_layer, scale):
    """(x A B) * scale for the adapter `name` of one layer (LORA_TARGETS), or None when that projection has none.

    x [..., in] with A's input letters last; the result is [..., out] with B's output letters, and the fused kv
    adapter's C axis moved first (delta[0] for k, delta[1] for v). Written as two 2-D matmuls over the flattened
    tokens ([M, in] @ [in, R] @ [R, out]) rather than einsums, so the gradients are plain transposed matmuls
    (measurements: docs/performance.md, 'LoRA matmuls')."""
    if lora_layer is None or name not in lora_layer:
        return None
    t = lora_target(name)
    a, b = lora_layer[name]["a"], lora_layer[name]["b"]
    rank, n_in = a.shape[-1], len(t.a) - 1
    lead = x.shape[:x.ndim - n_in]
    h = x.reshape(-1, math.prod(a.shape[:-1])) @ a.reshape(-1, rank).astype(x.dtype)
    out = (h @ b.reshape(rank, -1).astype(x.dtype)) * scale
    out = out.reshape(*lead, *b.shape[1:]).astype(x.dtype)
    return jnp.moveaxis(out, len(lead) + t.b.index("C") - 1, 0) if "C" in t.b else out


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _widening_lora(x_MI, w_IO, a_IR, b_RO, scale):
    """x W + scale (x A) B as one matmul over the joined inner axis: [x, scale x A] @ [W; B].

    For a projection wider out than in (gate, up: D -> F), the separate form writes the [M, O] product (x A) B and
    adds it to x W, and its backward reads the [M, O] output gradient once more for dy B^T; joined, both ride on
    the base matmuls (measurements: docs/performance.md, 'LoRA matmuls'). The backward is written out, because
    differentiating the joined weight [W; B] would give B's gradient only through a full [I + R, O] product:
        [dx_base, dh] = dy [W; B]^T,  dh = scale dy B^T,  dx = dx_base + dh A^T,  dA = x^T dh,  dB = (scale x A)^T dy,
        dW = x^T dy (XLA drops it when, as in LoRA training, nothing differentiates W)
    """
    return _widening_lora_fwd(x_MI, w_IO, a_IR, b_RO, scale)[0]


def _widening_lora_fwd(x_MI, w_IO, a_IR, b_RO, scale):
    h_MR = (x_MI @ a_IR) * scale
    y_MO = jnp.concatenate([x_MI, h_MR], axis=1) @ jnp.concatenate([w_IO, b_RO], axis=0)
    return y_MO, (x_MI, h_MR, w_IO, a_IR, b_RO)


def _widening_lora_bwd(scale, res, dy_MO):
    x_MI, h_MR, w_IO, a_IR, b_RO = res
    d_MJ = dy_MO @ jnp.concatenate([w_IO, b_RO], axis=0).T  # J = I + R: [dx_base, dy B^T]
    dh_MR = d_MJ[:, x_MI.shape[1]:] * scale
    dx_MI = d_MJ[:, :x_MI.shape[1]] + dh_MR @ a_IR.T
    return dx_MI, x_MI.T @ dy_MO, x_MI.T @ dh_MR, h_MR.T @ dy_MO


_widening_lora.defvjp(_widening_lora_fwd, _widening_lora_bwd)


def _project(name, eq, x, w, lora_layer, scale):
    """x @ w (+ the LoRA delta), named "projection" for the layer scan's checkpoint policy (forward_hidden).
    An adapter on a single input-major weight (eq's weight letters start with the adapter's input letters) whose
    output is wider than its input goes through `_widening_lora` when there are at least as many tokens as input
    features (it copies W once per call: worth it for a training batch or a prefill, not for a decode step's few
    rows); every other adapter adds `lora_delta` to the base product."""
    t = lora_target(name) if lora_layer is not None and name in lora_layer else None
    n_in = 0 if t is None else math.prod(lora_layer[name]["a"].shape[:-1])
    input_major = t is not None and eq.split("->")[0].split(",")[1].startswith(t.a[:-1])  # w [in..., out...]
    if input_major and "C" not in t.b and lora_layer[name]["b"][0].size > n_in and x.size >= n_in * n_in:
        a, b = lora_layer[name]["a"], lora_layer[name]["b"]
        lead = x.shape[:x.ndim - (len(t.a) - 1)]
        y = _widening_lora(x.reshape(-1, n_in), w.reshape(n_in, -1).astype(x.dtype),
                           a.reshape(n_in, -1).astype(x.dtype), b.reshape(a.shape[-1], -1).astype(x.dtype), scale)
        return checkpoint_name(y.reshape(*lead, *b.shape[1:]), "projection")
    y = jnp.einsum(eq, x, w)
    delta = lora_delta(name, x, lora_layer, scale)
    return checkpoint_name(y if delta is None else y + delta, "projection")


def attention_masks(cfg, q_pos_BT, k_pos_BS, k_valid_BS, q_slot_T, k_slot_S, q_seg_BT=None, k_seg_BS=None):
    """Boolean [B,T,S] masks (global, local): causal by slot, key valid, same segment, and for local layers the
    position-based window q - W < k <= q."""
    mask = (k_slot_S[None, None, :] <= q_slot_T[None, :, None]) & k_valid_BS[:, None, :]
    if q_seg_BT is not None:
        mask &= q_seg_BT[:, :, None] == k_seg_BS[:, None, :]
    if cfg.sliding_window is None:
        return mask, mask
    in_window = k_pos_BS[:, None, :] > q_pos_BT[:, :, None] - cfg.sliding_window
    return mask, mask & in_window


def _scores(q_BKGTH, k_BSKH):
    """q . k for every query and key [B,K,G,T,S], float32. The queries come in [B,K,G,T,H], so the product is
    written in the order the softmax reads (measurements: docs/performance.md, 'Attention layout'). (One-token
    decoding has its own layout in decode.py.)"""
    k_BSKH = k_BSKH.astype(q_BKGTH.dtype)
    return jnp.einsum("BKGTH,BSKH->BKGTS", q_BKGTH, k_BSKH, preferred_element_type=jnp.float32)


def _weighted_values(p_BKGTS, v_BSKH):
    """sum_S p v -> [B,K,G,T,H]."""
    return jnp.einsum("BKGTS,BSKH->BKGTH", p_BKGTS, v_BSKH)


def _qkv(cfg, x_BTD, w, lora_layer, scale, sin_cos, shared_kv=None):
    """Projections of one layer with (Gemma 3) QK-norm and RoPE: (queries [B,T,K,G,H] times the query scale,
    keys [B,T,K,H], values [B,T,K,H]). Query heads are grouped over kv heads: N = K * G (MQA when K = 1, GQA
    otherwise); N, K and H are read off the weights (Gemma 4 layers differ). sin_cos: this layer's RoPE tables
    (`layer_rope`: the local or global base and scaling).
    Gemma 4 (HF Gemma4TextAttention): without a "v" weight (attention_k_eq_v) the values are the raw key
    projection; values get an unscaled RMSNorm (use_value_norm), keys their k_norm and RoPE; shared_kv: the
    (keys, values) of the layer this KV-shared layer reads, used as they are."""
    B, T, _ = x_BTD.shape
    plus_one = cfg.norm_plus_one
    q_BTNH = _project("q", "BTD,DNH->BTNH", x_BTD, w["q"], lora_layer, scale)
    N, H = q_BTNH.shape[2:]
    if shared_kv is None:
        k_BTKH = _project("k", "BTD,DKH->BTKH", x_BTD, w["k"], lora_layer, scale)
        v_BTKH = _project("v", "BTD,DKH->BTKH", x_BTD, w["v"], lora_layer, scale) if "v" in w else k_BTKH
        kv_delta = lora_delta("kv", x_BTD, lora_layer, scale)
        if kv_delta is not None:
            k_BTKH, v_BTKH = k_BTKH + kv_delta[0], v_BTKH + kv_delta[1]
        if cfg.use_value_norm:
            v_BTKH = rms_norm(v_BTKH, None, cfg.norm_eps)
    if cfg.use_qk_norm:  # over H, per head, before RoPE (HF Gemma3Attention, Tunix _query_norm/_key_norm)
        q_BTNH = rms_norm(q_BTNH, w["q_norm"], cfg.norm_eps, plus_one)
        if shared_kv is None:
            k_BTKH = rms_norm(k_BTKH, w["k_norm"], cfg.norm_eps, plus_one)
    q_BTNH = rope(q_BTNH, sin_cos)
    if shared_kv is None:
        k_BTKH = rope(k_BTKH, sin_cos)
    else:
        k_BTKH, v_BTKH = shared_kv
    q_BTNH = q_BTNH * jnp.asarray(cfg.query_pre_attn_scalar ** -0.5, q_BTNH.dtype)
    K = k_BTKH.shape[2]
    return q_BTNH.reshape(B, T, K, N // K, H), k_BTKH, v_BTKH


def _attention(cfg, x_BTD, w, lora_layer, scale, sin_cos, mask_BTS, k_cache_BSKH=None,
               v_cache_BSKH=None, mask_new_BTT=None, shared_kv=None):
    """Self-attention of one layer; returns (output, this step's keys [B,T,K,H], values [B,T,K,H]).

    Without a cache the T tokens attend to each other under mask_BTS [B,T,T]. With a cache the queries attend to
    the cached slots under mask_BTS [B,T,S] and to the T new keys under mask_new_BTT, in one softmax over both;
    the caller writes the new keys/values into the cache once, after all layers: written here, inside the layer
    scan, XLA copies the whole cache every layer (measurements: docs/performance.md, 'KV cache writes').
    """
    B, T, _ = x_BTD.shape
    q_BTKGH, k_BTKH, v_BTKH = _qkv(cfg, x_BTD, w, lora_layer, scale, sin_cos, shared_kv)
    if k_cache_BSKH is not None:
        # Round-trip through the cache dtype, so this step sees exactly what later steps will read back.
        k_BTKH, v_BTKH = k_BTKH.astype(k_cache_BSKH.dtype), v_BTKH.astype(v_cache_BSKH.dtype)
        parts = [(k_cache_BSKH, v_cache_BSKH, mask_BTS), (k_BTKH, v_BTKH, mask_new_BTT)]
        if k_cache_BSKH.shape[1] == T:  # the T tokens fill the whole cache: no earlier slot can exist
            parts = parts[1:]
    else:
        parts = [(k_BTKH, v_BTKH, mask_BTS)]
    q_BKGTH = jnp.transpose(q_BTKGH, (0, 2, 3, 1, 4))
    s_BKGTS = jnp.concatenate([_scores(q_BKGTH, k) for k, _, _ in parts], axis=-1)
    mask_BTS = jnp.concatenate([m for _, _, m in parts], axis=-1)
    s_BKGTS = softcap(s_BKGTS, cfg.attn_logit_softcap)  # before masking, as HF and Tunix do
    s_BKGTS = jnp.where(mask_BTS[:, None, None, :, :], s_BKGTS, MASK_VALUE)
    p_BKGTS = jax.nn.softmax(s_BKGTS, axis=-1)
    o_BKGTH, start = 0, 0
    for _, v, _ in parts:
        p_part = jax.lax.slice_in_dim(p_BKGTS, start, start + v.shape[1], axis=-1).astype(v.dtype)
        o_BKGTH = o_BKGTH + _weighted_values(p_part, v)
        start += v.shape[1]
    o_BTNH = jnp.transpose(o_BKGTH, (0, 3, 1, 2, 4)).reshape(B, T, -1, q_BTKGH.shape[-1]).astype(x_BTD.dtype)
    out_BTD = _project("o", "BTNH,NHD->BTD", o_BTNH, w["o"], lora_layer, scale)
    return out_BTD, k_BTKH, v_BTKH


def _mlp(x_BTD, w, lora_layer, scale, shard=None):
    """gelu_tanh(x gate) * (x up) @ down. gate and up may come output-major as "gate_FD" / "up_FD" ([F,D]: the
    decode loop's per-layer copies, gemma_jax/decode.py `decode_layers`) instead of "gate" / "up" ([D,F])."""
    def gate_or_up(name):
        if name + "_FD" in w:
            return _project(name, "BTD,FD->BTF", x_BTD, w[name + "_FD"], lora_layer, scale)
        return _project(name, "BTD,DF->BTF", x_BTD, w[name], lora_layer, scale)

    gate_BTF, up_BTF = gate_or_up("gate"), gate_or_up("up")
    h_BTF = constrain(jax.nn.gelu(gate_BTF, approximate=True) * up_BTF, shard, ACT_BTF)
    return _project("down", "BTF,FD->BTD", h_BTF, w["down"], lora_layer, scale)


def _moe(cfg, x_BTD, w):
    """Gemma 4's routed experts on the residual stream x (the dense MLP's input before its norm), exactly as
    transformers' Gemma4TextRouter and Gemma4TextExperts:
        router:  p = softmax_E((rms_norm(x) * router_scale * D^-0.5) @ router)   (rms_norm without scale)
                 the top A of p, renormalised to sum 1, each times per_expert_scale of its expert -> weights c
        experts: y = sum over the chosen e of c_e * down_e(gelu_tanh(gate_e(h)) * up_e(h)),  h = pre_moe_norm(x)
    (Tunix 0.1.7's MoE routes from the pre_moe-normed h instead of x; we follow transformers.)
    Computed densely: every expert runs on every token and the [B,T,E] combine weights are zero off the top A, so
    there is no gather, sort or capacity, and the gradient is that of plain einsums. The price: E / A times the
    expert FLOPs (16x for 26B-A4B: its experts then cost 3 x 128 x 2816 x 704 x 2 = 1.5 GFLOP per token and
    layer instead of 95 M) and [B,T,E,M] expert activations (2 x 2048 tokens: 369 M numbers per tensor per
    layer, 0.74 GB in bf16, before any tp split of E). A sorted dispatch would remove both; none is written yet
    (docs/performance.md 'Mixture-of-experts dispatch': jax.lax.ragged_dot, Tunix's way, is slower than this on a
    CPU; a sharded one needs an accelerator to measure). The router's top-k is not differentiated (the weights c
    are)."""
    E, A, D = cfg.num_experts, cfg.top_k_experts, cfg.embed_dim
    dtype = x_BTD.dtype
    with jax.named_scope("router"):
        r_BTD = rms_norm(x_BTD, None, cfg.norm_eps) * w["router_scale"].astype(dtype) * jnp.asarray(D ** -0.5, dtype)
        logits_BTE = jnp.einsum("BTD,DE->BTE", r_BTD, w["router"])
        p_BTE = jax.nn.softmax(logits_BTE.astype(jnp.float32), axis=-1)
        top_BTA, idx_BTA = jax.lax.top_k(p_BTE, A)
        top_BTA = top_BTA / jnp.sum(top_BTA, axis=-1, keepdims=True)
        top_BTA = top_BTA * w["per_expert_scale"].astype(jnp.float32)[idx_BTA]
        c_BTE = jnp.einsum("BTAE,BTA->BTE", jax.nn.one_hot(idx_BTA, E, dtype=jnp.float32), top_BTA)
    with jax.named_scope("experts"):
        h_BTD = rms_norm(x_BTD, w["pre_moe_norm"], cfg.norm_eps, cfg.norm_plus_one)
        gate_up_BTECM = jnp.einsum("BTD,EDCM->BTECM", h_BTD, w["experts_gate_up"])
        h_BTEM = jax.nn.gelu(gate_up_BTECM[:, :, :, 0], approximate=True) * gate_up_BTECM[:, :, :, 1]
        h_BTEM = h_BTEM * c_BTE[..., None].astype(dtype)
        return jnp.einsum("BTEM,EMD->BTD", h_BTEM, w["experts_down"])


def _block(cfg, x_BTD, w, lora_layer, scale, attend, ple_BTP=None, shard=None):
    """One transformer block: pre-norm attention and MLP, with Gemma 2's post-norms when configured.
    `attend(h_BTD) -> (out_BTD, extra)` is the attention of this layer (full or cached, see callers); returns
    (x, extra). Gemma 4 (HF Gemma4TextDecoderLayer): with experts (cfg.num_experts) the MLP output is
    post_mlp_norm(dense MLP) + post_moe_norm(experts), both read from the same residual x; then the per-layer input
    ple_BTP enters through norm(proj(gelu(gate(x)) * ple)) added to x, and the whole residual stream is multiplied
    by the layer scalar.
    shard: a ShardingCtx; the residual after attention, the MLP hidden and the block's output are constrained."""
    eps, plus_one = cfg.norm_eps, cfg.norm_plus_one
    h, extra = attend(rms_norm(x_BTD, w["attn_norm"], eps, plus_one))
    if cfg.use_post_norms:
        h = rms_norm(h, w["post_attn_norm"], eps, plus_one)
    x_BTD = constrain(x_BTD + h, shard, ACT_BTD)
    h = _mlp(rms_norm(x_BTD, w["ffw_norm"], eps, plus_one), w, lora_layer, scale, shard)
    if cfg.num_experts:
        with jax.named_scope("moe"):
            h = (rms_norm(h, w["post_mlp_norm"], eps, plus_one)
                 + rms_norm(_moe(cfg, x_BTD, w), w["post_moe_norm"], eps, plus_one))
    if cfg.use_post_norms:
        h = rms_norm(h, w["post_ffw_norm"], eps, plus_one)
    x_BTD = x_BTD + h
    if ple_BTP is not None:
        with jax.named_scope("per_layer_input"):
            g_BTP = jax.nn.gelu(jnp.einsum("BTD,DP->BTP", x_BTD, w["ple_gate"]), approximate=True) * ple_BTP
            h = rms_norm(jnp.einsum("BTP,PD->BTD", g_BTP, w["ple_proj"]), w["ple_norm"], eps, plus_one)
            x_BTD = x_BTD + h
    if "layer_scalar" in w:
        x_BTD = x_BTD * w["layer_scalar"].astype(x_BTD.dtype)
    return constrain(x_BTD, shard, ACT_BTD), extra


def embed(params, tokens_BT, cfg):
    """Token embedding times sqrt(D), the scale cast to the weight dtype first (bf16: sqrt(2304) -> 48.0)."""
    e = params["embed"]
    return e[tokens_BT] * jnp.asarray(math.sqrt(cfg.embed_dim), e.dtype)


def per_layer_inputs(params, tokens_BT, x_BTD, cfg):
    """Gemma 4's per-layer embeddings [B,T,L,P] (HF Gemma4TextModel.get_per_layer_inputs and
    project_per_layer_inputs): (norm(x @ W * D^-0.5) + E_ple[token] * sqrt(P)) * 2^-0.5, x the scaled embedding;
    the sqrt(P) scale cast to the table's dtype first, as for the main embedding."""
    e, P = params["per_layer_embed"], cfg.per_layer_input_dim
    tok_BTLP = e[tokens_BT] * jnp.asarray(math.sqrt(P), e.dtype)
    proj_BTLP = jnp.einsum("BTD,DLP->BTLP", x_BTD, params["per_layer_proj"])
    proj_BTLP = proj_BTLP * jnp.asarray(cfg.embed_dim ** -0.5, proj_BTLP.dtype)
    proj_BTLP = rms_norm(proj_BTLP, params["per_layer_proj_norm"], cfg.norm_eps, cfg.norm_plus_one)
    return (proj_BTLP + tok_BTLP) * jnp.asarray(2.0 ** -0.5, x_BTD.dtype)


def _gemma4_layers(params, x_BTD, tokens_BT, cfg, ropes, masks_g, masks_l, cache=None, lora=None,
                   shard=None):
    """Gemma 4's layers, unrolled in Python; returns (x, per layer its new (k, v), None for KV-shared layers).

    Why not the layer scan: the layers differ in shape (global head dim and kv heads, KV-shared layers without
    k/v weights, double-wide MLPs), and KV-shared layers read another layer's keys/values, so a scan would need
    padded weights or several scans over runs of equal layers (runs of 5 or fewer with the 5:1 pattern).
    Unrolled is the simplest correct form; compile time grows with depth. With cfg.remat each layer is checkpointed
    (its inputs kept, the layer run again in the backward pass). XLA's CPU backend does not lower an unrolled
    step's temp size with it (Gemma 3 unrolled neither); the saving is for accelerators' memory-aware scheduling
    and is not measured here. A scan over runs of equal layers, weights stacked inside the step, was measured and
    not kept (docs/performance.md, 'Gemma 4 layer runs').
    Each KV-shared layer attends with the (normed, rotated) keys and values of its LayerKind.kv_source: with a
    cache, the source's cached slots and its new keys/values (HF: the source's full-length cache states)."""
    ple_BTLP = per_layer_inputs(params, tokens_BT, x_BTD, cfg) if cfg.per_layer_input_dim else None
    kv = {}
    for i, (kind, w) in enumerate(zip(layer_kinds(cfg), params["layers"])):
        masks = masks_l if kind.local else masks_g
        src = i if kind.has_kv else kind.kv_source
        k_c, v_c = (None, None) if cache is None else (cache["k"][src], cache["v"][src])
        lora_layer = None if lora is None else lora_layer_slice(lora.layers, i)
        scale = 0.0 if lora is None else lora.scale

        def layer(x_BTD, w, lora_layer, ple_BTP, sin_cos, masks, k_c, v_c, shared_kv):
            def attend(h):
                out, k, v = _attention(cfg, h, w, lora_layer, scale, sin_cos, masks[0], k_c, v_c, *masks[1:],
                                       shared_kv=shared_kv)
                return out, (k, v)

            return _block(cfg, x_BTD, w, lora_layer, scale, attend, ple_BTP, shard)

        if cfg.remat:  # keep the layer's inputs for the backward pass, which runs the layer again
            layer = jax.checkpoint(layer)
        with jax.named_scope(f"layer_{i}"):
            x_BTD, kv[i] = layer(x_BTD, w, lora_layer, None if ple_BTLP is None else ple_BTLP[:, :, i],
                                 ropes[kind.local], masks, k_c, v_c, None if kind.has_kv else kv[kind.kv_source])
    return x_BTD, tuple(kv[i] if kind.has_kv else None for i, kind in enumerate(layer_kinds(cfg)))


def unembed(params, h_BTD, cfg):
    """Tied output projection to float32 logits, then Gemma 2's final softcap."""
    logits_BTV = jnp.einsum("BTD,VD->BTV", h_BTD, params["embed"], preferred_element_type=jnp.float32)
    return softcap(logits_BTV, cfg.final_logit_softcap)


def forward_hidden(params, tokens_BT, cfg: GemmaConfig, *, positions_BT=None, pad_mask_BT=None,
                   segment_ids_BT=None, cache=None, lora=None, shard=None):
    """The transformer up to the final norm: returns (hidden [B,T,D], new cache or None).

    positions_BT: per-token positions; default: count of real tokens before each one (so left padding works).
    pad_mask_BT: True for real tokens; default all True. Padding is never attended to.
    segment_ids_BT: tokens attend only within their segment (packed SFT rows); ignored with a cache.
    cache: from `init_cache`; the T tokens are written at slots [index, index + T) and attend to every valid
        earlier slot. Returns the updated cache (a new pytree; nothing is mutated).
    lora: adapters with `.scale` and `.layers` {name: {"a": [L,..], "b": [L,..]}} (see lora/), or None.
    shard: a gemma_jax.sharding.ShardingCtx (static under jit): the embedding output, each block's residual and
        MLP hidden, and the final hidden are constrained to its "act_*" rules. None: no constraints.
    """
    B, T = tokens_BT.shape
    if pad_mask_BT is None:
        pad_mask_BT = jnp.ones((B, T), bool)
    pad_mask_BT = pad_mask_BT.astype(bool)
    if positions_BT is None:
        positions_BT = jnp.maximum(jnp.cumsum(pad_mask_BT, axis=1) - 1, 0)
        if cache is not None:
            positions_BT = positions_BT + jnp.sum(cache["valid"], axis=1, keepdims=True)
    positions_BT = positions_BT.astype(jnp.int32)

    if cache is None:
        slots_S = jnp.arange(T)
        mask_g, mask_l = attention_masks(cfg, positions_BT, positions_BT, pad_mask_BT, slots_S, slots_S,
                                         segment_ids_BT, segment_ids_BT)
        masks_g, masks_l = (mask_g,), (mask_l,)
    else:
        index = cache["index"]
        S = cache["valid"].shape[1]
        k_pos_BS = jax.lax.dynamic_update_slice(cache["pos"], positions_BT, (0, index))
        k_valid_BS = jax.lax.dynamic_update_slice(cache["valid"], pad_mask_BT, (0, index))
        mask_g, mask_l = attention_masks(cfg, positions_BT, k_pos_BS, k_valid_BS, index + jnp.arange(T),
                                         jnp.arange(S))
        # Split each [B,T,S] mask into the slots written before this call and the T slots being written now.
        old_S = jnp.arange(S) < index
        split = lambda m: (m & old_S, jax.lax.dynamic_slice_in_dim(m, index, T, axis=2))  # noqa: E731
        masks_g, masks_l = split(mask_g), split(mask_l)

    scale = 0.0 if lora is None else lora.scale
    lora_layers = None if lora is None else lora.layers
    is_local_L = jnp.asarray(cfg.is_local_layer)
    ropes = rope_tables(cfg, positions_BT)
    x_BTD = constrain(embed(params, tokens_BT, cfg), shard, ACT_BTD)
    if cfg.layer_list:
        x_BTD, kv_new = _gemma4_layers(params, x_BTD, tokens_BT, cfg, ropes, masks_g, masks_l, cache, lora,
                                       shard)
        h_BTD = constrain(rms_norm(x_BTD, params["final_norm"], cfg.norm_eps, cfg.norm_plus_one), shard, ACT_BTD)
        if cache is None:
            return h_BTD, None
        put = lambda c, new: None if c is None else jax.lax.dynamic_update_slice(c, new, (0, index, 0, 0))  # noqa
        return h_BTD, {"k": tuple(put(c, None if n is None else n[0]) for c, n in zip(cache["k"], kv_new)),
                       "v": tuple(put(c, None if n is None else n[1]) for c, n in zip(cache["v"], kv_new)),
                       "pos": k_pos_BS, "valid": k_valid_BS, "index": index + T}

    def layer(x, xs):
        w, lora_layer, is_local, k_c, v_c = xs
        masks = tuple(jnp.where(is_local, ml, mg) for ml, mg in zip(masks_l, masks_g))

        def attend(h):
            out, k_new, v_new = _attention(cfg, h, w, lora_layer, scale, layer_rope(ropes, is_local), masks[0],
                                           k_c, v_c, *masks[1:])
            return out, (k_new, v_new)

        x, (k_new, v_new) = _block(cfg, x, w, lora_layer, scale, attend, shard=shard)
        return x, (None, None) if cache is None else (k_new, v_new)

    if cfg.remat:
        layer = jax.checkpoint(layer, prevent_cse=not cfg.scan_layers)
    elif cfg.scan_layers:
        # Under differentiation the scan stacks every residual of every layer into [L, ...] buffers, which XLA's
        # CPU backend zero-fills and copies. Saving only the projections' outputs (base + LoRA, named in
        # _project) and recomputing the elementwise work, the LoRA products and the attention products in the
        # backward pass is faster and keeps less memory (measurements: docs/performance.md, 'Layer scan
        # checkpointing'). No effect without differentiation.
        layer = jax.checkpoint(layer, prevent_cse=False,
                               policy=jax.checkpoint_policies.save_only_these_names("projection"))
    xs = (params["layers"], lora_layers, is_local_L, None if cache is None else cache["k"],
          None if cache is None else cache["v"])
    if cfg.scan_layers:
        x_BTD, (k_new_L, v_new_L) = jax.lax.scan(layer, x_BTD, xs)
    else:
        ys = []
        for i in range(cfg.num_layers):
            x_BTD, y = layer(x_BTD, jax.tree.map(lambda a, i=i: a[i], xs))
            ys.append(y)
        k_new_L, v_new_L = jax.tree.map(lambda *a: jnp.stack(a), *ys) if cache is not None else (None, None)
    h_BTD = constrain(rms_norm(x_BTD, params["final_norm"], cfg.norm_eps), shard, ACT_BTD)
    new_cache = None
    if cache is not None:
        # One in-place write of every layer's new keys/values at slots [index, index + T).
        put = lambda c, new: jax.lax.dynamic_update_slice(c, new, (0, 0, index, 0, 0))  # noqa: E731
        new_cache = {"k": put(cache["k"], k_new_L), "v": put(cache["v"], v_new_L), "pos": k_pos_BS,
                     "valid": k_valid_BS, "index": index + T}
    return h_BTD, new_cache


def forward(params, tokens_BT, cfg: GemmaConfig, *, positions_BT=None, pad_mask_BT=None, segment_ids_BT=None,
            cache=None, lora=None, shard=None):
    """Logits [B,T,V] (float32) and the updated cache. Arguments as in `forward_hidden`."""
    h_BTD, new_cache = forward_hidden(params, tokens_BT, cfg, positions_BT=positions_BT, pad_mask_BT=pad_mask_BT,
                                      segment_ids_BT=segment_ids_BT, cache=cache, lora=lora, shard=shard)
    return constrain(unembed(params, h_BTD, cfg), shard, ACT_BTV), new_cache
