"""The toy GRPO setup shared by the learner tests and the per-model pipeline tests: eight "what is i plus 3i?"
prompts, small hyperparameters (G 8, 8 new tokens, lr 3e-3, 6 steps, no KL), a reward that counts one target
token in the completion, and the probability of the first completion token that shows whether GRPO moved it."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from gemma_jax.model import forward, init_params
from grpo.learner import GRPOHParams, train
from grpo.rollout import prompt_ids
from lora.adapters import init_lora

RECORDS = [{"question": f"what is {i} plus {i * 3}?", "answer": str(4 * i), "domain": "math", "system": "Be brief."}
           for i in range(8)]
HP = GRPOHParams(group_size=8, prompts_per_step=4, micro_batch=8, beta=0.0, temperature=1.0, top_k=None, top_p=None,
                 max_prompt_tokens=32, max_new_tokens=8, lr=3e-3, steps=6, weight_decay=0.0, clip=1.0)


def make_toy_reward(target_id):
    """Reward = how often `target_id` appears when the completion text is tokenized again."""
    def reward_fn(texts, records, *, tokenizer, score_fn, prompt_ids, prob_state, **kw):
        r = np.array([tokenizer.encode(t).count(target_id) for t in texts], np.float64)
        return r, {"target": r}, {}, prob_state

    return reward_fn


def first_token_probs(params, lora, tokenizer, cfg, records=RECORDS):
    """p(next token | prompt) at the first completion position, averaged over the records' prompts [V]."""
    probs = []
    for r in records:
        ids = jnp.asarray([prompt_ids(r, tokenizer, HP.max_prompt_tokens)])
        logits, _ = forward(params, ids, cfg, lora=lora)
        probs.append(jax.nn.softmax(logits[0, -1]))
    return np.mean(np.asarray(probs), axis=0)


def pick_target(params, tokenizer, cfg):
    """The most likely ordinary token (no special / byte piece) after the prompts under the initial model."""
    for i in np.argsort(-first_token_probs(params, None, tokenizer, cfg)):
        piece = tokenizer.sp.IdToPiece(int(i))
        if i > 3 and i not in tokenizer.stop_ids and not piece.startswith("<"):
            return int(i)
    raise AssertionError("no ordinary token")


def run_toy_grpo(cfg, tokenizer, out_dir):
    """HP.steps toy GRPO steps on init_params(cfg, 0) with rank-4 adapters, the target picked by pick_target.
    Returns (p(target) before, p(target) after, the metrics.jsonl rows)."""
    params = init_params(cfg, seed=0)
    target = pick_target(params, tokenizer, cfg)
    lora, _, _ = train(cfg, params, init_lora(cfg, rank=4, alpha=8.0, seed=1), RECORDS, tokenizer, HP, str(out_dir),
                       reward_fn=make_toy_reward(target), save_every=100, sample_every=0, seed=3,
                       print_fn=lambda *a: None)
    p0, p1 = (first_token_probs(params, lo, tokenizer, cfg)[target] for lo in (None, lora))
    rows = [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]
    return float(p0), float(p1), rows
