"""Gemma 4 through the training pipeline: tiny Gemma 4's logits equal Tunix's Gemma4 holding the same weights on
a left-padded batch; its per-layer LoRA adapters exported with PEFT names load in `peft.PeftModel` on
transformers' Gemma4ForCausalLM with equal logits, and `run.py --stage export` writes them (peft) and the merged
model (hf); a few SFT steps lower the loss; a few GRPO steps raise a toy reward's target probability.

TINY_GEMMA4 has every feature on and Tunix 0.1.7's Gemma 4 supports all of them (PLE, KV sharing, global head
dim with one kv head and k = v, proportional RoPE, double-wide shared MLPs, layer scalars, value norm), so the
parity test runs it unchanged.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from grpo_utils import run_toy_grpo
from hf_utils import hf_logits, our_logits, padded_batch
from safetensors.numpy import load_file
from tunix_utils import to_tunix_gemma4, tunix_logits

import gemma_jax as g
from cli import export as export_cli
from cli.common import run_cli
from gemma_jax.config import TINY_GEMMA4
from gemma_jax.model import forward, init_params
from lora.adapters import LoRA, init_lora
from lora.export import export_peft, peft_tensors
from lora.io import save_adapters
from sft.batches import SFTData, encode_example
from sft.train import HParams, train_loop

CFG = TINY_GEMMA4


def _random_params(seed):
    """init_params with every norm and layer scalar randomised around 1 (so a swapped norm would show)."""
    params = init_params(CFG, seed)
    rng = np.random.RandomState(seed)
    return jax.tree_util.tree_map_with_path(
        lambda path, v: jnp.asarray(1.0 + 0.3 * rng.randn(*v.shape), v.dtype)
        if any(s in jax.tree_util.keystr(path) for s in ("norm", "layer_scalar")) else v, params)


def test_logits_equal_tunix_gemma4_left_padded():
    params = _random_params(1)
    tokens = np.random.RandomState(0).randint(4, CFG.vocab_size, size=(2, 20))  # T = 20 > window 8
    mask = np.ones((2, 20), bool)
    mask[1, :5], tokens[1, :5] = False, 0
    ours = np.asarray(forward(params, jnp.asarray(tokens), CFG, pad_mask_BT=jnp.asarray(mask))[0])
    theirs = tunix_logits(to_tunix_gemma4(params, CFG), tokens, mask)
    assert np.abs(ours).max() > 1.0  # not a degenerate model
    print(f"Tunix Gemma 4 max |logit diff| {np.abs(ours - theirs)[mask].max():.2e}")
    assert np.abs(ours - theirs)[mask].max() <= 1e-4


def _random_lora(targets, seed):
    """Per-layer adapters (rank 4, alpha 8) with every B random and non-zero, so each adapter changes the logits."""
    lora = init_lora(CFG, rank=4, alpha=8.0, targets=targets, seed=seed)
    rng = np.random.RandomState(seed)
    layers = {n: {"a": ab["a"], "b": tuple(None if b is None else jnp.asarray(0.1 * rng.randn(*b.shape), jnp.float32)
                                           for b in ab["b"])} for n, ab in lora.layers.items()}
    return LoRA(layers=layers, scale=lora.scale)


def _lora_logits(params, lora, tokens, mask):
    return np.asarray(forward(params, jnp.asarray(tokens), CFG, pad_mask_BT=jnp.asarray(mask), lora=lora)[0])


# targets -> (PEFT modules exported, those on layer 2: global, k = v, no v_proj). Layers 3-5 are KV-shared (no
# k_proj/v_proj); the fused kv adapter needs a v weight, so it sits on layers 0 and 1 only; "k" also on layer 2.
PEFT_CASES = {
    "fused_kv": (("q", "kv", "gate", "up", "down"), 6 + 2 * 2 + 3 * 6, {"q_proj", "gate_proj", "up_proj", "down_proj"}),
    "separate_kv_o": (("q", "k", "v", "o"), 6 + 3 + 2 + 6, {"q_proj", "k_proj", "o_proj"}),
}


@pytest.mark.parametrize("case", list(PEFT_CASES))
def test_peft_export_on_gemma4_loads_with_same_logits(tmp_path, case):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    targets, n_modules, layer2 = PEFT_CASES[case]
    params, lora = _random_params(1), _random_lora(targets, seed=2)
    g.save_hf(tmp_path / "base", CFG, params)
    export_peft(tmp_path / "adapter", CFG, lora)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], len(config["target_modules"])) == (4, 8, n_modules)
    assert {m.split(".")[-1] for m in config["target_modules"] if m.startswith("model.layers.2.")} == layer2
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base", attn_implementation="eager").eval()
    model = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    # Every exported tensor was injected, and nothing else (a module PEFT wrapped without a tensor keeps B = 0).
    exported = load_file(os.path.join(tmp_path, "adapter", "adapter_model.safetensors"))
    injected = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    assert len(exported) == len(injected) == 2 * n_modules
    for name, x in exported.items():
        assert np.array_equal(injected[name.replace(".weight", ".default.weight")].numpy(), x), name
    tokens, mask = padded_batch(20)
    ours = _lora_logits(params, lora, tokens, mask)
    assert np.abs(ours - our_logits(params, CFG, tokens, mask))[mask].max() > 0.1  # the adapters matter
    diff = np.abs(ours - hf_logits(model, tokens, mask))[mask].max()
    print(f"gemma4 PEFT {case}: max |logits - peft| = {diff:.2e}")
    assert diff <= 1e-4, diff


def test_export_cli_peft_and_merged_hf_on_gemma4(tmp_path, tokenizer_path, capsys):
    """`run.py --stage export` on a Gemma 4 base with saved per-layer adapters: --format peft writes exactly
    peft_tensors(lora) (loadable: the test above); --format hf writes the merged model, whose transformers logits
    equal ours with the adapters."""
    from transformers import AutoModelForCausalLM

    params, lora = _random_params(4), _random_lora(("q", "k", "v", "o", "down"), seed=5)
    g.save_hf(tmp_path / "base", CFG, params)
    save_adapters(tmp_path / "adapters", lora, CFG)
    common = ["--base", str(tmp_path / "base"), "--tokenizer", tokenizer_path, "--adapters", str(tmp_path / "adapters")]
    assert run_cli(export_cli.main, ["--format", "peft", *common, "--out", str(tmp_path / "peft")], prog="export") == 0
    got = load_file(os.path.join(tmp_path, "peft", "adapter_model.safetensors"))
    want = peft_tensors(lora)
    assert sorted(got) == sorted(want) and all(np.array_equal(got[k], want[k]) for k in want)
    assert run_cli(export_cli.main, ["--format", "hf", *common, "--out", str(tmp_path / "hf")], prog="export") == 0
    assert "with the adapters of" in capsys.readouterr().out
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    assert type(model).__name__ == "Gemma4ForCausalLM"
    tokens, mask = padded_batch(20)
    ours = _lora_logits(params, lora, tokens, mask)
    assert np.abs(ours - our_logits(params, CFG, tokens, mask))[mask].max() > 0.1
    diff = np.abs(ours - hf_logits(model, tokens, mask))[mask].max()
    print(f"gemma4 merged export: max |logits - transformers| = {diff:.2e}")
    assert diff <= 1e-4, diff


def _record(i):
    a, b = 3 + 7 * i, 11 + 5 * (i % 4)
    return {"prompt": f"What is {a} plus {b}?", "reasoning": f"{a} plus {b} is {a + b}.", "answer": str(a + b),
            "system": None, "domain": "math", "source": "test"}


def test_sft_steps_lower_the_loss_on_gemma4(tokenizer, tmp_path):
    params = init_params(CFG, 0)
    data = SFTData([encode_example(_record(i), tokenizer, 64) for i in range(8)], batch_size=4, max_len=64, seed=0)
    hp = HParams(lr=1e-2, warmup_steps=5, steps=30, grad_accum=1, weight_decay=0.0, clip=1.0)
    train_loop(CFG, params, init_lora(CFG, 8, 16.0, seed=0), data, hp, str(tmp_path), save_every=100,
               print_fn=lambda *a: None)
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    first, last = rows[0]["loss"], rows[-1]["loss"]
    print(f"SFT loss {first:.3f} -> {last:.3f}")
    assert len(rows) == 30 and first > 5.0  # starts near ln(512) = 6.24
    assert last < 0.3 * first, (first, last)  # measured 6.87 -> 1.39


def test_grpo_steps_raise_a_toy_reward_on_gemma4(gemma4_tokenizer, tmp_path):
    """The Gemma 3 test's toy GRPO run (tests/grpo_utils.py), in Gemma 4's own chat format (<|turn>). With the
    Gemma 1-3 format the picked target ('20.') appears in 1 of 32 completions and p(target) falls (0.0102 ->
    0.0075): no signal to learn from."""
    p0, p1, rows = run_toy_grpo(CFG, gemma4_tokenizer, tmp_path)
    rewards = [row["reward/domain_math_mean"] for row in rows]
    print(f"GRPO p(target) {p0:.4f} -> {p1:.4f}; toy reward per step {rewards}")
    assert len(rows) == 6
    assert p1 > 1.5 * p0 and p1 - p0 > 0.01, (p0, p1)  # measured 0.0408 -> 0.1134
    # One step's reward is 32 samples of a rare token (0 to 5 hits), so the last two steps are averaged: measured
    # 0.031, 0.094, 0.156, 0.000, 0.094, 0.156 (first 0.031, last two 0.125).
    assert np.mean(rewards[-2:]) >= rewards[0] + 0.05, rewards
