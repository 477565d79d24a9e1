"""LoRA adapters: y = x W + (x A B) * (alpha / rank), A He-uniform, B zeros (REFERENCE.md §3).

The adapters are a pytree of their own, separate from the frozen base params, so `jax.grad` with respect to
them never touches the base. `scale` is static pytree metadata (not a trainable leaf).

Per-layer shapes (each with a leading L axis), named after the projections in gemma_jax/model.py:
    q: A [D,R], B [R,N,H]; k, v: A [D,R], B [R,K,H]; kv (Tunix's fused adapter): A [D,R], B [R,2,K,H];
    o: A [N,H,R], B [R,D]; gate, up: A [D,R], B [R,F]; down: A [F,R], B [R,D].
"""

import dataclasses
import math

import jax
import jax.numpy as jnp

from gemma_jax.config import GemmaConfig
from gemma_jax.model import LORA_EINSUMS, lora_weight_shapes

# The projections the Tunix Gemma examples adapt: q_einsum, kv_einsum, gate_proj, up_proj, down_proj.
DEFAULT_TARGETS = ("q", "kv", "gate", "up", "down")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LoRA:
    layers: dict  # name -> {"a": [L, ...], "b": [L, ...]}
    scale: float = dataclasses.field(metadata=dict(static=True))  # alpha / rank


def lora_shapes(cfg: GemmaConfig, rank: int, targets=DEFAULT_TARGETS) -> dict:
    """name -> (A shape, B shape), without the leading L axis."""
    if "kv" in targets and ("k" in targets or "v" in targets):
        raise ValueError("LoRA targets: use either the fused 'kv' adapter or separate 'k'/'v', not both")
    return lora_weight_shapes(cfg, rank, targets)


def init_lora(cfg: GemmaConfig, rank: int, alpha: float, targets=DEFAULT_TARGETS, seed: int = 0,
              dtype=jnp.float32) -> LoRA:
    """Fresh adapters: A He-uniform (bound sqrt(6 / fan_in)), B zeros, so the adapted model equals the base."""
    shapes = lora_shapes(cfg, rank, targets)
    keys = jax.random.split(jax.random.key(seed), len(shapes))
    layers = {}
    for key, (name, (a_shape, b_shape)) in zip(keys, shapes.items()):
        fan_in = math.prod(a_shape[:-1])
        bound = math.sqrt(6.0 / fan_in)
        a = jax.random.uniform(key, (cfg.num_layers, *a_shape), jnp.float32, -bound, bound).astype(dtype)
        layers[name] = {"a": a, "b": jnp.zeros((cfg.num_layers, *b_shape), dtype)}
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
        layers[name] = {"a": jnp.concatenate([ab["a"], a2.astype(ab["a"].dtype)], axis=-1),
                        "b": jnp.concatenate([ab["b"], (b2 * ratio).astype(ab["b"].dtype)], axis=1)}
    return LoRA(layers=layers, scale=first.scale)


# How each adapter's A @ B product maps onto the base weight it adapts (per layer, no L axis).
_MERGE = {
    "q": ("DR,RNH->DNH", "q"),
    "k": ("DR,RKH->DKH", "k"),
    "v": ("DR,RKH->DKH", "v"),
    "o": ("NHR,RD->NHD", "o"),
    "gate": ("DR,RF->DF", "gate"),
    "up": ("DR,RF->DF", "up"),
    "down": ("FR,RD->FD", "down"),
}
assert set(_MERGE) | {"kv"} == set(LORA_EINSUMS)


def merge(params: dict, lora: LoRA) -> dict:
    """Plain params with W' = W + scale * A B folded in (computed in float32, cast back to W's dtype)."""
    layers = dict(params["layers"])
    for name, ab in lora.layers.items():
        a, b = ab["a"].astype(jnp.float32), ab["b"].astype(jnp.float32)
        if name == "kv":
            delta = lora.scale * jnp.einsum("LDR,LRCKH->CLDKH", a, b)
            for c, target in enumerate(("k", "v")):
                layers[target] = (layers[target].astype(jnp.float32) + delta[c]).astype(layers[target].dtype)
            continue
        eq, target = _MERGE[name]
        delta = lora.scale * jnp.einsum("L" + eq.replace(",", ",L").replace("->", "->L"), a, b)
        layers[target] = (layers[target].astype(jnp.float32) + delta).astype(layers[target].dtype)
    return {**params, "layers": layers}
