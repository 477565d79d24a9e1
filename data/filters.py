"""Row checks shared by the SFT and RL converters: typed field access that turns bad values into counted drops,
the drop report, prompt normalisation for de-duplication and splits, and the English-only heuristic.

English-only heuristic (`is_english`): a text is English when
  1. at least 90% of its letters are ASCII a-z/A-Z (rejects Chinese, Russian, Arabic, Greek... and heavily
     accented text; digits, punctuation and LaTeX are ignored, and a text with no letters passes), and
  2. when it has at least 8 words (inline $math$, LaTeX commands and one-letter variables are not counted as
     words), at least 10% of its words are common English function words ("the", "of",
     "is", ...). Written English runs at roughly 40-50% function words, so 10% leaves a wide margin for
     formula-heavy math prompts, while Spanish, French, German, Portuguese or Indonesian prose written in
     ASCII lands well below it (their function words are not on the list). Short texts skip this test: there are
     too few words to judge and short math prompts ("Solve 3x + 5 = 11.") must pass.
It is a filter for bulk data, not a language identifier: no external model, deterministic, and tested on examples.
"""

import hashlib
import re
import unicodedata

from rewards.tags import ANSWER_END, ANSWER_START, REASONING_END, REASONING_START

CONTRACT_TAGS = (REASONING_START, REASONING_END, ANSWER_START, ANSWER_END)

STOPWORDS = frozenset("""
a about above after again all also am an and any are as at be because been before being below between both but by
can could did do does doing down during each few for from further had has have having he her here hers him his how
i if in into is it its itself just me more most my no nor not now of off on once only or other our out over own same
she should so some such than that the their them then there these they this those through to too under until up
very was we were what when where which while who whom why will with would you your
""".split())

MIN_ASCII_LETTER_SHARE = 0.9
MIN_STOPWORD_RATE = 0.1
MIN_WORDS_FOR_STOPWORDS = 8


class Drop(Exception):
    """Raised by a converter for a row that must not be kept; `reason` is the drop-report key."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


def new_report(reasons) -> dict:
    """{"read", "kept", "dropped": {reason: 0 for every known reason}, "examples": {reason: [first 3 messages]}}."""
    return {"read": 0, "kept": 0, "dropped": {r: 0 for r in reasons}, "examples": {}}


def count_drop(report: dict, reason: str, where: str, detail: str = ""):
    report["dropped"][reason] = report["dropped"].get(reason, 0) + 1
    examples = report["examples"].setdefault(reason, [])
    if len(examples) < 3:
        examples.append(f"{where}: {detail}" if detail else where)


def get_str(row: dict, key: str, *, required: bool = True) -> str | None:
    """A string field. Required: absent -> missing_column, None -> null, not a str -> wrong_type.
    Optional: absent, None or blank -> None; not a str -> wrong_type."""
    if key not in row:
        if required:
            raise Drop("missing_column", f"no {key!r} (row has {sorted(row)})")
        return None
    value = row[key]
    if value is None:
        if required:
            raise Drop("null", f"{key!r} is null")
        return None
    if not isinstance(value, str):
        raise Drop("wrong_type", f"{key!r} is {type(value).__name__}, expected str")
    if not required and not value.strip():
        return None
    return value


def get_field(row: dict, key: str, types: tuple, what: str):
    """A non-string required field (list, dict, int): absent -> missing_column, None -> null, else type-checked.
    bool is rejected where int is expected (True is an int in Python)."""
    if key not in row:
        raise Drop("missing_column", f"no {key!r} (row has {sorted(row)})")
    value = row[key]
    if value is None:
        raise Drop("null", f"{key!r} is null")
    if not isinstance(value, types) or (int in types and isinstance(value, bool)):
        raise Drop("wrong_type", f"{key!r} is {type(value).__name__}, expected {what}")
    return value


def normalize_prompt(text: str) -> str:
    """Unicode NFKC, lower case, whitespace runs collapsed: two prompts that differ only in these are duplicates."""
    return " ".join(unicodedata.normalize("NFKC", text).lower().split())


def prompt_key(text: str) -> str:
    return hashlib.sha1(normalize_prompt(text).encode("utf-8")).hexdigest()


def prompt_text(system: str | None, message: str) -> str:
    """The user turn as the chat template builds it (Gemma has no system role: system text is prepended)."""
    return f"{system}\n\n{message}" if system else message


def has_contract_tag(text: str) -> bool:
    return any(t in text for t in CONTRACT_TAGS)


def english_stats(text: str) -> tuple[float, float, int]:
    """(share of ASCII letters among letters, share of words that are English stop words, number of words)."""
    letters = [c for c in text if c.isalpha()]
    ascii_share = sum(c.isascii() for c in letters) / len(letters) if letters else 1.0
    # Inline math ($…$), LaTeX commands and one-letter variables are not words of any language.
    prose = re.sub(r"\\[A-Za-z]+", " ", re.sub(r"\$[^$]*\$", " ", text)).lower()
    words = [w for w in re.findall(r"[a-z]+(?:'[a-z]+)?", prose) if len(w) > 1 or w in ("a", "i")]
    rate = sum(w in STOPWORDS for w in words) / len(words) if words else 0.0
    return ascii_share, rate, len(words)


def is_english(text: str, *, check_stopwords: bool = True) -> bool:
    ascii_share, rate, n_words = english_stats(text)
    if ascii_share < MIN_ASCII_LETTER_SHARE:
        return False
    return not (check_stopwords and n_words >= MIN_WORDS_FOR_STOPWORDS and rate < MIN_STOPWORD_RATE)
