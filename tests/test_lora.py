"""LoRA tests: a fresh adapter changes nothing, merge equals the adapted forward, parity with Tunix + qwix LoRA,
adapter save/load round trip and its mismatch errors, PEFT export loaded by peft onto a transformers Gemma 2,
merged export loaded by transformers."""

import dataclasses
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma_jax.config import TINY, config_to_hf
from gemma_jax.model import LORA_TARGETS, ParamSpec, forward, init_params, lora_specs, param_specs
from lora import DEFAULT_TARGETS, LoRA, count_trainable, init_lora, lora_shapes, merge
from lora.export import export_merged_hf, export_peft
from lora.io import load_adapters, read_adapter_meta, save_adapters

# Tunix hard-codes the query scale to head_dim**-0.5, so the shared config uses query_pre_attn_scalar = head_dim.
CFG = dataclasses.replace(TINY, query_pre_attn_scalar=TINY.head_dim)
RANK, ALPHA = 4, 8.0


def _params(cfg, seed=0):
    """Random params built in numpy (no per-op compiles): fan-in scaled normals, non-zero norm weights (zero
    norms would hide a missing `1 + w`)."""
    rng = np.random.RandomState(seed)

    def make(spec):
        std = 0.3 if spec.init == "zeros" else spec.fan_in ** -0.5
        return jnp.asarray(std * rng.standard_normal(spec.shape), jnp.float32)

    return jax.tree.map(make, param_specs(cfg), is_leaf=lambda x: isinstance(x, ParamSpec))


def _random_lora(cfg, targets=DEFAULT_TARGETS, rank=RANK, alpha=ALPHA, seed=0, b_std=0.1):
    """Adapters with A He-uniform as init_lora and B non-zero, large enough to move the logits by O(1)."""
    rng = np.random.RandomState(seed)
    layers = {}
    for name, (a_shape, b_shape) in lora_shapes(cfg, rank, targets).items():
        bound = math.sqrt(6.0 / math.prod(a_shape[:-1]))
        layers[name] = {"a": jnp.asarray(rng.uniform(-bound, bound, (cfg.num_layers, *a_shape)), jnp.float32),
                        "b": jnp.asarray(b_std * rng.standard_normal((cfg.num_layers, *b_shape)), jnp.float32)}
    return LoRA(layers=layers, scale=alpha / rank)


@pytest.fixture(scope="module")
def base():
    params = _params(CFG)
    tokens = np.random.RandomState(0).randint(4, CFG.vocab_size, (2, 20))  # T 20 > window 8
    fwd = jax.jit(lambda p, t, lora: forward(p, t, CFG, lora=lora)[0])
    return params, tokens, fwd


def _max_diff(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def test_fresh_adapter_changes_nothing_and_merge_matches(base):
    params, tokens, fwd = base
    plain = np.asarray(fwd(params, tokens, None))
    fresh = init_lora(CFG, RANK, ALPHA)
    assert np.array_equal(np.asarray(fwd(params, tokens, fresh)), plain)  # B = 0: exactly the base
    lora = _random_lora(CFG)  # same targets as `fresh`: one compiled forward serves both
    adapted = np.asarray(fwd(params, tokens, lora))
    assert _max_diff(adapted, plain) > 0.1  # the adapters really change the model
    assert _max_diff(np.asarray(fwd(merge(params, lora), tokens, None)), adapted) <= 1e-5


def test_lora_specs_match_the_base_weights_they_adapt():
    """Every target's A @ B (R contracted) has exactly the shape and logical axes of the base weight(s) it adds to
    (param_specs), with kv's C axis giving one slice per base weight; A He-uniform over its input, B zeros."""
    cfg = dataclasses.replace(TINY, num_layers=3)
    rank = 5
    sizes = (cfg.num_layers, cfg.embed_dim, cfg.hidden_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, rank)
    assert len(set(sizes)) == len(sizes)  # all distinct, so a misplaced letter changes a shape
    base = param_specs(cfg)["layers"]
    product = jax.vmap(lambda a, b: jnp.tensordot(a, b, axes=1))  # per layer: A's last axis (R) with B's first
    for name, target in LORA_TARGETS.items():
        spec = lora_specs(cfg, rank, [name])[name]
        a, b = spec["a"], spec["b"]
        assert a.axes[-1] == b.axes[1] == "rank" and a.shape[-1] == b.shape[1] == rank
        shape = jax.eval_shape(product, jax.ShapeDtypeStruct(a.shape, jnp.float32),
                               jax.ShapeDtypeStruct(b.shape, jnp.float32)).shape
        axes = a.axes[:-1] + b.axes[2:]
        assert len(axes) == len(shape)
        if "pair" in axes:
            c = axes.index("pair")
            assert shape[c] == len(target.adds_to) == 2
            shape, axes = shape[:c] + shape[c + 1:], axes[:c] + axes[c + 1:]
        else:
            assert len(target.adds_to) == 1
        for w in target.adds_to:
            assert (shape, axes) == (base[w].shape, base[w].axes), (name, w)
        assert (a.init, a.fan_in, b.init) == ("he_uniform", math.prod(a.shape[1:-1]), "zeros")
    with pytest.raises(ValueError, match="both adapt 'k'"):
        lora_specs(cfg, rank, ["kv", "k"])
    with pytest.raises(ValueError, match="unknown LoRA target 'qkv'"):
        lora_specs(cfg, rank, ["q", "qkv"])


def test_count_trainable():
    # Per layer: q 64*4 + 4*4*16, kv 64*4 + 4*2*2*16, gate/up 64*4 + 4*128 each, down 128*4 + 4*64.
    per_layer = (256 + 256) + (256 + 256) + 2 * (256 + 512) + (512 + 256)
    assert count_trainable(jax.eval_shape(lambda: init_lora(CFG, RANK, ALPHA))) == 4 * per_layer == 13312


def test_matches_tunix_qwix_lora(base):
    import qwix
    from flax import nnx
    from tunix_utils import to_tunix, tunix_logits

    params, tokens, fwd = base
    lora = _random_lora(CFG)
    model = to_tunix(params, CFG)
    provider = qwix.LoraProvider(module_path=".*q_einsum|.*kv_einsum|.*gate_proj|.*down_proj|.*up_proj",
                                 rank=RANK, alpha=ALPHA)
    model = qwix.apply_lora_to_model(model, provider, **model.get_model_input(), rngs=nnx.Rngs(0))
    for i, layer in enumerate(model.layers):
        targets = {"q": layer.attn.q_einsum, "kv": layer.attn.kv_einsum, "gate": layer.mlp.gate_proj,
                   "up": layer.mlp.up_proj, "down": layer.mlp.down_proj}
        for name, module in targets.items():
            prefix = "w" if name in ("q", "kv") else "kernel"
            for ab in ("a", "b"):
                var = getattr(module, f"{prefix}_lora_{ab}")
                ours = np.asarray(lora.layers[name][ab][i])
                assert var.value.shape == ours.shape, (name, ab, var.value.shape, ours.shape)
                var.value = jnp.asarray(ours)
    ref = tunix_logits(model, tokens)
    ours = np.asarray(fwd(params, tokens, lora))
    assert _max_diff(ours, np.asarray(fwd(params, tokens, None))) > 0.1
    print(f"LoRA logits vs Tunix + qwix: max abs diff {_max_diff(ours, ref):.2e}")
    assert _max_diff(ours, ref) <= 1e-4


def test_save_load_round_trip_exact(tmp_path):
    lora = _random_lora(CFG, targets=("q", "k", "v", "o", "down"), rank=3, alpha=5.0)
    save_adapters(tmp_path / "a", lora, CFG, extra={"step": 7})
    back = load_adapters(tmp_path / "a", CFG, rank=3, alpha=5.0, targets=("q", "k", "v", "o", "down"))
    assert back.scale == lora.scale and set(back.layers) == set(lora.layers)
    for name in lora.layers:
        for ab in ("a", "b"):
            assert np.array_equal(np.asarray(back.layers[name][ab]), np.asarray(lora.layers[name][ab]))
            assert back.layers[name][ab].dtype == jnp.float32
    meta = read_adapter_meta(tmp_path / "a")
    assert meta["extra"] == {"step": 7} and meta["rank"] == 3 and meta["alpha"] == 5.0
    # bfloat16 adapters come back bit for bit, in bfloat16.
    lora16 = jax.tree.map(lambda x: jnp.asarray(np.asarray(x).astype(jnp.bfloat16)), lora)
    save_adapters(tmp_path / "b", lora16, CFG)
    back16 = load_adapters(tmp_path / "b")
    assert back16.layers["q"]["b"].dtype == jnp.bfloat16
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in
               zip(jax.tree.leaves(back16), jax.tree.leaves(lora16)))


def test_load_mismatches_name_the_problem(tmp_path):
    path = tmp_path / "a"
    save_adapters(path, _random_lora(CFG), CFG)
    with pytest.raises(ValueError, match="rank: file 4 vs expected 8"):
        load_adapters(path, CFG, rank=8)
    with pytest.raises(ValueError, match=r"targets: file \['down', 'gate', 'kv', 'q', 'up'\] vs expected \['q'"):
        load_adapters(path, CFG, targets=("q", "v"))
    with pytest.raises(ValueError, match="alpha: file 8.0 vs expected 16"):
        load_adapters(path, alpha=16)
    other = dataclasses.replace(CFG, num_layers=6, hidden_dim=256)
    with pytest.raises(ValueError, match=r"different model \(num_layers: file 4 vs given 6; hidden_dim"):
        load_adapters(path, other)
    # param_dtype / scan_layers do not change what the adapters compute: loading still works.
    assert load_adapters(path, dataclasses.replace(CFG, param_dtype="bfloat16", scan_layers=False)).scale == 2.0
    with pytest.raises(ValueError, match="LoRA tensor q.a has shape"):
        save_adapters(tmp_path / "c", _random_lora(other), CFG)
    with pytest.raises(FileNotFoundError, match="lora.json not found"):
        load_adapters(tmp_path / "missing")
    # A tensor file that disagrees with its JSON is named.
    meta = json.loads((path / "lora.json").read_text())
    meta["targets"] = ["q", "kv"]
    (path / "lora.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"lora.safetensors: tensors .* unexpected \['down.a'"):
        load_adapters(path)


# --- Hugging Face / PEFT ------------------------------------------------------------------------------------

def _hf_model(cfg, params):
    """A transformers Gemma 2 holding our params (our layout -> HF's [out, in] Linear weights)."""
    import torch
    from transformers import Gemma2Config, Gemma2ForCausalLM

    hf_cfg = Gemma2Config(**{k: v for k, v in config_to_hf(cfg).items() if k not in ("architectures", "torch_dtype")})
    hf_cfg._attn_implementation = "eager"
    model = Gemma2ForCausalLM(hf_cfg).eval()
    t = lambda x: torch.tensor(np.asarray(x, np.float32))  # noqa: E731
    lay = params["layers"]
    sd = {"model.embed_tokens.weight": t(params["embed"]), "model.norm.weight": t(params["final_norm"])}
    D = cfg.embed_dim
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        sd[p + "self_attn.q_proj.weight"] = t(np.asarray(lay["q"][i]).reshape(D, -1).T)
        sd[p + "self_attn.k_proj.weight"] = t(np.asarray(lay["k"][i]).reshape(D, -1).T)
        sd[p + "self_attn.v_proj.weight"] = t(np.asarray(lay["v"][i]).reshape(D, -1).T)
        sd[p + "self_attn.o_proj.weight"] = t(np.asarray(lay["o"][i]).reshape(-1, D).T)
        for name in ("gate", "up", "down"):
            sd[p + f"mlp.{name}_proj.weight"] = t(np.asarray(lay[name][i]).T)
        for ours, hf in (("attn_norm", "input_layernorm"), ("post_attn_norm", "post_attention_layernorm"),
                         ("ffw_norm", "pre_feedforward_layernorm"), ("post_ffw_norm", "post_feedforward_layernorm")):
            sd[p + f"{hf}.weight"] = t(lay[ours][i])
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    return model


def _hf_logits(model, tokens):
    import torch

    with torch.no_grad():
        return model(input_ids=torch.tensor(tokens)).logits.float().numpy()


@pytest.fixture(scope="module")
def hf_base(base):
    params, tokens, fwd = base
    model = _hf_model(CFG, params)
    # The base models agree before any adapter is involved.
    assert _max_diff(_hf_logits(model, tokens), fwd(params, tokens, None)) <= 1e-4
    return params, tokens, fwd


@pytest.mark.parametrize("targets", [("q", "kv", "gate", "up", "down"), ("q", "k", "v", "o", "down")],
                         ids=["fused_kv", "separate_kv_o"])
def test_peft_export_loads_in_peft_with_same_logits(hf_base, tmp_path, targets):
    from peft import PeftModel

    params, tokens, fwd = hf_base
    lora = _random_lora(CFG, targets=targets, seed=3)
    export_peft(tmp_path, CFG, lora)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["r"] == RANK and config["lora_alpha"] == 8
    peft_model = PeftModel.from_pretrained(_hf_model(CFG, params), str(tmp_path)).eval()
    # Every exported tensor was injected (a name mismatch would leave PEFT's zero-initialised B in place).
    from safetensors.numpy import load_file

    exported = load_file(os.path.join(tmp_path, "adapter_model.safetensors"))
    injected = {k: v for k, v in peft_model.state_dict().items() if "lora_" in k}
    assert len(injected) == len(exported)
    for name, x in exported.items():
        assert np.array_equal(injected[name.replace(".weight", ".default.weight")].numpy(), x), name
    ours = np.asarray(fwd(params, tokens, lora))
    assert _max_diff(ours, fwd(params, tokens, None)) > 0.1
    assert _max_diff(_hf_logits(peft_model, tokens), ours) <= 2e-5  # measured ~5e-6
    assert _max_diff(fwd(merge(params, lora), tokens, None), ours) <= 1e-5  # merge of these targets too


def test_merged_hf_export_loads_in_transformers(hf_base, tmp_path):
    from transformers import AutoModelForCausalLM

    params, tokens, fwd = hf_base
    lora = _random_lora(CFG, seed=5)
    export_merged_hf(tmp_path, CFG, params, lora)
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path), attn_implementation="eager").eval()
    assert _max_diff(_hf_logits(model, tokens), fwd(params, tokens, lora)) <= 2e-5  # measured ~5e-6


def test_concat_lora_equals_merging_the_first_then_applying_the_second():
    """GRPO on top of SFT: merge(base, sft) + grpo adapters must equal base + concat(sft, grpo), with different
    ranks and scales on the two sides."""
    from lora.adapters import concat_lora

    cfg = TINY
    params = init_params(cfg, 0)
    tokens = jnp.asarray(np.random.RandomState(0).randint(4, cfg.vocab_size, (2, 12)))

    def randomised(lora, seed):
        keys = iter(jax.random.split(jax.random.key(seed), 2 * len(lora.layers)))
        layers = {n: {"a": ab["a"], "b": 0.05 * jax.random.normal(next(keys), ab["b"].shape)}
                  for n, ab in lora.layers.items()}
        return type(lora)(layers=layers, scale=lora.scale)

    first = randomised(init_lora(cfg, 4, 8.0, seed=1), 2)
    second = randomised(init_lora(cfg, 2, 6.0, seed=3), 4)
    stacked = forward(merge(params, first), tokens, cfg, lora=second)[0]
    combined = concat_lora(first, second)
    assert combined.layers["q"]["a"].shape[-1] == 6
    together = forward(params, tokens, cfg, lora=combined)[0]
    assert np.abs(np.asarray(stacked) - np.asarray(together)).max() <= 1e-5
    assert np.abs(np.asarray(stacked) - np.asarray(forward(params, tokens, cfg)[0])).max() > 1e-2


@pytest.mark.parametrize("rows", [96, 8])  # 96 tokens >= 64 inputs: the joined matmul; 8 (a decode step): not
def test_widening_projection_equals_the_separate_form(rows):
    """`_project` on gate (D 64 -> F 128) joins the adapter into the base matmul for a batch of tokens; its value
    and its gradients for x, W, A and B equal those of the separate x W + s (x A) B written out here."""
    from gemma_jax.model import _project

    rng = np.random.default_rng(3)
    x, w = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((2, rows // 2, 64), (64, 128)))
    a, b = (jnp.asarray(rng.standard_normal(s) * 0.3, jnp.float32) for s in ((64, RANK), (RANK, 128)))
    cot = jnp.asarray(rng.standard_normal((2, rows // 2, 128)), jnp.float32)

    def ours(x, w, a, b):
        return jnp.sum(_project("gate", "BTD,DF->BTF", x, w, {"gate": {"a": a, "b": b}}, 1.5) * cot)

    def separate(x, w, a, b):
        return jnp.sum((x @ w + ((x @ a) @ b) * 1.5) * cot)

    v1, g1 = jax.value_and_grad(ours, argnums=(0, 1, 2, 3))(x, w, a, b)
    v2, g2 = jax.value_and_grad(separate, argnums=(0, 1, 2, 3))(x, w, a, b)
    np.testing.assert_allclose(v1, v2, rtol=1e-5)
    for name, u, v in zip("xwab", g1, g2):
        np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-4, err_msg=name)
    assert ("custom_vjp_call" in str(jax.make_jaxpr(ours)(x, w, a, b))) == (rows == 96)
