"""GRPO advantages and loss checked against Tunix 0.1.7's own functions (`algo_core.compute_advantages`,
`compute_drgrpo_advantages`, `grpo_loss_fn`) on fixed arrays: the loss, its metrics, and the gradient with
respect to the logits, for k1/k3 KL, every aggregation mode, epsilon_high, dual clip and GSPO-token."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tunix.rl import algo_core, common

from gemma_jax.scoring import logprobs_from_logits as completion_logprobs
from grpo.advantages import compute_advantages, zero_std_fraction
from grpo.loss import LOSS_AGG_MODES, grpo_loss

B, P, C, V, G = 8, 3, 6, 11, 4
TEMPERATURE = 0.6


@pytest.mark.parametrize("G_", [2, 4, 5])
def test_group_advantages_equal_tunix(G_):
    rng = np.random.default_rng(G_)
    r = rng.normal(size=6 * G_).astype(np.float32)
    r[:G_] = 1.5  # one group with equal rewards: std 0
    ours = compute_advantages(r, G_)
    ref = np.asarray(algo_core.compute_advantages(r, G_))
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=1e-5)
    assert np.all(ours[:G_] == 0.0)
    ours_dr = compute_advantages(r, G_, scale="none")
    ref_dr = np.asarray(algo_core.compute_drgrpo_advantages(jnp.asarray(r), G_))
    np.testing.assert_allclose(ours_dr, ref_dr, atol=1e-6)


def test_batch_scaled_advantages_by_hand():
    r = np.array([1.0, 3.0, 2.0, 2.0], np.float32)  # groups of 2: means 2 and 2, batch std(ddof=1) = sqrt(2/3)
    a = compute_advantages(r, 2, scale="batch")
    np.testing.assert_allclose(a, np.array([-1.0, 1.0, 0.0, 0.0]) / (np.sqrt(2 / 3) + 1e-6), rtol=1e-6)
    assert zero_std_fraction(r, 2) == 0.5
    with pytest.raises(ValueError, match="multiple of the group size"):
        compute_advantages(r, 3)


class FixedLogits(nnx.Module):
    """A stand-in 'model' for Tunix whose output logits are a trainable parameter, so Tunix's grpo_loss_fn
    runs unchanged and its gradient is taken with respect to the logits themselves."""

    def __init__(self, logits):
        self.logits = nnx.Param(logits)

    def __call__(self, tokens, positions=None, cache=None, attention_mask=None, **kwargs):
        return self.logits.value, None


def _fixed_arrays(seed=0):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(B, P + C, V)).astype(np.float32) * 2
    prompt = rng.integers(2, V, size=(B, P)).astype(np.int32)
    completion = rng.integers(2, V, size=(B, C)).astype(np.int32)
    lengths = np.array([6, 1, 4, 6, 0, 3, 5, 2])  # one empty row
    completion[np.arange(C)[None, :] >= lengths[:, None]] = 0  # pad id 0, right padding
    adv = rng.normal(size=B).astype(np.float32)
    logp = np.asarray(completion_logprobs(jnp.asarray(logits[:, P - 1:-1]), jnp.asarray(completion), TEMPERATURE))
    old = (logp + rng.normal(size=logp.shape) * 0.6).astype(np.float32)  # some ratios fall outside the clip range
    ref = (logp + rng.normal(size=logp.shape) * 0.5).astype(np.float32)
    return logits, prompt, completion, adv, old, ref


def _tunix(logits, prompt, completion, adv, old, ref, *, beta, eps_high, kl, agg, gspo, epsilon_c=None):
    cfg = types.SimpleNamespace(beta=beta, epsilon=0.2, epsilon_high=0.2 if eps_high is None else eps_high,
                                epsilon_c=epsilon_c,
                                loss_algo="gspo-token" if gspo else "grpo", loss_agg_mode=agg,
                                temperature=TEMPERATURE, kl_loss_mode={"k1": "kl", "k3": "low_var_kl"}[kl],
                                kl_clamp_value=None)
    ex = common.TrainExample(
        prompt_ids=jnp.asarray(prompt), prompt_mask=jnp.asarray(prompt != 0), completion_ids=jnp.asarray(completion),
        completion_mask=jnp.asarray(completion != 0), advantages=jnp.asarray(adv),
        ref_per_token_logps=None if ref is None else jnp.asarray(ref),
        old_per_token_logps=None if old is None else jnp.asarray(old))
    graphdef, state = nnx.split(FixedLogits(jnp.asarray(logits)))

    def f(state):
        return algo_core.grpo_loss_fn(nnx.merge(graphdef, state), ex, cfg, pad_id=0, eos_id=1)

    (loss, aux), grads = jax.value_and_grad(f, has_aux=True)(state)
    return float(loss), aux, np.asarray(grads["logits"].value)


def _ours(logits, completion, adv, old, ref, *, beta, eps_high, kl, agg, gspo, epsilon_c=None):
    def f(logits):
        lp, ent = completion_logprobs(logits[:, P - 1:-1], jnp.asarray(completion), TEMPERATURE, return_entropy=True)
        return grpo_loss(lp, jnp.asarray(adv), jnp.asarray(completion != 0),
                         old_logp_BC=None if old is None else jnp.asarray(old),
                         ref_logp_BC=None if ref is None else jnp.asarray(ref), entropy_BC=ent, beta=beta,
                         epsilon=0.2, epsilon_high=eps_high, epsilon_c=epsilon_c, kl=kl, loss_agg=agg, gspo=gspo)

    (loss, m), g = jax.value_and_grad(f, has_aux=True)(jnp.asarray(logits))
    return float(loss), m, np.asarray(g)


CASES = (
    [dict(kl=kl, agg=agg, eps_high=0.28, gspo=False) for kl in ("k1", "k3") for agg in LOSS_AGG_MODES]
    + [dict(kl="k3", agg="sequence-mean-token-mean", eps_high=None, gspo=False),
       dict(kl="k3", agg="sequence-mean-token-mean", eps_high=0.28, gspo=False, epsilon_c=1.05),
       dict(kl="k3", agg="sequence-mean-token-mean", eps_high=None, gspo=True),
       dict(kl="k1", agg="token-mean", eps_high=0.28, gspo=True)]
)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_loss_and_gradient_equal_tunix(case):
    logits, prompt, completion, adv, old, ref = _fixed_arrays()
    kw = dict(beta=0.08, **case)
    t_loss, t_aux, t_grad = _tunix(logits, prompt, completion, adv, old, ref, **kw)
    o_loss, o_m, o_grad = _ours(logits, completion, adv, old, ref, **kw)
    np.testing.assert_allclose(o_loss, t_loss, atol=1e-5, rtol=1e-5)
    assert np.abs(t_grad).max() > 1e-3  # the comparison is not between two zero gradients
    np.testing.assert_allclose(o_grad, t_grad, atol=1e-5, rtol=1e-5)
    for ours, theirs in [("pg_loss", "pg_loss"), ("clip_frac", "pg_clipfrac"), ("kl", "kl"), ("kl_loss", "kl_loss"),
                         ("entropy", "entropy"), ("ppo_kl", "ppo_kl"), ("ratio_mean", "is_ratio/mean"),
                         ("ratio_max", "is_ratio/max"), ("ratio_min", "is_ratio/min"),
                         ("clip_frac_lower", "pg_clipfrac_lower")]:
        np.testing.assert_allclose(float(o_m[ours]), float(t_aux[theirs]), atol=1e-5, rtol=1e-5, err_msg=ours)
    if not case["gspo"]:
        assert float(o_m["clip_frac"]) > 0.05  # the fixed arrays exercise the clipped branch
    if case.get("epsilon_c"):
        assert float(o_m["clip_frac_lower"]) > 0.0  # and the dual clip


def test_one_iteration_without_kl_equals_tunix_and_ratio_is_one():
    logits, prompt, completion, adv, _, _ = _fixed_arrays(1)
    kw = dict(beta=0.0, eps_high=None, kl="k1", agg="sequence-mean-token-mean", gspo=False)
    t_loss, _, t_grad = _tunix(logits, prompt, completion, adv, None, None, **kw)
    o_loss, m, o_grad = _ours(logits, completion, adv, None, None, **kw)
    np.testing.assert_allclose(o_loss, t_loss, atol=1e-6)
    np.testing.assert_allclose(o_grad, t_grad, atol=1e-6)
    assert float(m["ratio_min"]) == 1.0 and float(m["ratio_max"]) == 1.0
    assert float(m["clip_frac"]) == 0.0


def test_equal_rewards_in_a_group_give_zero_policy_gradient():
    logits, _, completion, _, _, _ = _fixed_arrays(2)
    rewards = np.array([1.0, 1.0, 1.0, 1.0, 0.0, 2.0, 1.0, 3.0], np.float32)
    adv = compute_advantages(rewards, G)
    _, _, g = _ours(logits, completion, adv, None, None, beta=0.0, eps_high=None, kl="k3",
                    agg="sequence-mean-token-mean", gspo=False)
    assert np.all(g[:G] == 0.0)  # the first group (equal rewards) gets no gradient at all
    assert np.abs(g[G:]).max() > 1e-3
