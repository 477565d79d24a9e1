"""nanotunix entry point: `python run.py --stage sft|grpo|eval|generate [options]`.

With no arguments it runs the GRPO stage of the embedded default (a tiny Gemma and bundled data, on a CPU);
`--stage sft` or `--stage grpo` without --base/--data runs that stage of it (grpo/embedded.py).
Each stage's options live with its code; `python run.py --stage X --help` lists them.
"""

import argparse
import importlib
import sys

STAGES = {
    "sft": "sft.cli",
    "grpo": "grpo.cli",
    "eval": "grpo.evaluate",
    "generate": "gemma_jax.generate",
}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(description=__doc__, add_help=False)
    parser.add_argument("--stage", choices=sorted(STAGES), default="grpo")
    args, rest = parser.parse_known_args(argv)
    if args.stage in ("sft", "grpo") and not {"--base", "--data", "-h", "--help"} & set(rest):
        from grpo.embedded import main as embedded_main  # no model or data given: the embedded default

        return embedded_main(args.stage, rest) or 0
    module = importlib.import_module(STAGES[args.stage])
    return module.main(rest) or 0


if __name__ == "__main__":
    sys.exit(main())
