"""`python run.py --stage sft [options]`: LoRA SFT of a Gemma checkpoint on reasoning traces.

    python run.py --stage sft                                    # embedded default: bundled tiny model + data
    python run.py --stage sft --sft-stage 1 --base ckpt/gemma-2-2b-it --tokenizer ckpt/tokenizer.model \\
        --data glaive.parquet bespoke.jsonl --data-kind auto --mesh fsdp=1,tp=4 --out runs/sft1
    python run.py --stage sft --sft-stage 2 --init-adapters runs/sft1/adapters ...    # stage 2 continues stage 1

Stage defaults follow the recipe (docs/recipe.md): stage 1 lr 5e-5, max length 2048; stage 2 lr 1e-5, max length
1280, completions <= 1024 tokens and at least half math. Both: micro-batch 2 x grad-accum 64, warmup 20, weight
decay 0.1, clip 0.1, LoRA rank 32 / alpha 64. Any option given on the command line wins over the stage default.
The run writes `{out}/metrics.jsonl`, `{out}/checkpoints/` (resumed automatically) and `{out}/adapters/`.
"""

import dataclasses
import os
import sys

from cli.common import (
    UsageError,
    add_hparam_flags,
    check_files,
    hparams_from_args,
    load_model,
    mesh_from_args,
    need,
    parser,
    run_cli,
    user_input,
)
from data.mix import mix_long_short, stage2_filter, train_eval_split
from data.readers import file_format, iter_rows
from data.sft import prepare_sft
from lora.adapters import init_lora
from lora.io import load_adapters, save_adapters
from sft.batches import SFTData, encode_example
from sft.train import STAGE_DEFAULTS, HParams, train_loop

# Stage 2's data filter (the recipe's): completions of at most this many tokens, and at least this share of math.
STAGE2_FILTER = {"max_completion": 1024, "math_share": 0.5}
KINDS = {"glaive": "glaive", "bespoke": "bespoke", "csv": "recipe_csv"}


def build_parser():
    p = parser("run.py --stage sft", __doc__, train=True)
    a = p.add_argument
    a("--sft-stage", type=int, choices=(1, 2), default=1, help="the recipe's stage: sets lr and max length, and "
      "stage 2's data filter (default: 1)")
    a("--eval-fraction", type=float, default=0.02, help="held-out share of --data when no --eval-data (default: 0.02)")
    a("--data-kind", choices=("glaive", "bespoke", "csv", "auto"), default="auto",
      help="format of --data (auto: .csv is the recipe CSV, else by the columns)")
    a("--pack", action="store_true", help="pack several short examples per row")
    a("--cot-mix", default=None, help="long:short chain-of-thought ratio, e.g. 1:4 (stage 1's default); "
      "'none' keeps every record")
    a("--long-threshold", type=int, default=512, help="reasoning tokens above which a trace is long (default: 512)")
    a("--remat", action="store_true", help="rematerialise each layer in the backward pass (less memory)")
    a("--no-resume", action="store_true", help="start afresh even if OUT/checkpoints has a checkpoint")
    add_hparam_flags(p, HParams)
    p.set_defaults(out="runs/sft", eval_every=100, save_every=100)
    return p


def detect_kind(path: str) -> str:
    """auto: .csv -> the recipe CSV; otherwise by the first row's columns (glaive: prompt/response, bespoke:
    conversations)."""
    if file_format(path) == "csv":
        return "recipe_csv"
    for _, row in iter_rows(path, None, batch_size=1):
        cols = set(row) if isinstance(row, dict) else set()
        if {"prompt", "response"} <= cols:
            return "glaive"
        if "conversations" in cols:
            return "bespoke"
        raise UsageError(f"{path}: cannot tell the SFT format from columns {sorted(cols)}; pass --data-kind")
    raise UsageError(f"{path}: no rows")


def load_records(paths, kind: str, tokenizer, print_fn=print) -> list:
    records = []
    for path in paths:
        with user_input(path):
            k = detect_kind(path) if kind == "auto" else KINDS[kind]
            recs, report = prepare_sft(path, kind=k, count_tokens=lambda t: len(tokenizer.encode(t)))
        dropped = {r: n for r, n in report["dropped"].items() if n}
        print_fn(f"{path}: {k}, read {report['read']}, kept {report['kept']}, dropped {dropped or 0}")
        records += recs
    if not records:
        raise UsageError(f"no usable SFT records in {' '.join(paths)}")
    return records


def select_records(records, args, tokenizer) -> list:
    """The recipe's data selection: stage 1 mixes long and short chains of thought (--cot-mix), stage 2 keeps
    completions <= 1024 tokens with at least half math."""
    count = lambda t: len(tokenizer.encode(t))  # noqa: E731
    cot_mix = args.cot_mix or ("1:4" if args.sft_stage == 1 else "none")
    if cot_mix != "none":
        try:
            ratio = tuple(int(x) for x in cot_mix.split(":"))
        except ValueError:
            raise UsageError(f"--cot-mix {cot_mix!r}: expected LONG:SHORT such as 1:4, or none") from None
        n = len(records)
        with user_input("--cot-mix"):
            mixed = mix_long_short(records, count_tokens=count, ratio=ratio, long_threshold=args.long_threshold,
                                   seed=args.seed)
        if mixed:
            records = mixed
            print(f"long:short {cot_mix} mix (long = reasoning > {args.long_threshold} tokens): {len(records)} of {n}")
        else:  # e.g. a data set with no long traces at all: say so rather than train on nothing
            print(f"long:short {cot_mix} mix: no long traces (> {args.long_threshold} tokens) in the data; "
                  f"keeping all {n} records")
    if args.sft_stage == 2:
        n = len(records)
        records = stage2_filter(records, count_tokens=count, max_completion_tokens=STAGE2_FILTER["max_completion"],
                                math_share=STAGE2_FILTER["math_share"], seed=args.seed)
        print(f"stage 2 filter: {len(records)} of {n} records (completions <= {STAGE2_FILTER['max_completion']} "
              f"tokens, math share >= {STAGE2_FILTER['math_share']})")
        if not records:
            raise UsageError(f"--data: no record passes the stage 2 filter ({STAGE2_FILTER})")
    return records


def build_data(records, tokenizer, hp: HParams, args, *, shuffle=True):
    with user_input("--data"):
        examples = [encode_example(r, tokenizer, hp.max_len, where=f"SFT record {i} ({r.get('source', '?')})")
                    for i, r in enumerate(records)]
    # length buckets (powers of two from 64, then max_len): short batches stay short, few distinct compiles
    buckets = [b for b in (64, 128, 256, 512, 1024, 2048, 4096) if b < hp.max_len] + [hp.max_len]
    return SFTData(examples, hp.batch, hp.max_len, pack=args.pack, buckets=buckets, seed=args.seed,
                   shuffle=shuffle, pad_id=tokenizer.pad_id)


def stage_hparams(args) -> HParams:
    """The HParams of the parsed flags: a flag given wins over the --sft-stage defaults, which win over HParams'."""
    return hparams_from_args(HParams, args, STAGE_DEFAULTS[args.sft_stage])


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    need(args, "--base", "--data")
    check_files("--data", args.data)
    check_files("--eval-data", args.eval_data)
    hp = stage_hparams(args)
    cfg, params, _, tokenizer = load_model(args.base, args.tokenizer, dtype=args.dtype, remat=args.remat)
    mesh = mesh_from_args(args.mesh)
    if args.init_adapters:  # checked before the pass over the data
        with user_input(f"--init-adapters {args.init_adapters}"):
            lora = load_adapters(args.init_adapters, cfg, dtype="float32")
    else:
        lora = init_lora(cfg, args.lora_rank, args.lora_alpha, seed=args.seed)

    records = load_records(args.data, args.data_kind, tokenizer)
    if args.eval_data:
        eval_records = load_records(args.eval_data, args.data_kind, tokenizer)
    else:
        with user_input("--eval-fraction"):
            records, eval_records = train_eval_split(records, args.eval_fraction, seed=args.seed)
    records = select_records(records, args, tokenizer)
    data = build_data(records, tokenizer, hp, args)
    eval_data = build_data(eval_records, tokenizer, hp, args, shuffle=False) if len(eval_records) >= hp.batch else None
    steps = hp.steps or max(1, data.batches_per_epoch // hp.grad_accum)
    hp = dataclasses.replace(hp, steps=steps, warmup_steps=min(hp.warmup_steps, steps))

    print(f"sft stage {args.sft_stage}: {len(data.examples)} train / {len(eval_records)} eval records, "
          f"{steps} steps x {hp.grad_accum} x {hp.batch} rows of <= {hp.max_len} tokens, lr {hp.lr}, "
          f"LoRA rank {lora_rank(lora)}, dtype {cfg.param_dtype}, mesh {args.mesh or 'none'}")
    with user_input(f"--out {args.out}"):  # a checkpoint there of another model or LoRA shape
        lora, _, last = train_loop(cfg, params, lora, data, hp, args.out, eval_data=eval_data,
                                   eval_every=args.eval_every, save_every=args.save_every,
                                   resume=not args.no_resume, seed=args.seed, mesh=mesh,
                                   tensorboard=args.tensorboard)
    out = os.path.join(args.out, "adapters")
    save_adapters(out, lora, cfg, extra={"sft_stage": args.sft_stage, "steps": steps, "final_loss": last.get("loss")})
    print(f"adapters: {out}")
    return 0


def lora_rank(lora) -> int:
    return next(iter(lora.layers.values()))["a"].shape[-1]


if __name__ == "__main__":
    sys.exit(run_cli(main, sys.argv[1:], prog="run.py --stage sft"))
