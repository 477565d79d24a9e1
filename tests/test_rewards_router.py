"""Reward router: routing by domain / reward_model_type, exact totals and components, weights, NaN safety and
clear errors. The probability reward uses a pure-numpy test double (its model check is in test_rewards_prob.py)."""

import re

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rewards.prob import ProbRewardConfig
from rewards.router import RewardConfig, compute_rewards, reward_type
from rewards.tags import render_completion


def _fake_score(tokenizer):
    """Every target token gets log(q), q from "p=0.7" in the decoded reasoning, 0.1 without (the baseline)."""
    def fn(prefixes, targets):
        out = []
        for pre, tgt in zip(prefixes, targets):
            m = re.search(r"p=([0-9.]+|nan)", tokenizer.sp.DecodeIds(list(pre)))
            out.append(np.full(len(tgt), np.log(float(m.group(1)) if m else 0.1)))
        return out
    return fn


def test_reward_type_routing():
    assert reward_type({"domain": "math"}) == "math"
    assert reward_type({"domain": "Math "}) == "math"
    assert reward_type({"domain": "creative"}) == "prob"
    assert reward_type({}) == "prob"
    assert reward_type({"domain": "math", "reward_model_type": "prob"}) == "prob"  # explicit type wins
    assert reward_type({"domain": "science", "reward_model_type": "math"}) == "math"
    assert reward_type({"domain": "math", "reward_model_type": ""}) == "math"  # empty means absent
    assert reward_type({"domain": "math", "reward_model_type": None}) == "math"
    with pytest.raises(ValueError, match=r"reward record 3: reward_model_type 'judge'"):
        reward_type({"reward_model_type": "judge"}, 3)


def test_mixed_batch_exact_totals_and_components(tokenizer):
    comps = [
        render_completion("work", "42"),  # math, strict, exact: 3 + 3
        render_completion("work", "45") + " extra",  # math, trailing text (format 1.5), ratio .93: 0.5
        "<answer>abc</answer>",  # math: format 0.0, unparseable -0.5
        render_completion("p=0.7", "whatever"),  # prob, strict: 3 + 2 * (0.7 - 0.1)
        "p=0.9 no tags",  # prob, not strict: gated to 0; format -2
        render_completion("p=0.05", "w"),  # prob via reward_model_type, below the baseline: clip to 0
    ]
    records = [
        {"question": "q1", "answer": "42", "domain": "math"},
        {"question": "q2", "answer": "$48", "domain": "math"},
        {"question": "q3", "answer": "7", "domain": "math"},
        {"question": "q4", "answer": "a story", "domain": "creative"},
        {"question": "q5", "answer": "a story", "domain": "creative"},
        {"question": "q6", "answer": "12", "domain": "math", "reward_model_type": "prob"},
    ]
    prompt_ids = [tokenizer.encode_chat(r["question"]) for r in records]
    cfg = RewardConfig(prob=ProbRewardConfig(std_filter=False))
    totals, comp, metrics, state = compute_rewards(comps, records, tokenizer=tokenizer,
                                                   score_fn=_fake_score(tokenizer), prompt_ids=prompt_ids, cfg=cfg)
    np.testing.assert_array_equal(comp["is_math"], [True, True, True, False, False, False])
    np.testing.assert_array_equal(comp["format"], [3.0, 1.5, 0.0, 3.0, -2.0, 3.0])
    np.testing.assert_array_equal(comp["math"], [3.0, 0.5, -0.5, 0.0, 0.0, 0.0])
    np.testing.assert_allclose(comp["prob"], [0.0, 0.0, 0.0, 0.6, 0.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(totals, [6.0, 2.0, -0.5, 4.2, -2.0, 3.0], atol=1e-12)
    assert metrics["num_math"] == 3 and metrics["num_prob"] == 3 and metrics["prob/num_gated"] == 1
    assert metrics["reward/strict_fraction"] == 0.5
    assert metrics["reward/math_mean"] == pytest.approx(1.0) and metrics["reward/prob_mean"] == pytest.approx(0.2)
    assert state.baseline_computations == 2  # q4 and q6 pairs were scored; q5 was gated

    weighted = RewardConfig(math_format_weight=0.5, math_correctness_weight=2.0, other_format_weight=0.0,
                            prob_weight=10.0, prob=ProbRewardConfig(std_filter=False))
    totals, *_ = compute_rewards(comps, records, tokenizer=tokenizer, score_fn=_fake_score(tokenizer),
                                 prompt_ids=prompt_ids, cfg=weighted, prob_state=state)
    np.testing.assert_allclose(totals, [7.5, 1.75, -1.0, 6.0, 0.0, 0.0], atol=1e-12)


def test_general_reward_format_only(tokenizer):
    """Ablation: the non-math totals are the format reward alone; nothing is scored, the prob state passes through,
    and the math rows are unchanged. The two general samples differ only in reasoning, so they now tie."""
    comps = [render_completion("work", "42"), render_completion("p=0.7", "w"), render_completion("p=0.2", "w"),
             "p=0.9 no tags"]
    records = [{"question": "q", "answer": "42", "domain": "math"}] + [{"question": "q", "answer": "a story"}] * 3
    prompt_ids = [tokenizer.encode_chat("q")] * 4

    def never(prefixes, targets):
        raise AssertionError("format_only must not score")

    cfg = RewardConfig(general_reward="format_only")
    totals, comp, metrics, state = compute_rewards(comps, records, tokenizer=tokenizer, score_fn=never,
                                                   prompt_ids=prompt_ids, cfg=cfg, prob_state="untouched")
    np.testing.assert_array_equal(totals, [6.0, 3.0, 3.0, -2.0])
    np.testing.assert_array_equal(comp["prob"], np.zeros(4))
    assert state == "untouched" and not any(k.startswith("prob/") for k in metrics)
    totals, *_ = compute_rewards(comps, records, cfg=RewardConfig(general_reward="format_only",
                                                                  other_format_weight=0.5))
    np.testing.assert_array_equal(totals, [6.0, 1.5, 1.5, -1.0])  # no tokenizer or score_fn needed
    prob_cfg = RewardConfig(prob=ProbRewardConfig(std_filter=False))
    totals, *_ = compute_rewards(comps, records, tokenizer=tokenizer, score_fn=_fake_score(tokenizer),
                                 prompt_ids=prompt_ids, cfg=prob_cfg)
    np.testing.assert_allclose(totals, [6.0, 3.0 + 2 * 0.6, 3.0 + 2 * 0.1, -2.0], atol=1e-12)  # the default ranks
    with pytest.raises(ValueError, match="general_reward 'none' is not one of"):
        compute_rewards(comps, records, cfg=RewardConfig(general_reward="none"))


def test_math_only_batch_needs_no_model():
    totals, comp, metrics, state = compute_rewards(
        [render_completion("r", "1/2"), "junk"], [{"answer": "0.5", "domain": "math"}] * 2)
    np.testing.assert_array_equal(totals, [6.0, -2.5])
    assert state is None and metrics["num_prob"] == 0 and np.isnan(metrics["reward/prob_mean"])


def test_nan_safety(tokenizer):
    comps = [render_completion("p=nan", "x"), render_completion("p=0.6", "x")]
    records = [{"answer": "y", "domain": "open"}] * 2
    totals, comp, metrics, _ = compute_rewards(
        comps, records, tokenizer=tokenizer, score_fn=_fake_score(tokenizer),
        prompt_ids=[tokenizer.encode_chat("q")] * 2, cfg=RewardConfig(prob=ProbRewardConfig(std_filter=False)))
    np.testing.assert_allclose(totals, [3.0, 4.0], atol=1e-12)
    assert metrics["prob/num_nonfinite"] == 1 and np.all(np.isfinite(totals))
    nan_cfg = RewardConfig(math_format_weight=float("nan"))
    totals, _, metrics, _ = compute_rewards(["x"], [{"answer": "1", "domain": "math"}], cfg=nan_cfg)
    assert totals[0] == 0.0 and metrics["num_nonfinite_totals"] == 1


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="2 completions but 1 records"):
        compute_rewards(["a", "b"], [{"answer": "1"}])
    with pytest.raises(ValueError, match="reward record 1: missing key 'answer'"):
        compute_rewards(["a", "b"], [{"answer": "1", "domain": "math"}, {"domain": "math"}])
    with pytest.raises(ValueError, match="1 non-math samples need tokenizer, score_fn and prompt_ids"):
        compute_rewards(["a"], [{"answer": "1", "domain": "poetry"}])
    with pytest.raises(ValueError, match="reward record 0: expected a dict"):
        compute_rewards(["a"], ["not a record"])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.text(max_size=80), st.text(max_size=20), st.booleans()), min_size=1, max_size=6))
def test_arbitrary_text_never_raises_and_totals_in_range(tokenizer, rows):
    comps = [c for c, _, _ in rows]
    records = [{"answer": a, "domain": "math" if m else "other"} for _, a, m in rows]
    totals, comp, _, _ = compute_rewards(comps, records, tokenizer=tokenizer, score_fn=_fake_score(tokenizer),
                                         prompt_ids=[tokenizer.encode_chat("q")] * len(rows))
    assert np.all(np.isfinite(totals)) and np.all((comp["prob"] >= 0) & (comp["prob"] <= 1))
    lo = np.where(comp["is_math"], -3.5, -2.5)
    hi = np.where(comp["is_math"], 6.0, 5.0)
    assert np.all((totals >= lo) & (totals <= hi))
