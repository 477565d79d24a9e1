"""Group-relative advantages for GRPO (docs/reference.md#grpo-in-tunix).

Rollouts are grouped as G consecutive rows: rows i*G .. i*G+G-1 are the G completions of prompt i. Every
completion gets one scalar advantage, broadcast over its tokens by the loss.
"""

import numpy as np

# Tunix 0.1.7 `algo_core.compute_advantages` adds 1e-6 to the group std (earlier versions used 1e-4).
STD_EPS = 1e-6

SCALINGS = ("group", "batch", "none")
ESTIMATORS = ("grpo", "rloo")  # Tunix `advantage_estimator` names


def compute_advantages(rewards_B, group_size: int, *, scale: str = "group", eps: float = STD_EPS,
                       estimator: str = "grpo") -> np.ndarray:
    """Advantage of each completion relative to its group of G = `group_size` consecutive rows.

    estimator="rloo" (REINFORCE Leave-One-Out, Ahmadian et al. 2024, arXiv 2402.14740; Tunix
        `algo_core.compute_rloo_advantages`, `advantage_estimator="rloo"`): A_i = r_i - mean_{j != i} r_j
        = G/(G-1) (r_i - mean_group), never divided by a std, so `scale` does not apply to it.
    estimator="grpo" (default), by `scale`:
    scale="group" (default; GRPO paper, Tunix `advantage_estimator="grpo"`, TRL `scale_rewards="group"`):
        A_i = (r_i - mean_group) / (std_group(ddof=1) + eps)
    scale="batch" (TRL `scale_rewards="batch"`): the group mean is subtracted, then divided by the std (ddof=1)
        over the whole batch + eps; a group with equal rewards still gets advantage 0.
    scale="none" (Dr.GRPO, arXiv 2503.20783; Tunix `advantage_estimator="drgrpo"`, TRL `scale_rewards="none"`):
        A_i = r_i - mean_group, no division, so easy/hard prompts are not up-weighted.
    A group whose rewards are all equal gets advantage 0 in every mode: it carries no learning signal.
    """
    r_B = np.asarray(rewards_B, np.float64)
    if r_B.ndim != 1:
        raise ValueError(f"rewards must be a 1-D array [B*G], got shape {r_B.shape}")
    if group_size < 1 or r_B.shape[0] % group_size:
        raise ValueError(f"rewards length {r_B.shape[0]} is not a multiple of the group size G={group_size}")
    if estimator not in ESTIMATORS:
        raise ValueError(f"advantage estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if scale not in SCALINGS:
        raise ValueError(f"advantage scale must be one of {SCALINGS}, got {scale!r}")
    r_PG = r_B.reshape(-1, group_size)
    if estimator == "rloo":
        if group_size < 2:  # as Tunix: no other sample to form a baseline
            return np.zeros_like(r_B, np.float32)
        loo_PG = (r_PG.sum(axis=1, keepdims=True) - r_PG) / (group_size - 1)
        return (r_PG - loo_PG).reshape(-1).astype(np.float32)
    centred_PG = r_PG - r_PG.mean(axis=1, keepdims=True)
    if scale == "group":
        std_P1 = r_PG.std(axis=1, ddof=1, keepdims=True) if group_size > 1 else np.zeros_like(centred_PG[:, :1])
        centred_PG = centred_PG / (std_P1 + eps)
    elif scale == "batch":
        std = r_B.std(ddof=1) if r_B.size > 1 else 0.0
        centred_PG = centred_PG / (std + eps)
    return centred_PG.reshape(-1).astype(np.float32)


def zero_std_fraction(rewards_B, group_size: int, tol: float = 1e-8) -> float:
    """Fraction of groups whose G rewards are all equal (std <= tol): those give no gradient (TRL's
    `frac_reward_zero_std`)."""
    r_PG = np.asarray(rewards_B, np.float64).reshape(-1, group_size)
    return float(np.mean(r_PG.std(axis=1) <= tol))
