"""Checkpoint loader tests: Kaggle/orbax checkpoints against Tunix's own loader, dtype casts, and bad input;
save_kaggle's output read by Tunix's loader and by ours.

The Kaggle checkpoints are written here with orbax in the layout Tunix 0.1.7 reads (`params.load_and_format_params`
then the linen->nnx mapping of `Gemma.from_params`). Tunix's loader builds its model from the same files with a tiny
ModelConfig; we compare every array (through tests/tunix_utils.to_tunix) and the logits.
"""

import dataclasses
import json
import os

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file
from tunix.models.gemma import model as tunix_gemma
from tunix.models.gemma import params as tunix_params
from tunix.rl import common as tunix_common
from tunix_utils import to_tunix, tunix_config

import gemma_jax as g
from gemma_jax.checkpoint import _orbax_leaves, load_hf, load_kaggle, save_kaggle
from gemma_jax.model import forward, param_specs

TUNIX_GEMMA2 = dataclasses.replace(g.TINY, query_pre_attn_scalar=16)  # Tunix scales queries by head_dim**-0.5
TUNIX_MHA = dataclasses.replace(TUNIX_GEMMA2, num_kv_heads=4)  # K == N: the fused qkv_einsum layout


def _params(cfg, seed=0, dtype=np.float32):
    """Random numpy params (fan-in scaled; norms non-zero so a dropped or swapped norm shows). numpy, not
    init_params, so no per-shape JAX compile."""
    rng = np.random.RandomState(seed)

    def make(spec):
        std = 0.3 if spec.init == "zeros" else spec.fan_in ** -0.5
        return (std * rng.randn(*spec.shape)).astype(np.float32).astype(dtype)

    specs = param_specs(cfg)
    return {"embed": make(specs["embed"]), "final_norm": make(specs["final_norm"]),
            "layers": {k: make(v) for k, v in specs["layers"].items()}}


def _kaggle_tree(params, cfg, *, gating_fd=False, pad_rows=0):
    """Our params in the Kaggle Flax layout: top-level keys are slash-joined module paths (as Tunix reads them)."""
    lay = params["layers"]
    emb = params["embed"]
    if pad_rows:  # non-zero padding rows, so dropping or keeping them is visible
        emb = np.concatenate([emb, 0.1 * np.random.RandomState(7).randn(pad_rows, cfg.embed_dim).astype(emb.dtype)])
    tree = {"transformer/embedder": {"input_embedding": emb}, "transformer/final_norm": {"scale": params["final_norm"]}}
    for i in range(cfg.num_layers):
        pre = f"transformer/layer_{i}"
        q, k, v = (lay[n][i].transpose(1, 0, 2) for n in ("q", "k", "v"))
        if cfg.num_kv_heads == cfg.num_heads:
            tree[f"{pre}/attn/qkv_einsum"] = {"w": np.stack([q, k, v])}
        else:
            tree[f"{pre}/attn/q_einsum"] = {"w": q}
            tree[f"{pre}/attn/kv_einsum"] = {"w": np.stack([k, v])}
        tree[f"{pre}/attn/attn_vec_einsum"] = {"w": lay["o"][i]}
        gating = np.stack([lay["gate"][i], lay["up"][i]])
        tree[f"{pre}/mlp/gating_einsum"] = {"w": gating.transpose(0, 2, 1) if gating_fd else gating}
        tree[f"{pre}/mlp/linear"] = {"w": lay["down"][i]}
        tree[f"{pre}/pre_attention_norm"] = {"scale": lay["attn_norm"][i]}
        tree[f"{pre}/pre_ffw_norm"] = {"scale": lay["ffw_norm"][i]}
        if cfg.use_post_norms:
            tree[f"{pre}/post_attention_norm"] = {"scale": lay["post_attn_norm"][i]}
            tree[f"{pre}/post_ffw_norm"] = {"scale": lay["post_ffw_norm"][i]}
    return tree


def _write_orbax(path, tree):
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(os.path.abspath(path), tree)
    ckpt.wait_until_finished()
    return str(path)


def _tunix_load(path, cfg):
    """Tunix's own loader: load_and_format_params, then the linen->nnx assignment Gemma.from_params does, with a
    tiny ModelConfig in place of a named release."""
    raw = tunix_params.load_and_format_params(os.path.abspath(path))
    return tunix_gemma.module_from_linen_variables(
        module_factory=lambda: tunix_gemma.Gemma(tunix_config(cfg), rngs=nnx.Rngs(params=0)),
        variables=raw["transformer"], map_key_fn=tunix_gemma._map_linen_var_names,
        assign_val_fn=tunix_gemma._assign_linen_params_to_nnx_state)


@nnx.jit
def _tunix_logits(model, tokens_BT):
    """Tunix's full-sequence logits with its own position and causal-mask helpers (unpadded rows), jitted: eager
    nnx runs op by op and is ~3x slower to first result here."""
    mask_BT = jnp.ones(tokens_BT.shape, bool)
    positions = tunix_common.build_positions_from_mask(mask_BT)
    return model(tokens_BT, positions, None, tunix_common.make_causal_attn_mask(mask_BT))[0]


def _flat_state(model):
    return {k: np.asarray(v.value) for k, v in nnx.state(model, nnx.Param).flat_state()}


@pytest.mark.parametrize("cfg, gating_fd, pad_rows", [
    (TUNIX_GEMMA2, False, 128), (g.TINY_GEMMA1, False, 0), (TUNIX_MHA, False, 0), (TUNIX_GEMMA2, True, 0),
], ids=["gemma2_padded_vocab", "gemma1_mqa", "mha_fused_qkv", "gemma2_gating_FD"])
def test_kaggle_matches_tunix_loader(cfg, gating_fd, pad_rows, tmp_path):
    params = _params(cfg, 1)
    tunix_dir = _write_orbax(tmp_path / "tunix", _kaggle_tree(params, cfg, pad_rows=pad_rows))
    ours_dir = tunix_dir
    if gating_fd:  # Tunix assigns gating[0] untransposed, so it reads only [2,D,F]; we read the [2,F,D] file
        ours_dir = _write_orbax(tmp_path / "fd", _kaggle_tree(params, cfg, gating_fd=True))
    _, ours = load_kaggle(ours_dir, cfg)  # explicit config: an inferred one has Gemma 2 2B's window (4096)
    tunix_model = _tunix_load(tunix_dir, dataclasses.replace(cfg, vocab_size=cfg.vocab_size + pad_rows))
    ref, mine = _flat_state(tunix_model), _flat_state(to_tunix(ours, cfg))
    assert ref.keys() == mine.keys()
    for key, want in ref.items():
        if key == ("embedder", "input_embedding"):
            assert want.shape[0] == cfg.vocab_size + pad_rows
            want = want[: cfg.vocab_size]  # we keep the real vocabulary only (checkpoint.py docstring)
        assert np.array_equal(want, mine[key]), key
    # unpadded rows: Tunix's window mask differs on left-padded ones (docs/reference.md#window-and-left-padding)
    tokens = np.random.RandomState(0).randint(4, cfg.vocab_size, (2, 20))
    theirs = np.asarray(_tunix_logits(tunix_model, jnp.asarray(tokens)))[..., : cfg.vocab_size]
    assert np.abs(np.asarray(forward(ours, jnp.asarray(tokens), cfg)[0]) - theirs).max() <= 1e-4


@pytest.mark.parametrize("cfg", [TUNIX_GEMMA2, g.TINY_GEMMA1, TUNIX_MHA], ids=["gemma2", "gemma1_mqa", "mha"])
def test_save_kaggle_read_by_tunix_and_by_us(cfg, tmp_path):
    params = _params(cfg, 4)
    save_kaggle(tmp_path / "out", cfg, params)
    _, back = load_kaggle(tmp_path / "out", cfg)
    for key in ("embed", "final_norm"):
        assert np.array_equal(np.asarray(back[key]), params[key]) and back[key].dtype == jnp.float32, key
    assert back["layers"].keys() == params["layers"].keys()
    for key, want in params["layers"].items():
        assert np.array_equal(np.asarray(back["layers"][key]), want), key
    tunix_model = _tunix_load(tmp_path / "out", cfg)
    tokens = np.random.RandomState(1).randint(4, cfg.vocab_size, (2, 20))
    theirs = np.asarray(_tunix_logits(tunix_model, jnp.asarray(tokens)))
    mine = np.asarray(forward(back, jnp.asarray(tokens), cfg)[0])
    assert theirs.shape == mine.shape and np.abs(mine - theirs).max() <= 1e-4


def test_save_kaggle_gemma3_layout_and_round_trip(tmp_path):
    cfg = g.TINY_GEMMA3
    params = _params(cfg, 5, dtype=ml_dtypes.bfloat16)
    save_kaggle(tmp_path / "g3", cfg, params)
    leaves = _orbax_leaves(str(tmp_path / "g3"))
    D, F, H = cfg.embed_dim, cfg.hidden_dim, cfg.head_dim
    assert leaves["transformer/layer_0/mlp/gating_einsum/w"][1:] == ((2, F, D), "bfloat16")  # upstream Gemma 3
    assert leaves["transformer/layer_6/attn/_key_norm/scale"][1] == (H,)
    _, back = load_kaggle(tmp_path / "g3", cfg, dtype="bfloat16")  # an explicit cfg casts to its dtype otherwise
    for key, want in params["layers"].items():
        assert back["layers"][key].dtype == jnp.bfloat16 and np.array_equal(np.asarray(back["layers"][key]), want)
    assert np.array_equal(np.asarray(back["embed"]), params["embed"])
    with pytest.raises(ValueError, match=r"param 'layers/q_norm': shape None"):
        save_kaggle(tmp_path / "bad", cfg, {**params, "layers": {k: v for k, v in params["layers"].items()
                                                                 if k != "q_norm"}})


def test_kaggle_config_inferred_from_shapes(tmp_path):
    params = _params(g.TINY_GEMMA1, 2)
    cfg, _ = g.load_checkpoint(_write_orbax(tmp_path / "g1", _kaggle_tree(params, g.TINY_GEMMA1)))
    assert cfg == g.TINY_GEMMA1
    params = _params(TUNIX_MHA, 2)
    cfg, _ = load_kaggle(_write_orbax(tmp_path / "mha", _kaggle_tree(params, TUNIX_MHA)))
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (4, 4, 16)
    params = _params(TUNIX_GEMMA2, 2, dtype=ml_dtypes.bfloat16)
    cfg, loaded = load_kaggle(_write_orbax(tmp_path / "g2", _kaggle_tree(params, TUNIX_GEMMA2)))
    assert cfg == dataclasses.replace(TUNIX_GEMMA2, sliding_window=4096, param_dtype="bfloat16")
    assert loaded["layers"]["q"].dtype == jnp.bfloat16
    assert np.array_equal(np.asarray(loaded["layers"]["down"]), params["layers"]["down"])


def test_kaggle_tunix_padded_vocab_is_trimmed_to_256000(tmp_path):
    cfg = g.GemmaConfig(num_layers=1, embed_dim=8, hidden_dim=16, num_heads=2, num_kv_heads=1, head_dim=4,
                        vocab_size=256_000, query_pre_attn_scalar=4)
    params = _params(cfg, 3)
    loaded_cfg, loaded = load_kaggle(_write_orbax(tmp_path / "pad", _kaggle_tree(params, cfg, pad_rows=128)))
    assert loaded_cfg.vocab_size == 256_000 and loaded["embed"].shape == (256_000, 8)
    assert np.array_equal(np.asarray(loaded["embed"]), params["embed"])


@pytest.mark.parametrize("edit, match", [
    (lambda t: t.pop("transformer/layer_1/pre_ffw_norm"), r"missing tensor.*transformer/layer_1/pre_ffw_norm/scale"),
    (lambda t: t.update({"transformer/layer_0/extra": {"w": np.zeros(3, np.float32)}}),
     r"unknown tensor.*transformer/layer_0/extra/w"),
    (lambda t: t.update({"transformer/layer_2/mlp/linear": {"w": np.zeros((128, 63), np.float32)}}),
     r"transformer/layer_2/mlp/linear/w.*shape \(128, 63\), expected \(128, 64\)"),
    (lambda t: t.update({"transformer/final_norm": {"scale": np.zeros(64, np.int32)}}),
     r"transformer/final_norm/scale.*dtype int32"),
], ids=["missing", "extra", "shape", "dtype"])
def test_kaggle_bad_input(edit, match, tmp_path):
    tree = _kaggle_tree(_params(g.TINY, 0), g.TINY)
    edit(tree)
    path = _write_orbax(tmp_path / "bad", tree)
    with pytest.raises(ValueError, match=match):
        load_kaggle(path, g.TINY)


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face safetensors: casts and bad input


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf_tiny")
    g.save_hf(path, g.TINY, _params(g.TINY, 5))
    return path


def _tensors(path):
    with safe_open(os.path.join(path, "model.safetensors"), framework="numpy") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _rewrite(src, dst, tensors):
    os.makedirs(dst, exist_ok=True)
    with open(os.path.join(src, "config.json")) as f, open(os.path.join(dst, "config.json"), "w") as out:
        out.write(f.read())
    save_file(tensors, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    return str(dst)


@pytest.mark.parametrize("dtype", [ml_dtypes.bfloat16, np.float16])
def test_half_precision_file_cast_to_float32_exactly(dtype, tmp_path):
    params = _params(g.TINY, 6, dtype=dtype)
    g.save_hf(tmp_path, g.TINY, params)
    cfg, native = load_hf(tmp_path)
    assert cfg.param_dtype == np.dtype(dtype).name and native["embed"].dtype == np.dtype(dtype)
    cfg32, loaded = g.load_checkpoint(tmp_path, dtype="float32")
    assert cfg32.param_dtype == "float32" and loaded["layers"]["o"].dtype == jnp.float32
    for key in ("q", "o", "down", "post_ffw_norm"):
        assert np.array_equal(np.asarray(loaded["layers"][key]), params["layers"][key].astype(np.float32)), key
    assert np.array_equal(np.asarray(loaded["embed"]), params["embed"].astype(np.float32))


def test_tied_lm_head_accepted_and_untied_rejected(hf_dir, tmp_path):
    tensors = _tensors(hf_dir)
    ok = _rewrite(hf_dir, tmp_path / "tied", {**tensors, "lm_head.weight": tensors["model.embed_tokens.weight"]})
    _, params = load_hf(ok)
    assert np.array_equal(np.asarray(params["embed"]), tensors["model.embed_tokens.weight"])
    bad = _rewrite(hf_dir, tmp_path / "untied",
                   {**tensors, "lm_head.weight": tensors["model.embed_tokens.weight"] + 1})
    with pytest.raises(ValueError, match=r"'lm_head.weight' in .*untied/model.safetensors: differs"):
        load_hf(bad)


def _drop(t, name):
    t.pop(name)
    return t


@pytest.mark.parametrize("edit, match", [
    (lambda t: _drop(t, "model.layers.2.mlp.up_proj.weight"), r"missing tensor.*model.layers.2.mlp.up_proj.weight"),
    (lambda t: {**t, "model.layers.9.self_attn.q_proj.weight": t["model.layers.0.self_attn.q_proj.weight"]},
     r"unknown tensor.*model.layers.9.self_attn.q_proj.weight.*model.safetensors"),
    (lambda t: {**t, "model.layers.1.self_attn.k_proj.weight": t["model.layers.1.self_attn.k_proj.weight"][:, :-1]},
     r"'model.layers.1.self_attn.k_proj.weight' in .*model.safetensors: shape \(32, 63\), expected \(32, 64\)"),
    (lambda t: {**t, "model.norm.weight": t["model.norm.weight"].astype(np.int32)},
     r"'model.norm.weight' in .*model.safetensors: dtype I32 not supported"),
], ids=["missing", "extra", "shape", "dtype"])
def test_hf_bad_tensors(edit, match, hf_dir, tmp_path):
    path = _rewrite(hf_dir, tmp_path / "bad", edit(_tensors(hf_dir)))
    with pytest.raises(ValueError, match=match):
        g.load_checkpoint(path)


def _copy_with_bytes(hf_dir, dst, edit):
    os.makedirs(dst)
    with open(os.path.join(hf_dir, "config.json")) as f, open(os.path.join(dst, "config.json"), "w") as out:
        out.write(f.read())
    raw = open(os.path.join(hf_dir, "model.safetensors"), "rb").read()
    with open(os.path.join(dst, "model.safetensors"), "wb") as f:
        f.write(edit(raw))
    return str(dst)


def test_truncated_file_names_the_tensor_and_file(hf_dir, tmp_path):
    raw = open(os.path.join(hf_dir, "model.safetensors"), "rb").read()
    header = json.loads(raw[8: 8 + int.from_bytes(raw[:8], "little")])
    header.pop("__metadata__")
    last = max(header, key=lambda n: header[n]["data_offsets"][1])  # the tensor stored at the end of the file
    path = _copy_with_bytes(hf_dir, tmp_path / "trunc", lambda raw: raw[:-100])
    with pytest.raises(ValueError, match=rf"tensor '{last}' in .*trunc/model.safetensors: .*truncated"):
        load_hf(path)


def test_corrupt_header(hf_dir, tmp_path):
    garbled = _copy_with_bytes(hf_dir, tmp_path / "garbled", lambda raw: raw[:8] + b"\xff{[" + raw[11:])
    with pytest.raises(ValueError, match=r"garbled/model.safetensors: corrupt header, not valid JSON"):
        load_hf(garbled)
    huge = _copy_with_bytes(hf_dir, tmp_path / "huge", lambda raw: (10**12).to_bytes(8, "little") + raw[8:])
    with pytest.raises(ValueError, match=r"huge/model.safetensors: corrupt or truncated header"):
        load_hf(huge)


def test_sharded_index_pointing_to_missing_shard(hf_dir, tmp_path):
    path = _rewrite(hf_dir, tmp_path / "idx", _tensors(hf_dir))
    os.rename(os.path.join(path, "model.safetensors"), os.path.join(path, "shard-1.safetensors"))
    weight_map = {n: "shard-1.safetensors" for n in _tensors(hf_dir)}
    weight_map["model.norm.weight"] = "shard-2.safetensors"
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    with pytest.raises(ValueError, match=r"'model.norm.weight': its shard .*shard-2.safetensors .* does not exist"):
        load_hf(path)


def test_missing_and_unrecognised_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"checkpoint not found: .*nowhere"):
        g.load_checkpoint(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "weights.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"empty: not a checkpoint.*found \['weights.bin'\]"):
        g.load_checkpoint(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match=r"Kaggle/orbax checkpoint folder not found: .*nowhere"):
        load_kaggle(tmp_path / "nowhere")
