"""`python run.py --stage generate`: load a Gemma checkpoint, apply the chat template, print the completion.

    python run.py --stage generate --base PATH [--tokenizer PATH] --prompt "What is 2+2?" \
        [--system "..."] [--temperature 0.7 --top-k 50 --top-p 0.95] [--max-new-tokens 256] [--seed 0] \
        [--num-samples 1] [--adapters DIR] [--dtype float32|bfloat16] [--decode-weights auto|per_layer|stacked]

Default decoding is greedy (temperature 0). Generation stops at the tokenizer's stop ids (eos and <end_of_turn>).
"""

import sys
import time

from cli.common import add_decode_weights_flag, load_model, need, parser, run_cli
from gemma_jax.sampler import generate


def build_parser():
    p = parser("run.py --stage generate", __doc__, data=False)
    a = p.add_argument
    a("--prompt", help="the user message")
    a("--system", default=None, help="system text, prepended to the user message")
    a("--raw", action="store_true", help="feed --prompt as is (with <bos>), without the chat template")
    a("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    a("--top-k", type=int, default=None, help="keep the k most likely tokens (default: all)")
    a("--top-p", type=float, default=None, help="nucleus threshold in (0, 1] (default: no filter)")
    a("--max-new-tokens", type=int, default=256, help="completion budget (default: %(default)s)")
    a("--num-samples", type=int, default=1, help="completions to sample (default: 1)")
    add_decode_weights_flag(p)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    need(args, "--base", "--prompt")
    cfg, params, lora, tokenizer = load_model(args.base, args.tokenizer, args.adapters, dtype=args.dtype)
    if args.raw:
        ids = tokenizer.encode(args.prompt, add_bos=True)
    else:
        ids = tokenizer.encode_chat(args.prompt, args.system)
    t0 = time.perf_counter()
    # One call, so compile time dominates: one decode loop (decode_segment = all steps) compiles fastest; the
    # sampler's default segments pay off when the same shapes are sampled many times (GRPO, evaluation).
    out = generate(params, cfg, [ids], max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                   top_k=args.top_k, top_p=args.top_p, stop_ids=tokenizer.stop_ids, seed=args.seed,
                   num_samples=args.num_samples, lora=lora, pad_id=tokenizer.pad_id,
                   decode_segment=args.max_new_tokens, decode_weights=args.decode_weights)
    seconds = time.perf_counter() - t0
    for i in range(len(out.tokens)):
        if args.num_samples > 1:
            print(f"--- sample {i}")
        print(tokenizer.decode(out.tokens[i, : out.lengths[i]]))
    print(f"[{int(out.lengths.sum())} tokens in {seconds:.2f} s incl. compile; prompt {len(ids)} tokens; "
          f"stopped: {out.stopped.tolist()}]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, sys.argv[1:], prog="run.py --stage generate"))
