"""Gemma 4 Kaggle/orbax checkpoints: save_kaggle's output read by Tunix 0.1.7's own Gemma 4 loader
(`tunix.models.gemma4.params.create_model_from_checkpoint`) into its Gemma4 model gives our logits; the names and
shapes of full-size presets are exactly those Tunix's model asks for; save -> load_kaggle is bit-exact; config
inference (save_kaggle's config file, else the GEMMA4_* preset with the same shapes); errors naming the tensor and
folder; `run.py --stage export --format kaggle` on a Gemma 4 base with adapters, read by Tunix.

Tiny configs: TINY_GEMMA4 (PLE, KV sharing, global head dim with one kv head and k = v, proportional RoPE,
double-wide shared MLPs, layer scalars: everything Tunix's Gemma 4 supports) and MOE, the same with 4 experts of
hidden 24, top-2. Random weights, norms and scales around 1 (a swapped norm shows), one left-padded row. In the MoE
parity case pre_moe_norm is all ones: Tunix routes from the pre_moe-normed residual, transformers (and we) from
the residual itself (gemma_jax/model.py `_moe`), which agree only when that norm's scale is constant.
"""

import dataclasses
import os
import re
import shutil

import flax
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from hf_utils import padded_batch
from tunix.models.gemma4 import model as tunix_gemma4
from tunix.models.gemma4 import params as tunix_params
from tunix_utils import tunix_gemma4_config, tunix_logits

import gemma_jax as g
from cli import export as export_cli
from cli.common import run_cli
from gemma_jax import config as C
from gemma_jax.checkpoint import (
    KAGGLE4_CONFIG,
    _infer_kaggle4_config,
    _kaggle4_name_map,
    _orbax_leaves,
    load_kaggle,
    save_kaggle,
)
from gemma_jax.model import forward, param_specs
from lora.adapters import LoRA, init_lora, merge
from lora.io import save_adapters

DENSE = C.TINY_GEMMA4
MOE = dataclasses.replace(C.TINY_GEMMA4, num_experts=4, top_k_experts=2, moe_hidden_dim=24)
# No layer scalars (Tunix's skip_scale written as ones) and no PLE: the other branches of the name map.
PLAIN = dataclasses.replace(C.TINY_GEMMA4, use_layer_scalar=False, per_layer_input_dim=0)


def _params(cfg, seed, dtype=np.float32):
    """Random numpy params of param_specs(cfg): scales ("ones" specs) around 1, weights fan-in scaled."""
    rng = np.random.RandomState(seed)

    def make(spec):
        x = 1.0 + 0.3 * rng.randn(*spec.shape) if spec.init == "ones" else spec.fan_in ** -0.5 * rng.randn(*spec.shape)
        return x.astype(np.float32).astype(dtype)

    return jax.tree.map(make, param_specs(cfg), is_leaf=lambda x: hasattr(x, "axes"))


def _our_logits(params, cfg, tokens, mask, lora=None):
    params = jax.tree.map(jnp.asarray, params)
    return np.asarray(forward(params, jnp.asarray(tokens), cfg, pad_mask_BT=jnp.asarray(mask), lora=lora)[0])


def _tunix_load(path, cfg):
    return tunix_params.create_model_from_checkpoint(str(path), tunix_gemma4_config(cfg), dtype=jnp.float32)


@pytest.mark.parametrize("cfg", [DENSE, MOE], ids=["dense", "moe"])
def test_save_kaggle_read_by_tunix_gemma4_loader(cfg, tmp_path):
    params = _params(cfg, 1)
    if cfg.num_experts:
        for w in params["layers"]:
            w["pre_moe_norm"][...] = 1.0  # see the module docstring
    save_kaggle(tmp_path / "k4", cfg, params)
    tokens, mask = padded_batch(20)  # T 20 > window 8
    ours = _our_logits(params, cfg, tokens, mask)
    theirs = tunix_logits(_tunix_load(tmp_path / "k4", cfg), tokens, mask)
    diff = np.abs(ours - theirs)[mask].max()
    print(f"gemma4 save_kaggle {cfg.num_experts and 'moe' or 'dense'}: max |logits - Tunix| = {diff:.2e}")
    assert np.abs(ours).max() > 1.0 and diff <= 1e-4, diff  # measured 1.1e-5 dense, 1.5e-5 moe


@pytest.mark.slow
@pytest.mark.parametrize("ours, theirs", [(C.GEMMA4_E2B, "gemma4_e2b"), (C.GEMMA4_26B_A4B, "gemma4_26b_a4b")],
                         ids=["e2b", "26b_a4b"])
def test_full_size_names_and_shapes_are_tunix_models(ours, theirs):
    """Our full-size layout (zero-stride arrays: no memory) through Tunix's map_from_upstream_checkpoint gives
    exactly the parameter names and shapes of Tunix's own preset model (nnx.eval_shape): nothing missing, nothing
    pruned. E2B: PLE, KV sharing, double-wide MLPs; 26B-A4B: the experts, k = v on global layers."""
    tree = {}
    for name, (_, _, shape, _) in _kaggle4_name_map(ours).items():
        module, leaf = name.rsplit("/", 1)
        tree.setdefault(module, {})[leaf] = np.broadcast_to(np.zeros((), np.float32), shape)
    mapped = flax.traverse_util.flatten_dict(tunix_params.map_from_upstream_checkpoint(tree))
    model = nnx.eval_shape(lambda: tunix_gemma4.Gemma4(getattr(tunix_gemma4.ModelConfig, theirs)(),
                                                       rngs=nnx.Rngs(0)))
    want = flax.traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model)))
    assert sorted(mapped) == sorted(want)
    assert {k: mapped[k].shape for k in want} == {k: v.shape for k, v in want.items()}


@pytest.mark.parametrize("cfg, dtype", [(DENSE, np.float32), (MOE, ml_dtypes.bfloat16), (PLAIN, np.float32)],
                         ids=["dense_f32", "moe_bf16", "plain_f32"])
def test_save_then_load_kaggle_is_bit_exact(cfg, dtype, tmp_path):
    params = _params(cfg, 2, dtype)
    save_kaggle(tmp_path / "k4", cfg, params)
    leaves = _orbax_leaves(str(tmp_path / "k4"))
    D, F, H = cfg.embed_dim, cfg.hidden_dim, cfg.head_dim
    assert leaves["transformer/layer_0/mlp/gating_einsum/w"][1] == (2, F, D)  # Tunix transposes each half
    assert leaves["transformer/layer_3/mlp/gating_einsum/w"][1] == (2, 2 * F, D)  # double-wide shared layer
    assert leaves["transformer/layer_2/attn/k_einsum/w"][1] == (1, D, 32)  # global: k = v, 1 kv head, H 32
    assert leaves["transformer/layer_0/attn/kv_einsum/w"][1] == (2, 2, D, H)
    name = np.dtype(dtype).name
    for want_cfg in (None, dataclasses.replace(cfg, param_dtype=name)):
        got_cfg, back = load_kaggle(tmp_path / "k4", want_cfg)
        assert got_cfg == dataclasses.replace(cfg, param_dtype=name)
        assert jax.tree.structure(back) == jax.tree.structure(params)
        for (path, want), got in zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(back)):
            assert got.dtype == want.dtype and np.array_equal(np.asarray(got), want), jax.tree_util.keystr(path)
    # KV-shared layers: Tunix's model holds k/v weights and a key norm it never reads; we write zeros
    raw = ocp.StandardCheckpointer().restore(str(tmp_path / "k4"))
    assert not raw["transformer/layer_3/attn/kv_einsum"]["w"].any()
    assert raw["transformer/layer_0"]["skip_scale"].shape == (1,)


def test_config_inferred_from_preset_shapes(tmp_path):
    """No config file: each GEMMA4_* preset is told apart by its tensor names and shapes alone (metadata only)."""
    for preset in (C.GEMMA4_E2B, C.GEMMA4_E4B, C.GEMMA4_12B, C.GEMMA4_31B, C.GEMMA4_26B_A4B):
        leaves = {n: (None, shape, "bfloat16") for n, (_, _, shape, _) in _kaggle4_name_map(preset).items()}
        assert _infer_kaggle4_config(leaves, str(tmp_path)) == dataclasses.replace(preset, param_dtype="bfloat16")


def _rewrite(src, dst, edit):
    """Copy the orbax checkpoint src to dst with edit(tree) applied (and save_kaggle's config file)."""
    tree = ocp.StandardCheckpointer().restore(str(src))
    edit(tree)
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(str(dst), tree)
    ckpt.wait_until_finished()
    shutil.copyfile(src / KAGGLE4_CONFIG, dst / KAGGLE4_CONFIG)
    return dst


def test_bad_checkpoints_name_the_tensor_and_folder(tmp_path):
    cfg = PLAIN
    params = _params(cfg, 3)
    src = tmp_path / "k4"
    save_kaggle(src, cfg, params)

    bad = _rewrite(src, tmp_path / "missing", lambda t: t.pop("transformer/layer_1/attn/kv_einsum"))
    want = f"{bad}: missing tensor(s) ['transformer/layer_1/attn/kv_einsum/w']"
    with pytest.raises(ValueError, match=re.escape(want)):
        load_kaggle(bad)

    def reshape(t):
        t["transformer/layer_2/attn/q_einsum"]["w"] = t["transformer/layer_2/attn/q_einsum"]["w"][:, :, :16]
    bad = _rewrite(src, tmp_path / "shape", reshape)
    with pytest.raises(ValueError, match=re.escape(f"tensor 'transformer/layer_2/attn/q_einsum/w' in {bad}: shape "
                                                   f"(4, 64, 16), expected (4, 64, 32)")):
        load_kaggle(bad)

    def scalar(t):
        t["transformer/layer_4"]["skip_scale"] = t["transformer/layer_4"]["skip_scale"] * 2
    bad = _rewrite(src, tmp_path / "scalar", scalar)
    with pytest.raises(ValueError, match=re.escape(f"tensor 'transformer/layer_4/skip_scale' in {bad}: not all ones")):
        load_kaggle(bad)

    # the unread k/v of a KV-shared layer may be absent; without the config file cfg must be given
    ok = _rewrite(src, tmp_path / "no_shared_kv", lambda t: t.pop("transformer/layer_5/attn/k_einsum"))
    os.remove(ok / KAGGLE4_CONFIG)
    with pytest.raises(ValueError, match=re.escape(f"{ok}: a Gemma 4 checkpoint whose tensor shapes match no "
                                                   "GEMMA4_* preset") + ".*pass cfg"):
        load_kaggle(ok)
    _, back = load_kaggle(ok, cfg)
    assert np.array_equal(np.asarray(back["layers"][5]["q"]), params["layers"][5]["q"])
    with pytest.raises(ValueError, match=re.escape("param ['layers'][1]['k_norm']: shape None")):
        save_kaggle(tmp_path / "bad_params", cfg, {**params, "layers": [params["layers"][0]] + [
            {k: v for k, v in w.items() if k != "k_norm"} for w in params["layers"][1:]]})


def test_export_cli_kaggle_on_gemma4_read_by_tunix(tmp_path, tokenizer_path, capsys):
    """`run.py --stage export --format kaggle` merges per-layer adapters into a Gemma 4 base: Tunix's loader reads
    the folder with our adapted logits, and it works as --base again (load_checkpoint, no cfg: bit-exact)."""
    cfg = DENSE
    params = _params(cfg, 4)
    lora = init_lora(cfg, rank=4, alpha=8.0, targets=("q", "k", "v", "o", "down"), seed=5)
    rng = np.random.RandomState(5)
    lora = LoRA(layers={n: {"a": ab["a"], "b": tuple(None if b is None else jnp.asarray(
        0.1 * rng.randn(*b.shape), jnp.float32) for b in ab["b"])} for n, ab in lora.layers.items()}, scale=lora.scale)
    g.save_hf(tmp_path / "base", cfg, params)
    save_adapters(tmp_path / "adapters", lora, cfg)
    out = tmp_path / "kaggle"
    argv = ["--format", "kaggle", "--base", str(tmp_path / "base"), "--tokenizer", tokenizer_path,
            "--adapters", str(tmp_path / "adapters"), "--out", str(out)]
    assert run_cli(export_cli.main, argv, prog="export") == 0
    assert "with the adapters of" in capsys.readouterr().out
    tokens, mask = padded_batch(20)
    ours = _our_logits(params, cfg, tokens, mask, lora)
    assert np.abs(ours - _our_logits(params, cfg, tokens, mask))[mask].max() > 0.1  # the adapters matter
    diff = np.abs(ours - tunix_logits(_tunix_load(out, cfg), tokens, mask))[mask].max()
    print(f"gemma4 kaggle export: max |logits - Tunix| = {diff:.2e}")
    assert diff <= 1e-4, diff
    got_cfg, back = g.load_checkpoint(out)
    want = merge(jax.tree.map(jnp.asarray, params), lora)
    assert got_cfg == cfg and os.path.exists(out / "tokenizer.model")
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(want)))
