"""Per-sample reward routing and composition (docs/recipe.md#rewards).

Each record picks its reward: `reward_model_type` ("math" | "prob") when present and non-empty, else "math" if
`domain` == "math", else "prob".
    math samples:  total = math_format_weight * format + math_correctness_weight * math_reward
    other samples: total = other_format_weight * format + prob_weight * prob_reward
With the defaults (weights 1, 1, 1, 2: the recipe's "probability weight 2 vs rule weight 1") a math total is in
[-3.5, 6.0] and another total in [-2.5, 5.0]. Components are returned unweighted, 0 where a component does not
apply, with `is_math` telling which rows are math. Totals are NaN-safe: a non-finite total becomes 0 and is counted.

Ablation: `general_reward="format_only"` drops the probability reward from the non-math samples (their total is
other_format_weight * format; the prob component is 0, nothing is scored, the prob state is returned unchanged);
"prob" (the default) is the routing above.
"""

import dataclasses
from collections.abc import Sequence

import numpy as np

from rewards.format import FormatConfig, format_reward, is_strict
from rewards.math import MathRewardConfig, math_reward
from rewards.prob import ProbRewardConfig, ProbState, ScoreFn, prob_rewards

REWARD_TYPES = ("math", "prob")
GENERAL_REWARDS = ("prob", "format_only")


@dataclasses.dataclass(frozen=True)
class RewardConfig:
    math_format_weight: float = 1.0
    math_correctness_weight: float = 1.0
    other_format_weight: float = 1.0
    prob_weight: float = 2.0
    general_reward: str = "prob"  # non-math samples: "prob" (format + probability) or "format_only" (ablation)
    format: FormatConfig = FormatConfig()
    math: MathRewardConfig = MathRewardConfig()
    prob: ProbRewardConfig = ProbRewardConfig()


def reward_type(record: dict, row: int = 0) -> str:
    """"math" or "prob" for one record (module docstring); a clear error on anything else."""
    if not isinstance(record, dict):
        raise ValueError(f"reward record {row}: expected a dict, got {type(record).__name__}")
    rm = record.get("reward_model_type")
    if rm is not None and str(rm).strip():
        rm = str(rm).strip().lower()
        if rm not in REWARD_TYPES:
            raise ValueError(f"reward record {row}: reward_model_type {rm!r} is not one of {REWARD_TYPES}")
        return rm
    return "math" if str(record.get("domain", "")).strip().lower() == "math" else "prob"


def compute_rewards(completions: Sequence[str], records: Sequence[dict], *, tokenizer=None,
                    score_fn: ScoreFn | None = None, prompt_ids: Sequence[Sequence[int]] | None = None,
                    prob_state: ProbState | None = None, cfg: RewardConfig = RewardConfig()):
    """(totals [n], components {"format", "math", "prob", "is_math"}, metrics, new prob state) for n samples.

    records[i] has "answer" (the reference) and "domain" / "reward_model_type" for routing. The probability
    reward needs tokenizer, score_fn and prompt_ids (ids of each sample's chat-templated prompt).
    """
    n = len(completions)
    if len(records) != n:
        raise ValueError(f"compute_rewards: {n} completions but {len(records)} records")
    if cfg.general_reward not in GENERAL_REWARDS:
        raise ValueError(f"RewardConfig.general_reward {cfg.general_reward!r} is not one of {GENERAL_REWARDS}")
    kinds = [reward_type(r, i) for i, r in enumerate(records)]
    for i, r in enumerate(records):
        if "answer" not in r:
            raise ValueError(f"reward record {i}: missing key 'answer' (keys: {sorted(r)})")
    texts = [c if isinstance(c, str) else "" for c in completions]
    is_math = np.array([k == "math" for k in kinds], dtype=bool)
    fmt = np.array([format_reward(t, cfg.format) for t in texts], dtype=np.float64)
    mth = np.array([math_reward(t, str(r["answer"]), cfg.math) if m else 0.0
                    for t, r, m in zip(texts, records, is_math)], dtype=np.float64)
    prob, prob_metrics, new_state = np.zeros(n), {}, prob_state
    idx = np.flatnonzero(~is_math) if cfg.general_reward == "prob" else np.zeros(0, int)
    if idx.size:
        if tokenizer is None or score_fn is None or prompt_ids is None:
            raise ValueError(f"compute_rewards: {idx.size} non-math samples need tokenizer, score_fn and prompt_ids")
        if len(prompt_ids) != n:
            raise ValueError(f"compute_rewards: {n} completions but {len(prompt_ids)} prompt_ids")
        sub, prob_metrics, new_state = prob_rewards(
            [texts[i] for i in idx], [str(records[i]["answer"]) for i in idx], [prompt_ids[i] for i in idx],
            tokenizer=tokenizer, score_fn=score_fn, state=prob_state, cfg=cfg.prob)
        prob[idx] = sub
    totals = np.where(is_math, cfg.math_format_weight * fmt + cfg.math_correctness_weight * mth,
                      cfg.other_format_weight * fmt + cfg.prob_weight * prob)
    finite = np.isfinite(totals)
    totals = np.where(finite, totals, 0.0)
    metrics = _metrics(texts, totals, fmt, mth, prob, is_math, int(np.sum(~finite)))
    metrics.update({f"prob/{k}": v for k, v in prob_metrics.items()})
    return totals, {"format": fmt, "math": mth, "prob": prob, "is_math": is_math}, metrics, new_state


def _metrics(texts, totals, fmt, mth, prob, is_math, num_nonfinite) -> dict:
    def mean(x):
        return float(np.mean(x)) if x.size else float("nan")

    return {
        "reward/mean": mean(totals), "reward/min": float(np.min(totals)) if totals.size else float("nan"),
        "reward/max": float(np.max(totals)) if totals.size else float("nan"),
        "reward/format_mean": mean(fmt), "reward/strict_fraction": mean(np.array([is_strict(t) for t in texts])),
        "reward/math_mean": mean(mth[is_math]), "reward/prob_mean": mean(prob[~is_math]),
        "num_math": int(is_math.sum()), "num_prob": int((~is_math).sum()), "num_nonfinite_totals": num_nonfinite,
    }
