"""Gemma 4 through the training pipeline: tiny Gemma 4's logits equal Tunix's Gemma4 holding the same weights on
a left-padded batch; a few SFT steps lower the loss. No GRPO test yet: the Gemma 3 test's toy reward (one token's
count, lr 3e-3 x 6 or 1e-2 x 8 steps) starts at 1 hit in 32 samples here and does not rise.

TINY_GEMMA4 has every feature on and Tunix 0.1.7's Gemma 4 supports all of them (PLE, KV sharing, global head
dim with one kv head and k = v, proportional RoPE, double-wide shared MLPs, layer scalars, value norm), so the
parity test runs it unchanged. No PEFT export test: lora/export.py does not export Gemma 4's per-layer adapters.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
from tunix_utils import to_tunix_gemma4, tunix_logits

from gemma_jax.config import TINY_GEMMA4
from gemma_jax.model import forward, init_params
from lora.adapters import init_lora
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

