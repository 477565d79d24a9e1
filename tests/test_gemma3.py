"""Gemma 3 text models: parity with transformers' Gemma3ForCausalLM (and the text tower of
Gemma3ForConditionalGeneration) through files it saved, with Tunix's Gemma 3, our save_hf read back by
transformers, the KV-cache and sampler paths, parameter counts of the full-size presets, loader errors.

Tiny configs: 7 layers with pattern 6 (layers 0-4 and 6 sliding, 5 global), window 8 < T = 20, random weights
including every norm and the q/k norms, query_pre_attn_scalar 24 != head_dim 16, GQA and MQA, RoPE scaling on
(x8 on the global layer) and off, one left-padded row.
"""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hf_utils import cached_logits, hf_greedy_tokens, hf_logits, our_logits, padded_batch
from safetensors.numpy import load_file, save_file
from transformers import AutoModelForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig
from tunix_utils import to_tunix_gemma3, tunix_logits

import gemma_jax as g
from gemma_jax import config as C
from gemma_jax import decode
from gemma_jax.config import config_from_hf, config_to_hf
from gemma_jax.model import abstract_params, count_params, init_params
from gemma_jax.sampler import generate

T = 20
CASES = {"gqa_scaled": C.TINY_GEMMA3,
         "mqa_unscaled": dataclasses.replace(C.TINY_GEMMA3, num_kv_heads=1, rope_scaling=1.0)}


def _hf_config(cfg, **extra):
    d = {k: v for k, v in config_to_hf(cfg).items() if k not in ("architectures", "model_type", "torch_dtype")}
    return Gemma3TextConfig(**{**d, **extra})


def _randomize(model, seed):
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():  # non-zero norms: a missing `1 + w` or swapped norm shows
            p.normal_(0, 0.3 if "norm" in name else 0.2)
    return model.eval()


@pytest.fixture(scope="module", params=list(CASES))
def hf_case(request, tmp_path_factory):
    cfg = CASES[request.param]
    model = _randomize(Gemma3ForCausalLM(_hf_config(cfg, attn_implementation="eager")), seed=1)
    path = str(tmp_path_factory.mktemp(f"hf3_{request.param}"))
    model.save_pretrained(path)
    return cfg, model, path


def test_config_reads_back_as_the_preset(hf_case):
    cfg, _, path = hf_case
    assert config_from_hf(path) == dataclasses.replace(cfg, query_pre_attn_scalar=24.0)
    assert cfg.is_local_layer == (True,) * 5 + (False, True)


def test_load_hf_matches_transformers_logits(hf_case):
    cfg, model, path = hf_case
    got_cfg, params = g.load_checkpoint(path)
    assert params["layers"]["q_norm"].shape == (7, 16)
    tokens, mask = padded_batch(T)
    diff = np.abs(our_logits(params, got_cfg, tokens, mask) - hf_logits(model, tokens, mask))[mask].max()
    assert diff <= 1e-4, diff


def test_rope_scaling_and_local_base_matter(hf_case):
    """Dropping the scaling (or using one base everywhere) changes the logits far beyond the tolerance."""
    cfg, model, path = hf_case
    _, params = g.load_checkpoint(path)
    tokens, mask = padded_batch(T)
    ref = hf_logits(model, tokens, mask)
    wrong = dataclasses.replace(cfg, rope_local_base=None) if cfg.rope_scaling == 1.0 else \
        dataclasses.replace(cfg, rope_scaling=1.0)
    assert np.abs(our_logits(params, wrong, tokens, mask) - ref)[mask].max() > 1e-2


def _params_with_norms(cfg, seed):
    params = init_params(cfg, seed)
    rng = np.random.RandomState(seed)
    layers = {k: (jnp.asarray(0.3 * rng.randn(*v.shape), v.dtype) if "norm" in k else v)
              for k, v in params["layers"].items()}
    return {**params, "final_norm": jnp.asarray(0.3 * rng.randn(cfg.embed_dim), jnp.float32), "layers": layers}


@pytest.mark.parametrize("name", list(CASES))
def test_save_hf_loads_in_transformers_with_same_logits(name, tmp_path):
    cfg = CASES[name]
    params = _params_with_norms(cfg, 3)
    g.save_hf(tmp_path, cfg, params)
    assert json.load(open(tmp_path / "config.json"))["model_type"] == "gemma3_text"
    model = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert type(model).__name__ == "Gemma3ForCausalLM"
    tokens, mask = padded_batch(T)
    diff = np.abs(our_logits(params, cfg, tokens, mask) - hf_logits(model, tokens, mask))[mask].max()
    assert diff <= 1e-4, diff


@pytest.mark.parametrize("name", list(CASES))
def test_matches_tunix_gemma3(name):
    """Unpadded rows: Tunix's prefill sliding-window mask is built on token indices (`jnp.triu`/`jnp.tril` in
    tunix/models/gemma3/model.py), which equal positions only without left padding."""
    cfg = CASES[name]
    params = _params_with_norms(cfg, 5)
    tokens = np.random.RandomState(1).randint(4, 512, size=(2, T))
    ours = our_logits(params, cfg, tokens, np.ones(tokens.shape, bool))
    theirs = tunix_logits(to_tunix_gemma3(params, cfg), tokens)
    diff = np.abs(ours - theirs).max()
    assert diff <= 1e-4, diff


def test_multimodal_text_tower_loads(tmp_path, capsys):
    """A Gemma3ForConditionalGeneration file: the text tower is read (vision skipped, one log line), the embedding
    padded past image_token_index (512 + 64 rows) is cut to the text vocabulary, logits equal HF's on it."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    text = _hf_config(C.TINY_GEMMA3, vocab_size=576).to_dict()
    mm = Gemma3Config(text_config=text, image_token_index=512, mm_tokens_per_image=4,
                      vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, image_size=28, patch_size=14))
    model = _randomize(Gemma3ForConditionalGeneration(mm), seed=2)
    model.config._attn_implementation = "eager"
    model.save_pretrained(tmp_path)
    cfg, params = g.load_checkpoint(tmp_path)
    log = capsys.readouterr().out
    n_vision = sum(1 for n, _ in model.state_dict().items() if "vision_tower" in n or "multi_modal" in n)
    assert f"skipped {n_vision} vision tensors" in log and n_vision > 10
    assert cfg.vocab_size == 512 and params["embed"].shape == (512, 96)
    tokens, mask = padded_batch(T)
    ref = hf_logits(model, tokens, mask)[..., :512]
    diff = np.abs(our_logits(params, cfg, tokens, mask) - ref)[mask].max()
    assert diff <= 1e-4, diff


def test_kv_cache_prefill_then_decode_equals_full_forward():
    cfg = C.TINY_GEMMA3
    params = _params_with_norms(cfg, 6)
    tokens, mask = padded_batch(T)
    assert np.abs(cached_logits(params, cfg, tokens, mask) - our_logits(params, cfg, tokens, mask))[mask].max() <= 1e-4


def test_decode_buffers_follow_the_layer_pattern():
    assert decode.buffer_lengths(C.TINY_GEMMA3, 30) == (8, 8, 8, 8, 8, 30, 8)


def test_greedy_equals_transformers_generate_left_padded(hf_case):
    """More new tokens (14) than the window (8), prompts of 3 and 6 tokens left-padded in one batch."""
    cfg, model, path = hf_case
    _, params = g.load_checkpoint(path)
    prompts, N = [[2, 17, 99, 45, 300, 8], [2, 77, 5]], 14
    out = generate(params, cfg, prompts, max_new_tokens=N, temperature=0.0, stop_ids=(1,))
    ref = hf_greedy_tokens(model, prompts, N)
    assert np.array_equal(out.tokens, ref), (out.tokens, ref)


PRESETS = {"270m": C.GEMMA3_270M, "1b": C.GEMMA3_1B, "4b": C.GEMMA3_4B, "12b": C.GEMMA3_12B, "27b": C.GEMMA3_27B}


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_param_count_equals_transformers(name):
    cfg = PRESETS[name]
    ours = count_params(jax.eval_shape(lambda: abstract_params(cfg)))
    with torch.device("meta"):
        model = Gemma3ForCausalLM(_hf_config(cfg))
    theirs = sum(p.numel() for p in model.parameters())
    assert ours == theirs, (ours, theirs)
    if name == "1b":
        assert ours == 999_885_952  # google/gemma-3-1b-it as published
    if name == "270m":
        assert ours == 268_098_176  # google/gemma-3-270m as published


def test_presets_layer_patterns():
    assert C.GEMMA3_27B.is_local_layer.count(False) == 10  # layers 5, 11, ..., 59
    assert [i for i, loc in enumerate(C.GEMMA3_4B.is_local_layer) if not loc] == [5, 11, 17, 23, 29]
    assert (C.GEMMA3_27B.query_pre_attn_scalar, C.GEMMA3_27B.head_dim, C.GEMMA3_4B.rope_scaling) == (168, 128, 8.0)
    explicit = dataclasses.replace(C.TINY_GEMMA3, sliding_window_pattern=0,
                                   layer_types=["full_attention"] + ["sliding_attention"] * 6)
    assert explicit.is_local_layer == (False,) + (True,) * 6
    assert g.TINY.is_local_layer == (True, False, True, False)  # Gemma 2 unchanged


OLD_1B = {  # google/gemma-3-1b-it's config.json (pre-transformers-5 layout), at tiny size
    "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "attention_bias": False,
    "attention_dropout": 0.0, "attn_logit_softcapping": None, "bos_token_id": 2, "cache_implementation": "hybrid",
    "eos_token_id": [1, 106], "final_logit_softcapping": None, "head_dim": 16, "hidden_activation":
    "gelu_pytorch_tanh", "hidden_size": 96, "initializer_range": 0.02, "intermediate_size": 128,
    "max_position_embeddings": 32768, "num_attention_heads": 4, "num_hidden_layers": 7, "num_key_value_heads": 1,
    "pad_token_id": 0, "query_pre_attn_scalar": 24, "rms_norm_eps": 1e-06, "rope_local_base_freq": 10000,
    "rope_scaling": {"factor": 8.0, "rope_type": "linear"}, "rope_theta": 1000000, "sliding_window": 8,
    "sliding_window_pattern": 6, "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": 512,
}


def test_config_from_hf_older_gemma3_layout():
    cfg = config_from_hf(OLD_1B)
    assert cfg == dataclasses.replace(CASES["gqa_scaled"], num_kv_heads=1, param_dtype="bfloat16")
    with pytest.raises(ValueError, match="RoPE type 'dynamic'"):
        config_from_hf({**OLD_1B, "rope_scaling": {"factor": 2.0, "rope_type": "dynamic"}})


def _saved(tmp_path, cfg):
    g.save_hf(tmp_path, cfg, init_params(cfg, 0))
    return str(tmp_path / "model.safetensors")


def test_missing_q_norm_names_tensor_and_file(tmp_path):
    file = _saved(tmp_path, C.TINY_GEMMA3)
    tensors = load_file(file)
    del tensors["model.layers.3.self_attn.q_norm.weight"]
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing tensor\(s\) \['model.layers.3.self_attn.q_norm.weight'\]"
                                         r".*model.safetensors"):
        g.load_checkpoint(tmp_path)


def test_wrong_shape_k_norm_names_tensor_and_file(tmp_path):
    file = _saved(tmp_path, C.TINY_GEMMA3)
    tensors = load_file(file)
    tensors["model.layers.5.self_attn.k_norm.weight"] = np.zeros(8, np.float32)
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"tensor 'model.layers.5.self_attn.k_norm.weight' in .*model.safetensors: "
                                         r"shape \(8,\), expected \(16,\)"):
        g.load_checkpoint(tmp_path)


def test_qk_norms_only_with_qk_norm_and_replicated():
    from gemma_jax.sharding import make_mesh, param_shardings

    assert "q_norm" not in abstract_params(g.TINY)["layers"]
    mesh = make_mesh("fsdp=4,tp=2")
    sh = param_shardings(C.TINY_GEMMA3, mesh)
    assert sh["layers"]["q_norm"].spec == sh["layers"]["k_norm"].spec == jax.sharding.PartitionSpec(None, None)
    assert sh["layers"]["q"].spec != jax.sharding.PartitionSpec(None, None, None, None)


def test_gemma2_config_cannot_carry_gemma3_fields():
    with pytest.raises(ValueError, match="at most one of"):
        dataclasses.replace(g.TINY, sliding_window_pattern=6)
    with pytest.raises(ValueError, match="need use_qk_norm"):
        config_to_hf(dataclasses.replace(g.TINY, rope_scaling=8.0))


def test_tokenizer_reads_gemma3_turn_ids_from_pieces(tmp_path):
    """Turn markers at other ids than in tests/conftest.py's tokenizer (an extra piece in front, as Gemma 3's
    105/106 differ from Gemma 2's 106/107): the ids come from the pieces, and the chat text is Gemma 3's template
    (system text + blank line prepended to the first user turn)."""
    import sentencepiece as spm

    from gemma_jax.tokenizer import Tokenizer

    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(f"Question {i}: what is {i} plus {i}? The answer is {2 * i}." for i in range(300)))
    spm.SentencePieceTrainer.Train(
        input=str(corpus), model_prefix=str(tmp_path / "t"), vocab_size=300, model_type="bpe", pad_id=0, eos_id=1,
        bos_id=2, unk_id=3, user_defined_symbols=["<start_of_image>", "<start_of_turn>", "<end_of_turn>"],
        byte_fallback=True, num_threads=1, minloglevel=2, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=False)
    tok = Tokenizer(str(tmp_path / "t.model"))
    assert (tok.start_of_turn_id, tok.end_of_turn_id, tok.stop_ids) == (5, 6, (1, 6))
    assert tok.chat_prompt("Hi", system="Be brief.") == \
        "<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n"
    ids = tok.encode_chat("Hi", system="Be brief.")
    assert ids[:2] == [2, 5] and ids.count(5) == 2 and ids.count(6) == 1


def test_greedy_equals_tunix_sampler_gemma3():
    """Unpadded prompts of 16 tokens, 16 new tokens (past the window 8): the same greedy tokens as Tunix's
    Sampler on its Gemma 3 with our weights, and its log-probs within 1e-5."""
    from tunix.generate import sampler as tunix_sampler
    from tunix_utils import IdTokenizer

    cfg = C.TINY_GEMMA3
    params = _params_with_norms(cfg, 7)
    rng = np.random.RandomState(3)
    prompts = [[2] + rng.randint(8, cfg.vocab_size, 15).tolist() for _ in range(3)]
    cache_cfg = tunix_sampler.CacheConfig(cache_size=64, num_layers=cfg.num_layers, num_kv_heads=cfg.num_kv_heads,
                                          head_dim=cfg.head_dim)
    sampler = tunix_sampler.Sampler(to_tunix_gemma3(params, cfg), IdTokenizer(), cache_cfg)
    ref = sampler([" ".join(map(str, p)) for p in prompts], max_generation_steps=16, max_prompt_length=16,
                  temperature=0.0, eos_tokens=[1], return_logprobs=True)
    assert np.array_equal(ref.padded_prompt_tokens, np.asarray(prompts))
    out = generate(params, cfg, prompts, max_new_tokens=16, temperature=0.0, stop_ids=(1,))
    for i in range(len(prompts)):
        n = out.lengths[i] - int(out.stopped[i])
        assert out.tokens[i, :n].tolist() == ref.tokens[i].tolist()
        assert np.abs(out.logprobs[i, :n] - np.asarray(ref.logprobs[i])).max() <= 1e-5
    assert len({t for row in out.tokens.tolist() for t in row}) >= 6  # not degenerate (measured 8 distinct)


def test_sharded_bf16_gemma3_loads_bit_exact(tmp_path):
    model = _randomize(Gemma3ForCausalLM(_hf_config(C.TINY_GEMMA3)), seed=4).to(torch.bfloat16)
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    assert len([f for f in tmp_path.iterdir() if f.suffix == ".safetensors"]) > 2
    cfg, params = g.load_checkpoint(tmp_path)
    assert cfg.param_dtype == "bfloat16" and params["layers"]["k_norm"].dtype == jnp.bfloat16
    sd = model.state_dict()
    for i in (0, 5):
        for name in ("q_norm", "k_norm"):
            want = sd[f"model.layers.{i}.self_attn.{name}.weight"].view(torch.int16).numpy()
            assert np.array_equal(np.asarray(params["layers"][name][i]).view(np.int16), want)
    want_q = sd["model.layers.5.self_attn.q_proj.weight"].view(torch.int16).numpy()
    assert np.array_equal(np.asarray(params["layers"]["q"][5]).reshape(96, -1).T.view(np.int16), want_q)


def _kaggle_gemma3_tree(params, cfg):
    """Our params in the upstream Flax layout of Gemma 3 (names as in Tunix's gemma3 map_from_upstream_checkpoint),
    with a few vision leaves as the multimodal releases have."""
    lay = {k: np.asarray(v) for k, v in params["layers"].items()}
    tree = {"transformer/embedder": {"input_embedding": np.asarray(params["embed"])},
            "transformer/final_norm": {"scale": np.asarray(params["final_norm"])},
            "transformer/embedder/mm_soft_embedding_norm": {"scale": np.ones(32, np.float32)},
            "SigLiPFromPatches_0/siglip_encoder/embedding": {"kernel": np.ones((2, 2, 3, 32), np.float32),
                                                             "bias": np.zeros(32, np.float32)}}
    for i in range(cfg.num_layers):
        pre = f"transformer/layer_{i}"
        tree[f"{pre}/attn/q_einsum"] = {"w": lay["q"][i].transpose(1, 0, 2)}
        tree[f"{pre}/attn/kv_einsum"] = {"w": np.stack([lay["k"][i].transpose(1, 0, 2),
                                                         lay["v"][i].transpose(1, 0, 2)])}
        tree[f"{pre}/attn/attn_vec_einsum"] = {"w": lay["o"][i]}
        tree[f"{pre}/attn/_query_norm"] = {"scale": lay["q_norm"][i]}
        tree[f"{pre}/attn/_key_norm"] = {"scale": lay["k_norm"][i]}
        tree[f"{pre}/mlp/gating_einsum"] = {"w": np.stack([lay["gate"][i].T, lay["up"][i].T])}  # [2,F,D]
        tree[f"{pre}/mlp/linear"] = {"w": lay["down"][i]}
        for ours, theirs in (("attn_norm", "pre_attention_norm"), ("post_attn_norm", "post_attention_norm"),
                             ("ffw_norm", "pre_ffw_norm"), ("post_ffw_norm", "post_ffw_norm")):
            tree[f"{pre}/{theirs}"] = {"scale": lay[ours][i]}
    return tree


def test_kaggle_gemma3_matches_tunix_loader(tmp_path, capsys):
    """The same orbax folder through our load_kaggle and Tunix's gemma3 create_model_from_checkpoint."""
    import orbax.checkpoint as ocp
    from tunix.models.gemma3 import params as tunix_params
    from tunix_utils import tunix_gemma3_config

    from gemma_jax.checkpoint import load_kaggle

    cfg = C.TINY_GEMMA3
    params = _params_with_norms(cfg, 8)
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(str(tmp_path / "k"), _kaggle_gemma3_tree(params, cfg))
    ckpt.wait_until_finished()
    got_cfg, ours = load_kaggle(tmp_path / "k", cfg)
    assert "skipped 3 vision tensors" in capsys.readouterr().out
    for key in ("q_norm", "k_norm", "gate", "q"):
        assert np.array_equal(np.asarray(ours["layers"][key]), np.asarray(params["layers"][key])), key
    model = tunix_params.create_model_from_checkpoint(str(tmp_path / "k"), tunix_gemma3_config(cfg),
                                                      dtype=jnp.float32)
    tokens = np.random.RandomState(2).randint(4, 512, size=(2, T))
    diff = np.abs(our_logits(ours, got_cfg, tokens, np.ones(tokens.shape, bool)) - tunix_logits(model, tokens)).max()
    assert diff <= 1e-4, diff


def test_kaggle_gemma3_config_inferred_as_preset():
    from gemma_jax.checkpoint import _infer_kaggle_config

    c = C.GEMMA3_27B
    D, F, N, K, H = c.embed_dim, c.hidden_dim, c.num_heads, c.num_kv_heads, c.head_dim
    leaves = {"transformer/embedder/input_embedding": (None, (262_144, D), "bfloat16"),
              "transformer/layer_0/attn/_query_norm/scale": (None, (H,), "bfloat16"),
              "transformer/layer_0/attn/q_einsum/w": (None, (N, D, H), "bfloat16"),
              "transformer/layer_0/attn/kv_einsum/w": (None, (2, K, D, H), "bfloat16"),
              "transformer/layer_0/mlp/linear/w": (None, (F, D), "bfloat16")}
    leaves.update({f"transformer/layer_{i}/mlp/linear/w": (None, (F, D), "bfloat16") for i in range(1, 62)})
    assert _infer_kaggle_config(leaves, "x") == dataclasses.replace(c, param_dtype="bfloat16")
    leaves["transformer/layer_0/mlp/linear/w"] = (None, (F + 1, D), "bfloat16")
    with pytest.raises(ValueError, match="matches no GEMMA3_\\* preset; pass cfg"):
        _infer_kaggle_config(leaves, "x")


def test_unrolled_and_remat_layers_equal_the_scan():
    cfg = C.TINY_GEMMA3
    params = _params_with_norms(cfg, 9)
    tokens, mask = padded_batch(T)
    ref = our_logits(params, cfg, tokens, mask)
    for variant in (dict(scan_layers=False), dict(remat=True)):
        got = our_logits(params, dataclasses.replace(cfg, **variant), tokens, mask)
        assert np.abs(got - ref)[mask].max() <= 1e-5, variant
