"""Greedy evaluation of a policy on held-out RL records, and `python run.py --stage eval`.

    python run.py --stage eval --ckpt BASE [--adapters DIR] --data FILE [--tokenizer PATH] [--limit N]

Metrics (greedy decoding, as the recipe evaluates, REFERENCE.md §5):
    strict_format_rate  fraction of completions that follow the strict <reasoning>/<answer> contract
    math_accuracy       fraction of math records whose extracted answer is equivalent to the reference
    prob_reward_mean    mean RLPR probability reward on the non-math records (no std filter; baseline per record)
    completion_len_mean mean completion length in tokens (stop token included)
"""

import argparse
import sys

import numpy as np

from gemma_jax.sampler import bucket_length, generate
from grpo.rollout import make_score_fn, prompt_ids, text_metrics


def evaluate(params, cfg, lora, records, tokenizer, *, hp=None, max_prompt_tokens: int = 256,
             max_new_tokens: int = 768, batch_size: int = 8, samples_path: str | None = None,
             return_texts: bool = False):
    """The module docstring's metrics over `records` (hp, when given, sets the prompt and generation budgets).
    With return_texts: (metrics, the greedy completions in record order)."""
    from rewards.prob import ProbRewardConfig, prob_rewards
    from rewards.router import reward_type

    if hp is not None:
        max_prompt_tokens, max_new_tokens = hp.max_prompt_tokens, hp.max_new_tokens
    prompts = [prompt_ids(r, tokenizer, max_prompt_tokens) for r in records]
    texts, lengths = [], []
    for s in range(0, len(prompts), batch_size):
        out = generate(params, cfg, prompts[s:s + batch_size], max_new_tokens=max_new_tokens, temperature=0.0,
                       lora=lora, stop_ids=tokenizer.stop_ids, pad_id=tokenizer.pad_id,
                       prompt_bucket=bucket_length(max_prompt_tokens))
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


def load_rl_records(path, tokenizer, *, kind: str = "recipe_csv", prompt_budget: int | None = None,
                    limit: int | None = None) -> list:
    """RL records from a data file via data.rl.prepare_rl (its report names every dropped row's reason)."""
    from data.rl import prepare_rl

    records, report = prepare_rl(path, kind=kind, count_tokens=lambda t: len(tokenizer.encode(t)),
                                 prompt_budget=prompt_budget)
    if not records:
        raise ValueError(f"{path}: no usable RL records (read {report['read']}, dropped {report['dropped']})")
    return records[:limit] if limit else records


def parse_args(argv):
    p = argparse.ArgumentParser(prog="run.py --stage eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="base model: Hugging Face safetensors folder or Kaggle checkpoint")
    p.add_argument("--adapters", default=None, help="LoRA adapters folder (lora/io.py); default: the base model")
    p.add_argument("--data", required=True, help="held-out RL data file (CSV/JSONL/parquet)")
    p.add_argument("--data-kind", default="recipe_csv", help="data.rl source kind (recipe_csv, open_rs, ...)")
    p.add_argument("--tokenizer", default=None, help="tokenizer.model (default: CKPT/tokenizer.model)")
    p.add_argument("--max-prompt-tokens", type=int, default=256)
    p.add_argument("--max-new-tokens", type=int, default=768)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N records only")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else list(argv))
    from grpo.cli import load_model_and_tokenizer

    cfg, params, lora, tokenizer = load_model_and_tokenizer(args.ckpt, args.tokenizer, args.adapters)
    records = load_rl_records(args.data, tokenizer, kind=args.data_kind, limit=args.limit)
    m = evaluate(params, cfg, lora, records, tokenizer, max_prompt_tokens=args.max_prompt_tokens,
                 max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    print(f"{'metric':<22}{'value':>10}")
    for k in ("strict_format_rate", "math_accuracy", "prob_reward_mean", "completion_len_mean", "num_records"):
        print(f"{k:<22}{m[k]:>10.4f}" if isinstance(m[k], float) else f"{k:<22}{m[k]:>10}")
    return 0
