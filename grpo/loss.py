"""The GRPO objective written out: per-token log-probs under the sampling temperature, the clipped surrogate,
the KL penalty to the reference policy, and the loss aggregation modes (REFERENCE.md §4).

Shapes: B rollouts (prompts x G), P prompt tokens (left-padded), C completion tokens (right-padded), V vocab.
Every function here mirrors one piece of Tunix 0.1.7 (`rl/algo_core.py: grpo_loss_fn`, `rl/common.py:
compute_per_token_logps / compute_kl_divergence / aggregate_loss`); tests/test_grpo_loss.py checks the loss and
its gradient against those functions on fixed arrays.
"""

import jax
import jax.numpy as jnp

# Tunix `loss_agg_mode` names. The first is the default (Tunix GRPOConfig default).
LOSS_AGG_MODES = ("sequence-mean-token-mean", "token-mean", "sequence-mean-token-sum-norm",
                  "sequence-mean-token-scale", "seq-mean-token-sum")
# k1 = Tunix kl_loss_mode "kl", k3 = "low_var_kl" (Schulman's estimator, GRPO paper eq. 4).
KL_KINDS = ("k1", "k3")
LOG_RATIO_CLIP = 20.0  # Tunix clips the log importance ratio to [-20, 20] before exp: exp(20) is still finite
GSPO_LOG_RATIO_MAX = 10.0  # Tunix's cap on the GSPO-token log ratio


def kl_penalty(logp_BC, ref_logp_BC, kind: str = "k3"):
    """Per-token estimate of KL(pi || pi_ref) from samples of pi.

    k1 = logp - ref_logp (Tunix 0.1.7 default `kl_loss_mode="kl"`).
    k3 = exp(ref_logp - logp) - (ref_logp - logp) - 1 (GRPO paper eq. 4, Tunix `"low_var_kl"`, TRL's only KL).
    Our default is k3: it is >= 0 per token and low-variance, and, used as a loss, its gradient
    (1 - pi_ref/pi) grad logp pulls the policy toward the reference; k1's gradient is grad logp, whose expectation
    under on-policy samples is zero, so as a loss term k1 barely regularises (it is a fine *metric*).
    """
    logp_BC, ref_logp_BC = logp_BC.astype(jnp.float32), ref_logp_BC.astype(jnp.float32)
    if kind == "k1":
        return logp_BC - ref_logp_BC
    if kind == "k3":
        diff_BC = ref_logp_BC - logp_BC
        return jnp.exp(diff_BC) - diff_BC - 1.0
    raise ValueError(f"KL kind must be one of {KL_KINDS}, got {kind!r}")


def aggregate(x_BC, mask_BC, mode: str = "sequence-mean-token-mean", *, num_rows=None, num_tokens=None, norm=None):
    """Reduce a per-token quantity to a scalar, as Tunix `common.aggregate_loss(loss_agg_mode=mode)`.

    With n_i tokens in row i, R non-empty rows, N tokens in all, C the padded completion length:
      sequence-mean-token-mean (default; GRPO paper): sum_i (sum_t x_it / n_i) / R
      token-mean (DAPO; TRL "dapo"/"bnpo"):           sum_it x_it / N
      sequence-mean-token-sum-norm:                   sum_it x_it / norm   (norm defaults to R, as Tunix;
          Dr.GRPO's constant normaliser is norm = R * max_new_tokens, independent of the lengths)
      sequence-mean-token-scale (Tunix DrGRPOConfig default; TRL "dr_grpo"): sum_i (sum_t x_it / norm) / R,
          norm defaulting to C
      seq-mean-token-sum:                             sum_i sum_t x_it / R
    num_rows / num_tokens override R / N: under gradient accumulation the learner passes the whole batch's
    counts, so the micro-batch losses add up exactly to the full-batch loss.
    """
    x_BC = x_BC.astype(jnp.float32)
    m_BC = mask_BC.astype(jnp.float32)
    n_B = m_BC.sum(axis=-1)
    rows = jnp.maximum((n_B > 0).sum(), 1) if num_rows is None else num_rows
    sum_B = (x_BC * m_BC).sum(axis=-1)
    if mode == "token-mean":
        return sum_B.sum() / jnp.maximum(m_BC.sum() if num_tokens is None else num_tokens, 1)
    if mode == "sequence-mean-token-mean":
        return (sum_B / jnp.maximum(n_B, 1)).sum() / rows
    if mode == "sequence-mean-token-sum-norm":
        return sum_B.sum() / jnp.maximum(rows if norm is None else norm, 1e-6)
    if mode == "sequence-mean-token-scale":
        return (sum_B / jnp.maximum(x_BC.shape[-1] if norm is None else norm, 1e-6)).sum() / rows
    if mode == "seq-mean-token-sum":
        return sum_B.sum() / rows  # rows with no tokens contribute 0 to the sum
    raise ValueError(f"loss aggregation mode must be one of {LOSS_AGG_MODES}, got {mode!r}")


def _masked_mean(x_BC, m_BC):
    """Tunix `algo_core.masked_mean` (note its + 1e-8 in the denominator), used for the logged metrics."""
    return (x_BC * m_BC).sum() / (m_BC.sum() + 1e-8)


def _log_ratio(logp_BC, old_logp_BC, m_BC, gspo: bool):
    """log(pi / pi_old) per token, clipped to +-20; for GSPO-token, the sequence-level ratio
    s_i = mean_t log(pi/pi_old) carried by each token as logp - sg(logp) + sg(s_i) (GSPO eq. 11), capped at 10."""
    lr_BC = jnp.clip(logp_BC - old_logp_BC, -LOG_RATIO_CLIP, LOG_RATIO_CLIP)
    if gspo:
        seq_B = (lr_BC * m_BC).sum(axis=-1) / jnp.maximum(m_BC.sum(axis=-1), 1)
        lr_BC = logp_BC - jax.lax.stop_gradient(logp_BC) + jax.lax.stop_gradient(seq_B)[:, None]
        lr_BC = jnp.minimum(lr_BC, GSPO_LOG_RATIO_MAX)
    return lr_BC


def grpo_loss(logp_BC, advantages_B, mask_BC, *, old_logp_BC=None, ref_logp_BC=None, entropy_BC=None,
              beta: float = 0.04, epsilon: float = 0.2, epsilon_high: float | None = None, epsilon_c=None,
              kl: str = "k3", loss_agg: str = "sequence-mean-token-mean", gspo: bool = False,
              num_rows=None, num_tokens=None, norm=None):
    """GRPO loss (GRPO paper eq. 21 with PPO clipping; Tunix `algo_core.grpo_loss_fn`) and its metrics.

        ratio_t   = exp(clip(logp_t - old_logp_t, -20, 20)),   old_logp = stop_gradient(logp) when None
                    (num_iterations == 1: the ratio is exactly 1 but its gradient is grad logp)
        policy_t  = max(-A * ratio_t, -A * clip(ratio_t, 1 - epsilon, 1 + epsilon_high))
                    (epsilon_high = epsilon by default; DAPO's clip-higher uses 0.28; Tunix/TRL `epsilon_high`)
                    optional dual clip (Tunix `epsilon_c`): for A < 0, min(policy_t, -epsilon_c * A)
        loss      = agg(policy) + beta * agg(KL_t)      KL_t from `kl_penalty(kind=kl)`, ref_logp=None: no KL
    gspo=True is Tunix `loss_algo="gspo-token"` (GSPO, arXiv 2507.18071). `agg` is `aggregate(mode=loss_agg)`.
    Returns (loss, metrics): pg_loss, kl (token mean of KL_t), kl_loss, clip_frac, clip_frac_lower, ppo_kl,
    entropy (aggregated like the loss), ratio_mean/max/min, tokens.
    """
    m_BC = mask_BC.astype(jnp.float32)
    logp_BC = logp_BC.astype(jnp.float32)
    old_BC = jax.lax.stop_gradient(logp_BC) if old_logp_BC is None else old_logp_BC.astype(jnp.float32)
    eps_hi = epsilon if epsilon_high is None else epsilon_high
    agg = dict(mode=loss_agg, num_rows=num_rows, num_tokens=num_tokens, norm=norm)
    adv_B1 = advantages_B.astype(jnp.float32)[:, None]

    lr_BC = _log_ratio(logp_BC, old_BC, m_BC, gspo)
    ratio_BC = jnp.exp(lr_BC)
    unclipped_BC = -adv_B1 * ratio_BC
    clipped_BC = -adv_B1 * jnp.clip(ratio_BC, 1 - epsilon, 1 + eps_hi)
    per_token_BC = jnp.maximum(unclipped_BC, clipped_BC)
    dual_BC = per_token_BC if epsilon_c is None else -epsilon_c * adv_B1
    lower_BC = ((per_token_BC > dual_BC) & (adv_B1 < 0)).astype(jnp.float32)
    per_token_BC = jnp.where(adv_B1 < 0, jnp.minimum(dual_BC, per_token_BC), per_token_BC)
    loss = pg_loss = aggregate(per_token_BC, m_BC, **agg)

    metrics = {
        "pg_loss": pg_loss,
        "clip_frac": _masked_mean((clipped_BC > unclipped_BC).astype(jnp.float32), m_BC),
        "clip_frac_lower": aggregate(lower_BC, m_BC, **agg),
        "ppo_kl": _masked_mean(-(logp_BC - old_BC), m_BC),
        "ratio_mean": _masked_mean(ratio_BC, m_BC),
        "ratio_max": jnp.max(jnp.where(m_BC > 0, ratio_BC, 0.0)),
        "ratio_min": jnp.min(jnp.where(m_BC > 0, ratio_BC, jnp.inf)),
        "tokens": m_BC.sum(),
        "kl": jnp.float32(0.0),
        "kl_loss": jnp.float32(0.0),
    }
    if ref_logp_BC is not None:
        kl_BC = kl_penalty(logp_BC, ref_logp_BC, kl)
        metrics["kl"] = (kl_BC * m_BC).sum() / jnp.maximum(m_BC.sum(), 1)
        metrics["kl_loss"] = aggregate(kl_BC, m_BC, **agg)
        if beta:
            loss = loss + beta * metrics["kl_loss"]
    if entropy_BC is not None:
        metrics["entropy"] = aggregate(jax.lax.stop_gradient(entropy_BC), m_BC, **agg)
    return loss, metrics
