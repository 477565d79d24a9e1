"""What every command shares: the flag vocabulary, flags generated from the hyperparameter dataclasses, one
model / tokenizer / adapters loader with its checks, and the error convention.

Error convention: a mistake in the user's input (a missing file or column, a bad mesh spec, adapters of another
model) is raised as `UsageError`, or converted to one by `user_input(...)` around the code that reads that input;
`run_cli` prints it as one line `error: ...` and exits with status 2 (`--debug`: the traceback instead). Anything
else is a bug in this code and raises as usual.
"""

import argparse
import contextlib
import dataclasses
import inspect
import os
import re
import sys
import types
import typing

import gemma_jax
from gemma_jax.sampler import DECODE_WEIGHTS
from gemma_jax.sharding import make_mesh
from lora.io import load_adapters
from train.state import CheckpointMismatchError

USER_ERRORS = (ValueError, KeyError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError,
               CheckpointMismatchError)


# The commands score log-probs in vocabulary chunks (gemma_jax/scoring.py) for the 256k-262k vocabularies of the
# real checkpoints, so the [B, T, V] float32 logits never exist; small vocabularies keep the full logits (tested equal
# within 1e-6; the cost at MID size is within run-to-run noise: docs/chunked_logprobs.md).
CHUNKED_VOCAB, LOGITS_CHUNK = 65_536, 8192


class UsageError(Exception):
    """A problem with what the user asked for: printed as one line, exit status 2."""


@contextlib.contextmanager
def user_input(what: str):
    """Reading `what` (a flag and its value, a file): turn the reader's ValueError / missing-file errors into a
    UsageError that names it."""
    try:
        yield
    except UsageError:
        raise
    except USER_ERRORS as e:
        msg = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
        # readers name their file already ("x.csv: missing column ..."): say it once
        raise UsageError(msg if msg.startswith(what) else f"{what}: {msg}") from e


def run_cli(main, argv, *, prog: str) -> int:
    """Run `main(argv)`; a UsageError becomes `error: <message>` on stderr and exit status 2."""
    debug = "--debug" in argv
    try:
        return main(argv) or 0
    except UsageError as e:
        if debug:
            raise
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2


# ------------------------------------------------------------------------------------------------ flags
def parser(prog: str, doc: str, *, train: bool = False, data: bool = True) -> argparse.ArgumentParser:
    """A parser with the flags every command shares. train=True adds the ones of the two training stages."""
    p = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    a = p.add_argument
    a("--base", help="base checkpoint folder: Hugging Face safetensors or Kaggle Flax/orbax")
    a("--tokenizer", help="sentencepiece tokenizer.model (default: BASE/tokenizer.model)")
    a("--dtype", choices=("float32", "bfloat16"), help="base weight dtype (default: the checkpoint's)")
    if data:
        a("--data", nargs="+", help="data files (CSV, JSONL or parquet)")
    a("--mesh", help="device mesh, e.g. fsdp=4,tp=2; across slices dcn_data=2,fsdp=4,tp=2 (default: one device)")
    a("--seed", type=int, default=0, help="seed of sampling, data order and adapter init (default: 0)")
    a("--debug", action="store_true", help="show the Python traceback of an input error")
    if train:
        a("--init-adapters", help="adapters folder to start from (GRPO: the SFT result; SFT stage 2: stage 1's)")
        a("--eval-data", nargs="+", help="held-out data files")
        a("--out", help="output folder: metrics.jsonl, checkpoints/ (resumed automatically), adapters/")
        a("--lora-rank", type=int, default=32, help="rank of new adapters (default: 32)")
        a("--lora-alpha", type=float, default=64.0, help="alpha of new adapters; scale = alpha / rank (default: 64)")
        a("--eval-every", type=int, help="evaluate on --eval-data every N steps")
        a("--save-every", type=int, help="checkpoint every N steps")
        a("--tensorboard", action="store_true", help="also write TensorBoard events to OUT/tensorboard (written "
          "without the tensorboard package; view them with `tensorboard --logdir OUT/tensorboard`)")
    else:
        a("--adapters", help="LoRA adapters folder (saved by the sft/grpo stages) to apply")
    return p


def add_decode_weights_flag(p: argparse.ArgumentParser) -> None:
    """--decode-weights for the commands that decode (generate, eval); GRPO's comes from its GRPOHParams field."""
    p.add_argument("--decode-weights", choices=DECODE_WEIGHTS, default="auto",
                   help="per_layer: decode from a per-layer copy of the weights (Gemma 4: of gate and up); stacked: "
                        "from the weights as they are, no copy; auto (default): per_layer on a CPU, else stacked")


def _field_comments(cls) -> dict:
    """name -> the `# comment` after the field in the dataclass source: the flag's help text."""
    out = {}
    for line in inspect.getsource(cls).splitlines():
        m = re.match(r"\s+(\w+)\s*:[^#]*#\s*(.+)$", line)
        if m:
            out[m.group(1)] = m.group(2).strip()
    return out


def _parse_optional(inner):
    def parse(text):
        return None if text.lower() == "none" else inner(text)

    parse.__name__ = inner.__name__
    return parse


def add_hparam_flags(p: argparse.ArgumentParser, cls, *, skip=(), aliases=None, defaults=None) -> None:
    """One flag per field of the dataclass `cls` (`--field-name`), typed from its annotation, with the field's
    comment as help. The parsed value is absent unless the flag is given (argparse.SUPPRESS), so
    `hparams_from_args` can tell "not given" from "given the default". `defaults` only changes the help text."""
    comments, hints = _field_comments(cls), typing.get_type_hints(cls)
    aliases, defaults = aliases or {}, defaults or {}
    group = p.add_argument_group(f"{cls.__name__} (defaults: the recipe's)")
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        hint, optional = hints[f.name], False
        if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
            args = [t for t in typing.get_args(hint) if t is not type(None)]
            hint, optional = args[0], True
        default = defaults.get(f.name, f.default)
        help_text = f"{comments.get(f.name, '')} (default: {default})"
        names = [f"--{f.name.replace('_', '-')}", *aliases.get(f.name, ())]
        if hint is bool:
            group.add_argument(*names, dest=f.name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                               help=help_text)
        else:
            kind = _parse_optional(hint) if optional else hint
            group.add_argument(*names, dest=f.name, type=kind, default=argparse.SUPPRESS, metavar=hint.__name__.upper(),
                               help=help_text + (" ('none' for None)" if optional else ""))


def hparams_from_args(cls, args, overrides=None):
    """cls(**fields): a flag given on the command line wins over `overrides` (e.g. a stage's defaults), which win
    over the dataclass defaults. A value the dataclass rejects is a UsageError naming the flag."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    values = {**(overrides or {}), **given}
    hp = cls(**values)
    check = getattr(hp, "check", None)
    if check is not None:
        with user_input("hyperparameters"):
            check()
    return hp


# ------------------------------------------------------------------------------------------------ loading
def load_model(base: str | None, tokenizer_path: str | None = None, adapters: str | None = None, *,
               dtype: str | None = None, remat: bool = False, adapters_flag: str = "--adapters"):
    """(cfg, params, lora or None, tokenizer) with every check a user's input needs: the folders exist, the
    tokenizer fits the model's vocabulary, the adapters fit the model. adapters_flag: how errors name `adapters`."""
    if not base:
        raise UsageError("--base: give the base checkpoint folder")
    if not os.path.exists(base):  # before the tokenizer, whose default path lies inside it
        raise UsageError(f"--base: {base} does not exist")
    tok_path = tokenizer_path or os.path.join(base, "tokenizer.model")
    if not os.path.isfile(tok_path):
        raise UsageError(f"--tokenizer: {tok_path} does not exist (pass --tokenizer PATH/tokenizer.model)")
    with user_input("--tokenizer"):
        tokenizer = gemma_jax.Tokenizer(tok_path)
    with user_input("--base"):
        cfg, params = gemma_jax.load_checkpoint(base, dtype=dtype)
    if remat:
        cfg = dataclasses.replace(cfg, remat=True)
    if cfg.logits_chunk is None and cfg.vocab_size > CHUNKED_VOCAB:
        cfg = dataclasses.replace(cfg, logits_chunk=LOGITS_CHUNK)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise UsageError(f"--tokenizer {tok_path}: {tokenizer.vocab_size} pieces but the model at {base} has a "
                         f"vocabulary of {cfg.vocab_size}")
    lora = None
    if adapters:
        with user_input(f"{adapters_flag} {adapters}"):
            lora = load_adapters(adapters, cfg)
    return cfg, params, lora, tokenizer


def mesh_from_args(spec: str | None):
    """The device mesh of `--mesh`, or None for one device."""
    if not spec:
        return None
    with user_input("--mesh"):
        return make_mesh(spec)


def check_files(flag: str, paths) -> None:
    """UsageError naming the first of `paths` that is not a file, before any is read: a typo in the last data
    file should not cost a pass over the first ones."""
    for path in paths or ():
        if not os.path.isfile(path):
            raise UsageError(f"{flag}: {path} " + ("is not a file" if os.path.exists(path) else "does not exist"))


def need(args, *names):
    """UsageError unless every flag in `names` was given."""
    missing = [n for n in names if not getattr(args, n.lstrip("-").replace("-", "_"), None)]
    if missing:
        raise UsageError(f"missing {' and '.join(missing)}")
