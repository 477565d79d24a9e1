"""Gemma 3 through the training pipeline: LoRA on tiny Gemma 3 exported with PEFT names loads in
`peft.PeftModel` on transformers' Gemma3ForCausalLM with equal logits; a few SFT steps lower the loss; a few GRPO
steps raise a toy reward's target probability."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from grpo_utils import run_toy_grpo

import gemma_jax as g
from gemma_jax.config import TINY_GEMMA3
from gemma_jax.model import ParamSpec, forward, init_params, param_specs
from lora.adapters import LoRA, init_lora, lora_shapes
from lora.export import export_peft
from sft.batches import SFTData, encode_example
from sft.train import HParams, train_loop

CFG = TINY_GEMMA3


def _params(seed=0):
    rng = np.random.RandomState(seed)

    def make(spec):
        std = 0.3 if spec.init == "zeros" else spec.fan_in ** -0.5
        return jnp.asarray(std * rng.standard_normal(spec.shape), jnp.float32)

    return jax.tree.map(make, param_specs(CFG), is_leaf=lambda x: isinstance(x, ParamSpec))


def _random_lora(targets, rank=4, alpha=8.0, seed=0):
    rng = np.random.RandomState(seed)
    layers = {}
    for name, (a_shape, b_shape) in lora_shapes(CFG, rank, targets).items():
        bound = math.sqrt(6.0 / math.prod(a_shape[:-1]))
        layers[name] = {"a": jnp.asarray(rng.uniform(-bound, bound, (CFG.num_layers, *a_shape)), jnp.float32),
                        "b": jnp.asarray(0.1 * rng.standard_normal((CFG.num_layers, *b_shape)), jnp.float32)}
    return LoRA(layers=layers, scale=alpha / rank)


@pytest.mark.parametrize("targets", [("q", "kv", "gate", "up", "down"), ("q", "k", "v", "o")],
                         ids=["fused_kv", "separate_kv_o"])
def test_peft_export_on_gemma3_loads_with_same_logits(tmp_path, targets):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    params, lora = _params(1), _random_lora(targets, seed=2)
    g.save_hf(tmp_path / "base", CFG, params)
    export_peft(tmp_path / "adapter", CFG, lora)
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base", attn_implementation="eager").eval()
    model = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    n_injected = sum(1 for k in model.state_dict() if "lora_" in k)
    modules = sum(2 if t == "kv" else 1 for t in targets)  # the fused kv adapter exports as k_proj and v_proj
    assert n_injected == CFG.num_layers * modules * 2  # lora_A and lora_B of each: every tensor was injected
    tokens = np.random.RandomState(0).randint(4, CFG.vocab_size, (2, 20))
    with torch.no_grad():
        theirs = model(input_ids=torch.tensor(tokens)).logits.float().numpy()
    ours = np.asarray(forward(params, jnp.asarray(tokens), CFG, lora=lora)[0])
    plain = np.asarray(forward(params, jnp.asarray(tokens), CFG)[0])
    assert np.abs(ours - plain).max() > 0.1  # the adapters matter
    assert np.abs(ours - theirs).max() <= 1e-4


def _record(i):
    a, b = 3 + 7 * i, 11 + 5 * (i % 4)
    return {"prompt": f"What is {a} plus {b}?", "reasoning": f"{a} plus {b} is {a + b}.", "answer": str(a + b),
            "system": None, "domain": "math", "source": "test"}


def test_sft_steps_lower_the_loss_on_gemma3(tokenizer, tmp_path):
    params = jax.jit(init_params, static_argnums=(0, 1))(CFG, 0)
    data = SFTData([encode_example(_record(i), tokenizer, 64) for i in range(8)], batch_size=4, max_len=64, seed=0)
    hp = HParams(lr=1e-2, warmup_steps=5, steps=30, grad_accum=1, weight_decay=0.0, clip=1.0)
    train_loop(CFG, params, init_lora(CFG, 8, 16.0, seed=0), data, hp, str(tmp_path), save_every=100,
               print_fn=lambda *a: None)
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    first, last = rows[0]["loss"], rows[-1]["loss"]
    print(f"SFT loss {first:.3f} -> {last:.3f}")
    assert len(rows) == 30 and first > 5.0  # starts near ln(512) = 6.24
    assert last < 0.5 * first, (first, last)  # measured 6.68 -> 0.37


def test_grpo_steps_raise_a_toy_reward_on_gemma3(tokenizer, tmp_path):
    p0, p1, rows = run_toy_grpo(CFG, tokenizer, tmp_path)
    logged = lambda row: {k: v for k, v in row.items() if "reward" in k or "target" in k}  # noqa: E731
    print(f"GRPO p(target) {p0:.4f} -> {p1:.4f}; first {logged(rows[0])}, last {logged(rows[-1])}")
    assert len(rows) == 6
    assert p1 > 1.5 * p0 and p1 - p0 > 0.01, (p0, p1)  # measured 0.0095 -> 0.0563
    r0, r1 = rows[0]["reward/domain_math_mean"], rows[-1]["reward/domain_math_mean"]
    assert r1 >= r0 + 0.1, (r0, r1)  # the toy reward itself, measured 0.125 -> 0.3125

