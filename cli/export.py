"""`python run.py --stage export`: a base model (+ adapters) written for other tools.

    python run.py --stage export --format hf|peft|kaggle --base BASE [--adapters DIR] --out DIR

hf: the adapters merged into the base as a Hugging Face safetensors folder (lora.export.export_merged_hf).
kaggle: the same merged weights as a Kaggle Flax/orbax checkpoint, the layout Tunix loads (gemma_jax.save_kaggle).
peft: the adapters alone as a PEFT LoRA adapter folder (lora.export.export_peft); needs --adapters.
hf and kaggle also copy the tokenizer into DIR, so DIR works as `--base` of the other stages.
"""

import os
import shutil
import sys

from cli.common import UsageError, load_model, need, parser, run_cli
from gemma_jax.checkpoint import save_kaggle
from lora.adapters import merge
from lora.export import export_merged_hf, export_peft


def build_parser():
    p = parser("run.py --stage export", __doc__, data=False)
    a = p.add_argument
    a("--format", choices=("hf", "peft", "kaggle"), help="what to write (see above)")
    a("--out", help="output folder (must not exist or be empty)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    need(args, "--format", "--base", "--out")
    if args.format == "peft" and not args.adapters:
        raise UsageError("--format peft: give the --adapters to export")
    if os.path.exists(args.out) and (not os.path.isdir(args.out) or os.listdir(args.out)):
        raise UsageError(f"--out: {args.out} exists and is not an empty folder")
    cfg, params, lora, tokenizer = load_model(args.base, args.tokenizer, args.adapters, dtype=args.dtype)
    if args.format == "peft":
        export_peft(args.out, cfg, lora, base_model_name_or_path=os.path.abspath(args.base))
    elif args.format == "hf":
        export_merged_hf(args.out, cfg, params, lora)
    else:
        if os.path.isdir(args.out):
            os.rmdir(args.out)  # empty (checked above); orbax writes only into a new folder
        save_kaggle(args.out, cfg, params if lora is None else merge(params, lora))
    if args.format != "peft":
        shutil.copyfile(args.tokenizer or os.path.join(args.base, "tokenizer.model"),
                        os.path.join(args.out, "tokenizer.model"))
    merged = f" with the adapters of {args.adapters} merged in" if lora is not None and args.format != "peft" else ""
    print(f"export: wrote {args.format} to {args.out}{merged}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, sys.argv[1:], prog="run.py --stage export"))
