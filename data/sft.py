"""SFT data: converters from the public reasoning sets and the recipe CSV into one SFT record, and `prepare_sft`,
which streams files, validates every row and reports how many rows were dropped and why.

SFT record (plain dict): {"prompt", "reasoning", "answer", "domain", "source", "system"}; the training target is
`sft_completion(record)` = `<reasoning>\\n…\\n</reasoning>\\n<answer>\\n…\\n</answer>` (rewards.tags).

Sources (column layouts: docs/reference.md#data-sets):
- "glaive": glaiveai/reasoning-v1-20m, `prompt`, `response` = `<think>…</think>` then the answer. Domain "general".
- "bespoke": bespokelabs/Bespoke-Stratos-17k, `system`, `conversations` = [{from: user, value}, {from: assistant,
  value}] with `<|begin_of_thought|>…<|end_of_thought|>` `<|begin_of_solution|>…<|end_of_solution|>`.
  Its `system` text teaches those marker names, which would contradict our tags, so it is not kept (system None).
  Domain from the prompt (the set has no column for it): "Return your final response within \\boxed{}" (its math
  prompts) -> math, "executable Python function" / "```python" -> code, anything else -> science.
- "recipe_csv": the recipe's `user, assistant` (+ optional `domain`, `system`); the assistant holds
  `<reasoning>…</reasoning>` `<answer>…</answer>`, or `<think>…</think>` then the answer (optionally in `<answer>`).

Checks, in order (first failure names the drop reason): field present / not null / a string (missing_column, null,
wrong_type; bad_json / bad_csv_row from the reader), structure (bad_tags: each tag exactly once, nothing before
the reasoning, reasoning before answer, nothing after a tagged answer, no output-contract tag inside either block;
empty_reasoning; empty_answer), English only (non_english, see data.filters), token budgets (too_long_prompt,
too_long_completion, too_long_total), and last de-duplication by normalised prompt (duplicate), so a bad first
copy never shadows a good later one. Malformed rows are counted, never kept, never raise.
"""

from dataclasses import dataclass

from data.filters import (
    Drop,
    count_drop,
    get_field,
    get_str,
    has_contract_tag,
    is_english,
    new_report,
    prompt_key,
    prompt_text,
)
from data.readers import BadRow, iter_sources
from rewards.tags import ANSWER_END, ANSWER_START, REASONING_END, REASONING_START, render_completion

THINK_START, THINK_END = "<think>", "</think>"
THOUGHT_START, THOUGHT_END = "<|begin_of_thought|>", "<|end_of_thought|>"
SOLUTION_START, SOLUTION_END = "<|begin_of_solution|>", "<|end_of_solution|>"

SOURCES = {"glaive": "glaiveai/reasoning-v1-20m", "bespoke": "bespokelabs/Bespoke-Stratos-17k",
           "recipe_csv": "recipe_csv"}
COLUMNS = {"glaive": (["prompt", "response"], ()), "bespoke": (["conversations"], ("system",)),
           "recipe_csv": (["user", "assistant"], ("domain", "system"))}
DROP_REASONS = ("bad_json", "bad_csv_row", "missing_column", "null", "wrong_type", "bad_conversation", "bad_tags",
                "empty_reasoning", "empty_answer", "empty_prompt", "non_english", "too_long_prompt",
                "too_long_completion", "too_long_total", "duplicate")


@dataclass(frozen=True)
class SFTBudgets:
    """Token limits (None: no limit). The prompt counts the user turn text (system + message,
    docs/reference.md#tokenizer-and-chat-template); the chat template's few marker tokens are not included."""
    prompt: int | None = None
    completion: int | None = None
    total: int | None = None


def sft_completion(record: dict) -> str:
    return render_completion(record["reasoning"], record["answer"])


def parse_blocks(text: str, r_open: str, r_close: str, a_open: str | None = None, a_close: str | None = None):
    """(reasoning, answer) from `r_open reasoning r_close` then either `a_open answer a_close` or the plain rest.
    Raises Drop(bad_tags | empty_reasoning | empty_answer)."""
    for tag in (r_open, r_close, a_open, a_close):
        if tag is not None and text.count(tag) != 1:
            raise Drop("bad_tags", f"{tag!r} appears {text.count(tag)} times, expected once")
    i0, i1 = text.index(r_open), text.index(r_close)
    if text[:i0].strip():
        raise Drop("bad_tags", f"text before {r_open!r}")
    if i1 < i0:
        raise Drop("bad_tags", f"{r_close!r} before {r_open!r}")
    reasoning, rest = text[i0 + len(r_open):i1].strip(), text[i1 + len(r_close):]
    if a_open is None:
        answer = rest.strip()
    else:
        j0, j1 = rest.find(a_open), rest.find(a_close)
        if j0 < 0 or j1 < j0:
            raise Drop("bad_tags", f"answer block not after the reasoning block, in order {a_open!r} {a_close!r}")
        if rest[:j0].strip() or rest[j1 + len(a_close):].strip():
            raise Drop("bad_tags", "text outside the reasoning and answer blocks")
        answer = rest[j0 + len(a_open):j1].strip()
    if has_contract_tag(reasoning) or has_contract_tag(answer) or THINK_START in answer or THINK_END in answer:
        raise Drop("bad_tags", "an output-contract or think tag inside a block")
    if not reasoning:
        raise Drop("empty_reasoning")
    if not answer:
        raise Drop("empty_answer")
    return reasoning, answer


def _record(prompt, reasoning, answer, domain, source, system=None) -> dict:
    if not prompt.strip():
        raise Drop("empty_prompt")
    return {"prompt": prompt.strip(), "reasoning": reasoning, "answer": answer, "domain": domain,
            "source": source, "system": system}


def convert_glaive(row: dict) -> dict:
    prompt, response = get_str(row, "prompt"), get_str(row, "response")
    reasoning, answer = parse_blocks(response, THINK_START, THINK_END)
    return _record(prompt, reasoning, answer, "general", SOURCES["glaive"])


def bespoke_domain(prompt: str) -> str:
    if "\\boxed" in prompt:
        return "math"
    if "executable Python function" in prompt or "```python" in prompt:
        return "code"
    return "science"


def convert_bespoke(row: dict) -> dict:
    turns = get_field(row, "conversations", (list,), "a list of {from, value}")
    if len(turns) != 2 or not all(isinstance(t, dict) for t in turns):
        raise Drop("bad_conversation", f"expected [user, assistant] turns, got {len(turns)} items")
    if [t.get("from") for t in turns] != ["user", "assistant"]:
        raise Drop("bad_conversation", f"turn roles {[t.get('from') for t in turns]}, expected ['user', 'assistant']")
    prompt, text = get_str(turns[0], "value"), get_str(turns[1], "value")
    reasoning, answer = parse_blocks(text, THOUGHT_START, THOUGHT_END, SOLUTION_START, SOLUTION_END)
    return _record(prompt, reasoning, answer, bespoke_domain(prompt), SOURCES["bespoke"])


def convert_recipe_csv(row: dict, default_domain: str = "general") -> dict:
    prompt, text = get_str(row, "user"), get_str(row, "assistant")
    domain = (get_str(row, "domain", required=False) or default_domain).strip().lower()
    system = get_str(row, "system", required=False)
    if REASONING_START in text or REASONING_END in text:
        reasoning, answer = parse_blocks(text, REASONING_START, REASONING_END, ANSWER_START, ANSWER_END)
    elif THINK_START in text or THINK_END in text:
        tagged = ANSWER_START in text or ANSWER_END in text
        reasoning, answer = parse_blocks(text, THINK_START, THINK_END, *((ANSWER_START, ANSWER_END) if tagged
                                                                         else (None, None)))
    else:
        raise Drop("bad_tags", "no <reasoning> or <think> block")
    return _record(prompt, reasoning, answer, domain, SOURCES["recipe_csv"], system and system.strip())


CONVERTERS = {"glaive": convert_glaive, "bespoke": convert_bespoke, "recipe_csv": convert_recipe_csv}


def check_budgets(record: dict, count_tokens, budgets: SFTBudgets):
    """Raise Drop(too_long_*) when the record exceeds a token budget."""
    n_prompt = count_tokens(prompt_text(record["system"], record["prompt"]))
    n_completion = count_tokens(sft_completion(record))
    for reason, n, limit in (("too_long_prompt", n_prompt, budgets.prompt),
                             ("too_long_completion", n_completion, budgets.completion),
                             ("too_long_total", n_prompt + n_completion, budgets.total)):
        if limit is not None and n > limit:
            raise Drop(reason, f"{n} tokens > {limit}")


def _check_row(row, kind, english_only, count_tokens, budgets, default_domain):
    if isinstance(row, BadRow):
        raise Drop(row.reason, row.message)
    record = convert_recipe_csv(row, default_domain) if kind == "recipe_csv" else CONVERTERS[kind](row)
    if english_only and not (is_english(record["prompt"])
                             and is_english(record["reasoning"] + "\n" + record["answer"], check_stopwords=False)):
        raise Drop("non_english")
    if budgets is not None:
        check_budgets(record, count_tokens, budgets)
    return record


def prepare_sft(sources, *, kind: str, count_tokens=None, budgets: SFTBudgets | None = None,
                english_only: bool = True, dedupe: bool = True, default_domain: str = "general",
                batch_size: int = 1024) -> tuple[list, dict]:
    """Convert and filter SFT rows from `sources` (a path, a list of paths, or an iterable of row dicts).

    Returns (records in input order, report) with report = {"read", "kept", "dropped": {reason: n}, "examples"}.
    default_domain: the recipe CSV's domain where it has no `domain` column or the cell is empty.
    A parquet/CSV file lacking a required column raises ValueError (a wrong file, not a bad row)."""
    if kind not in CONVERTERS:
        raise ValueError(f"kind must be one of {sorted(CONVERTERS)}, got {kind!r}")
    if budgets is not None and count_tokens is None:
        raise ValueError("budgets need count_tokens (a callable text -> number of tokens)")
    columns, optional = COLUMNS[kind]
    report, records, seen = new_report(DROP_REASONS), [], set()
    for where, row in iter_sources(sources, columns, optional_columns=optional, batch_size=batch_size):
        report["read"] += 1
        try:
            record = _check_row(row, kind, english_only, count_tokens, budgets, default_domain)
            key = prompt_key(record["prompt"])
            if dedupe and key in seen:
                raise Drop("duplicate", "same normalised prompt as an earlier row")
            seen.add(key)
        except Drop as d:
            count_drop(report, d.reason, where, d.detail)
            continue
        records.append(record)
        report["kept"] += 1
    return records, report
