"""Sampling SFT records: chain-of-thought-length-aware long:short mix, domain mix, the stage-2 filter, and a
train/eval split with no prompt on both sides.

Every function is deterministic for a seed (`random.Random(seed)`) and returns the chosen records in their input
order (shuffling for training is the loader's job), so a result can be checked exactly.

- `mix_long_short`: a record is "long" when its reasoning has more than `long_threshold` tokens. The recipe mixes
  long and short chains of thought 1:4; we take the largest set with exactly that ratio: k = min(n_long // a,
  n_short // b) groups, k*a long and k*b short records sampled without replacement.
- `mix_domains`: target shares per domain; the largest total whose per-domain counts fit the records available,
  counts by largest remainder so they sum to the total exactly. Domains without a share are left out.
- `stage2_filter`: stage 2 of the recipe keeps completions <= 1024 tokens and raises the math share: all math
  records that fit are kept and the others are subsampled so math makes up at least `math_share`.
"""

import math
import random

from data.filters import prompt_key
from data.sft import sft_completion


def _sample_in_order(indices: list[int], k: int, rng: random.Random) -> list[int]:
    return sorted(rng.sample(indices, k))


def mix_long_short(records: list, *, count_tokens, long_threshold: int = 512, ratio=(1, 4), seed: int = 0,
                   max_records: int | None = None) -> list:
    """Exactly ratio[0]:ratio[1] long:short records (long = reasoning longer than long_threshold tokens)."""
    a, b = ratio
    if a < 1 or b < 1:
        raise ValueError(f"ratio must be two positive integers (long, short), got {ratio}")
    long_i = [i for i, r in enumerate(records) if count_tokens(r["reasoning"]) > long_threshold]
    long_set = set(long_i)
    short_i = [i for i in range(len(records)) if i not in long_set]
    k = min(len(long_i) // a, len(short_i) // b)
    if max_records is not None:
        k = min(k, max_records // (a + b))
    rng = random.Random(seed)
    chosen = _sample_in_order(long_i, k * a, rng) + _sample_in_order(short_i, k * b, rng)
    return [records[i] for i in sorted(chosen)]


def domain_counts(available: dict[str, int], shares: dict[str, float], total: int | None = None) -> dict[str, int]:
    """Per-domain counts matching `shares` (which must sum to 1) for the largest feasible total (or `total`)."""
    if not shares or any(s <= 0 for s in shares.values()) or abs(sum(shares.values()) - 1.0) > 1e-6:
        raise ValueError(f"shares must be positive and sum to 1, got {shares}")
    empty = [d for d in shares if available.get(d, 0) == 0]
    if empty:
        raise ValueError(f"shares name domain(s) {empty} with no records; available: {available}")
    # A small epsilon so that e.g. 30 / 0.3 does not floor to 99 through float rounding.
    feasible = min(math.floor(available[d] / s + 1e-9) for d, s in shares.items())
    total = feasible if total is None else min(total, feasible)
    exact = {d: total * s for d, s in shares.items()}
    counts = {d: math.floor(x + 1e-9) for d, x in exact.items()}
    by_remainder = sorted(shares, key=lambda d: (-(exact[d] - counts[d]), d))
    for d in by_remainder[:total - sum(counts.values())]:
        counts[d] += 1
    return {d: min(c, available[d]) for d, c in counts.items()}


def mix_domains(records: list, shares: dict[str, float], *, seed: int = 0, total: int | None = None) -> list:
    """Subsample so each domain has its target share of the result (domains not in `shares` are dropped)."""
    by_domain: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        by_domain.setdefault(r["domain"], []).append(i)
    counts = domain_counts({d: len(v) for d, v in by_domain.items()}, shares, total)
    rng = random.Random(seed)
    chosen = []
    for d in sorted(counts):
        chosen += _sample_in_order(by_domain[d], counts[d], rng)
    return [records[i] for i in sorted(chosen)]


def stage2_filter(records: list, *, count_tokens, max_completion_tokens: int = 1024, math_share: float = 0.5,
                  seed: int = 0) -> list:
    """Keep completions <= max_completion_tokens; then keep every math record and subsample the rest so the
    math share is at least `math_share` (unchanged when it already is)."""
    if not 0.0 < math_share <= 1.0:
        raise ValueError(f"math_share must be in (0, 1], got {math_share}")
    fits = [r for r in records if count_tokens(sft_completion(r)) <= max_completion_tokens]
    math_i = [i for i, r in enumerate(fits) if r["domain"] == "math"]
    other_i = [i for i, r in enumerate(fits) if r["domain"] != "math"]
    n_other = min(len(other_i), math.floor(len(math_i) * (1.0 - math_share) / math_share + 1e-9))
    chosen = math_i + _sample_in_order(other_i, n_other, random.Random(seed))
    return [fits[i] for i in sorted(chosen)]


def _prompt_of(record: dict) -> str:
    return record["prompt"] if "prompt" in record else record["question"]


def train_eval_split(records: list, eval_fraction: float, seed: int = 0) -> tuple[list, list]:
    """(train, eval) with about eval_fraction of the records in eval and no normalised prompt on both sides:
    records are grouped by prompt and whole groups are assigned, in a seeded random order, until eval is full."""
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        groups.setdefault(prompt_key(_prompt_of(r)), []).append(i)
    keys = sorted(groups)
    random.Random(seed).shuffle(keys)
    target, eval_i = round(eval_fraction * len(records)), []
    for k in keys:
        if len(eval_i) >= target:
            break
        eval_i += groups[k]
    eval_set = set(eval_i)
    return ([r for i, r in enumerate(records) if i not in eval_set],
            [records[i] for i in sorted(eval_set)])
