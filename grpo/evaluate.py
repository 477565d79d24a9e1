"""Greedy evaluation of a policy on held-out RL records (the command is cli/eval.py).

Metrics (greedy decoding, as the recipe evaluates):
    strict_format_rate  fraction of completions that follow the strict <reasoning>/<answer> contract
    math_accuracy       fraction of math records whose extracted answer is equivalent to the reference
    general_exact_match fraction of non-math records whose extracted answer (rewards.math.extract_answer) equals the
                        reference after strip + casefold (grpo/rollout.py text_metrics); NaN when there are none
    prob_reward_mean    mean RLPR probability reward on the non-math records (no std filter; baseline per record)
    completion_len_mean mean completion length in tokens (stop token included)
"""

import numpy as np

from gemma_jax.sampler import bucket_length, generate
from grpo.rollout import make_score_fn, prompt_ids, text_metrics
from rewards.prob import ProbRewardConfig, prob_rewards
from rewards.router import reward_type


def evaluate(params, cfg, lora, records, tokenizer, *, hp=None, max_prompt_tokens: int = 256,
             max_new_tokens: int = 768, batch_size: int = 8, samples_path: str | None = None,
             return_texts: bool = False, decode_weights: str = "auto"):
    """The module docstring's metrics over `records` (hp, when given, sets the prompt and generation budgets and
    the sampler's decode_weights). With return_texts: (metrics, the greedy completions in record order)."""
    if hp is not None:
        max_prompt_tokens, max_new_tokens = hp.max_prompt_tokens, hp.max_new_tokens
        decode_weights = hp.decode_weights
    prompts = [prompt_ids(r, tokenizer, max_prompt_tokens) for r in records]
    texts, lengths = [], []
    for s in range(0, len(prompts), batch_size):
        out = generate(params, cfg, prompts[s:s + batch_size], max_new_tokens=max_new_tokens, temperature=0.0,
                       lora=lora, stop_ids=tokenizer.stop_ids, pad_id=tokenizer.pad_id,
                       prompt_bucket=bucket_length(max_prompt_tokens), decode_weights=decode_weights)
        texts += [tokenizer.decode(row[:n]) for row, n in zip(out.tokens, out.lengths)]
        lengths += out.lengths.tolist()
    if samples_path:
        with open(samples_path, "w") as f:
            for r, t in zip(records, texts):
                f.write(f"### {r.get('domain')}: {r['question']}\n### reference: {r['answer']}\n{t}\n\n")
    metrics = text_metrics(texts, records)
    other = [i for i, r in enumerate(records) if reward_type(r, i) == "prob"]
    metrics["prob_reward_mean"] = float("nan")
    if other:
        score_fn = make_score_fn(params, cfg, lora, pad_id=tokenizer.pad_id)
        pr, _, _ = prob_rewards([texts[i] for i in other], [str(records[i]["answer"]) for i in other],
                                [prompts[i] for i in other], tokenizer=tokenizer, score_fn=score_fn,
                                cfg=ProbRewardConfig(std_filter=False))
        metrics["prob_reward_mean"] = float(np.mean(pr))
    metrics["completion_len_mean"] = float(np.mean(lengths))
    metrics["num_records"] = len(records)
    return (metrics, texts) if return_texts else metrics
