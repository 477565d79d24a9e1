"""DAPO's two rollout-side changes (Yu et al. 2025, arXiv 2503.14476): the soft overlong punishment added to the
rewards, and dynamic sampling (groups whose G rewards are all equal are dropped and replaced by groups of further
prompts). Both are NumPy over one step's rows; grpo/rollout.py calls them, default off.
"""

import numpy as np


def overlong_penalty(lengths_B, max_len: int, buffer: int, factor: float = 1.0) -> np.ndarray:
    """Soft overlong punishment (DAPO eq. 13; TRL 1.16 `trl/rewards/other_rewards.py:
    get_soft_overlong_punishment(max_completion_len=max_len, soft_punish_cache=buffer)`), times `factor`:

        R(|y|) = 0                                     |y| <= L_max - L_cache
               = ((L_max - L_cache) - |y|) / L_cache   L_max - L_cache < |y| <= L_max
               = -1                                    |y| > L_max
    |y| counts the completion's tokens including its stop token (the sampler's `lengths`, as TRL's
    completion_ids). A completion cut at max_new_tokens = L_max gets -1 * factor."""
    n_B = np.asarray(lengths_B, np.float64)
    if buffer <= 0:
        return np.zeros_like(n_B)
    start = max_len - buffer
    r_B = np.where(n_B <= start, 0.0, (start - n_B) / buffer)
    return np.where(n_B > max_len, -1.0, r_B) * factor


def informative_groups(rewards_B, group_size: int, tol: float = 1e-8) -> np.ndarray:
    """[P] bool: True for the groups whose rewards are not all equal (std > tol; `zero_std_fraction`'s test)."""
    return np.asarray(rewards_B, np.float64).reshape(-1, group_size).std(axis=1) > tol


def dynamic_sample(draw, group_size: int, n_groups: int, max_extra_draws: int):
    """DAPO dynamic sampling (arXiv 2503.14476 sec. 3.2, eq. 11's constraint 0 < |correct| < G): keep the groups
    whose rewards differ, drawing further rounds until `n_groups` are kept or `max_extra_draws` extra rounds are
    spent.

    draw(k) -> dict of per-row values for round k = 0, 1, ... (NumPy arrays or lists with rows a multiple of G,
    'rewards' among them); round 0 is the step's own prompts. Groups are kept in draw order (round, then group).
    When the cap is hit with fewer than `n_groups` kept, the kept groups are repeated cyclically to `n_groups`, so
    the batch keeps its shape (one compile, micro_batch still divides it); a repeated group weighs double in the
    loss. With no group kept at all the batch is round 0 unchanged (every advantage is 0: only KL / entropy act).
    Returns (dict of the n_groups * G chosen rows, metrics)."""
    rounds, kept = [], []
    for k in range(max_extra_draws + 1):
        rounds.append(draw(k))
        for g in np.flatnonzero(informative_groups(rounds[-1]["rewards"], group_size)):
            if len(kept) < n_groups:
                kept.append((k, int(g)))
        if len(kept) == n_groups:
            break
    n_kept = len(kept)
    chosen = [kept[i % n_kept] for i in range(n_groups)] if n_kept else [(0, g) for g in range(n_groups)]

    def take(key):
        parts = [rounds[k][key][g * group_size:(g + 1) * group_size] for k, g in chosen]
        if isinstance(parts[0], np.ndarray):
            return np.concatenate(parts, axis=0)
        return [x for part in parts for x in part]

    metrics = {"dynamic/extra_draws": float(len(rounds) - 1), "dynamic/kept_groups": float(n_kept)}
    return {key: take(key) for key in rounds[0]}, metrics
