"""Rewards for GRPO: the strict format reward, the math answer cascade, the RLPR probability reward and the
per-sample router that composes them. No model code is imported here: the probability reward takes a scoring
function built by the caller."""

from rewards.format import FormatConfig, format_reward, format_reward_range, is_strict
from rewards.math import MathRewardConfig, extract_answer, is_equivalent, math_reward, math_reward_range, parse_number
from rewards.prob import ProbRewardConfig, ProbState, prob_rewards
from rewards.router import RewardConfig, compute_rewards, reward_type
from rewards.tags import render_completion

__all__ = [
    "FormatConfig", "format_reward", "format_reward_range", "is_strict", "MathRewardConfig", "extract_answer",
    "is_equivalent", "math_reward", "math_reward_range", "parse_number", "ProbRewardConfig", "ProbState",
    "prob_rewards", "RewardConfig", "compute_rewards", "reward_type", "render_completion",
]
