"""The embedded default's data generator and bundled files (data/tiny_tasks.py, bundled/, cli/embedded.py)."""

import csv
import filecmp
import os
import re
from fractions import Fraction

import numpy as np
import pytest

from cli.embedded import GRPO_ARGS, PATHS, SFT_ARGS
from data import tiny_tasks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EQUATION = re.compile(r"(\d+) ([-+*/]) (\d+)(?: ([-+*/]) (\d+))? = (-?\d+)\.")


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_data")
    counts = tiny_tasks.write_all(str(out))
    return str(out), counts


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _eval(a, op, b):
    a, b = Fraction(a), Fraction(b)
    return {"+": a + b, "-": a - b, "*": a * b, "/": a / b}[op]


def check_equations(text):
    """Every 'a op b [op c] = r.' in text is true arithmetic (left to right for two operations, except that
    '*' binds first in 'c - a * b'). Returns the number of equations checked."""
    n = 0
    for a, op1, b, op2, c, r in EQUATION.findall(text):
        if not op2:
            value = _eval(a, op1, b)
        elif op2 in "*/" and op1 in "+-":
            value = _eval(a, op1, _eval(b, op2, c))
        else:
            value = _eval(_eval(a, op1, b), op2, c)
        assert value == Fraction(r), f"false arithmetic in {text!r}: {a} {op1} {b} {op2} {c} = {r}"
        n += 1
    return n


def test_bundled_data_is_the_generators_output(generated):
    out, _ = generated
    for name in ("sft_train.csv", "sft_eval.csv", "rl_train.csv", "rl_eval.csv"):
        assert filecmp.cmp(os.path.join(out, name), os.path.join(ROOT, "bundled", "data", name), shallow=False), \
            f"bundled/data/{name} differs from `python -m data.tiny_tasks` output: rerun scripts/tiny.sh"


def test_heldout_split_shares_no_question(generated):
    out, counts = generated
    rl_eval = read_csv(os.path.join(out, "rl_eval.csv"))
    held = {r["question"] for r in rl_eval}
    assert len(held) == len(rl_eval) == counts["eval"] == 400
    train = {r["user"] for r in read_csv(os.path.join(out, "sft_train.csv"))}
    train |= {r["question"] for r in read_csv(os.path.join(out, "rl_train.csv"))}
    corpus = open(os.path.join(out, "corpus.txt")).read()
    corpus_q = set(re.findall(r"^Question: (.*)$", corpus, re.M))
    assert len(corpus_q) == counts["corpus"]
    assert not held & train and not held & corpus_q
    assert {r["user"] for r in read_csv(os.path.join(out, "sft_eval.csv"))} == held


# The general tasks solved again from the question text alone, with list operations written independently of the
# generator's table: each returns (answer, the long trace's steps as they must read).
LIST_STEPS = {"move the first word to the end": lambda w: w[1:] + w[:1],
              "move the last word to the front": lambda w: w[-1:] + w[:-1],
              "swap the first two words": lambda w: w[1::-1] + w[2:],
              "swap the last two words": lambda w: w[:-2] + w[:-3:-1],
              "reverse the words": lambda w: list(reversed(w))}
LIST_Q = re.compile(r"Start with ([a-z ]+)\. First ([a-z ]+), then ([a-z ]+)\. What are the words now\?")
SWAP_Q = re.compile(r"(\w+) has the (\w+), (\w+) has the (\w+), (\w+) has the (\w+)\. (\w+) and (\w+) swap, "
                    r"then (\w+) and (\w+) swap\. What does (\w+) have\?")
DAY_Q = re.compile(r"Today is (\w+)\. (\w+) leaves in (\d) days and comes back (\d) days later\. "
                   r"On which day does \2 come back\?")


def solve_general(q):
    days = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
    if m := LIST_Q.fullmatch(q):
        words, steps = m[1].split(), []
        for op in (m[2], m[3]):
            words = LIST_STEPS[op](words)
            steps.append(f"{op[0].upper()}{op[1:]}: {' '.join(words)}.")
        assert words != m[1].split()
        return " ".join(words), steps
    if m := SWAP_Q.fullmatch(q):
        people = [m[1], m[3], m[5]]
        held = {m[1]: m[2], m[3]: m[4], m[5]: m[6]}
        start, steps = dict(held), []
        for a, b in ((m[7], m[8]), (m[9], m[10])):
            held[a], held[b] = held[b], held[a]
            steps.append(f"{a} and {b} swap: " + ", ".join(f"{p} {held[p]}" for p in people) + ".")
        assert held[m[11]] != start[m[11]]  # two different swaps move every item
        return held[m[11]], [*steps, f"So {m[11]} has the {held[m[11]]}."]
    m = DAY_Q.fullmatch(q)
    assert m, f"no general task reads like {q!r}"
    mid = days[(days.index(m[1]) + int(m[3])) % 7]
    end = days[(days.index(mid) + int(m[4])) % 7]
    assert end != m[1]
    return end, [f"Counting {m[3]} days from {m[1]} gives {mid}.", f"Counting {m[4]} days from {mid} gives {end}."]


def test_answers_are_computed_and_both_forms_agree():
    """Every math equation is true; every general answer follows from its question (solved again here), each step
    of a long general trace is the true state after that step, and the short trace states the answer."""
    items = tiny_tasks.make_items(400, "math", "check") + tiny_tasks.make_items(600, "general", "check")
    n_eq = 0
    for it in items:
        for form in ("reasoning", "short_reasoning"):
            n_eq += check_equations(it[form])
            assert it[form].endswith(f"{it['answer']}."), (form, it)
        if it["domain"] == "math":
            assert it["reasoning"].count("=") == 2 and it["short_reasoning"].count("=") == 1
    assert n_eq == 400 * 3  # two equations in each long math trace, one in each short one
    kinds = []
    for it in items[400:]:
        answer, steps = solve_general(it["question"])
        assert it["answer"] == answer and it["reasoning"] == " ".join(steps), it
        kinds.append(it["question"].split()[0])
    assert kinds.count("Start") > 150 and kinds.count("Today") > 150  # the three kinds in about equal shares


def test_sft_traces_mix_long_and_short_one_to_four(generated):
    """The generator's teacher writes ~20% long traces; the stage-1 CoT mix with the embedded threshold takes an
    exact 1:4 long:short set from them."""
    from cli.sft import load_records
    from data.mix import mix_long_short
    from gemma_jax.tokenizer import Tokenizer

    tok = Tokenizer(PATHS["tokenizer"])
    out, _ = generated
    records = load_records([os.path.join(out, "sft_train.csv")], "auto", tok, print_fn=lambda *a: None)
    assert len(records) == 3000
    threshold = int(SFT_ARGS[SFT_ARGS.index("--long-threshold") + 1])
    count = lambda t: len(tok.encode(t))  # noqa: E731
    def is_long(r):  # the teacher's long form: two equations, or the general task's steps in full
        if r["domain"] == "math":
            return r["reasoning"].count("=") == 2
        return r["reasoning"] == " ".join(solve_general(r["prompt"])[1])

    for domain, n in (("math", 2000), ("general", 1000)):
        rows = [r for r in records if r["domain"] == domain]
        flags = [is_long(r) for r in rows]
        assert len(rows) == n and sum(flags) == n // 5  # exactly 1 long : 4 short in each domain
        # the token threshold separates the two forms exactly, so the CoT mix below sees the teacher's forms
        assert all((count(r["reasoning"]) > threshold) == lg for r, lg in zip(rows, flags)), domain
    mixed = mix_long_short(records, count_tokens=count, long_threshold=threshold, ratio=(1, 4), seed=0)
    n_long = sum(count(r["reasoning"]) > threshold for r in mixed)
    assert n_long * 4 == len(mixed) - n_long and len(mixed) > 2800


def test_bundled_sft_adapters_follow_the_format():
    """The committed SFT checkpoint (what `run.py --stage grpo` starts from) keeps the output contract on the
    held-out split: strict format >= 95% in each domain (greedy, first 96 records), mostly in one line."""
    from cli.embedded import heldout_eval
    from cli.grpo import load_rl_records
    from gemma_jax.tokenizer import Tokenizer
    from rewards.format import is_strict

    texts = []
    m = heldout_eval(PATHS["sft_adapters"], limit=96, texts_out=texts)
    records = load_rl_records([PATHS["rl_eval"]], Tokenizer(PATHS["tokenizer"]), kind="recipe_csv", limit=96)
    assert m["num_records"] == len(texts) == 96
    for domain in ("math", "general"):
        strict = [is_strict(t) for t, r in zip(texts, records) if r["domain"] == domain]
        assert len(strict) > 30 and sum(strict) / len(strict) >= 0.95, (domain, sum(strict), len(strict))
    # greedy SFT mostly answers in the one-line form (the room GRPO has)
    assert m["math_step_by_step_share"] < 0.3 and m["general_step_by_step_share"] < 0.3


def test_embedded_settings_fit_the_bundled_prompts():
    """Every held-out and training prompt fits --max-prompt-tokens untruncated."""
    from cli.grpo import load_rl_records
    from gemma_jax.tokenizer import Tokenizer
    from grpo.rollout import prompt_ids

    tok = Tokenizer(PATHS["tokenizer"])
    budget = int(GRPO_ARGS[GRPO_ARGS.index("--max-prompt-tokens") + 1])
    for key in ("rl_train", "rl_eval"):
        for r in load_rl_records([PATHS[key]], tok, kind="recipe_csv"):
            assert len(tok.encode_chat(r["question"], r["system"])) == len(prompt_ids(r, tok, budget)) <= budget


def test_reasoning_forms_counts_each_domains_forms():
    from cli.embedded import reasoning_forms
    from rewards.tags import render_completion

    records = [{"domain": "math", "answer": "8"}, {"domain": "math", "answer": "8"},
               {"domain": "general", "answer": "Friday"}, {"domain": "general", "answer": "Friday"},
               {"domain": "general", "answer": "cup"}]
    texts = [render_completion("4 + 5 = 9. 9 - 1 = 8.", "8"), render_completion("4 + 5 - 1 = 7.", "7"),
             render_completion("2 days after Monday is Wednesday. 2 days after Wednesday is Friday.", "Friday"),
             render_completion("Ana comes back on Friday.", "Friday"), "Ana has the cup."]  # the last: not strict
    m = reasoning_forms(records, texts)
    assert m == {"math_step_by_step_share": 0.5, "math_accuracy_step_by_step": 1.0, "math_accuracy_one_line": 0.0,
                 "general_step_by_step_share": 1 / 3, "general_em_step_by_step": 1.0, "general_em_one_line": 0.5}


def test_study_table_gives_mean_spread_and_std_per_variant(tmp_path, monkeypatch):
    """scripts/study.py's table from finished runs' summary.json: the SFT start, then per variant the mean over
    seeds, max - min and the sample std; a variant with no finished run is left out."""
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location("study", os.path.join(ROOT, "scripts", "study.py"))
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    monkeypatch.setattr(study, "run_dir", lambda v, s: str(tmp_path / f"{v}-seed{s}"))
    before = {"math_accuracy": 0.2, "general_exact_match": 0.1, "prob_reward_mean": 0.15, "strict_format_rate": 1.0}
    for seed, math, em in ((0, 0.5, 0.1), (1, 0.4, 0.2), (2, 0.6, 0.3)):
        os.makedirs(study.run_dir("default", seed))
        after = {**before, "math_accuracy": math, "general_exact_match": em}
        json.dump({"before": before, "after": after}, open(os.path.join(study.run_dir("default", seed),
                                                                         "summary.json"), "w"))
    lines = study.table(["default", "no_debias"], [0, 1, 2]).splitlines()
    assert lines[2] == "| SFT start | 0.200 | 0.100 | 0.150 | 1.000 |"
    assert lines[3] == ("| default (3 seeds) | 0.500 (spread 0.200, std 0.100) | 0.200 (spread 0.200, std 0.100) | "
                        "0.150 (spread 0.000, std 0.000) | 1.000 (spread 0.000, std 0.000) |")
    assert len(lines) == 4


def _make_tiny():
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_tiny", os.path.join(ROOT, "scripts", "make_tiny.py"))
    make_tiny = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_tiny)
    return make_tiny


def test_make_tiny_probe_names_each_generated_question_by_its_generator():
    """`scripts/make_tiny.py probe` groups held-out questions by task kind from their wording alone; every question
    each generator of data/tiny_tasks.py writes must land in that generator's kind. `forms` forces the long trace's
    first word, read off the question: it must be the first word the generator writes."""
    import random

    make_tiny = _make_tiny()
    rng = random.Random(0)
    for kind, item in (("math", tiny_tasks._math_item), ("list", tiny_tasks._list_item),
                       ("swap", tiny_tasks._swap_item), ("calendar", tiny_tasks._calendar_item)):
        items = [item(rng) for _ in range(2000)]
        kinds = {make_tiny.task_kind(it[0]) for it in items}
        assert kinds == {kind}, (kind, kinds)
        if kind != "math":
            for question, reasoning, *_ in items:
                assert reasoning.split()[0] == make_tiny.long_first_word(question), (question, reasoning)


def test_make_tiny_forms_table_per_kind_and_form():
    """`scripts/make_tiny.py forms` aggregates (kind, long form?, exact match?, p) per kind and form."""
    samples = [("calendar", True, True, 0.9), ("calendar", True, False, 0.5), ("calendar", False, False, 0.2),
               ("calendar", False, False, 0.4), ("list", False, True, 0.8)]
    t = _make_tiny().forms_table(samples)
    assert list(t) == ["calendar", "list"]
    assert t["calendar"]["long_share"] == 0.5 and t["list"]["long_share"] == 0.0
    assert t["calendar"]["long"] == {"n": 2, "exact_match": 0.5, "p": pytest.approx(0.7)}
    assert t["calendar"]["short"] == {"n": 2, "exact_match": 0.0, "p": pytest.approx(0.3)}
    assert t["list"]["short"] == {"n": 1, "exact_match": 1.0, "p": 0.8}
    assert t["list"]["long"]["n"] == 0 and np.isnan(t["list"]["long"]["exact_match"])


def test_corpus_answers_are_the_answer_blocks_tokens(generated):
    """The bundled tokenizer adds no dummy space (as Gemma's), so a word at a line start is other tokens than the
    same word after a space. The pre-training corpus must put each solution where the reasoning block does and each
    answer where the answer block does (each at a line start), so the base learns the very tokens that SFT trains,
    the sampler writes and the probability reward scores."""
    from gemma_jax.tokenizer import Tokenizer
    from rewards.tags import render_completion

    tok = Tokenizer(PATHS["tokenizer"])
    newline = tok.encode("\n")
    with open(os.path.join(generated[0], "corpus.txt")) as f:
        docs = [d for d in f.read().split("\n\n") if d.strip()][:600]
    words = differ = 0
    for doc in docs:
        assert doc.count(tiny_tasks.CORPUS_ANSWER) == 1 and doc.count(tiny_tasks.CORPUS_SOLUTION) == 1, doc
        solution, answer = doc.split(tiny_tasks.CORPUS_SOLUTION)[1].split(tiny_tasks.CORPUS_ANSWER)
        a_ids, s_ids, doc_ids = tok.encode(answer), tok.encode(solution), tok.encode(doc.strip())
        assert doc_ids[-len(a_ids) - len(newline):] == newline + a_ids, doc
        block = tok.encode(render_completion(solution, answer))
        start = block.index(tok.encode("<answer>")[0]) + 1 + len(newline)
        assert block[start:start + len(a_ids)] == a_ids, answer
        # The solution's tokens, in the document and in the reasoning block, are the solution's own.
        start = block.index(tok.encode("<reasoning>")[0]) + 1 + len(newline)
        assert block[start:start + len(s_ids)] == s_ids, solution
        at = next(i for i in range(len(doc_ids)) if doc_ids[i:i + len(s_ids)] == s_ids)
        assert doc_ids[at - len(newline):at] == newline, doc
        if not answer.isdigit():
            words += 1
            differ += tok.encode(" " + answer)[-len(a_ids):] != a_ids
    # After a space every word answer is other tokens: the corpus's old "The answer is X." taught only those.
    assert words > 150 and differ == words
