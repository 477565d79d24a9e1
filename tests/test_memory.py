"""train/memory.py: the estimate equals the bytes of arrays actually created (params, LoRA, AdamW state,
KV cache; on one device and per device on a fake 8-device mesh), and the activation model is within a stated
factor of XLA's own temp-buffer size for a compiled LoRA train step."""

import dataclasses

import jax
import pytest

from bench.memory_report import compile_step
from gemma_jax.config import TINY, TINY_GEMMA1, TINY_GEMMA4
from gemma_jax.model import init_cache, init_params
from gemma_jax.sharding import cache_shardings, lora_shardings, make_mesh, param_shardings
from lora import init_lora
from train import memory
from train.optim import adamw_init


def total_nbytes(tree):
    return sum(x.nbytes for x in jax.tree.leaves(tree))


def device0_nbytes(tree):
    """Bytes that device 0 holds of every (possibly sharded) array in the tree."""
    dev = jax.devices()[0]
    return sum(s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards if s.device == dev)


@pytest.mark.parametrize("cfg,dtype,targets", [
    (TINY, "float32", ("q", "kv", "gate", "up", "down")),
    (TINY_GEMMA1, "bfloat16", ("q", "k", "v", "o", "gate", "up", "down")),
])
def test_exact_bytes_one_device(cfg, dtype, targets):
    cfg = dataclasses.replace(cfg, param_dtype=dtype)
    est = memory.estimate_bytes(cfg, param_dtype=dtype, lora_rank=4, lora_targets=targets, batch=3, seq_len=16,
                                cache_batch=3, cache_len=40)
    params = init_params(cfg, 0)
    lora = init_lora(cfg, 4, 8.0, targets=targets)
    assert est["base_params"] == total_nbytes(params)
    assert est["lora_params"] == total_nbytes(lora) == est["grads"]
    assert est["optimizer"] == total_nbytes(adamw_init(lora))
    assert est["kv_cache"] == total_nbytes(init_cache(cfg, 3, 40))
    assert est["decode_weights"] == total_nbytes(params["layers"]) + total_nbytes(lora)
    assert est["sample_total"] == (est["base_params"] + est["lora_params"] + est["decode_weights"]
                                   + est["kv_cache"])


def test_gemma4_estimate_counts_each_layer_in_its_shapes():
    """Gemma 4: the KV cache term equals init_cache's bytes (per-layer buffers in each layer's shapes, none for
    KV-shared layers), and the activations grow with the double-wide MLP of the KV-shared layers."""
    kw = dict(param_dtype="float32", lora_rank=4, batch=3, seq_len=16, cache_batch=3, cache_len=40)
    est = memory.estimate_bytes(TINY_GEMMA4, **kw)
    assert est["base_params"] == total_nbytes(init_params(TINY_GEMMA4, 0))
    assert est["kv_cache"] == total_nbytes(init_cache(TINY_GEMMA4, 3, 40))
    act = dict(dtype="float32", batch=3, seq_len=16, mesh_shape={}, remat=False, lora_rank=4,
               lora_targets=("q", "kv", "gate", "up", "down"))
    wide = memory.activation_bytes(TINY_GEMMA4, **act)
    narrow = memory.activation_bytes(dataclasses.replace(TINY_GEMMA4, double_wide_mlp=False), **act)
    mlp = (memory.MLP_COPIES + 1) * 3 * 16 * TINY_GEMMA4.hidden_dim * 4  # one more [b,T,F] set per shared layer
    assert wide["layers_saved"] - narrow["layers_saved"] == TINY_GEMMA4.num_kv_shared_layers * mlp


def test_decode_weights_stacked_drop_the_per_layer_copy():
    """The sampling estimate with decode_weights="stacked" counts one group's layer slices (TINY: p = 2 of 4
    layers) instead of the per-layer copy of all the layers and adapters; its sample_total is lower by exactly the
    difference. Gemma 4 (listed layers, read in place): per_layer copies gate and up only, stacked nothing."""
    kw = dict(param_dtype="float32", lora_rank=4, batch=3, seq_len=16, cache_batch=3, cache_len=40)
    per_layer = memory.estimate_bytes(TINY, **kw)
    stacked = memory.estimate_bytes(TINY, **kw, decode_weights="stacked")
    copy = total_nbytes(init_params(TINY, 0)["layers"]) + total_nbytes(init_lora(TINY, 4, 8.0))
    assert per_layer["decode_weights"] == copy and stacked["decode_weights"] == copy // 2
    assert per_layer["sample_total"] - stacked["sample_total"] == copy - copy // 2
    assert {k: v for k, v in per_layer.items() if "decode" not in k and "sample" not in k} == \
        {k: v for k, v in stacked.items() if "decode" not in k and "sample" not in k}
    params = init_params(TINY_GEMMA4, 0)
    gate_up = sum(w["gate"].nbytes + w["up"].nbytes for w in params["layers"])
    assert memory.estimate_bytes(TINY_GEMMA4, **kw, decode_weights="per_layer")["decode_weights"] == gate_up
    assert memory.estimate_bytes(TINY_GEMMA4, **kw, decode_weights="stacked")["decode_weights"] == 0
    with pytest.raises(ValueError, match="decode_weights must be"):
        memory.estimate_bytes(TINY, **kw, decode_weights="auto")


def test_exact_bytes_per_device_on_mesh():
    mesh = make_mesh("fsdp=4,tp=2")
    est = memory.estimate_bytes(TINY, param_dtype="float32", lora_rank=4, batch=4, seq_len=16,
                                mesh_shape={"fsdp": 4, "tp": 2}, cache_batch=4, cache_len=24)
    p_sh = param_shardings(TINY, mesh)
    params = jax.device_put(init_params(TINY, 0), p_sh)
    lora = init_lora(TINY, 4, 8.0)
    l_sh = lora_shardings(lora, mesh)
    lora = jax.device_put(lora, l_sh)
    opt = jax.device_put(adamw_init(lora), {"count": jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()),
                                            "mu": l_sh, "nu": l_sh})
    cache = init_cache(TINY, 4, 24)
    cache = jax.device_put(cache, cache_shardings(cache, mesh))
    assert est["base_params"] == device0_nbytes(params) < total_nbytes(params) // 4
    assert est["lora_params"] == device0_nbytes(lora)
    assert est["optimizer"] == device0_nbytes(opt)
    assert est["kv_cache"] == device0_nbytes(cache) < total_nbytes(cache) // 2


# A config where layers and the vocabulary head both matter, small enough to compile in seconds.
SMALL = dataclasses.replace(TINY, num_layers=2, embed_dim=128, hidden_dim=512, num_heads=4, num_kv_heads=2,
                            head_dim=32, vocab_size=4096, query_pre_attn_scalar=32, sliding_window=64)
# Gemma 4's layers in several shapes: double-wide MLPs on the KV-shared layers, a wider global head dim.
SMALL_GEMMA4 = dataclasses.replace(TINY_GEMMA4, embed_dim=128, hidden_dim=512, num_heads=4, num_kv_heads=2,
                                   head_dim=32, global_head_dim=64, vocab_size=4096, sliding_window=64,
                                   per_layer_input_dim=16)
ACT_FACTOR = 1.5  # XLA's temp bytes / (estimated activations + grads) must lie in [1 / 1.5, 1.5]


# Gemma 4 without remat only: its layers are unrolled, and XLA's CPU backend does not lower an unrolled step's temp
# size when the layers are checkpointed (the same holds for Gemma 3 with scan_layers=False: 526 MB either way at
# MID_GEMMA3, 2 x 256 tokens), so the CPU cannot check the remat estimate of unrolled layers.
@pytest.mark.parametrize("base,remat", [(SMALL, False), (SMALL, True), (SMALL_GEMMA4, False)])
def test_activations_within_factor_of_xla(base, remat):
    cfg = dataclasses.replace(base, remat=remat)
    compiled, _ = compile_step(cfg, 8, 2, 128, make_mesh("tp=1", jax.devices()[:1]))
    ma = compiled.memory_analysis()
    est = memory.estimate_bytes(cfg, param_dtype="float32", lora_rank=8, batch=2, seq_len=128, remat=remat)
    assert ma.argument_size_in_bytes == est["base_params"] + est["lora_params"] + est["optimizer"] + 2 * 128 * 5
    ratio = ma.temp_size_in_bytes / (est["activations"] + est["grads"])
    print(f"remat={remat}: XLA temp {ma.temp_size_in_bytes} B, estimate {est['activations'] + est['grads']} B, "
          f"ratio {ratio:.2f}")
    assert 1 / ACT_FACTOR <= ratio <= ACT_FACTOR, ratio


def test_remat_and_sharding_shrink_the_estimate():
    from gemma_jax.config import GEMMA2_2B

    kw = dict(param_dtype="bfloat16", lora_rank=32, batch=2, seq_len=2048)
    one = memory.estimate_bytes(GEMMA2_2B, **kw, remat=True)
    # The bf16 2B base is 2 bytes x 2,614,341,888 parameters (docs/reference.md#gemma-numerics, tied embedding).
    assert one["base_params"] == 2 * 2_614_341_888
    assert one["activations_remat"] < one["activations_no_remat"] / 3
    tp8 = memory.estimate_bytes(GEMMA2_2B, **kw, remat=True, mesh_shape={"tp": 8})
    assert tp8["base_params"] < one["base_params"] / 6 and tp8["activations"] < one["activations"] / 4
    table = memory.format_table({"one": one, "tp8": tp8})
    assert "base_params" in table and "5.23 GB" in table


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match=r"unknown axes \['model'\]"):
        memory.estimate_bytes(TINY, lora_rank=4, batch=1, seq_len=8, mesh_shape={"model": 2})
    with pytest.raises(ValueError, match="unknown LoRA target 'qkv'"):
        memory.estimate_bytes(TINY, lora_rank=4, lora_targets=("qkv",), batch=1, seq_len=8)
    with pytest.raises(ValueError, match="optimizer must be"):
        memory.estimate_bytes(TINY, lora_rank=4, batch=1, seq_len=8, optimizer="lion")


def test_weight_bytes_of_every_preset_equal_the_parameter_count():
    """Stacked (Gemma 1-3) and listed (Gemma 4) layers alike: float32 weights are 4 bytes per parameter of
    abstract_params, on one device."""
    from gemma_jax import config as presets
    from gemma_jax.model import abstract_params, count_params

    names = [n for n in dir(presets) if n.startswith("GEMMA") and isinstance(getattr(presets, n), presets.GemmaConfig)]
    assert {"GEMMA2_2B", "GEMMA3_1B", "GEMMA4_E2B"} <= set(names)
    for name in names:
        cfg = getattr(presets, name)
        est = memory.estimate_bytes(cfg, param_dtype="float32", lora_rank=8, batch=1, seq_len=16)
        assert est["base_params"] == 4 * count_params(abstract_params(cfg)), name
