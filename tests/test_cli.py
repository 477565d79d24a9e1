"""The command line: a user's mistake ends `python run.py --stage X` with one `error:` line naming the culprit and
exit status 2 (a subprocess each, on tiny real files); the flags generated from the hyperparameter dataclasses
(every field's default, every field settable, stage defaults); `--stage export` in-process; and every
`python run.py` command in README.md parses."""

import argparse
import contextlib
import csv
import dataclasses
import io
import os
import re
import shlex
import subprocess
import sys
import typing

import pytest

from cli import eval as eval_cli
from cli import export as export_cli
from cli import generate as generate_cli
from cli import grpo as grpo_cli
from cli import sft as sft_cli
from cli.common import hparams_from_args, run_cli
from grpo.learner import GRPOHParams
from sft.train import STAGE_DEFAULTS, HParams

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = {"sft": sft_cli, "grpo": grpo_cli, "eval": eval_cli, "generate": generate_cli, "export": export_cli}


# ------------------------------------------------------------------------------------------- user errors
@pytest.fixture(scope="module")
def files(tmp_path_factory, tokenizer_path):
    """A tiny HF base (TINY, vocabulary 512 = the test tokenizer's), adapters of another model (2 layers, not 4),
    a valid SFT CSV and CSVs lacking the column each stage needs."""
    import jax

    from gemma_jax.checkpoint import save_hf
    from gemma_jax.config import TINY
    from gemma_jax.model import init_params
    from lora.adapters import init_lora
    from lora.io import save_adapters

    d = tmp_path_factory.mktemp("cli")
    save_hf(str(d / "base"), TINY, jax.jit(init_params, static_argnums=(0, 1))(TINY, 0))
    other = dataclasses.replace(TINY, num_layers=2)
    save_adapters(str(d / "other_adapters"), init_lora(other, 4, 8.0), other)
    trace = "<reasoning>1+2=3</reasoning><answer>3</answer>"
    tables = {"sft.csv": (["user", "assistant"], ["What is 1 plus 2?", trace]),
              "sft_no_assistant.csv": (["user", "answer"], ["What is 1 plus 2?", "3"]),
              "rl_no_question.csv": (["prompt", "answer"], ["What is 1 plus 2?", "3"])}
    for name, rows in tables.items():
        with open(d / name, "w", newline="") as f:
            csv.writer(f).writerows(rows)
    return {"dir": str(d), "base": ["--base", str(d / "base"), "--tokenizer", tokenizer_path]}


def _run(*argv):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device is enough here
    env["JAX_PLATFORMS"] = "cpu"
    return subprocess.run([sys.executable, "run.py", *argv], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


# (stage, argv after the base flags with {d} = the files' folder, what the one error line must contain in order)
CASES = {
    "sft_missing_column": ("sft", "--data {d}/sft_no_assistant.csv --out {d}/r",
                           ["{d}/sft_no_assistant.csv", "'assistant'"]),
    "grpo_missing_column": ("grpo", "--data {d}/rl_no_question.csv --out {d}/r",
                            ["{d}/rl_no_question.csv", "'question'"]),
    "eval_missing_data": ("eval", "--data {d}/nope.csv", ["--data: {d}/nope.csv does not exist"]),
    # checked before the first file is read (which would fail on its columns)
    "grpo_missing_eval_data": ("grpo", "--data {d}/rl_no_question.csv --eval-data {d}/nope.jsonl --out {d}/r",
                               ["--eval-data: {d}/nope.jsonl does not exist"]),
    "sft_bad_mesh": ("sft", "--data {d}/sft.csv --mesh fsdp=x --out {d}/r", ["--mesh", "'fsdp=x'", "'x'"]),
    "sft_other_adapters": ("sft", "--data {d}/sft.csv --init-adapters {d}/other_adapters --out {d}/r",
                           ["--init-adapters {d}/other_adapters", "num_layers: file 2 vs given 4"]),
    "grpo_other_adapters": ("grpo", "--data {d}/rl_no_question.csv --init-adapters {d}/other_adapters --out {d}/r",
                            ["--init-adapters {d}/other_adapters", "num_layers: file 2 vs given 4"]),
    "generate_other_adapters": ("generate", "--prompt hi --adapters {d}/other_adapters",
                                ["--adapters {d}/other_adapters", "num_layers: file 2 vs given 4"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_user_error_is_one_line_and_status_2(files, case):
    stage, argv, expected = CASES[case]
    d = files["dir"]
    r = _run("--stage", stage, *files["base"], *argv.format(d=d).split())
    lines = r.stderr.splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    prefix = f"run.py --stage {stage}: error: "
    assert lines[0].startswith(prefix)
    assert re.search(".*".join(re.escape(e.format(d=d)) for e in expected), lines[0]), lines[0]
    assert lines[0].count(expected[0].format(d=d)) == 1, lines[0]  # the culprit named once, not "x: x: ..."
    assert "Traceback" not in r.stdout + r.stderr


def test_export_kaggle_merges_the_adapters(files, tmp_path, capsys):
    import jax
    import numpy as np

    from gemma_jax.checkpoint import load_hf, load_kaggle
    from gemma_jax.config import TINY
    from lora.adapters import LoRA, init_lora, merge
    from lora.io import save_adapters

    lora = init_lora(TINY, 4, 8.0, seed=1)
    lora = LoRA({n: {"a": ab["a"], "b": ab["b"] + 0.01 * (i + 1)} for i, (n, ab) in enumerate(lora.layers.items())},
                lora.scale)  # non-zero B: the merge changes every adapted weight
    save_adapters(str(tmp_path / "adapters"), lora, TINY)
    out = str(tmp_path / "kaggle")
    argv = ["--format", "kaggle", *files["base"], "--adapters", str(tmp_path / "adapters"), "--out", out]
    assert run_cli(export_cli.main, argv, prog="run.py --stage export") == 0
    assert capsys.readouterr().out.strip() == f"export: wrote kaggle to {out} with the adapters of " \
                                              f"{tmp_path / 'adapters'} merged in"
    _, base = load_hf(files["base"][1])
    want = merge(base, lora)
    _, got = load_kaggle(out, TINY)  # explicit config: an inferred one has Gemma 2 2B's window
    for path, w in jax.tree_util.tree_flatten_with_path(want)[0]:
        g = got
        for k in path:
            g = g[k.key]
        assert np.array_equal(np.asarray(w), np.asarray(g)), path
    assert not np.array_equal(np.asarray(want["layers"]["q"]), np.asarray(base["layers"]["q"]))
    assert os.path.getsize(os.path.join(out, "tokenizer.model")) == os.path.getsize(files["base"][3])
    # Refused before anything is loaded: an --out in use, and peft without adapters.
    assert run_cli(export_cli.main, argv, prog="export") == 2
    assert f"--out: {out} exists" in capsys.readouterr().err
    assert run_cli(export_cli.main, ["--format", "peft", *files["base"], "--out", str(tmp_path / "p")],
                   prog="export") == 2
    assert "--format peft: give the --adapters" in capsys.readouterr().err


def test_missing_base_folder_is_named_before_its_tokenizer(files):
    base = os.path.join(files["dir"], "no_base")
    r = _run("--stage", "generate", "--base", base, "--prompt", "hi")
    assert (r.returncode, r.stderr) == (2, f"run.py --stage generate: error: --base: {base} does not exist\n")
    assert "Traceback" not in r.stdout


def test_debug_shows_the_traceback(files):
    d = files["dir"]
    r = _run("--stage", "sft", *files["base"], "--data", f"{d}/sft.csv", "--mesh", "fsdp=x", "--debug")
    assert r.returncode == 1
    assert r.stderr.startswith("Traceback") and "cli.common.UsageError: --mesh: mesh spec 'fsdp=x'" in r.stderr
    assert "error:" not in r.stderr.splitlines()[0]


# ------------------------------------------------------------------------------------------- flags
def test_equals_form_parses_like_the_spaced_form():
    for module in (sft_cli, grpo_cli):
        p = module.build_parser()
        assert p.parse_args(["--out=x/y", "--lr=3e-4"]) == p.parse_args(["--out", "x/y", "--lr", "3e-4"])
        assert p.parse_args(["--out=x/y"]).out == "x/y"


def test_no_flag_gives_every_dataclass_default():
    for module, cls in ((sft_cli, HParams), (grpo_cli, GRPOHParams)):
        hp = hparams_from_args(cls, module.build_parser().parse_args([]))
        for f in dataclasses.fields(cls):
            assert getattr(hp, f.name) == f.default, f.name


# A valid value other than the default for each str field (a new str field must be added here).
OTHER_STR = {"kl": "k1", "loss_agg": "token-mean", "loss_type": "dapo", "importance_sampling": "sequence",
             "adv_scale": "batch", "adv_estimator": "rloo", "sampler_is": "token_mask",
             "decode_weights": "stacked"}


def _other_value(f, hint):
    """(command-line words, the value they must give) for a value of field f other than its default."""
    flag = "--" + f.name.replace("_", "-")
    args = [t for t in typing.get_args(hint) if t is not type(None)] or [hint]
    kind = args[0]
    if kind is bool:
        return ([f"--no-{f.name.replace('_', '-')}"] if f.default else [flag]), not f.default
    if kind is str:
        return [flag, OTHER_STR[f.name]], OTHER_STR[f.name]
    if f.default is not None and len(args) < len(typing.get_args(hint)):  # Optional with a value: give None
        return [flag, "none"], None
    if kind is int:  # doubled keeps GRPO's micro_batch dividing prompts_per_step x G
        value = 2 * f.default if f.default else 3
    else:
        value = f.default / 2 if f.default else 0.25
    return [flag, repr(value)], value


@pytest.mark.parametrize("module,cls", [(sft_cli, HParams), (grpo_cli, GRPOHParams)], ids=["sft", "grpo"])
def test_each_flag_sets_exactly_its_field(module, cls):
    p, hints, default = module.build_parser(), typing.get_type_hints(cls), cls()
    for f in dataclasses.fields(cls):
        words, value = _other_value(f, hints[f.name])
        assert value != f.default, f.name
        hp = hparams_from_args(cls, p.parse_args(words))
        assert hp == dataclasses.replace(default, **{f.name: value}), words
    optional = [f for f in dataclasses.fields(cls) if type(None) in typing.get_args(hints[f.name])]
    for f in optional:  # 'none' is None for every Optional field
        assert getattr(hparams_from_args(cls, p.parse_args([f"--{f.name.replace('_', '-')}", "none"])), f.name) is None
    assert {f.name for f in optional} == ({"steps"} if cls is HParams else
                                          {"epsilon_high", "epsilon_c", "loss_norm", "loss_type", "delta", "top_k",
                                           "top_p", "sampler_is", "sampler_is_min", "sampler_is_max"})


def test_group_size_alias_and_bool_negation():
    p = grpo_cli.build_parser()
    assert hparams_from_args(GRPOHParams, p.parse_args(["-G", "8"])).group_size == 8
    assert hparams_from_args(GRPOHParams, p.parse_args(["--gspo", "--no-gspo"])).gspo is False


def test_sft_stage_2_defaults_unless_the_flag_is_given():
    p = sft_cli.build_parser()
    assert STAGE_DEFAULTS[2] == {"lr": 1e-5, "max_len": 1280}
    assert sft_cli.stage_hparams(p.parse_args([])) == HParams()
    assert sft_cli.stage_hparams(p.parse_args(["--sft-stage", "2"])) == HParams(lr=1e-5, max_len=1280)
    hp = sft_cli.stage_hparams(p.parse_args(["--sft-stage", "2", "--lr", "3e-5"]))
    assert hp == HParams(lr=3e-5, max_len=1280)
    hp = sft_cli.stage_hparams(p.parse_args(["--sft-stage", "2", "--max-len", "2048", "--batch", "4"]))
    assert hp == HParams(lr=1e-5, max_len=2048, batch=4)


# ------------------------------------------------------------------------------------------- README commands
def readme_commands() -> list[str]:
    """Every `python run.py ...` command in README.md's code blocks (indented or fenced), continuation lines
    joined, as the words after `python run.py` (shell comments dropped)."""
    lines, fenced, block = open(os.path.join(ROOT, "README.md")).read().splitlines(), False, []
    for line in lines:
        if line.startswith("```"):
            fenced = not fenced
            continue
        block.append(line if fenced or line.startswith("    ") else "")
    text = "\n".join(block).replace("\\\n", " ")
    commands = []
    for line in text.splitlines():
        for part in line.split("&&"):
            if part.strip().startswith("python run.py"):
                commands.append(shlex.split(part, comments=True)[2:])
    return commands


def _parse_error(words) -> str | None:
    """None if `python run.py WORDS` parses (as run.py does: --stage, then that stage's parser), else argparse's
    message."""
    top = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    top.add_argument("--stage", choices=sorted(STAGES), default="grpo")
    stage, rest = top.parse_known_args(words)
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            STAGES[stage.stage].build_parser().parse_args(rest)
    except SystemExit:
        return err.getvalue().strip().splitlines()[-1]
    return None


def test_readme_commands_are_found():
    stages = {_stage_of(c) for c in readme_commands()}
    assert stages == set(STAGES)


def _stage_of(words):
    return words[words.index("--stage") + 1] if "--stage" in words else "grpo"


def test_readme_commands_parse():
    failures = [f"python run.py {shlex.join(c)}\n    -> {e}" for c in readme_commands() if (e := _parse_error(c))]
    assert not failures, "README commands that do not parse:\n" + "\n".join(failures)
