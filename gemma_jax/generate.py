"""`python run.py --stage generate`: load a Gemma checkpoint, apply the chat template, print the completion.

    python run.py --stage generate --ckpt PATH [--tokenizer PATH] --prompt "What is 2+2?" \
        [--system "..."] [--temperature 0.7 --top-k 50 --top-p 0.95] [--max-new-tokens 256] [--seed 0] \
        [--num-samples 1] [--lora DIR] [--dtype float32|bfloat16]

Default decoding is greedy (temperature 0). Generation stops at the tokenizer's stop ids (eos and <end_of_turn>).
"""

import argparse
import os
import sys
import time


def parse_args(argv):
    p = argparse.ArgumentParser(prog="run.py --stage generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="Hugging Face safetensors folder or Kaggle Flax/orbax checkpoint")
    p.add_argument("--tokenizer", default=None, help="sentencepiece tokenizer.model (default: CKPT/tokenizer.model)")
    p.add_argument("--prompt", required=True, help="the user message")
    p.add_argument("--system", default=None, help="system text, prepended to the user message")
    p.add_argument("--raw", action="store_true", help="feed --prompt as is (with <bos>), without the chat template")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=None, help="keep the k most likely tokens (default: all)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus threshold in (0, 1] (default: no filter)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--lora", default=None, help="folder of LoRA adapters saved by the sft/grpo stages")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"], help="weight dtype")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else list(argv))
    import gemma_jax
    from gemma_jax.sampler import generate

    tok_path = args.tokenizer or os.path.join(args.ckpt, "tokenizer.model")
    if not os.path.exists(tok_path):
        raise FileNotFoundError(f"--tokenizer: {tok_path} does not exist (pass --tokenizer PATH/tokenizer.model)")
    tokenizer = gemma_jax.Tokenizer(tok_path)
    cfg, params = gemma_jax.load_checkpoint(args.ckpt, dtype=args.dtype)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ValueError(f"{tok_path}: tokenizer has {tokenizer.vocab_size} pieces but the model vocab is "
                         f"{cfg.vocab_size}")
    lora = None
    if args.lora:
        from lora.io import load_adapters  # only needed with --lora (and lora/ sits above gemma_jax)

        lora = load_adapters(args.lora)
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
                   decode_segment=args.max_new_tokens)
    seconds = time.perf_counter() - t0
    for i in range(len(out.tokens)):
        if args.num_samples > 1:
            print(f"--- sample {i}")
        print(tokenizer.decode(out.tokens[i, : out.lengths[i]]))
    print(f"[{int(out.lengths.sum())} tokens in {seconds:.2f} s incl. compile; prompt {len(ids)} tokens; "
          f"stopped: {out.stopped.tolist()}]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
