"""Gemma 4 mixture of experts (26B-A4B): parity with transformers' Gemma4ForCausalLM through files it saved, our
save_hf read back by transformers, cache decoding and greedy generation, the preset against the published config
and transformers' parameter count on the meta device, LoRA (attention and dense MLP adapters, none on the experts)
and a sharded forward.

Tiny configs: TINY_GEMMA4 (every dense Gemma 4 feature) with 4 experts, top-2 routing and expert hidden 24; and a
26B-A4B-shaped one (no PLE, no KV sharing, k = v global layers). Random weights including the router, its scales
and every norm (around 1); one left-padded row. transformers runs its eager expert loop in the parity fixture and
its default (grouped_mm) in the save_hf test.
"""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hf_utils import (
    cached_logits,
    hf_config,
    hf_greedy_tokens,
    hf_logits,
    our_logits,
    padded_batch,
    random_params,
    randomize_hf,
)
from transformers import AutoModelForCausalLM, Gemma4ForCausalLM, Gemma4TextConfig

import gemma_jax as g
from gemma_jax import config as C
from gemma_jax.config import config_from_hf, config_to_hf
from gemma_jax.model import abstract_params, count_params, forward
from gemma_jax.sampler import generate

T = 20
MOE = dataclasses.replace(C.TINY_GEMMA4, num_experts=4, top_k_experts=2, moe_hidden_dim=24)
CASES = {
    "all": MOE,
    "a4b_shape": dataclasses.replace(MOE, per_layer_input_dim=0, num_kv_shared_layers=0, double_wide_mlp=False),
}
# Norms, router scales and per-expert scales randomised around 1 (not all equal), the other weights around 0.
MOE_AROUND_ONE = ("norm", "router.scale", "per_expert_scale")
MOE_PARAMS_AROUND_ONE = ("norm", "layer_scalar", "scale")


@pytest.fixture(scope="module", params=list(CASES))
def hf_case(request, tmp_path_factory):
    cfg = CASES[request.param]
    hf_cfg = hf_config(Gemma4TextConfig, cfg, attn_implementation="eager", experts_implementation="eager")
    model = randomize_hf(Gemma4ForCausalLM(hf_cfg), seed=1, around_one=MOE_AROUND_ONE)
    path = str(tmp_path_factory.mktemp(f"hf4moe_{request.param}"))
    model.save_pretrained(path)
    return request.param, cfg, model, path


def test_load_hf_matches_transformers_logits(hf_case):
    name, cfg, model, path = hf_case
    got_cfg, params = g.load_checkpoint(path)
    assert got_cfg == cfg
    assert params["layers"][0]["experts_gate_up"].shape == (4, 64, 2, 24)
    tokens, mask = padded_batch(T)
    diff = np.abs(our_logits(params, got_cfg, tokens, mask) - hf_logits(model, tokens, mask))[mask].max()
    print(f"gemma4 moe {name}: max |logits - transformers| = {diff:.2e}")
    assert diff <= 1e-4, diff


def test_routing_matters(hf_case):
    """Routing to 3 experts instead of 2, or not renormalising the per-expert scales away, moves the logits far
    beyond the tolerance: the test above sees the router."""
    name, cfg, model, path = hf_case
    if name != "all":
        pytest.skip("one case is enough")
    _, params = g.load_checkpoint(path)
    tokens, mask = padded_batch(T)
    ref = hf_logits(model, tokens, mask)
    wrong = dataclasses.replace(cfg, top_k_experts=3)
    assert np.abs(our_logits(params, wrong, tokens, mask) - ref)[mask].max() > 1e-2
    flat = [{**w, "per_expert_scale": jnp.ones_like(w["per_expert_scale"])} for w in params["layers"]]
    assert np.abs(our_logits({**params, "layers": flat}, cfg, tokens, mask) - ref)[mask].max() > 1e-2


@pytest.mark.parametrize("name", list(CASES))
def test_save_hf_loads_in_transformers_with_same_logits(name, tmp_path):
    cfg = CASES[name]
    params = random_params(cfg, around_one=MOE_PARAMS_AROUND_ONE, seed=3)
    g.save_hf(tmp_path, cfg, params)
    saved = json.load(open(tmp_path / "config.json"))
    assert (saved["enable_moe_block"], saved["num_experts"], saved["top_k_experts"],
            saved["moe_intermediate_size"]) == (True, 4, 2, 24)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert type(model).__name__ == "Gemma4ForCausalLM"
    tokens, mask = padded_batch(T)
    diff = np.abs(our_logits(params, cfg, tokens, mask) - hf_logits(model, tokens, mask))[mask].max()
    print(f"gemma4 moe save_hf {name}: max |logits - transformers| = {diff:.2e}")
    assert diff <= 1e-4, diff
    got_cfg, back = g.load_checkpoint(tmp_path)
    assert got_cfg == cfg
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(back)))


@pytest.mark.parametrize("name", list(CASES))
def test_kv_cache_prefill_then_decode_equals_full_forward(name):
    """model.forward with a cache: a 12-token left-padded prefill then one token at a time past the window (8)."""
    cfg = CASES[name]
    params = random_params(cfg, around_one=MOE_PARAMS_AROUND_ONE, seed=6)
    tokens, mask = padded_batch(T)
    diff = np.abs(cached_logits(params, cfg, tokens, mask) - our_logits(params, cfg, tokens, mask))[mask].max()
    print(f"gemma4 moe cache {name}: max |prefill+decode - full forward| = {diff:.2e}")
    assert diff <= 1e-4, diff


def test_greedy_equals_transformers_generate_left_padded(hf_case):
    """The sampler's one-token steps (gemma_jax/decode.py, the same _block): 14 new tokens > window 8, prompts
    of 3 and 6 tokens left-padded in one batch."""
    name, cfg, model, path = hf_case
    _, params = g.load_checkpoint(path)
    prompts, N = [[2, 17, 99, 45, 300, 8], [2, 77, 5]], 14
    out = generate(params, cfg, prompts, max_new_tokens=N, temperature=0.0, stop_ids=(1,))
    ref = hf_greedy_tokens(model, prompts, N)
    assert np.array_equal(out.tokens, ref), (out.tokens, ref)


# The text_config of google/gemma-4-26B-A4B-it's published config.json (the fields that shape the model).
PUBLISHED_26B_A4B = {
    "model_type": "gemma4_text", "hidden_size": 2816, "intermediate_size": 2112, "num_hidden_layers": 30,
    "num_attention_heads": 16, "num_key_value_heads": 8, "num_global_key_value_heads": 2, "head_dim": 256,
    "global_head_dim": 512, "vocab_size": 262_144, "vocab_size_per_layer_input": 262_144,
    "hidden_size_per_layer_input": 0, "sliding_window": 1024, "final_logit_softcapping": 30.0,
    "attention_k_eq_v": True, "num_kv_shared_layers": 0, "use_double_wide_mlp": False, "enable_moe_block": True,
    "num_experts": 128, "top_k_experts": 8, "moe_intermediate_size": 704, "rms_norm_eps": 1e-6,
    "hidden_activation": "gelu_pytorch_tanh", "max_position_embeddings": 262_144, "tie_word_embeddings": True,
    "layer_types": (["sliding_attention"] * 5 + ["full_attention"]) * 5, "dtype": "bfloat16",
    "rope_parameters": {"full_attention": {"partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0,
                                           "rope_type": "proportional"},
                        "sliding_attention": {"rope_theta": 10_000.0, "rope_type": "default"}},
}


def test_preset_equals_the_published_config():
    assert config_from_hf(PUBLISHED_26B_A4B) == dataclasses.replace(C.GEMMA4_26B_A4B, param_dtype="bfloat16")
    mm = {"model_type": "gemma4", "text_config": PUBLISHED_26B_A4B, "architectures": ["Gemma4ForConditionalGeneration"]}
    assert config_from_hf(mm).num_experts == 128


@pytest.mark.parametrize("name", ["GEMMA4_26B_A4B", "MOE"])
def test_param_count_equals_transformers(name):
    """Abstract params (jax.eval_shape) against Gemma4ForCausalLM on the meta device (+ its layer_scalar
    buffers). 26B-A4B: 25.2 G parameters, of which 22.8 G are experts."""
    cfg = MOE if name == "MOE" else getattr(C, name)
    with torch.device("meta"):
        model = Gemma4ForCausalLM(hf_config(Gemma4TextConfig, cfg))
    theirs = sum(p.numel() for p in model.parameters())
    theirs += sum(b.numel() for n, b in model.named_buffers() if n.endswith("layer_scalar"))
    ours = count_params(jax.eval_shape(lambda: abstract_params(cfg)))
    assert ours == theirs, (ours, theirs)
    if name == "GEMMA4_26B_A4B":
        experts = sum(x.size for w in abstract_params(cfg)["layers"] for k, x in w.items() if k.startswith("experts"))
        assert (round(ours / 1e9, 1), round(experts / 1e9, 1)) == (25.2, 22.8)


@pytest.mark.parametrize("name", ["GEMMA4_26B_A4B", "MOE"])
def test_config_round_trips_through_hf(name):
    cfg = MOE if name == "MOE" else getattr(C, name)
    assert config_from_hf(config_to_hf(cfg)) == cfg
    assert config_from_hf(hf_config(Gemma4TextConfig, cfg).to_dict()) == cfg


def test_bad_moe_configs_are_refused():
    d = config_to_hf(MOE)
    with pytest.raises(ValueError, match="'top_k_experts' is missing"):
        config_from_hf({**d, "top_k_experts": None})
    with pytest.raises(ValueError, match="top_k_experts <= num_experts"):
        dataclasses.replace(MOE, top_k_experts=5)
    assert config_from_hf({**d, "enable_moe_block": False}).num_experts == 0


def test_lora_forward_and_gradients():
    """Adapters on attention and the dense MLP (the experts and router carry none): the adapted forward equals
    the merged weights' forward, differs from the base, and every adapter gets a gradient through the MoE."""
    from lora import init_lora, merge

    cfg = CASES["a4b_shape"]  # PLE and KV sharing are covered with LoRA in test_gemma4.py; this one compiles faster
    params = random_params(cfg, around_one=MOE_PARAMS_AROUND_ONE, seed=8)
    lora = init_lora(cfg, rank=4, alpha=8.0, targets=("q", "kv", "o", "gate", "up", "down"), seed=1)
    rng = np.random.RandomState(2)
    lora = jax.tree.map(lambda x: x if x.shape[0] != 4 else jnp.asarray(0.1 * rng.randn(*x.shape), x.dtype), lora)
    tokens, mask = padded_batch(T)
    adapted = np.asarray(forward(params, jnp.asarray(tokens), cfg, pad_mask_BT=jnp.asarray(mask), lora=lora)[0])
    assert np.abs(adapted - our_logits(merge(params, lora), cfg, tokens, mask))[mask].max() <= 1e-4
    assert np.abs(adapted - our_logits(params, cfg, tokens, mask))[mask].max() > 1e-2
    grads = jax.grad(lambda lo: forward(params, jnp.asarray(tokens), cfg, lora=lo)[0].sum())(lora)
    assert all(float(jnp.abs(x).max()) > 0 for x in jax.tree.leaves(grads))


def test_sharded_forward_equals_unsharded():
    """Experts split over tp (RULES "expert"), their D over fsdp, the router replicated over experts."""
    from gemma_jax.sharding import make_mesh, param_shardings

    cfg = MOE
    mesh = make_mesh("fsdp=2,tp=4")
    params = random_params(cfg, around_one=MOE_PARAMS_AROUND_ONE, seed=7)
    sh = param_shardings(cfg, mesh)
    P = jax.sharding.PartitionSpec
    assert sh["layers"][0]["experts_gate_up"].spec == P("tp", "fsdp", None, None)
    assert sh["layers"][0]["experts_down"].spec == P("tp", None, "fsdp")
    assert sh["layers"][0]["router"].spec == P("fsdp", None)
    tokens, mask = padded_batch(T)
    ref = our_logits(params, cfg, tokens, mask)
    got = jax.jit(lambda p: forward(p, jnp.asarray(tokens), cfg, pad_mask_BT=jnp.asarray(mask))[0])(
        jax.device_put(params, sh))
    assert np.abs(np.asarray(got) - ref)[mask].max() <= 1e-4


def test_memory_estimate_counts_the_experts():
    """The 26B-A4B base in bf16 is 2 bytes per parameter; the dense-over-experts activations are counted."""
    from train import memory

    cfg = C.GEMMA4_26B_A4B
    est = memory.estimate_bytes(cfg, param_dtype="bfloat16", lora_rank=8, batch=1, seq_len=1024)
    assert est["base_params"] == 2 * count_params(abstract_params(cfg))
    act = memory.activation_bytes(cfg, dtype="bfloat16", batch=1, seq_len=1024, mesh_shape={}, remat=False,
                                  lora_rank=8, lora_targets=("q",))
    dense = memory.activation_bytes(dataclasses.replace(cfg, num_experts=0, top_k_experts=0, moe_hidden_dim=0),
                                    dtype="bfloat16", batch=1, seq_len=1024, mesh_shape={}, remat=False,
                                    lora_rank=8, lora_targets=("q",))
    experts = 8 * 1024 * 128 * 704 * 2 + 3 * 1024 * 2816 * 4 + 2 * 1024 * 128 * 4
    assert act["layer_each"] - dense["layer_each"] == experts
