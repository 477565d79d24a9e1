"""Format reward: the strict output contract and the recipe's partial credits (docs/reference.md#format-reward).

Strict contract (what `rewards.tags.render_completion` produces):
    optional whitespace, `<reasoning>`, non-empty text, `</reasoning>`, optional whitespace,
    `<answer>`, non-empty text, `</answer>`, optional whitespace, end of text.
Each of the four tags appears exactly once, spelled exactly in lower case; a tag in another case anywhere in the
text (e.g. `<Answer>` inside the reasoning) also breaks strictness, since it makes the parse ambiguous. The stop
token is not part of the text: `Tokenizer.decode` stops before it, so after `</answer>` only whitespace may follow.

Score (all values in `FormatConfig`):
    strict match                      -> `strict` (+3.0), nothing else added
    otherwise, for each of the 4 tags -> `tag_once` (+0.5) if it appears exactly once (exact spelling),
                                         `tag_bad` (-0.5) if it is missing or repeated
                                       + `trailing` (-0.5) if non-whitespace text follows the last `</answer>`
Range with the defaults: [-2.5, 3.0] (`format_reward_range`). All work is linear in the text length (str.find and
str.count only, no backtracking regex), so huge texts are cheap.
"""

import dataclasses

from rewards.tags import ANSWER_END, ANSWER_START, REASONING_END, REASONING_START

TAGS = (REASONING_START, REASONING_END, ANSWER_START, ANSWER_END)


@dataclasses.dataclass(frozen=True)
class FormatConfig:
    strict: float = 3.0
    tag_once: float = 0.5
    tag_bad: float = -0.5
    trailing: float = -0.5


def format_reward_range(cfg: FormatConfig = FormatConfig()) -> tuple[float, float]:
    """[min, max] of `format_reward` under `cfg`."""
    per_tag = (min(cfg.tag_once, cfg.tag_bad), max(cfg.tag_once, cfg.tag_bad))
    lo = 4 * per_tag[0] + min(cfg.trailing, 0.0)
    hi = 4 * per_tag[1] + max(cfg.trailing, 0.0)
    return min(lo, cfg.strict), max(hi, cfg.strict)


def strict_blocks(text: str) -> tuple[str, str] | None:
    """(reasoning, answer) contents of a strictly formatted completion, or None if it is not strict."""
    if not isinstance(text, str):
        return None
    lower = text.lower()
    if any(lower.count(tag) != 1 or text.count(tag) != 1 for tag in TAGS):
        return None
    pos = [text.find(tag) for tag in TAGS]
    if not pos[0] < pos[1] < pos[2] < pos[3]:
        return None
    r0, r1, a0, a1 = pos
    before, between, after = text[:r0], text[r1 + len(REASONING_END):a0], text[a1 + len(ANSWER_END):]
    if before.strip() or between.strip() or after.strip():
        return None
    reasoning = text[r0 + len(REASONING_START):r1].strip()
    answer = text[a0 + len(ANSWER_START):a1].strip()
    if not reasoning or not answer:
        return None
    return reasoning, answer


def is_strict(text: str) -> bool:
    """True iff `text` follows the strict output contract (module docstring)."""
    return strict_blocks(text) is not None


def format_reward(text: str, cfg: FormatConfig = FormatConfig()) -> float:
    """The recipe's format score (module docstring). Non-string input scores as an empty text."""
    if not isinstance(text, str):
        text = ""
    if is_strict(text):
        return float(cfg.strict)
    score = sum(cfg.tag_once if text.count(tag) == 1 else cfg.tag_bad for tag in TAGS)
    end = text.rfind(ANSWER_END)
    if end >= 0 and text[end + len(ANSWER_END):].strip():
        score += cfg.trailing
    return float(score)
