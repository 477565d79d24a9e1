"""RLPR probability reward (arXiv 2506.18254; docs/reference.md#probability-reward-rlpr) for answers no rule can verify.

For a sampled completion with reasoning z and the reference answer y*:
    o'     = prompt + "<reasoning>\\n" + z + "\\n</reasoning>\\n<answer>\\n" + y*      (render_completion's layout)
    p      = mean_t exp(log pi(y*_t | o'_<t))         over the y* tokens ONLY (not the tags, not EOS)
    p_base = the same with an empty reasoning: prompt + "<reasoning>\\n\\n</reasoning>\\n<answer>\\n" + y*
             (exactly `render_completion("", y*)`), computed ONCE per (prompt ids, y* ids) and cached in the state
    reward = clip(p - p_base, 0, 1)
The scored text is the prefix of `render_completion(z, y*)` up to the end of y*: the closing "\\n</answer>" is
not needed, since a causal model's log-probs of y* do not depend on what follows.

Tokenization: the prompt ids are given (already chat-templated, with <bos>); the opening tags, z, the closing
tags and y* are encoded as separate pieces, so y*'s tokens are the same in o' and in the baseline, and cutting
the reasoning cuts whole tokens.

z is the text between <reasoning> and </reasoning> (or up to <answer> / the end if </reasoning> is missing); with
no <reasoning> tag, the text before the first <answer>. With `gate_on_format`, a non-strict completion scores 0.

Context budget: if prompt + tags + z + y* exceeds `max_len` tokens, the reasoning is cut FROM THE LEFT (its end,
nearest the answer, is kept; the prompt is never cut: that was a defect of the seed notebook) and the sample is
counted in `num_truncated`. If even an empty reasoning does not fit (or y* is empty), the sample scores 0 and is
counted in `num_skipped`.

Std filter (RLPR): per prompt (samples sharing prompt ids and y*), the std (ddof 0) of the reward over its
rollouts; EMA of the batch-mean std: ema <- decay * ema + (1 - decay) * batch_mean (initialised to the first
batch's mean); prompts whose std < beta * ema (the EMA after this batch's update) get reward 0. The state is a
frozen dataclass, returned updated, never mutated.

Ablation switches (`ProbRewardConfig`; the defaults are the reward above, unchanged):
    debias=False          reward = p (clipped to [0, 1], a no-op for a mean probability) instead of
                          clip(p - p_base, 0, 1). p_base is still computed, cached and reported in the metrics.
    std_filter=False      no std filter: the rewards are returned as computed, the EMA is not updated.
    notebook_defects=True the seed notebook's two scoring defects (docs/recipe.md#rewards), and only those:
        1. the mean is over the tokens of "<answer>\n" + y* + "\n</answer>" + <end_of_turn> (the tokenizer's
           `end_of_turn_id`), not over y* alone: the prefix ends at "\n</reasoning>\n", the target is
           encode("<answer>\n") + encode(y*) + encode("\n</answer>") + [end_of_turn_id];
        2. only the LAST `NOTEBOOK_WINDOW` (256) tokens of the scored sequence prefix + target are kept: the
           sequence is cut from the left, through the reasoning and into the prompt (bos included) if need be;
           `max_len` is not used. A cut sample is counted in `num_truncated`; a target of 256 tokens or more
           (no context token left) is skipped and counted in `num_skipped`.
        The baseline gets the same treatment (empty reasoning). Not reproduced: the notebook recomputed p_base at
        every step; it is still computed once per pair here.
Format-reward-only training for the non-math prompts is a router option (rewards/router.py `general_reward`).
"""

import dataclasses
import hashlib
from collections.abc import Callable, Sequence

import numpy as np

from rewards.format import is_strict
from rewards.tags import ANSWER_END, ANSWER_START, REASONING_END, REASONING_START

ScoreFn = Callable[[list[list[int]], list[list[int]]], list[np.ndarray]]
OPEN = f"{REASONING_START}\n"
CLOSE = f"\n{REASONING_END}\n{ANSWER_START}\n"
# notebook_defects: the prefix ends after the reasoning's closing tag; the answer tags are part of the target.
NOTEBOOK_CLOSE = f"\n{REASONING_END}\n"
NOTEBOOK_ANSWER_OPEN, NOTEBOOK_ANSWER_CLOSE = f"{ANSWER_START}\n", f"\n{ANSWER_END}"
NOTEBOOK_WINDOW = 256  # tokens of prefix + target the notebook kept


@dataclasses.dataclass(frozen=True)
class ProbRewardConfig:
    max_len: int = 1024  # token budget for prompt + tags + reasoning + y*
    gate_on_format: bool = True  # a non-strict completion scores 0
    debias: bool = True  # reward clip(p - p_base, 0, 1); False: reward p (ablation)
    std_filter: bool = True  # RLPR's EMA std filter; False: off (ablation)
    std_beta: float = 1.0
    ema_decay: float = 0.99
    notebook_defects: bool = False  # True: the seed notebook's target and 256-token window (module docstring)


@dataclasses.dataclass(frozen=True)
class ProbState:
    ema_std: float | None = None  # None until the first batch with the std filter
    baselines: dict = dataclasses.field(default_factory=dict)  # key(prompt ids, y* ids) -> p_base
    baseline_computations: int = 0  # how many p_base were ever computed (each pair once)


def pair_key(prompt_ids: Sequence[int], answer_ids: Sequence[int]) -> str:
    """Cache key of a (prompt, y*) pair: sha256 over both id sequences (length-prefixed, int64)."""
    h = hashlib.sha256()
    for ids in (prompt_ids, answer_ids):
        arr = np.asarray(ids, dtype=np.int64)
        h.update(np.int64(arr.size).tobytes())
        h.update(arr.tobytes())
    return h.hexdigest()


def extract_reasoning(text: str) -> str:
    """The reasoning z of a completion (module docstring), stripped."""
    start = text.find(REASONING_START)
    if start < 0:
        a = text.find(ANSWER_START)
        return (text if a < 0 else text[:a]).strip()
    body = text[start + len(REASONING_START):]
    for stop in (REASONING_END, ANSWER_START):
        idx = body.find(stop)
        if idx >= 0:
            return body[:idx].strip()
    return body.strip()


def _mean_prob(logp, n: int) -> float:
    logp = np.asarray(logp, dtype=np.float64).reshape(-1)
    if logp.size != n:
        raise ValueError(f"score_fn returned {logp.size} log-probs for a target of {n} tokens")
    return float(np.mean(np.exp(logp)))


def _targets(answers, tokenizer, cfg: ProbRewardConfig) -> list[list[int]]:
    """The scored token ids of each reference: y*'s, or with notebook_defects its answer tags and end-of-turn too
    ([] for an empty y*: skipped either way)."""
    ys = [tokenizer.encode(str(a).strip()) for a in answers]
    if not cfg.notebook_defects:
        return ys
    eot = getattr(tokenizer, "end_of_turn_id", None)
    if eot is None or eot < 0:
        raise ValueError("notebook_defects needs a tokenizer with an <end_of_turn> piece (end_of_turn_id)")
    head, tail = tokenizer.encode(NOTEBOOK_ANSWER_OPEN), tokenizer.encode(NOTEBOOK_ANSWER_CLOSE)
    return [head + y + tail + [eot] if y else [] for y in ys]


def _build(prompt, z_ids, open_ids, close_ids, target, cfg: ProbRewardConfig):
    """(prefix ids, number of tokens cut) within the budget, or None if even no reasoning fits.

    Default: the reasoning is cut from the left to fit max_len. notebook_defects: the last NOTEBOOK_WINDOW tokens of
    prefix + target, whatever they are (the count is of tokens cut, prompt included)."""
    if not target:
        return None
    if cfg.notebook_defects:
        seq = list(prompt) + open_ids + z_ids + close_ids
        cut = max(0, len(seq) + len(target) - NOTEBOOK_WINDOW)
        return (seq[cut:], cut) if cut < len(seq) else None
    room = cfg.max_len - len(prompt) - len(open_ids) - len(close_ids) - len(target)
    if room < 0:
        return None
    cut = max(0, len(z_ids) - room)
    return list(prompt) + open_ids + z_ids[cut:] + close_ids, cut


def _std_filter(rewards, keys, state: ProbState, cfg: ProbRewardConfig):
    """Zero the prompts whose reward std is below beta * EMA. Returns (rewards, ema, number of prompts dropped)."""
    groups = {}
    for i, k in enumerate(keys):
        groups.setdefault(k, []).append(i)
    stds = {k: float(np.std(rewards[idx])) for k, idx in groups.items()}
    if not stds:
        return rewards, state.ema_std, 0
    batch_mean = float(np.mean(list(stds.values())))
    ema = batch_mean if state.ema_std is None else cfg.ema_decay * state.ema_std + (1 - cfg.ema_decay) * batch_mean
    out, dropped = rewards.copy(), 0
    for k, idx in groups.items():
        if stds[k] < cfg.std_beta * ema:
            out[idx] = 0.0
            dropped += 1
    return out, ema, dropped


def _plan(completions, prompt_ids, targets, keys, gated, state, tokenizer, cfg):
    """The sequences to score: one per scored sample, plus one per new (prompt, y*) pair for its baseline.

    Returns (prefixes, targets, owners, counts): owners[j] is ("sample", i) or ("base", key)."""
    open_ids, close_ids = tokenizer.encode(OPEN), tokenizer.encode(NOTEBOOK_CLOSE if cfg.notebook_defects else CLOSE)
    prefixes, tgts, owners = [], [], []
    counts = {"num_truncated": 0, "num_skipped": 0}
    need_base = {}
    for i, text in enumerate(completions):
        if gated[i]:
            continue
        z_ids = tokenizer.encode(extract_reasoning(str(text)))
        built = _build(prompt_ids[i], z_ids, open_ids, close_ids, targets[i], cfg)
        if built is None:
            counts["num_skipped"] += 1
            continue
        counts["num_truncated"] += int(built[1] > 0)
        prefixes.append(built[0]), tgts.append(targets[i]), owners.append(("sample", i))
        if keys[i] not in state.baselines:
            need_base.setdefault(keys[i], i)  # each new pair once, even when repeated G times in the batch
    for key, i in need_base.items():
        prefix, _ = _build(prompt_ids[i], [], open_ids, close_ids, targets[i], cfg)  # fits: z did
        prefixes.append(prefix), tgts.append(targets[i]), owners.append(("base", key))
    return prefixes, tgts, owners, counts


def prob_rewards(completions: Sequence[str], answers: Sequence[str], prompt_ids: Sequence[Sequence[int]], *,
                 tokenizer, score_fn: ScoreFn, state: ProbState | None = None,
                 cfg: ProbRewardConfig = ProbRewardConfig()) -> tuple[np.ndarray, dict, ProbState]:
    """Per-sample RLPR rewards in [0, 1], metrics, and the new state (module docstring).

    score_fn(prefixes, targets) -> [log p of each target token given prefix + earlier target tokens]; called
    once per batch (new baselines included). Metrics: p and p_base per sample (NaN where not scored), counts of
    truncated / skipped / gated / non-finite samples and filtered prompts, the EMA and baseline counters.
    """
    n = len(completions)
    if len(answers) != n or len(prompt_ids) != n:
        raise ValueError(f"prob_rewards: {n} completions but {len(answers)} answers and {len(prompt_ids)} prompts")
    state = state or ProbState()
    targets = _targets(answers, tokenizer, cfg)
    keys = [pair_key(p, t) for p, t in zip(prompt_ids, targets)]
    gated = [cfg.gate_on_format and not is_strict(str(c)) for c in completions]
    prefixes, tgts, owners, counts = _plan(completions, prompt_ids, targets, keys, gated, state, tokenizer, cfg)

    logps = score_fn(prefixes, tgts) if prefixes else []
    if len(logps) != len(prefixes):
        raise ValueError(f"score_fn returned {len(logps)} results for {len(prefixes)} sequences")
    p, scored, new_base = np.full(n, np.nan), np.zeros(n, bool), {}
    for (kind, who), lp, t in zip(owners, logps, tgts):
        if kind == "sample":
            p[who], scored[who] = _mean_prob(lp, len(t)), True
        else:
            new_base[who] = _mean_prob(lp, len(t))
    # A non-finite baseline is used for this batch (reward 0, counted) but not cached: it is recomputed later.
    baselines = {**state.baselines, **{k: v for k, v in new_base.items() if np.isfinite(v)}}
    p_base = np.array([new_base.get(k, baselines.get(k, np.nan)) for k in keys], dtype=np.float64)
    diff = p - p_base if cfg.debias else p
    finite = np.isfinite(diff)  # NaN-safe: a non-finite score gives reward 0 and is counted
    rewards = np.clip(np.where(finite, diff, 0.0), 0.0, 1.0)

    ema, num_filtered = state.ema_std, 0
    if cfg.std_filter and n:
        rewards, ema, num_filtered = _std_filter(rewards, keys, state, cfg)
    new_state = dataclasses.replace(state, ema_std=ema, baselines=baselines,
                                    baseline_computations=state.baseline_computations + len(new_base))
    metrics = {
        "p": p, "p_base": p_base, **counts, "num_gated": int(sum(gated)),
        "num_nonfinite": int(np.sum(scored & ~finite)), "num_filtered_prompts": int(num_filtered),
        "ema_std": float("nan") if ema is None else float(ema),
        "num_new_baselines": len(new_base), "baseline_computations": new_state.baseline_computations,
    }
    return rewards.astype(np.float64), metrics, new_state
