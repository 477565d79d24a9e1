"""LoRA adapters: y = x W + (x A B) * (alpha / rank), B zeros so a fresh adapter is the base model (Hu et al.
2021, "LoRA", arXiv:2106.09685); A He-uniform, the default of qwix's LoraProvider (qwix/_src/providers/lora.py),
through which Tunix applies LoRA.

The adapters are a pytree of their own, separate from the frozen base params, so `jax.grad` with respect to
them never touches the base. `scale` is static pytree metadata (not a trainable leaf).

Shapes, axes and init come from gemma_jax.model.lora_specs (the LORA_TARGETS table; per layer, L axis first):
    q: A [D,R], B [R,N,H]; k, v: A [D,R], B [R,K,H]; kv (Tunix's fused adapter): A [D,R], B [R,2,K,H];
    o: A [N,H,R], B [R,D]; gate, up: A [D,R], B [R,F]; down: A [F,R], B [R,D].
"""

import dataclasses
import math

import jax
import jax.numpy as jnp

from gemma_jax.config import GemmaConfig
from gemma_jax.model import lora_layer_slice, lora_specs, lora_target

# The projections the Tunix Gemma examples adapt: q_einsum, kv_einsum, gate_proj, up_proj, down_proj.
DEFAULT_TARGETS = ("q", "kv", "gate", "up", "down")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LoRA:
    layers: dict  # name -> {"a": [L, ...], "b": [L, ...]}; Gemma 4: tuples over layers (None: no adapter there)
    scale: float = dataclasses.field(metadata=dict(static=True))  # alpha / rank


def lora_shapes(cfg: GemmaConfig, rank: int, targets=DEFAULT_TARGETS) -> dict:
    """name -> (A shape, B shape), without the leading L axis (from gemma_jax.model.lora_specs)."""
    if cfg.layer_list:
        raise ValueError("Gemma 4 adapters differ in shape per layer: read gemma_jax.model.lora_specs instead")
    return {n: (ab["a"].shape[1:], ab["b"].shape[1:]) for n, ab in lora_specs(cfg, rank, targets).items()}


def _init(spec, key, dtype):
    """One adapter tensor from its ParamSpec: "he_uniform" (bound sqrt(6 / fan_in), drawn in float32) or "zeros"."""
    if spec.init == "zeros":
        return jnp.zeros(spec.shape, dtype)
    if spec.init != "he_uniform":
        raise ValueError(f"LoRA init {spec.init!r} is not supported (expected 'he_uniform' or 'zeros')")
    bound = math.sqrt(6.0 / spec.fan_in)
    return jax.random.uniform(key, spec.shape, jnp.float32, -bound, bound).astype(dtype)


def init_lora(cfg: GemmaConfig, rank: int, alpha: float, targets=DEFAULT_TARGETS, seed: int = 0,
              dtype=jnp.float32) -> LoRA:
    """Fresh adapters: A He-uniform (bound sqrt(6 / fan_in)), B zeros, so the adapted model equals the base.
    One key per adapter, in the order of `targets`, drawn by its A (B takes none)."""
    specs = lora_specs(cfg, rank, targets)
    keys = jax.random.split(jax.random.key(seed), len(specs))
    if cfg.layer_list:  # Gemma 4: per-layer tuples (None where the layer lacks the weight); layer i's A: key i
        layers = {name: {"a": tuple(None if s is None else _init(s, jax.random.fold_in(key, i), dtype)
                                    for i, s in enumerate(ab["a"])),
                         "b": tuple(None if s is None else _init(s, None, dtype) for s in ab["b"])}
                  for key, (name, ab) in zip(keys, specs.items())}
        return LoRA(layers=layers, scale=float(alpha) / rank)
    layers = {name: {"a": _init(ab["a"], key, dtype), "b": _init(ab["b"], None, dtype)}
              for key, (name, ab) in zip(keys, specs.items())}
    return LoRA(layers=layers, scale=float(alpha) / rank)


def count_trainable(lora: LoRA) -> int:
    """Number of trainable numbers in the adapters (every A and B entry, all layers)."""
    return int(sum(math.prod(x.shape) for x in jax.tree.leaves(lora)))


def concat_lora(first: LoRA, second: LoRA) -> LoRA:
    """One adapter set equal to applying `first` and `second` together: ranks concatenated.

    x [A1 A2] [[B1], [B2 * s2/s1]] * s1 = x A1 B1 s1 + x A2 B2 s2, exactly (B2 rescaled so one scale serves both).
    Used after GRPO on top of merged SFT adapters, so the saved result loads onto the plain base model."""
    if set(first.layers) != set(second.layers):
        raise ValueError(f"concat_lora: target sets differ: {sorted(first.layers)} vs {sorted(second.layers)}")
    ratio = second.scale / first.scale
    layers = {}
    for name, ab in first.layers.items():
        a2, b2 = second.layers[name]["a"], second.layers[name]["b"]
        if isinstance(ab["a"], tuple):  # Gemma 4 per-layer adapters: A [..., R], B [R, ...]
            layers[name] = {
                "a": tuple(None if x is None else jnp.concatenate([x, y.astype(x.dtype)], axis=-1)
                           for x, y in zip(ab["a"], a2)),
                "b": tuple(None if x is None else jnp.concatenate([x, (y * ratio).astype(x.dtype)], axis=0)
                           for x, y in zip(ab["b"], b2))}
            continue
        layers[name] = {"a": jnp.concatenate([ab["a"], a2.astype(ab["a"].dtype)], axis=-1),
                        "b": jnp.concatenate([ab["b"], (b2 * ratio).astype(ab["b"].dtype)], axis=1)}
    return LoRA(layers=layers, scale=first.scale)


def merge(params: dict, lora: LoRA) -> dict:
    """Plain params with W' = W + scale * A B folded in (computed in float32, cast back to W's dtype).

    The einsum contracts R per layer: A's letters and B's letters (gemma_jax.model.LORA_TARGETS) -> the base
    weight's letters, e.g. q: LDR,LRNH->LDNH. The fused kv adapter's C axis goes first: slice c is added to
    adds_to[c] (k, then v)."""
    if isinstance(params["layers"], list):
        return _merge_per_layer(params, lora)
    layers = dict(params["layers"])
    for name, ab in lora.layers.items():
        t = lora_target(name)
        a, b = ab["a"].astype(jnp.float32), ab["b"].astype(jnp.float32)
        w_letters = "L" + (t.a[:-1] + t.b[1:]).replace("C", "")
        out_letters = ("C" if "C" in t.b else "") + w_letters
        delta = lora.scale * jnp.einsum(f"L{t.a},L{t.b}->{out_letters}", a, b)
        deltas = delta if "C" in t.b else delta[None]
        for target, d in zip(t.adds_to, deltas):
            layers[target] = (layers[target].astype(jnp.float32) + d).astype(layers[target].dtype)
    return {**params, "layers": layers}


def _merge_per_layer(params: dict, lora: LoRA) -> dict:
    """merge for Gemma 4's per-layer weights and adapters (lora_layer_slice picks layer i's)."""
    layers = [dict(w) for w in params["layers"]]
    for i, w in enumerate(layers):
        for name, ab in lora_layer_slice(lora.layers, i).items():
            t = lora_target(name)
            a, b = ab["a"].astype(jnp.float32), ab["b"].astype(jnp.float32)
            w_letters = (t.a[:-1] + t.b[1:]).replace("C", "")
            delta = lora.scale * jnp.einsum(f"{t.a},{t.b}->{('C' if 'C' in t.b else '') + w_letters}", a, b)
            for target, d in zip(t.adds_to, delta if "C" in t.b else delta[None]):
                w[target] = (w[target].astype(jnp.float32) + d).astype(w[target].dtype)
    return {**params, "layers": layers}
