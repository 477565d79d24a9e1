"""`python run.py --stage eval`: greedy metrics of a model (+ adapters) on held-out RL records.

    python run.py --stage eval --base BASE [--adapters DIR] --data FILE [--tokenizer PATH] [--limit N]
        [--decode-weights auto|per_layer|stacked]

Prints strict_format_rate, math_accuracy, general_exact_match, prob_reward_mean, completion_len_mean
(grpo/evaluate.py).
"""

import sys

from cli.common import add_decode_weights_flag, check_files, load_model, mesh_from_args, need, parser, run_cli
from cli.grpo import load_rl_records
from data.rl import CONVERTERS
from grpo.evaluate import evaluate
from grpo.learner import GRPOHParams

KEYS = ("strict_format_rate", "math_accuracy", "general_exact_match", "prob_reward_mean", "completion_len_mean",
        "num_records")


def build_parser():
    p = parser("run.py --stage eval", __doc__)
    a = p.add_argument
    a("--data-kind", choices=sorted(CONVERTERS), default="recipe_csv", help="source format of --data")
    a("--max-prompt-tokens", type=int, default=GRPOHParams.max_prompt_tokens,
      help="prompt budget (default: %(default)s)")
    a("--max-new-tokens", type=int, default=GRPOHParams.max_new_tokens,
      help="completion budget (default: %(default)s)")
    a("--batch-size", type=int, default=8, help="prompts decoded together (default: %(default)s)")
    a("--limit", type=int, default=None, help="evaluate the first N records only")
    add_decode_weights_flag(p)
    a("--samples", default=None, help="write every prompt, reference and completion to this text file")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    need(args, "--base", "--data")
    check_files("--data", args.data)
    cfg, params, lora, tokenizer = load_model(args.base, args.tokenizer, args.adapters, dtype=args.dtype)
    mesh_from_args(args.mesh)  # validated; evaluation runs on the default device placement
    records = load_rl_records(args.data, tokenizer, kind=args.data_kind, limit=args.limit)
    m = evaluate(params, cfg, lora, records, tokenizer, max_prompt_tokens=args.max_prompt_tokens,
                 max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, samples_path=args.samples,
                 decode_weights=args.decode_weights)
    print(f"{'metric':<22}{'value':>10}")
    for k in KEYS:
        print(f"{k:<22}{m[k]:>10.4f}" if isinstance(m[k], float) else f"{k:<22}{m[k]:>10}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, sys.argv[1:], prog="run.py --stage eval"))
