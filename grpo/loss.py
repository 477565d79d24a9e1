"""The GRPO objective written out: per-token log-probs under the sampling temperature, the clipped surrogate,
the KL penalty to the reference policy, the loss aggregation modes, and the GRPO family as arguments of one loss
(TRL 1.16 `loss_type`s, GSPO sequence-level ratios, two-sided clip, sampler/learner importance-sampling
correction, high-entropy token selection, entropy bonus).

Shapes: B rollouts (prompts x G), P prompt tokens (left-padded), C completion tokens (right-padded), V vocab.
Every function here mirrors one piece of Tunix 0.1.7 (`rl/algo_core.py: grpo_loss_fn`, `rl/common.py:
compute_per_token_logps / compute_kl_divergence / aggregate_loss`); tests/test_grpo_loss.py checks the loss and
its gradient against those functions on fixed arrays. The `loss_type` variants mirror TRL 1.16
(`trl/trainer/grpo_trainer.py: GRPOTrainer._compute_loss`, `get_high_entropy_mask`, `get_gamma_weights`, and the
vLLM importance-sampling block of `_generate_and_score_completions`); tests/test_grpo_family.py checks them against
TRL's own code.
"""

import jax
import jax.numpy as jnp
import numpy as np

# Tunix `loss_agg_mode` names. The first is the default (Tunix GRPOConfig default).
LOSS_AGG_MODES = ("sequence-mean-token-mean", "token-mean", "sequence-mean-token-sum-norm",
                  "sequence-mean-token-scale", "seq-mean-token-sum")
# k1 = Tunix kl_loss_mode "kl", k3 = "low_var_kl" (Schulman's estimator, GRPO paper eq. 4).
KL_KINDS = ("k1", "k3")
LOG_RATIO_CLIP = 20.0  # Tunix clips the log importance ratio to [-20, 20] before exp: exp(20) is still finite
GSPO_LOG_RATIO_MAX = 10.0  # Tunix's cap on the GSPO-token log ratio
# TRL 1.16 `GRPOConfig.loss_type` values. None (our default) is the Tunix path, aggregated by `loss_agg`.
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")
# How each TRL loss type aggregates, as a Tunix `loss_agg_mode` (dr_grpo: norm = rows * max_completion_length).
# TRL averages over all B rows, empty ones included, where Tunix counts only non-empty rows: see `grpo_loss`.
LOSS_TYPE_AGG = {"grpo": "sequence-mean-token-mean", "sapo": "sequence-mean-token-mean", "bnpo": "token-mean",
                 "dapo": "token-mean", "cispo": "token-mean", "vespo": "token-mean",
                 "dr_grpo": "sequence-mean-token-sum-norm", "luspo": "seq-mean-token-sum"}
IS_LEVELS = ("token", "sequence")  # TRL `importance_sampling_level`
SAMPLER_IS_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")  # TRL vllm_importance_*


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


def _log_ratio(logp_BC, old_logp_BC, m_BC, gspo: bool, level: str = "token"):
    """log(pi / pi_old) per token, clipped to +-20 (Tunix; TRL does not clip, identical inside the range).

    gspo=True (GSPO-token, GSPO eq. 11; Tunix `loss_algo="gspo-token"`): the sequence ratio s_i = mean_t log(pi/pi_old)
    carried by each token as logp - sg(logp) + sg(s_i), capped at 10 (Tunix).
    level="sequence" (GSPO eq. 5-7, arXiv 2507.18071; TRL `importance_sampling_level="sequence"`): s_i itself,
    differentiable through every token of the sequence, broadcast over its tokens."""
    lr_BC = jnp.clip(logp_BC - old_logp_BC, -LOG_RATIO_CLIP, LOG_RATIO_CLIP)
    seq_B = (lr_BC * m_BC).sum(axis=-1) / jnp.maximum(m_BC.sum(axis=-1), 1)
    if gspo:
        lr_BC = logp_BC - jax.lax.stop_gradient(logp_BC) + jax.lax.stop_gradient(seq_B)[:, None]
        lr_BC = jnp.minimum(lr_BC, GSPO_LOG_RATIO_MAX)
    elif level == "sequence":
        lr_BC = jnp.broadcast_to(seq_B[:, None], lr_BC.shape)
    elif level != "token":
        raise ValueError(f"importance sampling level must be one of {IS_LEVELS}, got {level!r}")
    return lr_BC


def sampler_is_weights(sampler_logp_BC, old_logp_BC, mask_BC, *, mode: str = "token_truncate",
                       clip_min: float | None = None, clip_max: float | None = 3.0):
    """Per-token weights correcting the sampler/learner mismatch (truncated / masked importance sampling,
    Yao et al. 2025 "Your efficient RL framework secretly brings you off-policy RL training"; TRL
    `vllm_importance_sampling_mode`, `_clip_min`, `_clip_max`; Tunix agentic `sampler_is="token"` is token_truncate
    with clip_max = `sampler_is_threshold`).

        d_t = (old_logp_t - sampler_logp_t) * m_t        (NaN sampler log-probs count as d_t = 0, as TRL)
        token_*:    w_t = exp(d_t)            sequence_*: w_i = exp(sum_t d_t), the same for every token of row i
        *_truncate: w = clip(w, clip_min, clip_max)     *_mask: w = 0 where w < clip_min or w > clip_max
    The weights carry no gradient. Returns (w_BC, metrics) with TRL's metric names
    `sampling/sampling_logp_difference/{mean,max}` (|old - sampler| over valid tokens),
    `sampling/importance_sampling_ratio/{min,mean,max}`, and `sampling/is_clipped_frac` (fraction of tokens, or
    sequences for sequence_* modes, whose weight was truncated or masked).
    """
    if mode not in SAMPLER_IS_MODES:
        raise ValueError(f"sampler IS mode must be one of {SAMPLER_IS_MODES}, got {mode!r}")
    m_BC = mask_BC.astype(jnp.float32)
    old_BC = jax.lax.stop_gradient(old_logp_BC.astype(jnp.float32))
    samp_BC = sampler_logp_BC.astype(jnp.float32)
    d_BC = jnp.nan_to_num((old_BC - samp_BC) * m_BC, nan=0.0)
    seq = mode.startswith("sequence")
    raw = jnp.exp(d_BC.sum(axis=-1, keepdims=True) if seq else d_BC)
    lo = -jnp.inf if clip_min is None else clip_min
    hi = jnp.inf if clip_max is None else clip_max
    outside = (raw < lo) | (raw > hi)
    w = jnp.clip(raw, lo, hi) if mode.endswith("truncate") else jnp.where(outside, 0.0, raw)
    valid_BC = (m_BC > 0) & ~jnp.isnan(old_BC - samp_BC)
    absd_BC = jnp.where(valid_BC, jnp.abs(old_BC - samp_BC), 0.0)
    sel = jnp.ones_like(w, bool) if seq else m_BC > 0  # TRL: every sequence, or the valid tokens
    n_sel = jnp.maximum(sel.sum(), 1)
    metrics = {
        "sampling/sampling_logp_difference/mean": absd_BC.sum() / jnp.maximum(valid_BC.sum(), 1),
        "sampling/sampling_logp_difference/max": absd_BC.max(),
        "sampling/importance_sampling_ratio/min": jnp.min(jnp.where(sel, w, jnp.inf)),
        "sampling/importance_sampling_ratio/mean": jnp.where(sel, w, 0.0).sum() / n_sel,
        "sampling/importance_sampling_ratio/max": jnp.max(jnp.where(sel, w, -jnp.inf)),
        "sampling/is_clipped_frac": (outside & sel).sum() / n_sel,
    }
    return jax.lax.stop_gradient(jnp.broadcast_to(w, m_BC.shape)), metrics


def high_entropy_mask(entropy_BC, mask_BC, top_quantile: float):
    """Keep only the top-rho fraction of valid tokens by entropy (Wang et al. 2025, "Beyond the 80/20 Rule",
    arXiv 2506.01939; TRL `top_entropy_quantile` / `GRPOTrainer.get_high_entropy_mask`):
        tau = quantile_{1 - rho}(H_t over valid tokens, linear interpolation);   keep_t = m_t and H_t >= tau
    rho = 1 keeps every token; rho = 0 keeps only the highest-entropy token(s)."""
    m = mask_BC.astype(bool)
    h_BC = jax.lax.stop_gradient(entropy_BC.astype(jnp.float32))
    tau = jnp.nanquantile(jnp.where(m, h_BC, jnp.nan), 1.0 - top_quantile)
    return m & (h_BC * m >= tau) & m.any()


def _vespo_weights(adv_B1, lr_BC, m_BC, is_w_BC, k_pos, lam_pos, k_neg, lam_neg):
    """VESPO's gamma weight of the sequence ratio w (arXiv 2602.10693; TRL `get_gamma_weights`), detached:
        log w = clip(sum_t clip(log r_t, +-20) + sum_t log w^IS_t, log 1e-8, 20)
        phi(w) = exp(lambda + k log w - lambda w)       (k, lambda by the sign of A; phi(1) = 1)"""
    lo = float(np.log(1e-8))
    log_w = (jnp.clip(lr_BC, -LOG_RATIO_CLIP, LOG_RATIO_CLIP) * m_BC).sum(-1, keepdims=True)
    if is_w_BC is not None:
        log_w = log_w + jnp.clip(jnp.log(is_w_BC), lo, LOG_RATIO_CLIP).sum(-1, keepdims=True)
    log_w = jnp.clip(log_w, lo, LOG_RATIO_CLIP)
    k = jnp.where(adv_B1 >= 0, k_pos, k_neg)
    lam = jnp.maximum(jnp.where(adv_B1 >= 0, lam_pos, lam_neg), 1e-4)
    phi = jnp.exp(lam + k * log_w - lam * jnp.exp(log_w))
    return jax.lax.stop_gradient(jnp.nan_to_num(phi, nan=0.0, posinf=0.0, neginf=0.0))


def _policy_term(loss_type, logp_BC, ratio_BC, lr_BC, adv_B1, m_BC, is_w_BC, *, epsilon, eps_hi, delta,
                 sapo_tau_pos, sapo_tau_neg, vespo):
    """Per-token policy loss of a TRL loss type (the clipped surrogate for None and grpo/bnpo/dr_grpo/dapo/luspo):
      clipped (PPO; GRPO eq. 3): max(-A r, -A clip(r, 1 - eps, 1 + eps_high)), r first capped at `delta` (two-sided
          clip, INTELLECT-2 arXiv 2505.07291, TRL `delta`): for A < 0 the loss is bounded by -delta * A
      cispo (MiniMax-M1 arXiv 2506.13585):  -sg(min(r, eps_high)) * A * logp   (eps_high is the raw cap, e.g. 5)
      sapo (arXiv 2511.20347):  -A * 4/tau * sigmoid(tau (r - 1)),  tau = sapo_tau_pos if A > 0 else sapo_tau_neg
      vespo (arXiv 2602.10693): -phi(w) * A * logp with `_vespo_weights`
    Returns (per_token_BC, unclipped_BC, clipped_BC); the last two only for the clipped surrogate."""
    if loss_type == "cispo":
        return -jax.lax.stop_gradient(jnp.minimum(ratio_BC, eps_hi)) * adv_B1 * logp_BC, None, None
    if loss_type == "sapo":
        tau = jnp.where(adv_B1 > 0, sapo_tau_pos, sapo_tau_neg)
        return -jax.nn.sigmoid(tau * (ratio_BC - 1)) * 4 / tau * adv_B1, None, None
    if loss_type == "vespo":
        return -_vespo_weights(adv_B1, lr_BC, m_BC, is_w_BC, *vespo) * adv_B1 * logp_BC, None, None
    r_BC = ratio_BC if delta is None else jnp.minimum(ratio_BC, delta)
    unclipped_BC = -adv_B1 * r_BC
    clipped_BC = -adv_B1 * jnp.clip(ratio_BC, 1 - epsilon, 1 + eps_hi)
    return jnp.maximum(unclipped_BC, clipped_BC), unclipped_BC, clipped_BC


def grpo_loss(logp_BC, advantages_B, mask_BC, *, old_logp_BC=None, ref_logp_BC=None, entropy_BC=None,
              beta: float = 0.04, epsilon: float = 0.2, epsilon_high: float | None = None, epsilon_c=None,
              kl: str = "k3", loss_agg: str = "sequence-mean-token-mean", gspo: bool = False,
              num_rows=None, num_tokens=None, norm=None,
              loss_type: str | None = None, importance_sampling: str = "token", delta: float | None = None,
              max_completion_length: int | None = None, kl_is_weight: bool = False,
              sapo_temperature_pos: float = 1.0, sapo_temperature_neg: float = 1.05,
              vespo_params: tuple = (2.0, 3.0, 3.0, 2.0),
              sampler_logp_BC=None, sampler_is_mode: str = "token_truncate",
              sampler_is_min: float | None = None, sampler_is_max: float | None = 3.0,
              top_entropy_quantile: float = 1.0, entropy_coef: float = 0.0):
    """GRPO loss (GRPO paper eq. 21 with PPO clipping; Tunix `algo_core.grpo_loss_fn`) and its metrics.

        ratio_t   = exp(clip(logp_t - old_logp_t, -20, 20)),   old_logp = stop_gradient(logp) when None
                    (num_iterations == 1: the ratio is exactly 1 but its gradient is grad logp)
        policy_t  = max(-A * ratio_t, -A * clip(ratio_t, 1 - epsilon, 1 + epsilon_high))
                    (epsilon_high = epsilon by default; DAPO's clip-higher uses 0.28; Tunix/TRL `epsilon_high`)
                    optional dual clip (Tunix `epsilon_c`): for A < 0, min(policy_t, -epsilon_c * A)
        loss      = agg(policy) + beta * agg(KL_t)      KL_t from `kl_penalty(kind=kl)`, ref_logp=None: no KL
    gspo=True is Tunix `loss_algo="gspo-token"` (GSPO, arXiv 2507.18071). `agg` is `aggregate(mode=loss_agg)`.

    The GRPO family (all off by default, so the default is exactly the Tunix loss above):
      loss_type (TRL 1.16 `loss_type`): the policy term of `_policy_term`, aggregated as TRL does (LOSS_TYPE_AGG;
          `loss_agg` is then ignored). grpo = Tunix sequence-mean-token-mean, bnpo/dapo = token-mean (dapo: pass
          the whole accumulated batch's token count as num_tokens), dr_grpo = sum / (B * max_completion_length)
          (default C), luspo = sum over tokens, mean over rows. Row means count all B rows (TRL), empty ones too.
      importance_sampling="sequence" (GSPO; TRL `importance_sampling_level`), delta (two-sided clip).
      kl_is_weight: KL_t multiplied by ratio_t (TRL `use_bias_correction_kl`, its default True; DeepSeek-V3.2).
      sampler_logp_BC: the rollout sampler's log-probs; the policy term is multiplied by `sampler_is_weights`
          (vespo folds them into phi instead, as TRL).
      top_entropy_quantile < 1: the policy term only on `high_entropy_mask` tokens (needs entropy_BC).
      entropy_coef: loss -= entropy_coef * token-mean entropy over the tokens the policy term uses
          (TRL `entropy_coef`; differentiable through entropy_BC).
    Returns (loss, metrics): pg_loss, kl (token mean of KL_t), kl_loss, clip_frac, clip_frac_lower, ppo_kl,
    entropy (aggregated like the loss), ratio_mean/max/min, tokens; plus TRL's names clip_ratio/low_mean,
    clip_ratio/high_mean, clip_ratio/region_mean, clip_ratio/low_min, clip_ratio/high_max (cispo_clip_ratio,
    vespo/phi_seq_mean for those losses), policy_loss, and the sampler IS metrics when sampler_logp_BC is given.
    """
    if loss_type is not None and loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be None or one of {LOSS_TYPES}, got {loss_type!r}")
    m_BC = mask_BC.astype(jnp.float32)
    logp_BC = logp_BC.astype(jnp.float32)
    old_BC = jax.lax.stop_gradient(logp_BC) if old_logp_BC is None else old_logp_BC.astype(jnp.float32)
    eps_hi = epsilon if epsilon_high is None else epsilon_high
    B, C = m_BC.shape
    if loss_type is None:
        agg = dict(mode=loss_agg, num_rows=num_rows, num_tokens=num_tokens, norm=norm)
    else:  # TRL's row means divide by all B rows, not only the non-empty ones
        rows = B if num_rows is None else num_rows
        agg = dict(mode=LOSS_TYPE_AGG[loss_type], num_rows=rows, num_tokens=num_tokens,
                   norm=rows * (C if max_completion_length is None else max_completion_length))
    adv_B1 = advantages_B.astype(jnp.float32)[:, None]

    lr_BC = _log_ratio(logp_BC, old_BC, m_BC, gspo, importance_sampling)
    ratio_BC = jnp.exp(lr_BC)
    is_w_BC, is_metrics = None, {}
    if sampler_logp_BC is not None:
        is_w_BC, is_metrics = sampler_is_weights(sampler_logp_BC, old_BC, m_BC, mode=sampler_is_mode,
                                                 clip_min=sampler_is_min, clip_max=sampler_is_max)
    per_token_BC, unclipped_BC, clipped_BC = _policy_term(
        loss_type, logp_BC, ratio_BC, jnp.clip(logp_BC - old_BC, -LOG_RATIO_CLIP, LOG_RATIO_CLIP), adv_B1, m_BC,
        is_w_BC, epsilon=epsilon, eps_hi=eps_hi, delta=delta, sapo_tau_pos=sapo_temperature_pos,
        sapo_tau_neg=sapo_temperature_neg, vespo=vespo_params)
    lower_BC = jnp.zeros_like(m_BC)
    if epsilon_c is not None:  # dual clip (Tunix): only changes the loss where it kicks in
        dual_BC = -epsilon_c * adv_B1
        lower_BC = ((per_token_BC > dual_BC) & (adv_B1 < 0)).astype(jnp.float32)
        per_token_BC = jnp.where(adv_B1 < 0, jnp.minimum(dual_BC, per_token_BC), per_token_BC)
    keep_BC = m_BC
    if top_entropy_quantile < 1.0:
        if entropy_BC is None:
            raise ValueError("top_entropy_quantile < 1 needs entropy_BC")
        keep_BC = high_entropy_mask(entropy_BC, m_BC, top_entropy_quantile).astype(jnp.float32)
        per_token_BC = per_token_BC * keep_BC
    if is_w_BC is not None and loss_type != "vespo":
        per_token_BC = per_token_BC * is_w_BC
    loss = pg_loss = aggregate(per_token_BC, m_BC, **agg)

    metrics = {
        "pg_loss": pg_loss,
        "clip_frac": (_masked_mean((clipped_BC > unclipped_BC).astype(jnp.float32), m_BC)
                      if clipped_BC is not None else jnp.float32(0.0)),
        "clip_frac_lower": aggregate(lower_BC, m_BC, **agg),
        "ppo_kl": _masked_mean(-(logp_BC - old_BC), m_BC),
        "ratio_mean": _masked_mean(ratio_BC, m_BC),
        "ratio_max": jnp.max(jnp.where(m_BC > 0, ratio_BC, 0.0)),
        "ratio_min": jnp.min(jnp.where(m_BC > 0, ratio_BC, jnp.inf)),
        "tokens": m_BC.sum(),
        "kl": jnp.float32(0.0),
        "kl_loss": jnp.float32(0.0),
        **is_metrics,
        **_trl_clip_metrics(loss_type, ratio_BC, adv_B1, m_BC, epsilon, eps_hi, delta, importance_sampling),
    }
    if loss_type == "vespo":
        phi = _vespo_weights(adv_B1, jnp.clip(logp_BC - old_BC, -20, 20), m_BC, is_w_BC, *vespo_params)
        metrics["vespo/phi_seq_mean"] = phi.mean()
    if ref_logp_BC is not None:
        kl_BC = kl_penalty(logp_BC, ref_logp_BC, kl)
        if kl_is_weight:  # makes the KL gradient the unbiased reverse-KL gradient off-policy (DeepSeek-V3.2)
            kl_BC = kl_BC * ratio_BC
        metrics["kl"] = (kl_BC * m_BC).sum() / jnp.maximum(m_BC.sum(), 1)
        metrics["kl_loss"] = aggregate(kl_BC, m_BC, **agg)
        if beta:
            loss = loss + beta * metrics["kl_loss"]
    metrics["policy_loss"] = loss
    if entropy_BC is not None:
        metrics["entropy"] = aggregate(jax.lax.stop_gradient(entropy_BC), m_BC, **agg)
        if entropy_coef:
            # TRL: the bonus is a plain token mean whatever the loss type, so entropy_coef means the same for all
            bonus = (entropy_BC.astype(jnp.float32) * keep_BC).sum() / jnp.maximum(keep_BC.sum(), 1)
            loss = loss - entropy_coef * bonus
    return loss, metrics


def _trl_clip_metrics(loss_type, ratio_BC, adv_B1, m_BC, epsilon, eps_hi, delta, level):
    """TRL's clip metrics: tokens (sequences at level="sequence") whose ratio lies outside the trust region on the
    side where the clip removes the gradient; means over valid tokens (all rows at sequence level)."""
    r_BC = ratio_BC if delta is None else jnp.minimum(ratio_BC, delta)
    if level == "sequence":  # one value per row, as TRL's (B, 1) ratios
        mean = lambda x: x[:, 0].mean()  # noqa: E731
        seq_mean = lambda x: x[:, 0]  # noqa: E731
    else:
        mean = lambda x: (x * m_BC).sum() / jnp.maximum(m_BC.sum(), 1)  # noqa: E731
        seq_mean = lambda x: jnp.where(m_BC.sum(-1) > 0, (x * m_BC).sum(-1) / m_BC.sum(-1), jnp.nan)  # noqa: E731
    if loss_type == "cispo":  # TRL applies delta only inside the clipped surrogate
        return {"cispo_clip_ratio": mean(((ratio_BC > eps_hi) & (adv_B1 > 0)).astype(jnp.float32))}
    if loss_type in ("sapo", "vespo"):
        return {}
    low = ((r_BC < 1 - epsilon) & (adv_B1 < 0)).astype(jnp.float32)
    high = ((r_BC > 1 + eps_hi) & (adv_B1 > 0)).astype(jnp.float32)
    return {"clip_ratio/low_mean": mean(low), "clip_ratio/high_mean": mean(high),
            "clip_ratio/region_mean": mean(jnp.maximum(low, high)),
            "clip_ratio/low_min": jnp.nanmin(seq_mean(low)), "clip_ratio/high_max": jnp.nanmax(seq_mean(high))}
