"""RL data: converters from open-rs, LitBench-Train, RLPR-Train and the recipe CSV into one RL record, the
domain system prompts, and `prepare_rl`, which streams files, validates rows and reports drops per reason.

RL record (plain dict): {"question", "answer" (y*, the reference), "answer_canon", "domain", "reward_model_type"
("math": rule-checked answer; "prob": RLPR probability of y*), "answer_type", "system", "source", "level"}.

Sources (column layouts: docs/reference.md#data-sets):
- "open_rs": knoveleng/open-rs `problem, solution, answer, level`. Only unambiguous numeric answers are kept
  (`numeric_answer`): integer, decimal, fraction a/b, LaTeX \\frac{a}{b}; intervals, several answers, expressions
  and text are dropped under their own reasons. `level` must be Easy or Hard; then 1:3 Easy:Hard stratification
  (the largest exact-ratio subset, seeded; the rest counted as `stratified_out`).
- "litbench": SAA-Lab/LitBench-Train `prompt, chosen_story, rejected_story, chosen_upvotes, rejected_upvotes, …`.
  Each prompt keeps its most upvoted chosen story (later pairs for the same prompt count as `duplicate`), then the
  top `top_n` prompts by chosen_upvotes (ties: file order) form the fixed-size creative subset (`not_selected`).
  The chosen story is y*, reward "prob". A leading subreddit tag like "[WP] " is removed from the prompt.
- "rlpr": openbmb/RLPR-Train-Dataset (verl parquet) `data_source, prompt [{role, content}], ability,
  reward_model {ground_truth, style}, extra_info`. The question is the last user turn (its own system turn asks
  for <think> tags, so it is replaced by ours); y* is reward_model.ground_truth; reward "prob", domain "general".
- "recipe_csv": `question, answer` + optional `answer_canon, domain, reward_model_type, answer_type, system`; domain
  defaults to `default_domain`, reward_model_type to "math" for the math domain and "prob" otherwise.
Every record gets the system prompt of its domain (MATH_SYSTEM_PROMPT for math, DEFAULT_SYSTEM_PROMPT otherwise),
unless a recipe CSV row gives its own in a `system` column;
the prompt budget counts system + question tokens as the chat template joins them.
"""

import random
import re
from decimal import Decimal
from fractions import Fraction

from data.filters import Drop, count_drop, get_field, get_str, new_report, prompt_key, prompt_text
from data.readers import BadRow, iter_sources
from rewards.tags import ANSWER_END, ANSWER_START, REASONING_END, REASONING_START

MATH_SYSTEM_PROMPT = (
    f"Solve the math problem. Think it through step by step between {REASONING_START} and {REASONING_END}. "
    f"Then give only the final number between {ANSWER_START} and {ANSWER_END}: no units, no words, no equation."
)
DEFAULT_SYSTEM_PROMPT = (
    f"Think about the request step by step between {REASONING_START} and {REASONING_END}. "
    f"Then write your final response between {ANSWER_START} and {ANSWER_END}."
)

SOURCES = {"open_rs": "knoveleng/open-rs", "litbench": "SAA-Lab/LitBench-Train",
           "rlpr": "openbmb/RLPR-Train-Dataset", "recipe_csv": "recipe_csv"}
COLUMNS = {"open_rs": (["problem", "answer", "level"], ()),
           "litbench": (["prompt", "chosen_story", "chosen_upvotes"], ()),
           "rlpr": (["prompt", "reward_model"], ("data_source", "ability")),
           "recipe_csv": (["question", "answer"], ("answer_canon", "domain", "reward_model_type", "answer_type",
                                                   "system"))}
DROP_REASONS = ("bad_json", "bad_csv_row", "missing_column", "null", "wrong_type", "bad_conversation",
                "empty_question", "empty_answer", "bad_value", "bad_level", "answer_interval", "answer_multiple",
                "answer_expression", "answer_text", "too_long_prompt", "too_long_answer", "duplicate",
                "stratified_out", "not_selected")


def system_prompt_for(domain: str) -> str:
    return MATH_SYSTEM_PROMPT if domain == "math" else DEFAULT_SYSTEM_PROMPT


# ---- numeric answers (open-rs) ----
_INT = re.compile(r"[-+]?(\d+|\d{1,3}(,\d{3})+)")
_DEC = re.compile(r"[-+]?(\d+\.\d*|\.\d+)")
_FRAC = re.compile(r"([-+]?)(\d+)/(\d+)")
_TEX_FRAC = re.compile(r"([-+]?)\\[dt]?frac\{\s*([-+]?\d+)\s*\}\{\s*(\d+)\s*\}")
_BOXED = re.compile(r"\\boxed\{(.*)\}")


def _unwrap(ans: str) -> str:
    """Strip outer whitespace, `$…$`, `\\(…\\)` and `\\boxed{…}` wrappers."""
    s = ans.strip()
    while True:
        if len(s) >= 2 and s[0] == "$" and s[-1] == "$":
            s = s.strip("$").strip()
        elif s.startswith("\\(") and s.endswith("\\)"):
            s = s[2:-2].strip()
        elif (m := _BOXED.fullmatch(s)) is not None:
            s = m.group(1).strip()
        else:
            return s


def numeric_answer(ans: str) -> tuple[str, str]:
    """(canonical form, answer_type) for an unambiguous number: integer ("1,000" -> "1000"), decimal ("-.50" ->
    "-0.5"), fraction or LaTeX \\frac ("\\frac{2}{4}" -> "1/2"). Raises Drop(answer_*) otherwise."""
    s = _unwrap(ans)
    if _INT.fullmatch(s):
        return str(int(s.replace(",", ""))), "integer"
    if _DEC.fullmatch(s):
        value = Decimal(s)
        return ("0" if value == 0 else format(value.normalize(), "f")), "decimal"
    m = _FRAC.fullmatch(s) or _TEX_FRAC.fullmatch(s)
    if m and int(m.group(3)) != 0:
        value = Fraction(int(m.group(2)), int(m.group(3))) * (-1 if m.group(1) == "-" else 1)
        return (str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}",
                "fraction")
    raise Drop(_why_not_numeric(s), repr(ans[:60]))


def _why_not_numeric(s: str) -> str:
    if re.fullmatch(r"[\[(].*,.*[\])]", s) or "\\infty" in s or "\\cup" in s:
        return "answer_interval"
    if re.search(r",|;|\\pm|\bor\b|\band\b|\\text\{\s*(or|and)\s*\}", s):
        return "answer_multiple"
    if re.search(r"[A-Za-z]{2,}", re.sub(r"\\[A-Za-z]+", "", s)) and not re.search(r"[=^+*/]", s):
        return "answer_text"
    return "answer_expression"


# ---- converters ----
def _record(question, answer, domain, reward_model_type, source, *, answer_canon=None, answer_type=None,
            level=None) -> dict:
    if not question.strip():
        raise Drop("empty_question")
    if not answer.strip():
        raise Drop("empty_answer")
    return {"question": question.strip(), "answer": answer.strip(), "answer_canon": answer_canon,
            "domain": domain, "reward_model_type": reward_model_type, "answer_type": answer_type,
            "system": system_prompt_for(domain), "source": source, "level": level}


def convert_open_rs(row: dict) -> dict:
    problem, answer, level = get_str(row, "problem"), get_str(row, "answer"), get_str(row, "level")
    if level.strip().lower() not in ("easy", "hard"):
        raise Drop("bad_level", f"level {level!r}, expected Easy or Hard")
    if not answer.strip():
        raise Drop("empty_answer")
    canon, answer_type = numeric_answer(answer)
    return _record(problem, answer, "math", "math", SOURCES["open_rs"], answer_canon=canon,
                   answer_type=answer_type, level=level.strip().capitalize())


_SUBREDDIT_TAG = re.compile(r"^\s*\[\s*[A-Z]{2,4}\s*\]\s*")


def convert_litbench(row: dict) -> dict:
    prompt, story = get_str(row, "prompt"), get_str(row, "chosen_story")
    upvotes = get_field(row, "chosen_upvotes", (int,), "int")
    rec = _record(_SUBREDDIT_TAG.sub("", prompt), story, "creative", "prob", SOURCES["litbench"])
    rec["_upvotes"] = upvotes  # ranking key for the top-N selection, removed before records are returned
    return rec


def convert_rlpr(row: dict) -> dict:
    turns = get_field(row, "prompt", (list,), "a list of {role, content}")
    if not all(isinstance(t, dict) for t in turns):
        raise Drop("bad_conversation", "a prompt turn is not a {role, content} struct")
    users = [t for t in turns if t.get("role") == "user"]
    if not users:
        raise Drop("bad_conversation", f"no user turn among roles {[t.get('role') for t in turns]}")
    question = get_str(users[-1], "content")
    reward_model = get_field(row, "reward_model", (dict,), "a {ground_truth, style} struct")
    answer = get_str(reward_model, "ground_truth")
    return _record(question, answer, "general", "prob", SOURCES["rlpr"])


def convert_recipe_csv(row: dict, default_domain: str = "general") -> dict:
    question, answer = get_str(row, "question"), get_str(row, "answer")
    domain = (get_str(row, "domain", required=False) or default_domain).strip().lower()
    rm_type = (get_str(row, "reward_model_type", required=False) or ("math" if domain == "math" else "prob"))
    if rm_type.strip().lower() not in ("math", "prob"):
        raise Drop("bad_value", f"reward_model_type {rm_type!r}, expected 'math' or 'prob'")
    canon, a_type = get_str(row, "answer_canon", required=False), get_str(row, "answer_type", required=False)
    record = _record(question, answer, domain, rm_type.strip().lower(), SOURCES["recipe_csv"],
                     answer_canon=canon and canon.strip(), answer_type=a_type and a_type.strip())
    system = get_str(row, "system", required=False)
    if system and system.strip():  # an explicit system prompt wins over the domain's default one
        record["system"] = system.strip()
    return record


CONVERTERS = {"open_rs": convert_open_rs, "litbench": convert_litbench, "rlpr": convert_rlpr,
              "recipe_csv": convert_recipe_csv}


# ---- preparation ----
def _check_row(row, kind, count_tokens, prompt_budget, answer_budget, default_domain):
    if isinstance(row, BadRow):
        raise Drop(row.reason, row.message)
    record = (convert_recipe_csv(row, default_domain) if kind == "recipe_csv" else CONVERTERS[kind](row))
    if prompt_budget is not None:
        n = count_tokens(prompt_text(record["system"], record["question"]))
        if n > prompt_budget:
            raise Drop("too_long_prompt", f"{n} tokens > {prompt_budget}")
    if answer_budget is not None:
        n = count_tokens(record["answer"])
        if n > answer_budget:
            raise Drop("too_long_answer", f"{n} tokens > {answer_budget}")
    return record


def stratify(records: list, ratio=(1, 3), seed: int = 0) -> tuple[list, int]:
    """The largest subset with exactly ratio[0]:ratio[1] Easy:Hard records, seeded sample, input order kept.
    Returns (records, number left out)."""
    a, b = ratio
    if a < 1 or b < 1:
        raise ValueError(f"easy_hard must be two positive integers, got {ratio}")
    easy = [i for i, r in enumerate(records) if r["level"] == "Easy"]
    hard = [i for i, r in enumerate(records) if r["level"] == "Hard"]
    k = min(len(easy) // a, len(hard) // b)
    rng = random.Random(seed)
    chosen = sorted(rng.sample(easy, k * a) + rng.sample(hard, k * b))
    return [records[i] for i in chosen], len(records) - len(chosen)


def _top_n(candidates: list, top_n, dedupe: bool, report: dict) -> list:
    """LitBench: rank by chosen_upvotes (ties: file order), one pair per prompt, keep the first top_n."""
    ranked = sorted(candidates, key=lambda c: -c[1]["_upvotes"])  # sorted() is stable: ties keep file order
    seen, out = set(), []
    for where, rec in ranked:
        key = prompt_key(rec["question"])
        if dedupe and key in seen:
            count_drop(report, "duplicate", where, "a higher-voted pair has the same prompt")
            continue
        seen.add(key)
        if top_n is not None and len(out) >= top_n:
            count_drop(report, "not_selected", where, f"outside the top {top_n} by chosen_upvotes")
            continue
        del rec["_upvotes"]
        out.append(rec)
    return out


def prepare_rl(sources, *, kind: str, count_tokens=None, prompt_budget: int | None = None,
               answer_budget: int | None = None, seed: int = 0, easy_hard=(1, 3), top_n: int | None = None,
               default_domain: str = "general", dedupe: bool = True, batch_size: int = 1024) -> tuple[list, dict]:
    """Convert and filter RL rows from `sources` (a path, a list of paths, or an iterable of row dicts).

    Returns (records, report) with report = {"read", "kept", "dropped": {reason: n}, "examples"}. Records keep
    input order, except LitBench, which comes ranked by chosen_upvotes. easy_hard (open-rs; None: off) and top_n
    (LitBench; None: all) select the final subset. A parquet/CSV file lacking a required column raises."""
    if kind not in CONVERTERS:
        raise ValueError(f"kind must be one of {sorted(CONVERTERS)}, got {kind!r}")
    if (prompt_budget is not None or answer_budget is not None) and count_tokens is None:
        raise ValueError("prompt_budget/answer_budget need count_tokens (a callable text -> number of tokens)")
    columns, optional = COLUMNS[kind]
    report, kept, seen = new_report(DROP_REASONS), [], set()
    for where, row in iter_sources(sources, columns, optional_columns=optional, batch_size=batch_size):
        report["read"] += 1
        try:
            record = _check_row(row, kind, count_tokens, prompt_budget, answer_budget, default_domain)
            key = prompt_key(record["question"])
            if dedupe and kind != "litbench" and key in seen:
                raise Drop("duplicate", "same normalised question as an earlier row")
            seen.add(key)
        except Drop as d:
            count_drop(report, d.reason, where, d.detail)
            continue
        kept.append((where, record))
    if kind == "litbench":
        records = _top_n(kept, top_n, dedupe, report)
    else:
        records = [rec for _, rec in kept]
    if kind == "open_rs" and easy_hard is not None:
        records, n_out = stratify(records, easy_hard, seed)
        report["dropped"]["stratified_out"] += n_out
    report["kept"] = len(records)
    return records, report
