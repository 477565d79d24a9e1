"""nanotunix entry point: `python run.py --stage sft|grpo|eval|generate|export [options]`.

With no arguments it runs the GRPO stage of the embedded default (a tiny Gemma and bundled data, on a CPU);
`--stage sft` or `--stage grpo` without --base and --data runs that stage of it (cli/embedded.py).
`python run.py --stage X --help` lists the options of stage X.
"""

import argparse
import sys

from cli import embedded
from cli import eval as eval_cli
from cli import export as export_cli
from cli import generate as generate_cli
from cli import grpo as grpo_cli
from cli import sft as sft_cli
from cli.common import run_cli

STAGES = {"sft": sft_cli, "grpo": grpo_cli, "eval": eval_cli, "generate": generate_cli, "export": export_cli}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    top = argparse.ArgumentParser(description=__doc__, add_help=False, allow_abbrev=False)
    top.add_argument("--stage", choices=sorted(STAGES), default="grpo")
    args, rest = top.parse_known_args(argv)
    module, prog = STAGES[args.stage], f"run.py --stage {args.stage}"
    if args.stage in ("sft", "grpo"):
        parsed = module.build_parser().parse_args(rest)  # --help and flag errors end here, as argparse does
        if parsed.base is None and parsed.data is None:  # no model or data given: the embedded default
            return run_cli(lambda a: embedded.main(args.stage, a), rest, prog=prog)
    return run_cli(module.main, rest, prog=prog)


if __name__ == "__main__":
    sys.exit(main())
