"""Rollout-side variants: RLOO advantages against Tunix 0.1.7 `algo_core.compute_rloo_advantages`, DAPO's soft
overlong punishment against TRL 1.16 `trl/rewards/other_rewards.py: get_soft_overlong_punishment`, DAPO dynamic
sampling on a prompt stream with a known reward pattern, and the sampler log-probs kept by the rollout."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from trl.rewards import get_soft_overlong_punishment
from tunix.rl import algo_core

from gemma_jax.config import TINY
from gemma_jax.model import init_params
from grpo.advantages import compute_advantages
from grpo.learner import GRPOHParams, extra_step_records, step_records, to_micro_batches, train_step
from grpo.rollout import rollout, rollout_logprobs
from grpo.shaping import dynamic_sample, overlong_penalty
from lora.adapters import init_lora
from train.optim import adamw_init


@pytest.mark.parametrize("G", [2, 4, 5])
def test_rloo_advantages_equal_tunix(G):
    rng = np.random.default_rng(G)
    r = rng.normal(size=6 * G).astype(np.float32)
    r[:G] = 0.5  # equal rewards: advantage 0
    ours = compute_advantages(r, G, estimator="rloo")
    ref = np.asarray(algo_core.compute_rloo_advantages(jnp.asarray(r), G))
    np.testing.assert_allclose(ours, ref, atol=1e-6)
    assert np.all(ours[:G] == 0.0)
    np.testing.assert_allclose(compute_advantages([1.0, 0.0, 0.0], 3, estimator="rloo"), [1.0, -0.5, -0.5])


def test_overlong_penalty_equals_trl():
    L_max, L_cache = 20, 8
    lengths = np.arange(0, 26)
    trl = np.asarray(get_soft_overlong_punishment(L_max, L_cache)([[1] * n for n in lengths]))
    np.testing.assert_allclose(overlong_penalty(lengths, L_max, L_cache), trl, atol=1e-12)
    # by hand: 0 up to 12 tokens, -1/8 per token in the buffer, -1 at L_max and beyond; times the factor
    np.testing.assert_allclose(overlong_penalty([12, 13, 16, 20, 21], L_max, L_cache, factor=0.5),
                               [0.0, -0.0625, -0.25, -0.5, -0.5])
    assert not overlong_penalty(lengths, L_max, 0).any()  # buffer 0: off


def _fake_draws(pattern, G=2):
    """draw(k): round k's groups, 'flat' (equal rewards) or 'mixed'; rows carry their (round, group) id."""
    def draw(k):
        rewards = np.concatenate([[1.0] * G if p == "flat" else np.arange(G, dtype=float) for p in pattern[k]])
        ids = [f"{k}.{g}" for g in range(len(pattern[k])) for _ in range(G)]
        return {"rewards": rewards, "ids": ids, "row": np.repeat(np.arange(len(pattern[k])) + 10 * k, G)}
    return draw


def test_dynamic_sample_keeps_informative_groups_in_draw_order():
    pattern = [["flat", "mixed", "flat"], ["flat", "flat", "flat"], ["mixed", "flat", "mixed"], ["mixed"] * 3]
    rows, m = dynamic_sample(_fake_draws(pattern), 2, 3, max_extra_draws=4)
    assert rows["ids"] == ["0.1", "0.1", "2.0", "2.0", "2.2", "2.2"]  # round 3 is never drawn
    np.testing.assert_array_equal(rows["row"], [1, 1, 20, 20, 22, 22])
    assert m == {"dynamic/extra_draws": 2.0, "dynamic/kept_groups": 3.0}
    # cap hit after 1 extra round with 1 group kept: it is repeated to fill the batch
    rows, m = dynamic_sample(_fake_draws(pattern), 2, 3, max_extra_draws=1)
    assert rows["ids"] == ["0.1"] * 6 and m == {"dynamic/extra_draws": 1.0, "dynamic/kept_groups": 1.0}
    # nothing informative at all: round 0 unchanged
    rows, m = dynamic_sample(_fake_draws([["flat"] * 3] * 2), 2, 3, max_extra_draws=1)
    assert rows["ids"] == ["0.0", "0.0", "0.1", "0.1", "0.2", "0.2"] and m["dynamic/kept_groups"] == 0.0


RECORDS = [{"question": f"what is {i} plus {i}?", "answer": str(2 * i), "domain": "math", "system": "Be brief.",
            "id": i} for i in range(10)]
HP = GRPOHParams(group_size=4, prompts_per_step=2, micro_batch=8, beta=0.0, temperature=1.0, top_k=None, top_p=None,
                 max_prompt_tokens=32, max_new_tokens=8)


def id_reward(texts, records, *, tokenizer, score_fn, prompt_ids, prob_state, **kw):
    """Records with an even id: reward 1 for every sample (a zero-std group); odd id j: 10 j + g for sample g."""
    r = np.array([1.0 if rec["id"] % 2 == 0 else 10 * rec["id"] + i % 4 for i, rec in enumerate(records)])
    return r, {"id": r}, {}, prob_state


@pytest.fixture(scope="module")
def model():
    params = init_params(TINY, seed=0)
    return params, init_lora(TINY, rank=4, alpha=8.0, seed=1)


def test_dynamic_sampling_rollout_keeps_exact_groups(model, tokenizer):
    params, lora = model
    seed = 3
    ids = lambda recs: [r["id"] for r in recs]  # noqa: E731
    assert ids(step_records(RECORDS, 2, 2, seed)) == [1, 4]  # the stream's prompts of step 2 ...
    assert [ids(extra_step_records(RECORDS, 2, k, 2, seed)) for k in (1, 2)] == [[5, 8], [8, 4]]  # ... its extras
    assert ids(step_records(RECORDS, 1, 2, seed)) == [0, 2]

    def run(step, **kw):
        hp = dataclasses.replace(HP, dynamic_sampling=True, **kw)
        extra = lambda k: extra_step_records(RECORDS, step, k, n=2, seed=seed)  # noqa: E731
        return rollout(params, TINY, lora, step_records(RECORDS, step, 2, seed), tokenizer, hp=hp,
                       reward_fn=id_reward, seed=11, extra_records=extra)

    ro, texts, m, _ = run(2)
    np.testing.assert_array_equal(ro["rewards"], [10, 11, 12, 13, 50, 51, 52, 53])  # id 1 (round 0), id 5 (round 1)
    assert m["dynamic/extra_draws"] == 1.0 and m["dynamic/kept_groups"] == 2.0
    assert m["frac_reward_zero_std"] == m["zero_std_groups"] == 0.5  # round 0: id 4 flat, id 1 not
    np.testing.assert_allclose(ro["advantages"], compute_advantages(ro["rewards"], 4))
    ro2, texts2, _, _ = run(2)
    assert texts2 == texts and all(np.array_equal(ro[k], ro2[k]) for k in ro)
    # step 1: ids 0 and 2 are flat; with no extra round allowed nothing is kept and round 0 is trained as is
    ro, _, m, _ = run(1, max_extra_draws=0)
    np.testing.assert_array_equal(ro["rewards"], [1.0] * 8)
    assert m["dynamic/extra_draws"] == 0.0 and m["dynamic/kept_groups"] == 0.0 and m["frac_reward_zero_std"] == 1.0
    ro, _, m, _ = run(1, max_extra_draws=4)  # round 1 (ids 3, 7) fills the batch
    np.testing.assert_array_equal(ro["rewards"], [30, 31, 32, 33, 70, 71, 72, 73])
    assert m["dynamic/extra_draws"] == 1.0
    ro0, _, m0, _ = rollout(params, TINY, lora, step_records(RECORDS, 2, 2, seed), tokenizer, hp=HP,
                            reward_fn=id_reward, seed=11)  # off: round 0 exactly
    np.testing.assert_array_equal(ro0["rewards"], [10, 11, 12, 13, 1, 1, 1, 1])
    assert "dynamic/extra_draws" not in m0


def test_rollout_keeps_sampler_logp_and_logs_the_mismatch(model, tokenizer):
    params, lora = model
    ro, _, m, _ = rollout(params, TINY, lora, RECORDS[:2], tokenizer, hp=HP, reward_fn=id_reward, seed=5)
    assert ro["sampler_logp"].shape == ro["completion"].shape  # trimmed like the completion columns
    mask = ro["completion_mask"]
    learner = rollout_logprobs(params, TINY, lora, ro, temperature=1.0, micro_batch=8)
    np.testing.assert_allclose(ro["sampler_logp"] * mask, learner * mask, atol=1e-4)  # float32 CPU: same policy
    assert m["completions/clipped_ratio"] == m["truncated_frac"]
    assert m["completions/mean_length"] == m["completion_len_mean"]
    batch, norms = to_micro_batches(ro, 8)
    out = {}
    for mode in (None, "token_truncate"):
        hp = dataclasses.replace(HP, sampler_is=mode)
        _, _, out[mode] = train_step(init_lora(TINY, rank=4, alpha=8.0, seed=1), adamw_init(lora), params, batch,
                                     norms, cfg=TINY, hp=hp)
    diff = float(out[None]["sampling/sampling_logp_difference/mean"])
    assert 0.0 <= diff < 1e-4 and float(out["token_truncate"]["sampling/sampling_logp_difference/mean"]) == diff
    assert "sampling/importance_sampling_ratio/mean" not in out[None]
    np.testing.assert_allclose(float(out["token_truncate"]["sampling/importance_sampling_ratio/mean"]), 1.0, atol=1e-3)
    np.testing.assert_allclose(float(out["token_truncate"]["loss"]), float(out[None]["loss"]), rtol=1e-3, atol=1e-6)
