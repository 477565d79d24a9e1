"""One GRPO rollout: RL records -> chat prompts -> G samples per prompt -> rewards -> group advantages, plus the
reference (and old-policy) per-token log-probs the loss needs.

    records --chat template + domain system prompt, cut to the prompt budget--> prompt ids
            --gemma_jax.sampler.generate(num_samples=G)--> completions (rows i*G .. i*G+G-1 for prompt i)
            --rewards.router.compute_rewards (probability reward scored by the current policy)--> rewards
            --grpo.advantages.compute_advantages--> advantages
    ref log-probs: the same base params with lora=None (no copy of the weights); old log-probs (the policy before
    this step's updates) only when num_iterations > 1, else the loss uses stop_gradient(logp).
A rollout is a dict of NumPy arrays (B = prompts x G rows, P prompt bucket, C = max_new_tokens):
    prompt [B,P] (left-padded), prompt_mask [B,P], completion [B,C] (right-padded), completion_mask [B,C],
    sampler_logp [B,C] (the sampler's own temperature-scaled log-probs), advantages [B], rewards [B], and
    optionally ref_logp [B,C], old_logp [B,C].
DAPO's overlong punishment and dynamic sampling (grpo/shaping.py) act between the rewards and the advantages.
"""

import functools
import time

import jax
import numpy as np

from data.rl import system_prompt_for
from gemma_jax.sampler import bucket_length, generate
from gemma_jax.scoring import completion_logprobs, token_logprobs
from grpo.advantages import compute_advantages, zero_std_fraction
from grpo.shaping import dynamic_sample, overlong_penalty
from rewards.format import is_strict
from rewards.math import extract_answer, math_correct
from rewards.router import compute_rewards, reward_type


def record_system(record: dict) -> str:
    """The record's system prompt, else the one of its domain (data/rl.py)."""
    if record.get("system"):
        return str(record["system"])
    return system_prompt_for(str(record.get("domain") or "general"))


def prompt_ids(record: dict, tokenizer, budget: int) -> list[int]:
    """<bos> + Gemma chat template (system text prepended to the question) as ids, at most `budget` tokens.

    A prompt over the budget keeps the template's head and tail and the LAST question tokens that fit (the
    question usually ends with what is asked; Tunix likewise keeps a prompt's last tokens)."""
    if "question" not in record:
        raise ValueError(f"RL record has no 'question' (keys: {sorted(record)})")
    return tokenizer.encode_chat_within(str(record["question"]), record_system(record), budget)


@functools.partial(jax.jit, static_argnames=("cfg", "temperature"))
def _logprobs_jit(params, lora, prompt, prompt_mask, completion, completion_mask, *, cfg, temperature):
    return completion_logprobs(params, cfg, prompt, prompt_mask, completion, completion_mask, lora=lora,
                           temperature=temperature)


def rollout_logprobs(params, cfg, lora, rollout: dict, *, temperature: float, micro_batch: int) -> np.ndarray:
    """Per-token completion log-probs [B,C] under (params, lora) at the sampling temperature, `micro_batch` rows
    at a time. lora=None: the reference policy."""
    B = rollout["prompt"].shape[0]
    out = []
    for s in range(0, B, micro_batch):
        sl = slice(s, s + micro_batch)
        out.append(np.asarray(_logprobs_jit(params, lora, rollout["prompt"][sl], rollout["prompt_mask"][sl],
                                            rollout["completion"][sl], rollout["completion_mask"][sl], cfg=cfg,
                                            temperature=float(temperature))))
    return np.concatenate(out, axis=0)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _score_jit(params, lora, tokens, mask, *, cfg):
    return token_logprobs(params, tokens, cfg, pad_mask_BT=mask, lora=lora)


def make_score_fn(params, cfg, lora, *, pad_id: int = 0, max_rows: int = 16):
    """score_fn(prefixes, targets) -> [log p(target_t | prefix, target_<t)] for the probability reward, under the
    current policy (temperature 1: the reward is the model's own probability of the reference answer).

    Sequences are right-padded to a length bucket and batches to a power of two (<= max_rows), so a few shapes
    are compiled once and reused across steps."""
    def score_fn(prefixes, targets):
        seqs = [list(p) + list(t) for p, t in zip(prefixes, targets)]
        T = bucket_length(max(len(s) for s in seqs))
        out = []
        for s in range(0, len(seqs), max_rows):
            chunk = seqs[s:s + max_rows]
            rows = min(max_rows, 1 << (len(chunk) - 1).bit_length())
            tokens = np.full((rows, T), pad_id, np.int32)
            mask = np.zeros((rows, T), bool)
            for i, seq in enumerate(chunk):
                tokens[i, :len(seq)], mask[i, :len(seq)] = seq, True
            lp = np.asarray(_score_jit(params, lora, tokens, mask, cfg=cfg))
            for i, (p, t) in enumerate(zip(prefixes[s:s + max_rows], targets[s:s + max_rows])):
                out.append(lp[i, len(p) - 1:len(p) - 1 + len(t)].astype(np.float64))
        return out

    return score_fn


def exact_match(text: str, reference) -> bool:
    """The extracted answer equals the reference after strip + casefold. Not normalize_answer: its math rules make
    different text answers equal ("5 days" and "5 weeks" both become "5": unit words after a number are dropped)."""
    ans = extract_answer(text)
    return ans is not None and ans.strip().casefold() == str(reference).strip().casefold()


def text_metrics(texts, records) -> dict:
    """Strict-format rate over all samples; math accuracy (extracted answer equivalent to the reference) over the
    math records and general exact match (extracted answer == reference, `exact_match`) over the others, each NaN when
    there are none. Records are split as the reward routes them (rewards.router.reward_type)."""
    is_math = [reward_type(r, i) == "math" for i, r in enumerate(records)]
    correct = [math_correct(t, r.get("answer", "")) for t, r, m in zip(texts, records, is_math) if m]
    exact = [exact_match(t, r.get("answer", "")) for t, r, m in zip(texts, records, is_math) if not m]
    return {"strict_format_rate": float(np.mean([is_strict(t) for t in texts])) if texts else float("nan"),
            "math_accuracy": float(np.mean(correct)) if correct else float("nan"),
            "general_exact_match": float(np.mean(exact)) if exact else float("nan")}


def _reward_metrics(rewards, components, records_rep) -> dict:
    """Reward std overall and per component, and the reward mean per domain."""
    m = {"reward/std": float(np.std(rewards))}
    for name, values in components.items():
        v = np.asarray(values, np.float64)
        if v.dtype == bool or name.startswith("is_"):
            continue
        m[f"reward/{name}_std"] = float(np.std(v))
    domains = np.array([str(r.get("domain") or "general") for r in records_rep])
    for d in sorted(set(domains)):
        m[f"reward/domain_{d}_mean"] = float(np.mean(rewards[domains == d]))
    return m


def trim_padding(ro: dict, lengths, multiple: int = 16) -> dict:
    """Drop the columns that are padding in every row: the prompts' common left padding (the sampler pads them to
    a length bucket) and the completions' common right padding (rows that stop early). Widths are rounded up to
    a multiple of `multiple`, so only a few shapes (compiles) occur. Exact: positions count real tokens only, so
    the reference and policy log-probs of the kept columns do not change; it only removes work."""
    P, C = ro["prompt"].shape[1], ro["completion"].shape[1]
    keep_p = min(P, -(-int(ro["prompt_mask"].sum(1).max()) // multiple) * multiple)
    keep_c = min(C, max(multiple, -(-int(np.max(lengths)) // multiple) * multiple))
    out = dict(ro)
    for k in ("prompt", "prompt_mask"):
        out[k] = ro[k][:, P - keep_p:]
    for k in ("completion", "completion_mask", "sampler_logp"):
        if k in ro:
            out[k] = ro[k][:, :keep_c]
    return out


def _sample_and_score(params, cfg, lora, records, tokenizer, hp, reward_fn, reward_cfg, prob_state, seed,
                      score_micro_batch):
    """G samples per record and their rewards (+ the overlong penalty when hp.overlong_buffer > 0), as one dict of
    per-row values (every round of dynamic sampling has the same widths: the prompt bucket and max_new_tokens),
    the reward function's scalar metrics, the new prob state and the timings."""
    G = hp.group_size
    prompts = [prompt_ids(r, tokenizer, hp.max_prompt_tokens) for r in records]
    t0 = time.perf_counter()
    out = generate(params, cfg, prompts, max_new_tokens=hp.max_new_tokens, temperature=hp.temperature,
                   top_k=hp.top_k, top_p=hp.top_p, stop_ids=tokenizer.stop_ids, seed=seed, num_samples=G,
                   lora=lora, pad_id=tokenizer.pad_id, prompt_bucket=bucket_length(hp.max_prompt_tokens),
                   decode_weights=hp.decode_weights)
    sample_s = time.perf_counter() - t0
    texts = [tokenizer.decode(row[:n]) for row, n in zip(out.tokens, out.lengths)]
    records_rep = [r for r in records for _ in range(G)]
    prompts_rep = [p for p in prompts for _ in range(G)]

    t1 = time.perf_counter()
    score_fn = make_score_fn(params, cfg, lora, pad_id=tokenizer.pad_id, max_rows=score_micro_batch)
    kw = {} if reward_cfg is None else {"cfg": reward_cfg}
    rewards, components, reward_metrics, prob_state = reward_fn(
        texts, records_rep, tokenizer=tokenizer, score_fn=score_fn, prompt_ids=prompts_rep, prob_state=prob_state,
        **kw)
    rewards = np.asarray(rewards, np.float64)
    components = {k: np.asarray(v) for k, v in components.items()}
    if hp.overlong_buffer:  # DAPO: added to the reward before the advantages (and before dynamic sampling's filter)
        components["overlong"] = overlong_penalty(out.lengths, hp.max_new_tokens, hp.overlong_buffer,
                                                  hp.overlong_penalty)
        rewards = rewards + components["overlong"]
    rows = {"prompt": out.prompt_tokens, "prompt_mask": out.prompt_mask, "completion": out.tokens,
            "sampler_logp": out.logprobs, "lengths": out.lengths, "stopped": out.stopped, "rewards": rewards,
            "texts": texts, "records": records_rep, **{f"component/{k}": v for k, v in components.items()}}
    return rows, reward_metrics, prob_state, sample_s, time.perf_counter() - t1


def _round_seed(seed: int, k: int) -> int:
    """Sampling seed of dynamic-sampling round k (round 0: the step's own seed), a function of (seed, k) only."""
    return seed if k == 0 else int(np.random.SeedSequence([seed, k]).generate_state(1)[0] >> 1)


def rollout(params, cfg, lora, records, tokenizer, *, hp, reward_fn=compute_rewards, reward_cfg=None, prob_state=None,
            seed: int = 0, score_micro_batch: int = 16, extra_records=None):
    """Sample G completions for each record, score them and compute advantages.

    hp: grpo.learner.GRPOHParams (group_size, temperature, top_k, top_p, max_prompt_tokens, max_new_tokens,
    adv_scale, adv_estimator, mask_truncated, overlong_buffer, overlong_penalty, dynamic_sampling, max_extra_draws,
    beta, num_iterations, micro_batch). reward_fn: the recipe's domain-routed reward
    (rewards.router.compute_rewards) unless another function with its signature is given.
    extra_records(k) -> the records of dynamic-sampling round k >= 1 (needed when hp.dynamic_sampling).
    The reward, text and length metrics describe round 0 (the step's own prompts, an unbiased sample of the
    policy); the trained rows are the groups `grpo.shaping.dynamic_sample` keeps.
    Returns (rollout dict, texts of the trained rows, metrics, new prob state)."""
    G = hp.group_size
    state = {"prob": prob_state, "sample_s": 0.0, "reward_s": 0.0}

    def draw(k):
        recs = records if k == 0 else extra_records(k)
        rows, reward_metrics, state["prob"], sample_s, reward_s = _sample_and_score(
            params, cfg, lora, recs, tokenizer, hp, reward_fn, reward_cfg, state["prob"], _round_seed(seed, k),
            score_micro_batch)
        state["sample_s"], state["reward_s"] = state["sample_s"] + sample_s, state["reward_s"] + reward_s
        if k == 0:
            state["round0"], state["reward_metrics"] = rows, reward_metrics
        return rows

    if hp.dynamic_sampling:
        if extra_records is None:
            raise ValueError("dynamic_sampling needs extra_records(k): the prompts of the extra rounds")
        rows, dyn_metrics = dynamic_sample(draw, G, len(records), hp.max_extra_draws)
    else:
        rows, dyn_metrics = draw(0), {}
    advantages = compute_advantages(rows["rewards"], G, scale=hp.adv_scale, estimator=hp.adv_estimator)
    ro = training_arrays(rows, advantages, hp)
    t2 = time.perf_counter()
    add_policy_logprobs(ro, params, cfg, lora, hp)
    times = {"sample_s": state["sample_s"], "reward_s": state["reward_s"], "ref_logp_s": time.perf_counter() - t2}
    metrics = rollout_metrics(state["round0"], state["reward_metrics"], dyn_metrics, G, times)
    return ro, rows["texts"], metrics, state["prob"]


def training_arrays(rows: dict, advantages, hp) -> dict:
    """The arrays the update needs, with the columns that are padding in every row dropped (`trim_padding`).
    The sampler's log-probs travel along ([B, C] float32, cheap): the learner always logs their mismatch with its
    own log-probs and corrects for it (sampler IS) when hp.sampler_is is set."""
    C = rows["completion"].shape[1]
    mask = (np.arange(C)[None, :] < rows["lengths"][:, None]).astype(np.float32)
    if hp.mask_truncated:  # DAPO's overlong filtering: a completion cut at max_new_tokens gets no loss
        mask = mask * rows["stopped"][:, None]
    ro = {"prompt": rows["prompt"], "prompt_mask": rows["prompt_mask"], "completion": rows["completion"],
          "completion_mask": mask, "sampler_logp": rows["sampler_logp"], "advantages": advantages,
          "rewards": rows["rewards"].astype(np.float32)}
    return trim_padding(ro, rows["lengths"])


def add_policy_logprobs(ro: dict, params, cfg, lora, hp) -> None:
    """ref_logp (the base with lora=None: the reference policy) when the KL term is on, and old_logp (the policy
    before this step's updates) when num_iterations > 1; otherwise the loss uses stop_gradient(logp)."""
    if hp.beta:
        ro["ref_logp"] = rollout_logprobs(params, cfg, None, ro, temperature=hp.temperature,
                                          micro_batch=hp.micro_batch)
    if hp.num_iterations > 1:
        ro["old_logp"] = rollout_logprobs(params, cfg, lora, ro, temperature=hp.temperature,
                                          micro_batch=hp.micro_batch)


def rollout_metrics(r0: dict, reward_metrics: dict, dyn_metrics: dict, G: int, times: dict) -> dict:
    """The step's rollout metrics, from round 0 (the step's own prompts): rewards per component and domain,
    strict format and accuracy, lengths, timings; the TRL names beside ours where they mean the same."""
    components = {k.split("/", 1)[1]: v for k, v in r0.items() if k.startswith("component/")}
    lengths = r0["lengths"].astype(np.float64)
    zero_std = zero_std_fraction(r0["rewards"], G)
    clipped = float(1.0 - r0["stopped"].mean())
    return {**{k: v for k, v in reward_metrics.items() if np.isscalar(v)},
            **_reward_metrics(r0["rewards"], components, r0["records"]), **text_metrics(r0["texts"], r0["records"]),
            "frac_reward_zero_std": zero_std, "zero_std_groups": zero_std, **dyn_metrics,
            "completion_len_mean": float(lengths.mean()), "completion_len_max": float(lengths.max()),
            "completions/mean_length": float(lengths.mean()), "truncated_frac": clipped,
            "completions/clipped_ratio": clipped, **times,
            "sample_tokens_per_s": float(lengths.sum()) / max(times["sample_s"], 1e-9)}
