"""Gemma 4 dense text models: parity with transformers' Gemma4ForCausalLM through files it saved (every feature
on, then each switched off in turn), our save_hf read back by transformers, parameter counts of the full-size
presets against transformers on the meta device, config reading and refusals; Gemma 4 12B's gemma4_unified files.

Tiny config TINY_GEMMA4: 6 layers with pattern 3 (layers 2 and 5 global), window 8 < T = 20, the last 3 layers
KV-shared, global head dim 32 with 1 kv head and k = v, proportional RoPE (1/4 of the angles), double-wide shared
MLPs, PLE of width 8, final softcap 30; random weights including every norm (around 1: Gemma 4 norms scale by w)
and random layer scalars; one left-padded row.
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
from gemma_jax.model import abstract_params, count_params, forward, init_cache, init_params, layer_kinds
from gemma_jax.sampler import generate

T = 20
_ALL = C.TINY_GEMMA4
# Each Gemma 4 feature off in turn (transformers always has the value norm, the layer scalars, w-scaled norms and
# attention scale 1, so those stay on). Without a global head dim of its own the full RoPE is allowed.
CASES = {
    "all": _ALL,
    "no_ple": dataclasses.replace(_ALL, per_layer_input_dim=0),
    "no_kv_sharing": dataclasses.replace(_ALL, num_kv_shared_layers=0),
    "no_double_wide": dataclasses.replace(_ALL, double_wide_mlp=False),
    "no_k_eq_v": dataclasses.replace(_ALL, attention_k_eq_v=False, num_global_kv_heads=None),
    "no_global_head_dim": dataclasses.replace(_ALL, global_head_dim=None),
    "full_rope": dataclasses.replace(_ALL, global_head_dim=None, global_rope_fraction=1.0),
    "no_softcap": dataclasses.replace(_ALL, final_logit_softcap=None),
}


@pytest.fixture(scope="module", params=list(CASES))
def hf_case(request, tmp_path_factory):
    cfg = CASES[request.param]
    model = randomize_hf(Gemma4ForCausalLM(hf_config(Gemma4TextConfig, cfg, attn_implementation="eager")), seed=1)
    path = str(tmp_path_factory.mktemp(f"hf4_{request.param}"))
    model.save_pretrained(path)
    return request.param, cfg, model, path


def test_load_hf_matches_transformers_logits(hf_case):
    name, cfg, model, path = hf_case
    got_cfg, params = g.load_checkpoint(path)
    assert got_cfg == cfg
    tokens, mask = padded_batch(T)
    diff = np.abs(our_logits(params, got_cfg, tokens, mask) - hf_logits(model, tokens, mask))[mask].max()
    print(f"gemma4 {name}: max |logits - transformers| = {diff:.2e}")
    assert diff <= 1e-4, diff


def test_tiny_layer_kinds():
    """Layer 3 (local) and 4 read layer 1's keys/values, layer 5 (global) reads layer 2's, as HF's
    store_full_length_kv picks; shared layers have no k/v weights and a 2F MLP; global layers H 32, K 1, k = v."""
    kinds = layer_kinds(_ALL)
    assert [k.kv_source for k in kinds] == [-1, -1, -1, 1, 1, 2]
    assert [k.head_dim for k in kinds] == [16, 16, 32, 16, 16, 32]
    assert [k.kv_heads for k in kinds] == [2, 2, 1, 2, 2, 1]
    assert [k.hidden for k in kinds] == [96, 96, 96, 192, 192, 192]
    params = init_params(_ALL, 0)
    assert [sorted({"k", "v"} & set(w)) for w in params["layers"]] == [["k", "v"], ["k", "v"], ["k"], [], [], []]


def test_rope_fraction_matters(hf_case):
    """Rotating half the global angles instead of a quarter changes the logits far beyond the tolerance."""
    name, cfg, model, path = hf_case
    if name != "all":
        pytest.skip("one case is enough")
    _, params = g.load_checkpoint(path)
    tokens, mask = padded_batch(T)
    ref = hf_logits(model, tokens, mask)
    wrong = dataclasses.replace(cfg, global_rope_fraction=0.5)
    assert np.abs(our_logits(params, wrong, tokens, mask) - ref)[mask].max() > 1e-2


@pytest.mark.parametrize("name", ["all", "no_ple", "no_k_eq_v"])
def test_save_hf_loads_in_transformers_with_same_logits(name, tmp_path):
    cfg = CASES[name]
    params = random_params(cfg, 3)
    g.save_hf(tmp_path, cfg, params)
    assert json.load(open(tmp_path / "config.json"))["model_type"] == "gemma4_text"
    model = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert type(model).__name__ == "Gemma4ForCausalLM"
    tokens, mask = padded_batch(T)
    diff = np.abs(our_logits(params, cfg, tokens, mask) - hf_logits(model, tokens, mask))[mask].max()
    print(f"gemma4 save_hf {name}: max |logits - transformers| = {diff:.2e}")
    assert diff <= 1e-4, diff
    got_cfg, back = g.load_checkpoint(tmp_path)
    assert got_cfg == cfg
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(back)))


@pytest.mark.parametrize("name", ["GEMMA4_E2B", "GEMMA4_E4B", "GEMMA4_12B", "GEMMA4_31B", "TINY_GEMMA4"])
def test_preset_param_count_equals_transformers(name):
    """jax.eval_shape-style abstract params against Gemma4ForCausalLM on the meta device. transformers keeps
    layer_scalar as a (saved) buffer, not a parameter: one number per layer, added to its count."""
    cfg = getattr(C, name)
    with torch.device("meta"):
        model = Gemma4ForCausalLM(hf_config(Gemma4TextConfig, cfg))
    theirs = sum(p.numel() for p in model.parameters())
    theirs += sum(b.numel() for n, b in model.named_buffers() if n.endswith("layer_scalar"))
    ours = count_params(jax.eval_shape(lambda: abstract_params(cfg)))
    assert ours == theirs, (ours, theirs)


@pytest.mark.parametrize("name", ["GEMMA4_E2B", "GEMMA4_E4B", "GEMMA4_12B", "GEMMA4_31B", "TINY_GEMMA4"])
def test_config_round_trips_through_hf(name):
    cfg = getattr(C, name)
    assert config_from_hf(config_to_hf(cfg)) == cfg
    assert config_from_hf(hf_config(Gemma4TextConfig, cfg).to_dict()) == cfg


def test_12b_preset_counts_as_transformers_gemma4_unified():
    """GEMMA4_12B is the text model of google/gemma-4-12B-it (model_type gemma4_unified), which transformers builds
    as Gemma4UnifiedForCausalLM: the same count on the meta device as its Gemma4ForCausalLM twin (11,907,350,320;
    the model card's 11.95 B adds the vision and audio embedders), and the published layer pattern."""
    from transformers.models.gemma4_unified import Gemma4UnifiedForCausalLM, Gemma4UnifiedTextConfig

    cfg = C.GEMMA4_12B
    d = {k: v for k, v in config_to_hf(cfg).items() if k not in ("architectures", "model_type", "torch_dtype")}
    with torch.device("meta"):
        model = Gemma4UnifiedForCausalLM(Gemma4UnifiedTextConfig(**d))
    theirs = sum(p.numel() for p in model.parameters())
    theirs += sum(b.numel() for n, b in model.named_buffers() if n.endswith("layer_scalar"))
    assert count_params(jax.eval_shape(lambda: abstract_params(cfg))) == theirs == 11_907_350_320
    assert model.config.layer_types == ["sliding_attention"] * 5 + ["full_attention"] + (
        ["sliding_attention"] * 5 + ["full_attention"]) * 7
    assert {(k.head_dim, k.kv_heads, k.k_eq_v, k.hidden) for k in layer_kinds(cfg)} == {(256, 8, False, 15360),
                                                                                        (512, 1, True, 15360)}


def test_12b_preset_equals_the_published_config():
    """config_from_hf of google/gemma-4-12B-it's config.json as published (transformers 5.10.0.dev0; the vision and
    audio configs shortened: they are not read) is GEMMA4_12B."""
    layer_types = (["sliding_attention"] * 5 + ["full_attention"]) * 8
    text = {
        "attention_bias": False, "attention_dropout": 0.0, "attention_k_eq_v": True, "bos_token_id": 2,
        "enable_moe_block": False, "eos_token_id": 1, "final_logit_softcapping": 30.0, "global_head_dim": 512,
        "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 3840,
        "hidden_size_per_layer_input": 0, "initializer_range": 0.02, "intermediate_size": 15360,
        "layer_types": layer_types, "max_position_embeddings": 262144, "model_type": "gemma4_unified_text",
        "moe_intermediate_size": None, "num_attention_heads": 16, "num_experts": None,
        "num_global_key_value_heads": 1, "num_hidden_layers": 48, "num_key_value_heads": 8,
        "num_kv_shared_layers": 0, "pad_token_id": 0, "rms_norm_eps": 1e-06,
        "rope_parameters": {"full_attention": {"partial_rotary_factor": 0.25, "rope_theta": 1000000.0,
                                               "rope_type": "proportional"},
                            "sliding_attention": {"rope_theta": 10000.0, "rope_type": "default"}},
        "sliding_window": 1024, "tie_word_embeddings": True, "top_k_experts": None,
        "use_bidirectional_attention": "vision", "use_cache": True, "use_double_wide_mlp": False,
        "vocab_size": 262144, "vocab_size_per_layer_input": 262144}
    published = {
        "architectures": ["Gemma4UnifiedForConditionalGeneration"], "audio_config": {"hidden_size": 640},
        "audio_token_id": 258881, "boa_token_id": 256000, "boi_token_id": 255999, "dtype": "bfloat16",
        "eoa_token_index": 258883, "eoi_token_id": 258882, "image_token_id": 258880, "initializer_range": 0.02,
        "model_type": "gemma4_unified", "text_config": text, "tie_word_embeddings": True,
        "transformers_version": "5.10.0.dev0", "video_token_id": 258884, "vision_config": {"patch_size": 16}}
    assert config_from_hf(published) == dataclasses.replace(C.GEMMA4_12B, param_dtype="bfloat16")


def test_presets_layer_patterns():
    assert C.GEMMA4_E2B.is_local_layer[:5] == (True,) * 4 + (False,)
    assert not C.GEMMA4_E2B.is_local_layer[-1] and not C.GEMMA4_31B.is_local_layer[-1]
    assert sum(k.kv_source >= 0 for k in layer_kinds(C.GEMMA4_E2B)) == 20
    assert {k.hidden for k in layer_kinds(C.GEMMA4_E2B)} == {6144, 12288}
    assert {k.hidden for k in layer_kinds(C.GEMMA4_E4B)} == {10240}
    assert {(k.head_dim, k.kv_heads, k.k_eq_v) for k in layer_kinds(C.GEMMA4_31B)} == {(256, 16, False),
                                                                                         (512, 4, True)}


def test_gemma1_to_3_configs_are_not_gemma4():
    for cfg in (C.TINY, C.TINY_GEMMA1, C.TINY_GEMMA3, C.GEMMA3_27B):
        assert not cfg.layer_list


def test_bidirectional_configs_are_refused():
    d = config_to_hf(_ALL)  # mixture-of-experts configs: tests/test_gemma4_moe.py
    with pytest.raises(ValueError, match="bidirectional"):
        config_from_hf({**d, "use_bidirectional_attention": "all"})


def test_multimodal_config_reads_the_text_config():
    from transformers import Gemma4Config

    mm = Gemma4Config(text_config=hf_config(Gemma4TextConfig, _ALL).to_dict()).to_dict()
    assert config_from_hf(mm) == _ALL


def test_multimodal_text_tower_loads(tmp_path, capsys):
    """A Gemma4ForConditionalGeneration file with vision and audio towers: the text tower is read (the towers and
    their embedders skipped, one log line), logits equal the multimodal model's on text."""
    from transformers import Gemma4Config, Gemma4ForConditionalGeneration

    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=2, head_dim=8)
    audio = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2)
    mm = Gemma4Config(text_config=hf_config(Gemma4TextConfig, _ALL).to_dict(), vision_config=vision, audio_config=audio)
    model = randomize_hf(Gemma4ForConditionalGeneration(mm), seed=2)
    model.config._attn_implementation = "eager"
    model.config.text_config._attn_implementation = "eager"
    model.save_pretrained(tmp_path)
    cfg, params = g.load_checkpoint(tmp_path)
    log = capsys.readouterr().out
    n_other = sum(1 for n in model.state_dict() if "language_model" not in n and n != "lm_head.weight")
    assert f"skipped {n_other} vision/audio tensors" in log and n_other > 10
    assert cfg == _ALL
    tokens, mask = padded_batch(T)
    diff = np.abs(our_logits(params, cfg, tokens, mask) - hf_logits(model, tokens, mask))[mask].max()
    print(f"gemma4 multimodal text tower: max |logits - transformers| = {diff:.2e}")
    assert diff <= 1e-4, diff


@pytest.mark.parametrize("multimodal", [False, True], ids=["causal_lm", "conditional_generation"])
def test_gemma4_unified_files_load_with_same_logits(tmp_path, capsys, multimodal):
    """Gemma 4 12B's architecture (transformers gemma4_unified): Gemma4UnifiedForCausalLM (model_type
    gemma4_unified_text) at tiny size with every feature but PLE, and Gemma4UnifiedForConditionalGeneration, whose
    vision and audio embedders are skipped; read through their files, logits equal theirs on text."""
    from transformers.models.gemma4_unified import (
        Gemma4UnifiedConfig,
        Gemma4UnifiedForCausalLM,
        Gemma4UnifiedForConditionalGeneration,
        Gemma4UnifiedTextConfig,
    )

    cfg = CASES["no_ple"]
    text = hf_config(Gemma4TextConfig, cfg, attn_implementation="eager").to_dict()
    text = Gemma4UnifiedTextConfig(**{k: v for k, v in text.items() if k not in ("model_type", "transformers_version")})
    if multimodal:
        vision = dict(patch_size=4, pooling_kernel_size=2, mm_embed_dim=16, mm_posemb_size=8)
        mm = Gemma4UnifiedConfig(text_config=text.to_dict(), vision_config=vision, audio_config=dict(audio_embed_dim=8))
        model = randomize_hf(Gemma4UnifiedForConditionalGeneration(mm), seed=3)
        model.config._attn_implementation = "eager"
        model.config.text_config._attn_implementation = "eager"
    else:
        model = randomize_hf(Gemma4UnifiedForCausalLM(text), seed=3)
    model.save_pretrained(tmp_path)
    got_cfg, params = g.load_checkpoint(tmp_path)
    assert got_cfg == cfg
    if multimodal:
        n_other = sum(1 for n in model.state_dict() if "language_model" not in n and n != "lm_head.weight")
        assert f"skipped {n_other} vision/audio tensors" in capsys.readouterr().out and n_other > 3
    tokens, mask = padded_batch(T)
    diff = np.abs(our_logits(params, cfg, tokens, mask) - hf_logits(model, tokens, mask))[mask].max()
    print(f"gemma4_unified multimodal={multimodal}: max |logits - transformers| = {diff:.2e}")
    assert diff <= 1e-4, diff


@pytest.mark.parametrize("name", ["all", "no_kv_sharing"])
def test_kv_cache_prefill_then_decode_equals_full_forward(name):
    """model.forward with a cache: a 12-token left-padded prefill then one token at a time past the window (8);
    KV-shared layers read their source layer's cache and new keys."""
    cfg = CASES[name]
    params = random_params(cfg, 6)
    tokens, mask = padded_batch(T)
    cache = init_cache(cfg, 2, T)
    assert [c is None for c in cache["k"]] == [k.kv_source >= 0 for k in layer_kinds(cfg)]
    diff = np.abs(cached_logits(params, cfg, tokens, mask) - our_logits(params, cfg, tokens, mask))[mask].max()
    print(f"gemma4 cache {name}: max |prefill+decode - full forward| = {diff:.2e}")
    assert diff <= 1e-4, diff


def test_greedy_equals_transformers_generate_left_padded(hf_case):
    """The sampler (gemma_jax/decode.py one-token steps, KV-shared layers reading their source's buffers): more
    new tokens (14) than the window (8), prompts of 3 and 6 tokens left-padded in one batch."""
    name, cfg, model, path = hf_case
    if name not in ("all", "no_kv_sharing"):
        pytest.skip("two cases are enough")
    _, params = g.load_checkpoint(path)
    prompts, N = [[2, 17, 99, 45, 300, 8], [2, 77, 5]], 14
    out = generate(params, cfg, prompts, max_new_tokens=N, temperature=0.0, stop_ids=(1,))
    ref = hf_greedy_tokens(model, prompts, N)
    assert np.array_equal(out.tokens, ref), (out.tokens, ref)


def test_sharded_forward_and_cache_equal_unsharded():
    """Per-layer weights and per-layer cache buffers get their declared shardings on a 4 x 2 fake mesh; the
    sharded forward with a cache equals the unsharded one."""
    from gemma_jax.sharding import cache_shardings, make_mesh, param_shardings

    cfg = _ALL
    mesh = make_mesh("fsdp=4,tp=2")
    params = random_params(cfg, 7)
    sh = param_shardings(cfg, mesh)
    assert sh["layers"][0]["q"].spec == jax.sharding.PartitionSpec("fsdp", "tp", None)
    tokens, mask = padded_batch(T)
    cache = init_cache(cfg, 2, T)
    ref, ref_cache = forward(params, jnp.asarray(tokens), cfg, pad_mask_BT=jnp.asarray(mask), cache=cache)
    placed = jax.device_put(params, sh)
    placed_cache = jax.device_put(cache, cache_shardings(cache, mesh))
    got, got_cache = jax.jit(lambda p, c: forward(p, jnp.asarray(tokens), cfg, pad_mask_BT=jnp.asarray(mask),
                                                  cache=c))(placed, placed_cache)
    # jit and sharding reorder float32 sums: equal within the parity tolerance, not bit for bit.
    assert np.abs(np.asarray(got) - np.asarray(ref))[mask].max() <= 1e-4
    assert np.abs(np.asarray(got_cache["k"][0]) - np.asarray(ref_cache["k"][0])).max() <= 1e-4
    assert got_cache["k"][3] is None


def test_old_adapter_fingerprints_unchanged():
    """The Gemma 4 fields at their defaults stay out of lora/io.py's model fingerprint: these digests are the ones
    computed before the fields existed (commit 2ac7ce7)."""
    from lora.io import model_fingerprint

    assert model_fingerprint(C.TINY)[1] == "28f1e5233ce9ef80"
    assert model_fingerprint(C.GEMMA3_1B)[1] == "c7ca16fd5b7b5bb2"
    assert model_fingerprint(_ALL)[1] != model_fingerprint(dataclasses.replace(_ALL, num_kv_shared_layers=0))[1]


@pytest.mark.parametrize("targets", [("q", "kv", "gate", "up", "down"), ("q", "k", "v", "o")])
def test_lora_forward_equals_merged_weights(targets):
    """Per-layer adapters in each layer's shapes (none on k/v/kv of KV-shared layers, none on v/kv of k = v
    layers): the adapted forward equals the forward of W + scale * A B merged, and every adapter gets a gradient."""
    from lora import concat_lora, init_lora, merge

    cfg = _ALL
    params = random_params(cfg, 8)
    lora = init_lora(cfg, rank=4, alpha=8.0, targets=targets, seed=1)
    rng = np.random.RandomState(2)
    lora = jax.tree.map(lambda x: x if x.shape[0] != 4 else jnp.asarray(0.1 * rng.randn(*x.shape), x.dtype), lora)
    if "kv" in targets:
        assert [a is None for a in lora.layers["kv"]["a"]] == [False, False, True, True, True, True]
        assert lora.layers["q"]["b"][2].shape == (4, 4, 32)
    tokens, mask = padded_batch(T)
    adapted = np.asarray(forward(params, jnp.asarray(tokens), cfg, pad_mask_BT=jnp.asarray(mask), lora=lora)[0])
    merged = our_logits(merge(params, lora), cfg, tokens, mask)
    base = our_logits(params, cfg, tokens, mask)
    assert np.abs(adapted - merged)[mask].max() <= 1e-4
    assert np.abs(adapted - base)[mask].max() > 1e-2
    second = jax.tree.map(lambda x: 0.5 * x, lora)  # concat_lora(first, second) = both applied together
    both = np.asarray(forward(params, jnp.asarray(tokens), cfg, pad_mask_BT=jnp.asarray(mask),
                              lora=concat_lora(lora, second))[0])
    assert np.abs(both - our_logits(merge(merge(params, lora), second), cfg, tokens, mask))[mask].max() <= 1e-4
    grads = jax.grad(lambda lo: forward(params, jnp.asarray(tokens), cfg, lora=lo)[0].sum())(lora)
    assert all(float(jnp.abs(x).max()) > 0 for x in jax.tree.leaves(grads))


def test_remat_recomputes_each_layer_with_equal_gradients():
    """cfg.remat checkpoints every Gemma 4 layer (one checkpoint per layer in the differentiated program, the
    layers' matmuls run again in the compiled backward) and leaves the loss and the LoRA gradients unchanged."""
    from lora import init_lora

    cfg = _ALL
    params = random_params(cfg, 8)
    lora = init_lora(cfg, rank=4, alpha=8.0, targets=("q", "kv", "gate", "up", "down"), seed=1)
    lora = jax.tree.map(lambda x: x + 0.05, lora)  # B != 0: every adapter's gradient flows through the model
    tokens, mask = (jnp.asarray(x) for x in padded_batch(T))

    def loss_and_grads(c):
        loss = lambda lo: forward(params, tokens, c, pad_mask_BT=mask, lora=lo)[0].mean()  # noqa: E731
        return jax.jit(jax.value_and_grad(loss)), loss

    (plain, _), (remat, remat_loss) = loss_and_grads(cfg), loss_and_grads(dataclasses.replace(cfg, remat=True))
    (l0, g0), (l1, g1) = plain(lora), remat(lora)
    assert abs(float(l0) - float(l1)) <= 1e-6
    assert all(float(jnp.abs(a - b).max()) <= 1e-6 for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)))
    jaxpr = jax.make_jaxpr(remat_loss)(lora)  # "remat2": the primitive of jax.checkpoint
    assert sum(e.primitive.name == "remat2" for e in jaxpr.eqns) == cfg.num_layers

    def dots(f):
        return f.lower(lora).compile().as_text().count(" dot(")

    assert dots(remat) > dots(plain)


def test_lora_adapters_save_and_load_round_trip(tmp_path):
    """Per-layer adapters written as "{target}.{i}.a|b" (only layers that carry them) and read back exactly; a
    config without KV sharing (more k/v adapters) is refused by name."""
    from lora import init_lora
    from lora.io import load_adapters, save_adapters

    lora = init_lora(_ALL, rank=4, alpha=8.0, targets=("q", "kv", "down"), seed=3)
    save_adapters(tmp_path, lora, _ALL)
    back = load_adapters(tmp_path, _ALL, rank=4, alpha=8.0)
    assert jax.tree.structure(back) == jax.tree.structure(lora)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(lora), jax.tree.leaves(back)))
    with pytest.raises(ValueError, match="num_kv_shared_layers"):
        load_adapters(tmp_path, dataclasses.replace(_ALL, num_kv_shared_layers=0))
