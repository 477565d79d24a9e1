"""The output contract's tags, shared by data preparation (which renders completions) and the rewards (which
parse them), so both sides always agree on one format."""

REASONING_START, REASONING_END = "<reasoning>", "</reasoning>"
ANSWER_START, ANSWER_END = "<answer>", "</answer>"


def render_completion(reasoning: str, answer: str) -> str:
    """The canonical completion text the model is trained to produce (and the strict format reward accepts)."""
    return f"{REASONING_START}\n{reasoning.strip()}\n{REASONING_END}\n{ANSWER_START}\n{answer.strip()}\n{ANSWER_END}"
