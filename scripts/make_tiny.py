"""Rebuild the embedded default's tokenizer and pre-trained base model from scratch (used by scripts/tiny.sh).

    python scripts/make_tiny.py tokenizer --data bundled/data --out bundled
    python scripts/make_tiny.py pretrain  --data bundled/data --out bundled --steps 1500
    python scripts/make_tiny.py probe     --data bundled/data --out bundled     # the base's accuracy per task kind
    python scripts/make_tiny.py forms     --adapters bundled/sft_adapters          # how adapters write general tasks

The tokenizer is a sentencepiece BPE model with Gemma's special-id layout (pad 0, eos 1, bos 2, unk 3, then
<start_of_turn>, <end_of_turn> and the reasoning/answer tags) and Gemma's habits: digits split one per token, text
kept as is (newlines, spaces), byte fallback. The base model is a Gemma-2-architecture transformer (GQA, sliding
window on even layers, both softcaps, post-norms) pre-trained with plain next-token loss on the generated corpus
(prose problems and worked solutions, no tags), then saved as Hugging Face safetensors.
"""

import argparse
import json
import os
import re
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from data.tiny_tasks import CORPUS_ANSWER, CORPUS_SOLUTION  # noqa: E402
from gemma_jax.config import GemmaConfig  # noqa: E402
from gemma_jax.model import count_params, forward, init_params  # noqa: E402
from gemma_jax.tokenizer import Tokenizer  # noqa: E402
from train.optim import adamw_init, adamw_update, clip_by_global_norm, lr_schedule  # noqa: E402

SPECIAL_PIECES = ["<start_of_turn>", "<end_of_turn>", "<reasoning>", "</reasoning>", "<answer>", "</answer>"]

# The bundled model: ~2.4M parameters, every Gemma 2 feature on.
TINY_DEFAULT = GemmaConfig(
    num_layers=4, embed_dim=192, hidden_dim=768, num_heads=4, num_kv_heads=2, head_dim=48, vocab_size=640,
    query_pre_attn_scalar=48, attn_logit_softcap=50.0, final_logit_softcap=30.0, sliding_window=64,
    local_layer_period=2, use_post_norms=True,
)


def train_tokenizer(data_dir, out_dir, vocab_size):
    import sentencepiece as spm

    os.makedirs(out_dir, exist_ok=True)
    prefix = os.path.join(out_dir, "tokenizer")
    spm.SentencePieceTrainer.Train(
        input=os.path.join(data_dir, "corpus.txt"), model_prefix=prefix, vocab_size=vocab_size, model_type="bpe",
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, user_defined_symbols=SPECIAL_PIECES, byte_fallback=True,
        split_digits=True, character_coverage=1.0, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=False, num_threads=2, minloglevel=2,
        input_sentence_size=200_000, shuffle_input_sentence=True, seed_sentencepiece_size=200_000,
    )
    os.remove(prefix + ".vocab")
    print(f"tokenizer: {prefix}.model")


def corpus_rows(tokenizer, data_dir, seq_len):
    """The corpus as one token stream (bos + document + eos, repeated), cut into rows of seq_len + 1 tokens."""
    with open(os.path.join(data_dir, "corpus.txt")) as f:
        docs = [d.strip() for d in f.read().split("\n\n") if d.strip()]
    stream = []
    for d in docs:
        stream += tokenizer.encode(d, add_bos=True, add_eos=True)
    n = len(stream) // (seq_len + 1)
    return np.asarray(stream[: n * (seq_len + 1)], np.int32).reshape(n, seq_len + 1)


# The task kind of a held-out question, from the wording data/tiny_tasks.py gives each kind.
KINDS = [("list", "Start with "), ("swap", " swap, then "), ("calendar", "Today is "), ("math", "")]


def task_kind(question: str) -> str:
    return next(k for k, marker in KINDS if marker in question)


def probe(params, cfg, tok, data_dir, *, per_kind=120):
    """Greedy accuracy of a base model in its pre-training format (`Question: ...\nSolution:\n`, which always works
    every step out) on the first `per_kind` held-out items of each task kind: what writing the work out gets this
    model, before any fine-tuning. Returns {kind: accuracy}."""
    import csv

    from gemma_jax.sampler import generate

    with open(os.path.join(data_dir, "rl_eval.csv")) as f:
        rows = list(csv.DictReader(f))
    by_kind = {}
    for r in rows:
        by_kind.setdefault(task_kind(r["question"]), []).append(r)
    out = {}
    for kind, items in sorted(by_kind.items()):
        items = items[:per_kind]
        prompts = [tok.encode(f"Question: {r['question']}{CORPUS_SOLUTION}", add_bos=True) for r in items]
        right = 0
        for i in range(0, len(prompts), 64):
            gen = generate(params, cfg, prompts[i:i + 64], max_new_tokens=72, temperature=0.0, stop_ids=(1,))
            for r, toks, n in zip(items[i:i + 64], gen.tokens, gen.lengths):
                text = tok.decode([int(t) for t in toks[:n]])
                m = re.search(re.escape(CORPUS_ANSWER) + r"([^\n]*)", text)
                right += bool(m) and m.group(1).strip() == r["answer"]
        out[kind] = right / len(items)
    return out


def long_first_word(question: str) -> str:
    """The first word of a general question's long trace, read off the question as data/tiny_tasks.py words it."""
    kind = task_kind(question)
    if kind == "calendar":
        return "Counting"
    if kind == "list":
        return re.search(r"First (\w+)", question).group(1).capitalize()
    return re.search(r"\. (\w+) and \w+ swap, then", question).group(1)


def forms_table(samples) -> dict:
    """samples: (kind, long form?, exact match?, p) per sample -> {kind: {"long_share", and for "long" / "short":
    {"n", "exact_match", "p"}}} (NaN where a form has no sample)."""
    out = {}
    for kind in sorted({k for k, *_ in samples}):
        rows = [s for s in samples if s[0] == kind]
        out[kind] = {"long_share": sum(s[1] for s in rows) / len(rows)}
        for form, is_long in (("long", True), ("short", False)):
            f = [s for s in rows if s[1] == is_long]
            out[kind][form] = {"n": len(f), "exact_match": float(np.mean([s[2] for s in f])) if f else float("nan"),
                               "p": float(np.mean([s[3] for s in f])) if f else float("nan")}
    return out


def forms(base_dir, tok_path, adapters, data_dir, *, per_kind=30, group=8, seed=0):
    """What the default GRPO run finds on the general half. The first `per_kind` held-out prompts of each general task
    kind are sampled as GRPO samples them (G 8, temperature 1.0, top-k 10, 64 new tokens, cli/embedded.py); for
    each kind: the share written in the long form (cli.embedded.step_by_step) and, per form, the exact match and the
    mean probability of the reference answer after that reasoning (the probability reward without its no-reasoning
    baseline and std filter). Plus each kind's greedy exact match with the completion forced to open with the long
    trace's first word: what the adapters can do when they write the steps. Returns (forms_table, forced)."""
    import csv

    from cli.common import load_model
    from cli.embedded import step_by_step
    from gemma_jax.sampler import generate
    from grpo.rollout import exact_match, make_score_fn, prompt_ids
    from rewards.prob import ProbRewardConfig
    from rewards.router import RewardConfig, compute_rewards

    cfg, params, lora, tok = load_model(base_dir, tok_path, adapters)
    with open(os.path.join(data_dir, "rl_eval.csv")) as f:
        rows = [r for r in csv.DictReader(f) if r["domain"] != "math"]
    rows = [r for kind in ("calendar", "list", "swap") for r in
            [r for r in rows if task_kind(r["question"]) == kind][:per_kind]]
    prompts = [prompt_ids(r, tok, 96) for r in rows]
    gen = generate(params, cfg, prompts, max_new_tokens=64, temperature=1.0, top_k=10, stop_ids=tok.stop_ids,
                   seed=seed, num_samples=group, lora=lora, pad_id=tok.pad_id)
    texts = [tok.decode([int(t) for t in toks[:n]]) for toks, n in zip(gen.tokens, gen.lengths)]
    rows_g = [r for r in rows for _ in range(group)]
    _, parts, _, _ = compute_rewards(
        texts, rows_g, tokenizer=tok, score_fn=make_score_fn(params, cfg, lora, pad_id=tok.pad_id),
        prompt_ids=[p for p in prompts for _ in range(group)],
        cfg=RewardConfig(prob=ProbRewardConfig(debias=False, std_filter=False)))
    samples = [(task_kind(r["question"]), step_by_step("general", t), exact_match(t, r["answer"]), float(p))
               for r, t, p in zip(rows_g, texts, parts["prob"])]
    heads = ["<reasoning>\n" + long_first_word(r["question"]) for r in rows]
    gen = generate(params, cfg, [p + tok.encode(h) for p, h in zip(prompts, heads)], max_new_tokens=64,
                   temperature=0.0, stop_ids=tok.stop_ids, lora=lora, pad_id=tok.pad_id)
    forced = {}
    for r, h, toks, n in zip(rows, heads, gen.tokens, gen.lengths):
        right = exact_match(h + tok.decode([int(t) for t in toks[:n]]), r["answer"])
        forced.setdefault(task_kind(r["question"]), []).append(right)
    return forms_table(samples), {k: sum(v) / len(v) for k, v in forced.items()}


def pretrain(data_dir, out_dir, *, steps, batch, seq_len, lr, seed, probe_every=0):
    cfg = TINY_DEFAULT
    tok = Tokenizer(os.path.join(out_dir, "tokenizer.model"))
    if tok.vocab_size != cfg.vocab_size:
        raise ValueError(f"tokenizer has {tok.vocab_size} pieces but TINY_DEFAULT.vocab_size is {cfg.vocab_size}")
    rows = corpus_rows(tok, data_dir, seq_len)
    print(f"corpus: {rows.shape[0]} rows of {seq_len + 1} tokens ({rows.size / 1e6:.2f}M tokens)")
    params = init_params(cfg, seed)
    print(f"model: {count_params(params) / 1e6:.2f}M parameters")
    opt = adamw_init(params)

    def loss_fn(p, x_BT):
        logits, _ = forward(p, x_BT[:, :-1], cfg)
        logp = jax.nn.log_softmax(logits, -1)
        return -jnp.mean(jnp.take_along_axis(logp, x_BT[:, 1:, None], -1))

    @jax.jit
    def step_fn(p, opt, x_BT, step):
        loss, grads = jax.value_and_grad(loss_fn)(p, x_BT)
        grads, norm = clip_by_global_norm(grads, 1.0)
        lr_t = lr_schedule(step, peak_lr=lr, warmup_steps=min(100, steps // 10), total_steps=steps, final_ratio=0.1)
        p, opt = adamw_update(grads, opt, p, lr_t, b2=0.99, weight_decay=0.01)
        return p, opt, loss, norm

    rng = np.random.default_rng(seed)
    t0 = time.time()
    for step in range(steps):
        idx = rng.integers(0, rows.shape[0], batch)
        params, opt, loss, norm = step_fn(params, opt, jnp.asarray(rows[idx]), step)
        if step % 50 == 0 or step == steps - 1:
            el = time.time() - t0
            print(f"step {step:5d}  loss {float(loss):.4f}  grad-norm {float(norm):.3f}  "
                  f"{(step + 1) * batch * seq_len / el:.0f} tok/s  eta {el / (step + 1) * (steps - step - 1):.0f}s",
                  flush=True)
        if probe_every and (step + 1) % probe_every == 0 and step + 1 < steps:
            acc = probe(params, cfg, tok, data_dir, per_kind=60)
            print(f"probe at step {step + 1}: " + "  ".join(f"{k} {v:.3f}" for k, v in acc.items()), flush=True)
    from gemma_jax.checkpoint import save_hf

    base_dir = os.path.join(out_dir, "base")
    save_hf(base_dir, cfg, params)
    with open(os.path.join(base_dir, "pretrain.json"), "w") as f:
        json.dump({"steps": steps, "batch": batch, "seq_len": seq_len, "lr": lr, "seed": seed,
                   "final_loss": float(loss)}, f, indent=1)
    print(f"base model: {base_dir}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["tokenizer", "pretrain", "probe", "forms"])
    ap.add_argument("--adapters", default=None, help="forms: the LoRA adapters folder (default: bundled/sft_adapters)")
    ap.add_argument("--data", default="bundled/data")
    ap.add_argument("--out", default="bundled")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--probe-every", type=int, default=0,
                    help="pretrain: print the probe's accuracy per task kind (60 items each) every this many steps")
    args = ap.parse_args(argv)
    if args.what == "tokenizer":
        train_tokenizer(args.data, args.out, TINY_DEFAULT.vocab_size)
    elif args.what == "pretrain":
        pretrain(args.data, args.out, steps=args.steps, batch=args.batch, seq_len=args.seq_len, lr=args.lr,
                 seed=args.seed, probe_every=args.probe_every)
    elif args.what == "forms":
        adapters = args.adapters or os.path.join(args.out, "sft_adapters")
        table, forced = forms(os.path.join(args.out, "base"), os.path.join(args.out, "tokenizer.model"), adapters,
                              args.data)
        print(f"{adapters}: general held-out prompts sampled as GRPO samples them (8 each, T 1.0, top-k 10); "
              "p = the reference's probability after the reasoning")
        print("| kind | long share | long: EM / p | short: EM / p | greedy EM, long form forced |")
        print("|---|---|---|---|---|")
        for kind, t in table.items():
            print(f"| {kind} | {t['long_share']:.2f} | {t['long']['exact_match']:.2f} / {t['long']['p']:.2f} | "
                  f"{t['short']['exact_match']:.2f} / {t['short']['p']:.2f} | {forced[kind]:.3f} |")
    else:
        from gemma_jax.checkpoint import load_hf

        cfg, params = load_hf(os.path.join(args.out, "base"))
        acc = probe(params, cfg, Tokenizer(os.path.join(args.out, "tokenizer.model")), args.data)
        print("probe (greedy, pre-training format, 120 held-out items per kind): "
              + "  ".join(f"{k} {v:.3f}" for k, v in acc.items()))


if __name__ == "__main__":
    main()
