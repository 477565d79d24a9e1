"""`python run.py --stage sft [options]`: LoRA SFT of a Gemma checkpoint on reasoning traces.

    python run.py --stage sft                                    # embedded default: bundled tiny model + data
    python run.py --stage sft --sft-stage 1 --base ckpt/gemma-2-2b-it --tokenizer ckpt/tokenizer.model \\
        --data glaive.parquet bespoke.jsonl --data-kind auto --mesh fsdp=1,tp=4 --out runs/sft1
    python run.py --stage sft --sft-stage 2 --resume-from runs/sft1/adapters ...    # stage 2 continues stage 1

Stage defaults follow the recipe (REFERENCE.md §5): stage 1 lr 5e-5, max length 2048; stage 2 lr 1e-5, max length
1280, completions <= 1024 tokens and at least half math. Both: micro-batch 2 x grad-accum 64, warmup 20, weight
decay 0.1, clip 0.1, LoRA rank 32 / alpha 64. Any option given on the command line wins over the stage default.
The run writes `{out}/metrics.jsonl`, `{out}/checkpoints/` (resumed automatically) and `{out}/adapters/`.
"""

import argparse
import dataclasses
import os
import sys

STAGE_DEFAULTS = {
    1: dict(lr=5e-5, max_len=2048, max_completion=None, math_share=None),
    2: dict(lr=1e-5, max_len=1280, max_completion=1024, math_share=0.5),
}
COMMON_DEFAULTS = dict(batch=2, grad_accum=64, warmup=20, weight_decay=0.1, clip=0.1, lora_rank=32, lora_alpha=64.0)
KINDS = {"glaive": "glaive", "bespoke": "bespoke", "csv": "recipe_csv"}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="run.py --stage sft", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sft-stage", type=int, choices=(1, 2), default=1)
    ap.add_argument("--data", nargs="+", help="SFT files (parquet, csv, jsonl)")
    ap.add_argument("--eval-data", nargs="+", help="held-out SFT files (default: --eval-fraction of --data)")
    ap.add_argument("--eval-fraction", type=float, default=0.02)
    ap.add_argument("--data-kind", choices=("glaive", "bespoke", "csv", "auto"), default="auto")
    ap.add_argument("--base", help="base checkpoint folder (Hugging Face safetensors or Kaggle orbax)")
    ap.add_argument("--tokenizer", help="sentencepiece tokenizer.model (default: <base>/tokenizer.model)")
    ap.add_argument("--dtype", choices=("bfloat16", "float32"), help="base weight dtype (default: the checkpoint's)")
    ap.add_argument("--lora-rank", type=int)
    ap.add_argument("--lora-alpha", type=float)
    ap.add_argument("--resume-from", help="adapters folder (lora/io.py) to start from, e.g. stage 1's output")
    ap.add_argument("--lr", type=float)
    ap.add_argument("--batch", type=int, help="micro-batch rows")
    ap.add_argument("--grad-accum", type=int)
    ap.add_argument("--max-len", type=int)
    ap.add_argument("--steps", type=int, help="optimizer steps (default: one epoch)")
    ap.add_argument("--warmup", type=int)
    ap.add_argument("--weight-decay", type=float)
    ap.add_argument("--clip", type=float)
    ap.add_argument("--pack", action="store_true", help="pack several short examples per row")
    ap.add_argument("--cot-mix", default=None, help="long:short chain-of-thought ratio, e.g. 1:4 (stage 1 default); "
                    "'none' keeps every record")
    ap.add_argument("--long-threshold", type=int, default=512, help="reasoning tokens above which a trace is long")
    ap.add_argument("--mesh", help="device mesh, e.g. fsdp=4,tp=2 (default: one device)")
    ap.add_argument("--out", default="runs/sft")
    ap.add_argument("--resume", choices=("auto", "no"), default="auto", help="continue from {out}/checkpoints")
    ap.add_argument("--eval-every", type=int)
    ap.add_argument("--save-every", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--remat", action="store_true", help="rematerialise each layer in the backward pass")
    return ap


def resolve_settings(args) -> dict:
    """Command line > stage defaults > common defaults."""
    s = {**COMMON_DEFAULTS, **STAGE_DEFAULTS[args.sft_stage], "steps": None, "eval_every": 100}
    if args.data is None or args.base is None:
        raise SystemExit("sft: give both --data and --base (or neither, through run.py, for the embedded default)")
    for key in ("lr", "batch", "grad_accum", "max_len", "steps", "warmup", "weight_decay", "clip", "lora_rank",
                "lora_alpha", "eval_every"):
        if getattr(args, key) is not None:
            s[key] = getattr(args, key)
    return s


def detect_kind(path: str) -> str:
    """auto: .csv -> the recipe CSV; otherwise by the first row's columns (glaive: prompt/response, bespoke:
    conversations)."""
    from data.readers import file_format, iter_rows

    if file_format(path) == "csv":
        return "recipe_csv"
    for _, row in iter_rows(path, None, batch_size=1):
        cols = set(row) if isinstance(row, dict) else set()
        if {"prompt", "response"} <= cols:
            return "glaive"
        if "conversations" in cols:
            return "bespoke"
        raise ValueError(f"{path}: cannot tell the SFT format from columns {sorted(cols)}; pass --data-kind")
    raise ValueError(f"{path}: no rows")


def load_records(paths, kind: str, tokenizer, print_fn=print) -> list:
    from data.sft import prepare_sft

    records = []
    for path in paths:
        k = detect_kind(path) if kind == "auto" else KINDS[kind]
        recs, report = prepare_sft(path, kind=k, count_tokens=lambda t: len(tokenizer.encode(t)))
        dropped = {r: n for r, n in report["dropped"].items() if n}
        print_fn(f"{path}: {k}, read {report['read']}, kept {report['kept']}, dropped {dropped or 0}")
        records += recs
    if not records:
        raise ValueError(f"no usable SFT records in {paths}")
    return records


def build_data(records, tokenizer, s, args, *, shuffle=True):
    from sft.batches import SFTData, encode_example

    examples = [encode_example(r, tokenizer, s["max_len"], where=f"SFT record {i} ({r.get('source', '?')})")
                for i, r in enumerate(records)]
    # length buckets (powers of two from 64, then max_len): short batches stay short, few distinct compiles
    buckets = [b for b in (64, 128, 256, 512, 1024, 2048, 4096) if b < s["max_len"]] + [s["max_len"]]
    return SFTData(examples, s["batch"], s["max_len"], pack=args.pack, buckets=buckets, seed=args.seed,
                   shuffle=shuffle, pad_id=tokenizer.pad_id)


def main(argv=None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    s = resolve_settings(args)

    from gemma_jax.checkpoint import load_checkpoint
    from gemma_jax.tokenizer import Tokenizer
    from lora.adapters import init_lora
    from lora.io import load_adapters, save_adapters
    from sft.train import HParams, train_loop

    cfg, params = load_checkpoint(args.base, dtype=args.dtype)
    if args.remat:
        cfg = dataclasses.replace(cfg, remat=True)
    tokenizer = Tokenizer(args.tokenizer or os.path.join(args.base, "tokenizer.model"))
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ValueError(f"--tokenizer {tokenizer.path}: {tokenizer.vocab_size} pieces > model vocab {cfg.vocab_size}")

    records = load_records(args.data, args.data_kind, tokenizer)
    if args.eval_data:
        eval_records = load_records(args.eval_data, args.data_kind, tokenizer)
    else:
        from data.mix import train_eval_split

        records, eval_records = train_eval_split(records, args.eval_fraction, seed=args.seed)
    cot_mix = args.cot_mix or ("1:4" if args.sft_stage == 1 else "none")
    if cot_mix != "none":
        from data.mix import mix_long_short

        try:
            ratio = tuple(int(x) for x in cot_mix.split(":"))
        except ValueError:
            raise SystemExit(f"--cot-mix {cot_mix!r}: expected LONG:SHORT such as 1:4, or none") from None
        n = len(records)
        mixed = mix_long_short(records, count_tokens=lambda t: len(tokenizer.encode(t)), ratio=ratio,
                               long_threshold=args.long_threshold, seed=args.seed)
        if mixed:
            records = mixed
            print(f"long:short {cot_mix} mix (long = reasoning > {args.long_threshold} tokens): {len(records)} of {n}")
        else:  # e.g. a data set with no long traces at all: say so rather than train on nothing
            print(f"long:short {cot_mix} mix: no long traces (> {args.long_threshold} tokens) in the data; "
                  f"keeping all {n} records")
    if s["max_completion"] is not None:
        from data.mix import stage2_filter

        n = len(records)
        records = stage2_filter(records, count_tokens=lambda t: len(tokenizer.encode(t)),
                                max_completion_tokens=s["max_completion"], math_share=s["math_share"], seed=args.seed)
        print(f"stage 2 filter: {len(records)} of {n} records (completions <= {s['max_completion']} tokens, "
              f"math share >= {s['math_share']})")
    data = build_data(records, tokenizer, s, args)
    eval_data = build_data(eval_records, tokenizer, s, args, shuffle=False) if len(eval_records) >= s["batch"] else None
    steps = s["steps"] or max(1, data.batches_per_epoch // s["grad_accum"])

    if args.resume_from:
        lora = load_adapters(args.resume_from, cfg, dtype="float32")
    else:
        lora = init_lora(cfg, s["lora_rank"], s["lora_alpha"], seed=args.seed)
    hp = HParams(peak_lr=s["lr"], warmup_steps=min(s["warmup"], steps), total_steps=steps,
                 weight_decay=s["weight_decay"], clip=s["clip"])
    mesh = None
    if args.mesh:
        from gemma_jax.sharding import make_mesh

        mesh = make_mesh(args.mesh)
    print(f"sft stage {args.sft_stage}: {len(data.examples)} train / {len(eval_records)} eval records, "
          f"{steps} steps x {s['grad_accum']} x {s['batch']} rows of <= {s['max_len']} tokens, lr {s['lr']}, "
          f"LoRA rank {s['lora_rank']} alpha {s['lora_alpha']}, dtype {cfg.param_dtype}, mesh {args.mesh or 'none'}")
    lora, _, last = train_loop(cfg, params, lora, data, hp, args.out, grad_accum=s["grad_accum"],
                               eval_data=eval_data, eval_every=s["eval_every"], save_every=args.save_every,
                               resume=args.resume == "auto", seed=args.seed, mesh=mesh)
    out = os.path.join(args.out, "adapters")
    save_adapters(out, lora, cfg, extra={"sft_stage": args.sft_stage, "steps": steps, "final_loss": last.get("loss")})
    print(f"adapters: {out}")
    return 0
