"""The embedded default: `python run.py --stage sft|grpo` with no model or data arguments, on a plain CPU.

It runs the recipe end to end on the bundled tiny Gemma-2-architecture model (bundled/base, built by
scripts/tiny.sh) and the bundled task data (data/tiny_tasks.py), with settings sized for two CPU cores, and shows
that it learned: a before/after table on the held-out split (strict-format rate, math accuracy, mean probability
reward, mean completion length, and how the math answers reason: the share worked step by step and the accuracy
of each form), greedy decoding as in the recipe's evaluation.

    sft  : bundled base -> LoRA SFT on bundled/data/sft_train.csv -> runs/sft-default/
    grpo : SFT adapters (runs/sft-default/adapters if present, else bundled/sft_adapters) -> LoRA GRPO on
           bundled/data/rl_train.csv -> runs/grpo-default/

Each run folder gets metrics.jsonl, adapters/, resolved_config.json, samples.txt (held-out completions after
training), summary.json (the table) and, when matplotlib is installed (optional, never required), curves.png.
Extra command-line options are passed through to the stage (e.g. --steps 20 --seed 1 --out runs/try).
"""

import json
import os

from cli import grpo as grpo_cli
from cli import sft as sft_cli
from cli.common import UsageError, load_model
from grpo.evaluate import evaluate
from grpo.rollout import exact_match
from rewards.format import strict_blocks
from rewards.math import math_correct
from train.metrics import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLED = os.path.join(ROOT, "bundled")
PATHS = {
    "base": os.path.join(BUNDLED, "base"),
    "tokenizer": os.path.join(BUNDLED, "tokenizer.model"),
    "sft_train": os.path.join(BUNDLED, "data", "sft_train.csv"),
    "sft_eval": os.path.join(BUNDLED, "data", "sft_eval.csv"),
    "rl_train": os.path.join(BUNDLED, "data", "rl_train.csv"),
    "rl_eval": os.path.join(BUNDLED, "data", "rl_eval.csv"),
    "sft_adapters": os.path.join(BUNDLED, "sft_adapters"),
}
SFT_OUT, GRPO_OUT = os.path.join("runs", "sft-default"), os.path.join("runs", "grpo-default")

# Sized for the tiny model on 2 CPU cores (the recipe's Gemma-2-2B values are the stages' own defaults). SFT runs
# 1500 steps (4 passes over the 3000 traces): after 600 the model wrote the general tasks' long form right far less
# often than its base solves them (docs/embedded_default.md), and GRPO had nothing to find on that half.
SFT_ARGS = ["--lr", "2e-3", "--max-len", "128", "--batch", "8", "--grad-accum", "1", "--steps", "1500",
            "--warmup-steps", "20", "--weight-decay", "0", "--clip", "1.0", "--lora-rank", "8", "--lora-alpha", "16",
            "--eval-every", "100", "--long-threshold", "15"]
GRPO_ARGS = ["--steps", "60", "--prompts-per-step", "16", "--group-size", "8", "--micro-batch", "32",
             "--max-prompt-tokens", "96", "--max-new-tokens", "64", "--temperature", "1.0", "--top-k", "10",
             "--lr", "1e-3", "--beta", "0.04", "--clip", "1.0", "--weight-decay", "0", "--eval-every", "20",
             "--eval-limit", "400", "--save-every", "20", "--sample-every", "20", "--lora-rank", "8",
             "--lora-alpha", "16"]
EVAL_KEYS = ("strict_format_rate", "math_accuracy", "general_exact_match", "prob_reward_mean", "completion_len_mean",
             "math_step_by_step_share", "math_accuracy_step_by_step", "math_accuracy_one_line",
             "general_step_by_step_share", "general_em_step_by_step", "general_em_one_line")


def check_bundled():
    missing = [p for k, p in PATHS.items() if k != "sft_adapters" and not os.path.exists(p)]
    if missing:
        raise UsageError(f"the embedded default needs the bundled files; missing: {missing}. "
                         "Rebuild them with `bash scripts/tiny.sh`, or pass --base/--data explicitly.")


def step_by_step(domain: str, completion: str) -> bool:
    """Whether a strictly formatted completion reasons in the long form of the bundled traces: two equations (math),
    or two or more sentences (general: the state after each step), rather than one line stating the result."""
    parsed = strict_blocks(completion)
    if not parsed:
        return False
    reasoning = parsed[0]
    return reasoning.count("=") >= 2 if domain == "math" else reasoning.count(". ") + reasoning.endswith(".") >= 2


def reasoning_forms(records, texts) -> dict:
    """How each domain's completions reason: the share written step by step (the long form of the bundled traces)
    rather than in one line, and the accuracy (math) or exact match (general) of each form. This is what GRPO
    changes here."""
    out = {}
    for domain, score, name in (("math", math_correct, "math_accuracy"), ("general", exact_match, "general_em")):
        counts = {"step_by_step": [0, 0], "one_line": [0, 0]}
        for r, t in zip(records, texts):
            if (r.get("domain") == "math") != (domain == "math"):
                continue
            form = "step_by_step" if step_by_step(domain, t) else "one_line"
            counts[form][0] += 1
            counts[form][1] += score(t, r["answer"])
        n = sum(c[0] for c in counts.values())
        out[f"{domain}_step_by_step_share"] = counts["step_by_step"][0] / max(n, 1)
        for form, (k, right) in counts.items():
            out[f"{name}_{form}"] = right / k if k else float("nan")
    return out


def heldout_eval(adapters, *, max_new_tokens=64, limit=None, samples_path=None, texts_out=None):
    """Greedy metrics of the bundled base (+ adapters, if given) on the held-out RL split (the completions are
    appended to `texts_out` when given)."""
    cfg, params, lora, tok = load_model(PATHS["base"], PATHS["tokenizer"], adapters)
    records = grpo_cli.load_rl_records([PATHS["rl_eval"]], tok, kind="recipe_csv", limit=limit)
    metrics, texts = evaluate(params, cfg, lora, records, tok, max_prompt_tokens=96, max_new_tokens=max_new_tokens,
                              batch_size=64, samples_path=samples_path, return_texts=True)
    if texts_out is not None:
        texts_out.extend(texts)
    return {**metrics, **reasoning_forms(records, texts)}


def print_table(title, before, after, print_fn=print):
    print_fn(f"\n{title}: held-out split ({after.get('num_records', '?')} records, greedy decoding)")
    print_fn(f"{'metric':<28}{'before':>10}{'after':>10}{'change':>10}")
    for k in EVAL_KEYS:
        b, a = before[k], after[k]
        print_fn(f"{k:<28}{b:>10.3f}{a:>10.3f}{a - b:>+10.3f}")


def plot_curves(out_dir):
    """curves.png of the training reward and held-out accuracy, when matplotlib is installed (optional)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    train, evals = read_metrics(out_dir, "train"), read_metrics(out_dir, "eval")
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    key = "reward/mean" if train and "reward/mean" in train[0] else "loss"
    axes[0].plot([r["step"] for r in train], [r.get(key) for r in train])
    axes[0].set(title=f"training {key}", xlabel="step")
    for k in ("math_accuracy", "strict_format_rate"):
        axes[1].plot([r["step"] for r in evals], [r.get(k) for r in evals], marker="o", label=k)
    axes[1].set(title="held-out (greedy)", xlabel="step", ylim=(0, 1.02))
    axes[1].legend()
    fig.tight_layout()
    path = os.path.join(out_dir, "curves.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def stage_argv(stage: str, argv: list) -> list:
    """The full command line of the stage: the bundled model and data, the sizes above, then the user's own
    flags (argparse keeps the last value given, so the user's --out, --steps, ... win)."""
    common = ["--base", PATHS["base"], "--tokenizer", PATHS["tokenizer"]]
    if stage == "sft":
        return [*common, "--data", PATHS["sft_train"], "--eval-data", PATHS["sft_eval"], "--out", SFT_OUT,
                *SFT_ARGS, *argv]
    start = os.path.join(SFT_OUT, "adapters")
    start = start if os.path.exists(start) else PATHS["sft_adapters"]
    return [*common, "--data", PATHS["rl_train"], "--eval-data", PATHS["rl_eval"], "--init-adapters", start,
            "--out", GRPO_OUT, *GRPO_ARGS, *argv]


def main(stage: str, argv: list) -> int:
    """Run the embedded default of `stage` (sft or grpo) with the user's extra flags `argv`."""
    check_bundled()
    module = sft_cli if stage == "sft" else grpo_cli
    args = stage_argv(stage, argv)
    parsed = module.build_parser().parse_args(args)
    out, start = parsed.out, parsed.init_adapters
    if start is not None and not os.path.exists(start):
        raise UsageError(f"--init-adapters: no SFT adapters at {start}: run `python run.py --stage sft` first")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "resolved_config.json"), "w") as f:
        json.dump({"stage": stage, "argv": args}, f, indent=1)
    print(f"embedded default ({stage}): python run.py --stage {stage} " + " ".join(args))
    before = heldout_eval(start)
    rc = module.main(args)
    after = heldout_eval(os.path.join(out, "adapters"), samples_path=os.path.join(out, "samples.txt"))
    print_table(f"{stage.upper()} (start: {start or 'base model'})", before, after)
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump({"before": before, "after": after, "start": start}, f, indent=1)
    png = plot_curves(out)
    print(f"outputs: {out}/ (metrics.jsonl, adapters/, samples.txt, summary.json{', curves.png' if png else ''})")
    return rc
