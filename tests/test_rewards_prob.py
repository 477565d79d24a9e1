"""RLPR probability reward: equality with a direct forward pass of the TINY model, baseline caching, the std
filter on a hand-made example, truncation / skipping / gating counts and NaN safety."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma_jax.config import TINY
from gemma_jax.model import forward, init_params
from gemma_jax.scoring import token_logprobs
from rewards.prob import CLOSE, OPEN, ProbRewardConfig, ProbState, extract_reasoning, pair_key, prob_rewards
from rewards.tags import render_completion

PAD_T, PAD_B = 96, 16  # fixed shapes: one compile for every score_fn call in this file

QUESTIONS = ["What is 3 plus 9?", "Write a short story about a cat named Tom."]
ANSWERS = ["The answer is 12.", "Tom the cat jumps over the lazy dog."]
REASONINGS = [["3 plus 9 is 12", "reasoning step by step about numbers", "the quick brown fox"],
              ["a cat named Tom", "Write a short story", "numbers 1 2 3"]]


@pytest.fixture(scope="module")
def params():
    return init_params(TINY, seed=3)


@pytest.fixture(scope="module")
def score_fn(params):
    """The GRPO-side score function, built here from token_logprobs on right-padded fixed-shape batches."""
    lp_fn = jax.jit(lambda p, t, m: token_logprobs(p, t, TINY, pad_mask_BT=m))

    def fn(prefixes, targets):
        assert len(prefixes) <= PAD_B
        toks, mask = np.zeros((PAD_B, PAD_T), np.int32), np.zeros((PAD_B, PAD_T), bool)
        for i, (pre, tgt) in enumerate(zip(prefixes, targets)):
            seq = list(pre) + list(tgt)
            toks[i, :len(seq)], mask[i, :len(seq)] = seq, True
        lp = np.asarray(lp_fn(params, jnp.asarray(toks), jnp.asarray(mask)))
        return [lp[i, len(pre) - 1:len(pre) - 1 + len(tgt)] for i, (pre, tgt) in enumerate(zip(prefixes, targets))]

    return fn


def _direct_mean_probs(params, seqs, starts):
    """Mean probability of seq[start:] per sequence from ONE batched forward pass (left-padded, float64 softmax)."""
    T = max(len(s) for s in seqs)
    toks = np.zeros((len(seqs), T), np.int32)
    mask = np.zeros((len(seqs), T), bool)
    for i, s in enumerate(seqs):
        toks[i, T - len(s):], mask[i, T - len(s):] = s, True
    logits, _ = forward(params, jnp.asarray(toks), TINY, pad_mask_BT=jnp.asarray(mask))
    logits = np.asarray(logits, np.float64)
    out = []
    for i, (s, st) in enumerate(zip(seqs, starts)):
        off = T - len(s)
        lg = logits[i, off + st - 1:off + len(s) - 1]
        logp = lg - lg.max(-1, keepdims=True)
        logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
        out.append(np.mean(np.exp(logp[np.arange(len(lg)), s[st:]])))
    return np.array(out)


def _batch(tokenizer):
    prompts, comps, answers = [], [], []
    for q, a, zs in zip(QUESTIONS, ANSWERS, REASONINGS):
        for z in zs:
            prompts.append(tokenizer.encode_chat(q)), comps.append(render_completion(z, "my guess")), answers.append(a)
    comps[2] = "no tags at all"  # non-strict: gated to 0 and never scored
    return prompts, comps, answers


def test_scored_layout_is_render_completion():
    for z, y in [("think", "42"), ("", "x"), ("a\nb", "long answer text")]:
        assert OPEN + z + CLOSE + y + "\n</answer>" == render_completion(z, y)
    assert extract_reasoning(render_completion(" z ", "y")) == "z"
    assert extract_reasoning("<reasoning>abc<answer>1</answer>") == "abc"
    assert extract_reasoning("plain text <answer>1</answer>") == "plain text"


def test_reward_equals_direct_forward_pass(tokenizer, params, score_fn):
    prompts, comps, answers = _batch(tokenizer)
    cfg = ProbRewardConfig(std_filter=False, max_len=PAD_T)
    rewards, m, state = prob_rewards(comps, answers, prompts, tokenizer=tokenizer, score_fn=score_fn, cfg=cfg)

    seqs, starts = [], []
    for q, a, zs in zip(QUESTIONS, ANSWERS, REASONINGS):
        for z in [""] + zs:  # baseline first: empty reasoning
            head = tokenizer.encode_chat(q) + tokenizer.encode(OPEN) + tokenizer.encode(z) + tokenizer.encode(CLOSE)
            seqs.append(head + tokenizer.encode(a)), starts.append(len(head))
            text = tokenizer.sp.DecodeIds(seqs[-1][1:])  # the scored text is the chat prompt + render_completion
            assert text == tokenizer.chat_prompt(q) + render_completion(z, a)[:-len("\n</answer>")]
    direct = _direct_mean_probs(params, seqs, starts).reshape(2, 4)
    p_direct, base_direct = direct[:, 1:].reshape(-1), np.repeat(direct[:, 0], 3)
    scored = np.array([True, True, False, True, True, True])
    np.testing.assert_allclose(m["p"][scored], p_direct[scored], rtol=1e-5, atol=0)
    np.testing.assert_allclose(m["p_base"], base_direct, rtol=1e-5, atol=0)
    expected = np.where(scored, np.clip(p_direct - base_direct, 0, 1), 0.0)
    assert np.abs(rewards - expected).max() <= 1e-5
    np.testing.assert_allclose(rewards, expected, rtol=1e-4, atol=1e-9)  # p ~ 1/512 here: check relatively too
    assert np.isnan(m["p"][2]) and rewards[2] == 0.0 and m["num_gated"] == 1
    assert (rewards > 1e-5).sum() >= 1 and (p_direct[scored] < base_direct[scored]).sum() >= 1  # both regimes hit
    assert m["num_truncated"] == 0 and m["num_skipped"] == 0 and state.baseline_computations == 2


def test_baseline_computed_once_per_pair(tokenizer, score_fn):
    prompts, comps, answers = _batch(tokenizer)
    calls = []

    def counting(prefixes, targets):
        calls.append(len(prefixes))
        return score_fn(prefixes, targets)

    state, first = None, None
    for step in range(4):
        rewards, m, state = prob_rewards(comps, answers, prompts, tokenizer=tokenizer, score_fn=counting,
                                         state=state, cfg=ProbRewardConfig(std_filter=False))
        first = rewards if first is None else first
        np.testing.assert_array_equal(rewards, first)  # the cached baseline is the one computed at step 0
        assert m["num_new_baselines"] == (2 if step == 0 else 0)
    assert calls == [5 + 2, 5, 5, 5]  # 5 strict samples each step, the 2 baselines only once
    assert state.baseline_computations == 2 and len(state.baselines) == 2
    keys = {pair_key(p, tokenizer.encode(a)) for p, a in zip(prompts, answers)}
    assert set(state.baselines) == keys


def _fake_tokenizer_score(tokenizer):
    """Pure-numpy test double: every target token gets log(q), with q read from "p=0.7" in the decoded reasoning
    (0.1 when absent, i.e. for the baseline). Records the prefixes it saw."""
    seen = []

    def fn(prefixes, targets):
        seen.extend(prefixes)
        out = []
        for pre, tgt in zip(prefixes, targets):
            m = re.search(r"p=([0-9.]+|nan)", tokenizer.sp.DecodeIds(list(pre)))
            q = float(m.group(1)) if m else 0.1
            out.append(np.full(len(tgt), np.log(q)))
        return out

    return fn, seen


def _std_batch(tokenizer, qs):
    prompts, comps, answers = [], [], []
    for k, row in enumerate(qs):
        for q in row:
            prompts.append(tokenizer.encode_chat(f"Question {k}")), answers.append(f"answer {k}")
            comps.append(render_completion(f"p={q}", "x"))
    return prompts, comps, answers


def test_std_filter_zeroes_exactly_the_low_std_prompts(tokenizer):
    fn, _ = _fake_tokenizer_score(tokenizer)
    # rewards p - 0.1: A [.8, 0, .8, 0] std .4; B [.4]*4 std 0; C [.2, .1, .2, .1] std .05; batch mean std .15
    prompts, comps, answers = _std_batch(tokenizer, [[0.9, 0.1, 0.9, 0.1], [0.5] * 4, [0.3, 0.2, 0.3, 0.2]])
    unfiltered = np.array([0.8, 0, 0.8, 0, 0.4, 0.4, 0.4, 0.4, 0.2, 0.1, 0.2, 0.1])
    kw = dict(tokenizer=tokenizer, score_fn=fn)
    r, m, s = prob_rewards(comps, answers, prompts, **kw, cfg=ProbRewardConfig(std_filter=False))
    np.testing.assert_allclose(r, unfiltered, atol=1e-12)
    # first batch: EMA = .15, B and C dropped
    r, m, s = prob_rewards(comps, answers, prompts, **kw)
    np.testing.assert_allclose(r, np.r_[unfiltered[:4], np.zeros(8)], atol=1e-12)
    assert m["num_filtered_prompts"] == 2 and s.ema_std == pytest.approx(0.15, abs=1e-12)
    # EMA 1.0 before: .99 + .0015 = .9915 drops all three
    r, m, s2 = prob_rewards(comps, answers, prompts, **kw, state=ProbState(ema_std=1.0))
    assert np.all(r == 0) and m["num_filtered_prompts"] == 3 and s2.ema_std == pytest.approx(0.9915, abs=1e-12)
    # EMA 0.01 before: .0099 + .0015 = .0114 drops only B (std 0)
    r, m, s3 = prob_rewards(comps, answers, prompts, **kw, state=ProbState(ema_std=0.01))
    np.testing.assert_allclose(r, np.r_[unfiltered[:4], np.zeros(4), unfiltered[8:]], atol=1e-12)
    assert m["num_filtered_prompts"] == 1 and s3.ema_std == pytest.approx(0.0114, abs=1e-12)
    # beta 0.3: threshold .045 < .05 keeps C
    r, m, _ = prob_rewards(comps, answers, prompts, **kw, cfg=ProbRewardConfig(std_beta=0.3))
    np.testing.assert_allclose(r, np.r_[unfiltered[:4], np.zeros(4), unfiltered[8:]], atol=1e-12)


def test_truncation_and_skipping_are_counted(tokenizer):
    fn, seen = _fake_tokenizer_score(tokenizer)
    prompt = tokenizer.encode_chat("Question 1")
    long_z = "p=0.6 " + "reasoning step by step about numbers " * 10
    comps = [render_completion(long_z, "x"), render_completion("p=0.6", "x"), render_completion(long_z, "x")]
    answers = ["answer", "answer", "a much longer reference answer " * 20]
    tail = tokenizer.encode(CLOSE)
    ans_len = len(tokenizer.encode("answer"))
    max_len = len(prompt) + len(tokenizer.encode(OPEN)) + len(tail) + ans_len + 8
    cfg = ProbRewardConfig(std_filter=False, max_len=max_len)
    r, m, s = prob_rewards(comps, answers, [prompt] * 3, tokenizer=tokenizer, score_fn=fn, cfg=cfg)
    assert m["num_truncated"] == 1 and m["num_skipped"] == 1  # the long reference does not fit at all
    z_ids = tokenizer.encode(long_z.strip())
    assert seen[0] == prompt + tokenizer.encode(OPEN) + z_ids[-8:] + tail  # the END of the reasoning is kept
    assert len(seen[0]) + ans_len == max_len
    # the cut dropped the "p=0.6" at the start, so the truncated sample scores like the baseline
    np.testing.assert_allclose(r, [0.0, 0.5, 0.0], atol=1e-12)
    assert np.isnan(m["p"][2]) and s.baseline_computations == 1


def test_gating_nan_safety_and_errors(tokenizer):
    fn, _ = _fake_tokenizer_score(tokenizer)
    prompt = tokenizer.encode_chat("Question 2")
    loose = "<reasoning>p=0.5</reasoning> <answer>x</answer> trailing"
    kw = dict(tokenizer=tokenizer, score_fn=fn)
    r, m, _ = prob_rewards([loose], ["y"], [prompt], **kw, cfg=ProbRewardConfig(std_filter=False))
    assert r[0] == 0.0 and m["num_gated"] == 1
    r, m, _ = prob_rewards([loose], ["y"], [prompt], **kw, cfg=ProbRewardConfig(std_filter=False,
                                                                                  gate_on_format=False))
    assert r[0] == pytest.approx(0.4, abs=1e-12) and m["num_gated"] == 0
    comps = [render_completion("p=nan", "x"), render_completion("p=0.3", "x")]
    r, m, s = prob_rewards(comps, ["y", "y"], [prompt] * 2, **kw, cfg=ProbRewardConfig(std_filter=False))
    np.testing.assert_allclose(r, [0.0, 0.2], atol=1e-12)
    assert m["num_nonfinite"] == 1 and np.all(np.isfinite(r))
    with pytest.raises(ValueError, match="2 completions but 1 answers"):
        prob_rewards(comps, ["y"], [prompt] * 2, **kw)
    with pytest.raises(ValueError, match="score_fn returned 0 results for 3 sequences"):
        prob_rewards(comps, ["y", "y"], [prompt] * 2, tokenizer=tokenizer, score_fn=lambda p, t: [])
    with pytest.raises(ValueError, match="log-probs for a target of"):
        prob_rewards(comps, ["y", "y"], [prompt] * 2, tokenizer=tokenizer,
                     score_fn=lambda p, t: [np.zeros(len(x) + 1) for x in t])


# Ablation switches, on a fixed copy model: a target token gets probability HIT if it already occurs in its context
# (prefix + earlier target tokens), else MISS. A reasoning that spells out the reference makes it likely.
HIT, MISS = 0.8, 0.05
STORY_Q, STORY_A = "Write a short story about a cat named Tom.", "the quick brown fox jumps over the lazy dog"
LEADS, MISSES = "the quick brown fox jumps over the lazy dog", "numbers 1 2 3"


def _copy_score(prefixes, targets):
    out = []
    for pre, tgt in zip(prefixes, targets):
        ctx = list(pre) + list(tgt)
        out.append(np.log([HIT if ctx[len(pre) + t] in ctx[:len(pre) + t] else MISS for t in range(len(tgt))]))
    return out


def _copy_mean(head, target):
    """The copy model's mean probability of `target` after `head`, computed directly in float64."""
    seq = list(head) + list(target)
    return float(np.mean([HIT if seq[t] in seq[:t] else MISS for t in range(len(head), len(seq))], dtype=np.float64))


def _heads(tokenizer, z, notebook=False):
    close = "\n</reasoning>\n" if notebook else CLOSE
    return tokenizer.encode_chat(STORY_Q) + tokenizer.encode(OPEN) + tokenizer.encode(z) + tokenizer.encode(close)


def _switch_run(tokenizer, reasonings, **cfg):
    comps = [render_completion(z, "x") for z in reasonings]
    prompts = [tokenizer.encode_chat(STORY_Q)] * len(comps)
    return prob_rewards(comps, [STORY_A] * len(comps), prompts, tokenizer=tokenizer, score_fn=_copy_score,
                        cfg=ProbRewardConfig(**cfg))


def test_switches_rank_the_leading_reasoning_first_with_exact_values(tokenizer):
    y = tokenizer.encode(STORY_A)
    p_lead, p_miss, p_base = (_copy_mean(_heads(tokenizer, z), y) for z in (LEADS, MISSES, ""))
    assert p_lead > p_base == p_miss == MISS  # none of y*'s tokens is in the prompt or in the other reasoning
    # default (debias, std filter on: one prompt, so its std equals the first EMA and is kept)
    r, m, s = _switch_run(tokenizer, [LEADS, MISSES])
    np.testing.assert_allclose(r, [p_lead - p_base, 0.0], rtol=1e-12, atol=0)
    assert m["num_filtered_prompts"] == 0 and s.ema_std == pytest.approx((p_lead - p_base) / 2, rel=1e-12)
    # debias=False: the reward is p itself, so the miss scores p_miss = MISS instead of 0
    r, m, _ = _switch_run(tokenizer, [LEADS, MISSES], debias=False, std_filter=False)
    np.testing.assert_allclose(r, [p_lead, p_miss], rtol=1e-12, atol=0)
    np.testing.assert_allclose(m["p_base"], [p_base] * 2, rtol=1e-12)  # still computed and reported
    # std_filter=False: the same rewards as the default here, and the EMA is left alone
    r, m, s = _switch_run(tokenizer, [LEADS, MISSES], std_filter=False)
    np.testing.assert_allclose(r, [p_lead - p_base, 0.0], rtol=1e-12, atol=0)
    assert s.ema_std is None and m["num_filtered_prompts"] == 0


def test_std_filter_switch_keeps_a_constant_group(tokenizer):
    """A second prompt whose rollouts all score the same (std 0 < EMA) is zeroed by the filter, kept without it."""
    y, other_q = tokenizer.encode(STORY_A), "Question 7"
    head = tokenizer.encode_chat(other_q) + tokenizer.encode(OPEN) + tokenizer.encode(LEADS) + tokenizer.encode(CLOSE)
    base = tokenizer.encode_chat(other_q) + tokenizer.encode(OPEN) + tokenizer.encode(CLOSE)
    const = _copy_mean(head, y) - _copy_mean(base, y)
    p_lead, p_base = (_copy_mean(_heads(tokenizer, z), y) for z in (LEADS, ""))
    comps = [render_completion(z, "x") for z in (LEADS, MISSES, LEADS, LEADS)]
    prompts = [tokenizer.encode_chat(STORY_Q)] * 2 + [tokenizer.encode_chat(other_q)] * 2
    kw = dict(tokenizer=tokenizer, score_fn=_copy_score)
    on, m_on, _ = prob_rewards(comps, [STORY_A] * 4, prompts, **kw)
    off, m_off, _ = prob_rewards(comps, [STORY_A] * 4, prompts, **kw, cfg=ProbRewardConfig(std_filter=False))
    assert const > 0
    np.testing.assert_allclose(off, [p_lead - p_base, 0.0, const, const], rtol=1e-12, atol=0)
    np.testing.assert_allclose(on, [p_lead - p_base, 0.0, 0.0, 0.0], rtol=1e-12, atol=0)
    assert m_on["num_filtered_prompts"] == 1 and m_off["num_filtered_prompts"] == 0


def test_notebook_defects_target_and_window(tokenizer):
    eot = tokenizer.end_of_turn_id
    wide = tokenizer.encode("<answer>\n") + tokenizer.encode(STORY_A) + tokenizer.encode("\n</answer>") + [eot]
    assert tokenizer.sp.DecodeIds(wide[:-1]) == "<answer>\n" + STORY_A + "\n</answer>"
    p_lead, p_miss, p_base = (_copy_mean(_heads(tokenizer, z, notebook=True), wide) for z in (LEADS, MISSES, ""))
    r, m, _ = _switch_run(tokenizer, [LEADS, MISSES], notebook_defects=True, std_filter=False)
    np.testing.assert_allclose(m["p"], [p_lead, p_miss], rtol=1e-12, atol=0)  # the tags and <end_of_turn> count
    np.testing.assert_allclose(r, [p_lead - p_base, 0.0], rtol=1e-12, atol=0)
    assert p_lead > p_base and m["num_truncated"] == 0
    y_only = _copy_mean(_heads(tokenizer, LEADS), tokenizer.encode(STORY_A))
    assert abs(p_lead - y_only) > 1e-3  # the wider mean is a different number
    # window: the answer-bearing words start a long reasoning; only the last 256 tokens of prefix + target are kept,
    # so the prompt and those words are cut away (the default keeps them: its budget is 1024 tokens)
    long_z = LEADS + " " + "numbers 1 2 3 " * 90
    head = _heads(tokenizer, long_z, notebook=True)
    assert len(head) + len(wide) - 256 > len(_heads(tokenizer, LEADS, notebook=True))  # the cut passes LEADS
    kept = (head + wide)[-256:]
    p_cut = _copy_mean(kept[:-len(wide)], wide)
    r, m, _ = _switch_run(tokenizer, [long_z, LEADS], notebook_defects=True, std_filter=False)
    np.testing.assert_allclose(m["p"], [p_cut, p_lead], rtol=1e-12, atol=0)
    assert m["num_truncated"] == 1 and p_cut < p_lead
    r_default, m_default, _ = _switch_run(tokenizer, [long_z], std_filter=False)
    y = tokenizer.encode(STORY_A)
    assert m_default["p"][0] == pytest.approx(_copy_mean(_heads(tokenizer, long_z), y), rel=1e-12)
    assert m_default["num_truncated"] == 0 and m_default["p"][0] > m["p"][0]


def test_notebook_defects_match_a_direct_forward_pass(tokenizer, params, score_fn):
    """The wider target goes through score_fn intact: equal to TINY's float64 probabilities of the same tokens."""
    eot = tokenizer.end_of_turn_id
    q, a, z = QUESTIONS[1], ANSWERS[1], REASONINGS[1][0]
    wide = tokenizer.encode("<answer>\n") + tokenizer.encode(a) + tokenizer.encode("\n</answer>") + [eot]
    heads = [tokenizer.encode_chat(q) + tokenizer.encode(OPEN) + tokenizer.encode(x) + tokenizer.encode(
        "\n</reasoning>\n") for x in ("", z)]
    base, p = _direct_mean_probs(params, [h + wide for h in heads], [len(h) for h in heads])
    cfg = ProbRewardConfig(notebook_defects=True, std_filter=False)
    r, m, _ = prob_rewards([render_completion(z, "x")], [a], [tokenizer.encode_chat(q)], tokenizer=tokenizer,
                           score_fn=score_fn, cfg=cfg)
    np.testing.assert_allclose([m["p"][0], m["p_base"][0]], [p, base], rtol=1e-5, atol=0)
    np.testing.assert_allclose(r, [np.clip(p - base, 0, 1)], rtol=1e-4, atol=1e-9)
