"""Sampler tests: greedy parity with Tunix's Sampler and with teacher forcing, log-probs, padding invariance,
top-k/top-p filters vs NumPy and Tunix, sampled frequencies, stop handling, shared-prefill samples, the stacked
decode weights (same output, less memory), the CLI."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_utils import random_params
from tunix_utils import IdTokenizer, to_tunix

import gemma_jax as g
from gemma_jax import decode
from gemma_jax.config import TINY_GEMMA4
from gemma_jax.model import abstract_params, forward, init_params
from gemma_jax.sampler import (
    argmax_first,
    bucket_length,
    decode_segments,
    filter_logits,
    generate,
    pad_prompts,
    sample_logits,
)

N_NEW = 24  # > the TINY window (8), so decoding crosses the sliding window


def _diverse_params(cfg, seed):
    """Random weights whose greedy output does not collapse to one repeated token: with the default init the tied
    embedding dominates the residual and the model predicts its input again. A smaller embedding, larger layer
    weights and non-zero norms give ~25 distinct tokens in 32 greedy steps."""
    if cfg.layer_list:  # Gemma 4: norms scale by w (around 1), layers listed
        p = random_params(cfg, seed)
        layers = [{k: v if "norm" in k or k == "layer_scalar" else 2.0 * v for k, v in w.items()}
                  for w in p["layers"]]
        return {**p, "layers": layers, "embed": 0.3 * p["embed"]}
    p = init_params(cfg, seed)
    key = jax.random.key(seed + 100)
    layers = {k: (0.3 * jax.random.normal(jax.random.fold_in(key, i), v.shape) if "norm" in k else 2.0 * v)
              for i, (k, v) in enumerate(p["layers"].items())}
    return {**p, "layers": layers, "embed": 0.3 * p["embed"]}


@pytest.fixture(scope="module")
def params():
    return _diverse_params(g.TINY, 0)


MIXED = [5, 11, 16]  # prompt lengths of the shared greedy batch: one left-padded bucket of 16


@pytest.fixture(scope="module")
def greedy_mixed(params):
    """(prompts, output): greedy, no stop ids, a left-padded batch of three prompts of different lengths."""
    prompts = _prompts(MIXED)
    return prompts, generate(params, g.TINY, prompts, max_new_tokens=N_NEW, temperature=0.0, stop_ids=())


def _prompts(lengths, seed=0, vocab=512):
    rs = np.random.RandomState(seed)
    return [[2] + rs.randint(4, vocab, n - 1).tolist() for n in lengths]


def _teacher_forced(params, cfg, prompts, completions):
    """Per row, logits [n, V] predicting each completion token from the unpadded prompt + completion so far.
    Rows are right-padded to one [4k, 48] shape (padding after a token cannot change it: causal attention), so
    every test shares one compile of the forward."""
    seqs = [list(p) + list(c) for p, c in zip(prompts, completions)]
    rows = -(-len(seqs) // 4) * 4
    tokens, mask = np.zeros((rows, 48), np.int32), np.zeros((rows, 48), bool)
    for i, s in enumerate(seqs):
        tokens[i, : len(s)], mask[i, : len(s)] = s, True
    logits = np.asarray(forward(params, jnp.asarray(tokens), cfg, pad_mask_BT=jnp.asarray(mask))[0])
    return [logits[i, len(p) - 1: len(s) - 1] for i, (p, s) in enumerate(zip(prompts, seqs))]


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_greedy_matches_tunix_sampler():
    """Same weights, same unpadded prompts (Tunix's sliding mask differs from HF on left-padded rows, see
    test_model): identical greedy tokens, and Tunix's log-probs (under the raw logits) within 1e-5."""
    from tunix.generate import sampler as tunix_sampler

    cfg = dataclasses.replace(g.TINY, query_pre_attn_scalar=16)  # Tunix hard-codes head_dim**-0.5
    params = _diverse_params(cfg, 1)
    prompts = _prompts([16] * 3, seed=1)
    stop_ids = (1, 7)
    cache_cfg = tunix_sampler.CacheConfig(cache_size=64, num_layers=cfg.num_layers, num_kv_heads=cfg.num_kv_heads,
                                          head_dim=cfg.head_dim)
    sampler = tunix_sampler.Sampler(to_tunix(params, cfg), IdTokenizer(), cache_cfg)
    ref = sampler([" ".join(map(str, p)) for p in prompts], max_generation_steps=N_NEW, max_prompt_length=16,
                  temperature=0.0, eos_tokens=list(stop_ids), return_logprobs=True)
    assert np.array_equal(ref.padded_prompt_tokens, np.asarray(prompts))  # Tunix saw our ids, unpadded
    out = generate(params, cfg, prompts, max_new_tokens=N_NEW, temperature=0.0, stop_ids=stop_ids)
    for i in range(len(prompts)):
        n = out.lengths[i] - int(out.stopped[i])  # Tunix's tokens stop before the stop id
        assert out.tokens[i, :n].tolist() == ref.tokens[i].tolist()
        assert np.abs(out.logprobs[i, :n] - np.asarray(ref.logprobs[i])).max() <= 1e-5
    assert len({t for row in out.tokens.tolist() for t in row}) >= 20  # a non-degenerate output


@pytest.mark.parametrize("k,p,temp", [(None, 0.8, 0.7), (10, 0.9, 1.0), (5, None, 1.3), (None, None, 0.6)])
def test_sampling_step_matches_tunix_sample_top_p(k, p, temp):
    """For one row our per-row key draws the same Gumbel noise as Tunix's batch key, so the filtered draw must be
    the same token for each of 200 keys, and the log-prob (under logits / T) the same number."""
    from tunix.generate.sampler import sample_top_p

    logits = jnp.asarray(2.0 * np.random.RandomState(2).randn(1, 64), jnp.float32)

    def both(key):
        ref_tok, ref_lp = sample_top_p(logits[:, None, :], key, temp, 1.0 if p is None else p, k,
                                       return_logprobs=True)
        tok, lp, _ = sample_logits(logits, key[None], temp, top_k=k, top_p=p)
        return ref_tok[0], ref_lp[0], tok[0], lp[0]

    keys = jax.vmap(jax.random.fold_in, (None, 0))(jax.random.PRNGKey(3), jnp.arange(200))
    ref_tok, ref_lp, tok, lp = map(np.asarray, jax.jit(jax.vmap(both))(keys))
    assert tok.tolist() == ref_tok.tolist()
    assert np.abs(lp - ref_lp).max() <= 1e-6
    assert len(set(tok.tolist())) >= 3


def test_greedy_is_teacher_forced_argmax_with_logprobs(params, greedy_mixed):
    """Left-padded batch of different lengths: every greedy token is the argmax of the teacher-forced forward
    on the unpadded prompt, and both log-prob outputs equal its log-softmax at that token (<= 1e-5)."""
    prompts, out = greedy_mixed
    assert out.prompt_tokens.shape == (3, 16) and out.prompt_mask.sum(1).tolist() == MIXED
    for i, logits in enumerate(_teacher_forced(params, g.TINY, prompts, out.tokens)):
        assert out.tokens[i].tolist() == logits.argmax(-1).tolist()
        ref = np.take_along_axis(_log_softmax(logits), out.tokens[i][:, None], -1)[:, 0]
        assert np.abs(out.logprobs[i] - ref).max() <= 1e-5
        assert np.abs(out.raw_logprobs[i] - ref).max() <= 1e-5
    assert len({t for row in out.tokens.tolist() for t in row}) >= 20  # a non-degenerate output


def test_sampled_logprobs_and_filter_membership(params):
    """Sampling with T=0.8, top_k=40, top_p=0.9: logprobs == log_softmax(forward / T) and raw_logprobs ==
    log_softmax(forward) at the sampled tokens (<= 1e-5), and every sampled token is inside the top-k/top-p set
    of the teacher-forced logits."""
    cfg, temp, k, top_p = g.TINY, 0.8, 40, 0.9
    prompts = _prompts([7, 16])
    out = generate(params, cfg, prompts, max_new_tokens=N_NEW, temperature=temp, top_k=k, top_p=top_p,
                   stop_ids=(), seed=5, num_samples=2)
    for r, logits in enumerate(_teacher_forced(params, cfg, [p for p in prompts for _ in range(2)], out.tokens)):
        toks = out.tokens[r][:, None]
        assert np.abs(out.logprobs[r] - np.take_along_axis(_log_softmax(logits / temp), toks, -1)[:, 0]).max() <= 1e-5
        assert np.abs(out.raw_logprobs[r] - np.take_along_axis(_log_softmax(logits), toks, -1)[:, 0]).max() <= 1e-5
        kept = np.isfinite(_numpy_filter(logits / temp, k, top_p))
        assert np.take_along_axis(kept, toks, -1).all()
    assert not np.array_equal(out.tokens[0], out.tokens[1])  # the two samples of a prompt differ


def test_left_padded_batch_equals_each_prompt_alone(params, greedy_mixed):
    """Greedy tokens (and log-probs) of a mixed-length left-padded batch equal each prompt decoded alone."""
    cfg = g.TINY
    prompts, batch = greedy_mixed
    for i, p in enumerate(prompts):
        alone = generate(params, cfg, [p], max_new_tokens=N_NEW, temperature=0.0, stop_ids=(), prompt_bucket=16)
        assert int(alone.prompt_mask.sum()) == len(p)
        assert batch.tokens[i].tolist() == alone.tokens[0].tolist()
        assert np.abs(batch.logprobs[i] - alone.logprobs[0]).max() <= 1e-5


def _numpy_filter(x, top_k, top_p):
    """Reference for Tunix's sample_top_p filter in NumPy: stable descending sort (ties to the lower id), keep
    top_k, then drop sorted tokens whose exclusive cumulative softmax mass over the kept ones exceeds top_p."""
    out = np.full_like(x, -np.inf)
    for b in range(x.shape[0]):
        order = np.argsort(-x[b], kind="stable")[: top_k or x.shape[1]]
        vals = x[b, order]
        probs = np.exp(vals - vals.max())
        probs /= probs.sum()
        keep = np.ones(len(order), bool) if top_p is None else (np.cumsum(probs) - probs) <= top_p
        out[b, order[keep]] = vals[keep]
    return out


@pytest.mark.parametrize("top_k,top_p", [(None, None), (3, None), (None, 0.5), (4, 0.7), (1, 0.99), (None, 0.05)])
def test_filter_logits_matches_numpy(top_k, top_p):
    rs = np.random.RandomState(6)
    x = rs.randn(5, 12).astype(np.float32) * 2
    x[0, 3] = x[0, 7] = x[0].max() + 1  # a tie at the top: top_k=1 keeps the lower id
    got = np.asarray(filter_logits(jnp.asarray(x), top_k, top_p))
    ref = _numpy_filter(x, top_k, top_p)
    assert np.array_equal(np.isfinite(got), np.isfinite(ref))
    assert np.array_equal(got[np.isfinite(got)], ref[np.isfinite(ref)])
    if top_k == 1:
        assert np.isfinite(got[0]).nonzero()[0].tolist() == [3]


@pytest.mark.parametrize("top_k,top_p", [(None, None), (4, 0.8)])
def test_sampled_frequencies_match_softmax(top_k, top_p):
    """200,000 draws on a 6-token vocabulary (fixed seed) against softmax(logits / T) renormalised over the
    filter's kept set. Pearson's chi-square over the kept tokens must stay below 22.46, the 99.9% quantile of
    chi-square with 5 dof (fewer dof when fewer tokens are kept, so the bound is conservative); a wrong
    temperature (e.g. T=1) gives a statistic in the thousands. Filtered-out tokens must never be drawn."""
    n, temp = 200_000, 0.7
    logits = np.array([[1.0, 0.5, -0.3, 2.0, 0.0, -1.5]], np.float32)
    keys = jax.random.split(jax.random.key(11), n)
    toks, lp, raw = jax.jit(lambda k: sample_logits(jnp.broadcast_to(jnp.asarray(logits), (n, 6)), k, temp,
                                                    top_k=top_k, top_p=top_p))(keys)
    counts = np.bincount(np.asarray(toks), minlength=6)
    expected_logits = _numpy_filter(logits / temp, top_k, top_p)[0]
    kept = np.isfinite(expected_logits)
    p = np.exp(expected_logits - expected_logits[kept].max())
    p /= p.sum()
    assert counts[~kept].sum() == 0
    chi2 = float((((counts - n * p) ** 2)[kept] / (n * p[kept])).sum())
    assert chi2 < 22.46, chi2
    if top_k is not None:
        assert kept.sum() == 2  # top_k 4, then top_p 0.8 cuts two more (masses .71, .17 | .08, .04): active
    ref_lp = _log_softmax(logits / temp)[0][np.asarray(toks)]
    assert np.abs(np.asarray(lp) - ref_lp).max() <= 1e-5
    assert np.abs(np.asarray(raw) - _log_softmax(logits)[0][np.asarray(toks)]).max() <= 1e-5


def test_stop_ids_rows_stop_independently(params, greedy_mixed):
    """Pick stop ids from the unstopped greedy run, so the expected output is known exactly: each row ends at its
    first stop id (kept, counted in lengths, stopped=True), then pad and 0 log-probs; rows without one are
    truncated (stopped=False, length = max_new_tokens) and unchanged."""
    prompts, free = greedy_mixed
    assert free.lengths.tolist() == [N_NEW] * 3 and not free.stopped.any()
    # Stop ids: the first token row 0 emits at step >= 3 and row 1 at step >= 12 that row 2 never emits, and one
    # id nobody emits (several stop ids, one unused).
    first_new = lambda row, t: next(int(x) for x in free.tokens[row, t:] if x not in free.tokens[2])  # noqa: E731
    stops = (first_new(0, 3), first_new(1, 12), min(set(range(4, 512)) - set(free.tokens.ravel().tolist())))
    out = generate(params, g.TINY, prompts, max_new_tokens=N_NEW, temperature=0.0, stop_ids=stops, pad_id=0)
    for i in range(3):
        hits = [t for t, tok in enumerate(free.tokens[i]) if tok in stops]
        n = hits[0] + 1 if hits else N_NEW
        assert out.lengths[i] == n and out.stopped[i] == bool(hits)
        assert out.tokens[i, :n].tolist() == free.tokens[i, :n].tolist()
        assert (out.tokens[i, n:] == 0).all() and (out.logprobs[i, n:] == 0).all()
        assert (out.raw_logprobs[i, n:] == 0).all()
        assert np.abs(out.logprobs[i, :n] - free.logprobs[i, :n]).max() <= 1e-6
    assert out.stopped[:2].all() and not out.stopped[2] and out.lengths[2] == N_NEW


def test_num_samples_equals_repeating_prompts(params, greedy_mixed):
    """num_samples=G (one prefill, cache repeated) gives the same tokens as each prompt listed G times in a row;
    the G samples of a prompt differ; a row's draws do not depend on its bucket's left padding (keys depend on
    seed, row and step only); same seed same tokens, another seed other tokens."""
    cfg, G = g.TINY, 3
    prompts = _prompts([5, 13], seed=9)
    kw = dict(max_new_tokens=16, temperature=1.0, top_k=30, stop_ids=(1,), seed=21)
    shared = generate(params, cfg, prompts, num_samples=G, **kw)
    repeated = generate(params, cfg, [p for p in prompts for _ in range(G)], **kw)
    assert shared.tokens.shape == (len(prompts) * G, 16)
    assert shared.tokens.tolist() == repeated.tokens.tolist()
    assert shared.lengths.tolist() == repeated.lengths.tolist()
    assert np.abs(shared.logprobs - repeated.logprobs).max() <= 1e-5
    assert np.array_equal(shared.prompt_tokens, repeated.prompt_tokens)
    assert len({tuple(r) for r in shared.tokens[:G].tolist()}) == G
    wide = generate(params, cfg, prompts[:1], prompt_bucket=32, **kw)  # row 0 again, 27 pads instead of 11
    assert wide.prompt_tokens.shape == (1, 32) and wide.tokens[0].tolist() == shared.tokens[0].tolist()
    again = generate(params, cfg, prompts, num_samples=G, **kw)
    assert again.tokens.tolist() == shared.tokens.tolist()
    other = generate(params, cfg, prompts, num_samples=G, **{**kw, "seed": 22})
    assert other.tokens.tolist() != shared.tokens.tolist()


def test_lora_adapters_are_applied(params, greedy_mixed):
    """Greedy decoding with non-zero adapters equals decoding the merged weights, and differs from the base."""
    import lora as lora_lib

    cfg = g.TINY
    adapters = lora_lib.init_lora(cfg, rank=4, alpha=8.0, seed=1)
    adapters = dataclasses.replace(adapters, layers=jax.tree.map(
        lambda b: 0.5 * jax.random.normal(jax.random.key(2), b.shape), adapters.layers))
    prompts, base = greedy_mixed
    kw = dict(max_new_tokens=N_NEW, temperature=0.0, stop_ids=())
    with_lora = generate(params, cfg, prompts, lora=adapters, **kw)
    merged = generate(lora_lib.merge(params, adapters), cfg, prompts, **kw)
    assert with_lora.tokens.tolist() == merged.tokens.tolist()
    assert (with_lora.tokens != base.tokens).mean() > 0.5


def test_buckets_and_bad_input(params):
    assert [bucket_length(n) for n in (1, 8, 9, 100, 128, 129, 300)] == [8, 8, 16, 128, 128, 256, 384]
    tokens, mask = pad_prompts(np.array([[5, 6, 0, 0], [0, 7, 8, 9]]), prompt_mask=np.array(
        [[1, 1, 0, 0], [0, 1, 1, 1]], bool))
    assert tokens.tolist() == [[0] * 6 + [5, 6], [0] * 5 + [7, 8, 9]] and mask.sum(1).tolist() == [2, 3]
    cfg = g.TINY
    with pytest.raises(ValueError, match=r"prompts\[1\].*non-empty"):
        generate(params, cfg, [[2, 3], []], max_new_tokens=2)
    with pytest.raises(ValueError, match=r"prompts\[0\].*\[0, 512\)"):
        generate(params, cfg, [[2, 600]], max_new_tokens=2)
    with pytest.raises(ValueError, match="top_p"):
        generate(params, cfg, [[2, 3]], max_new_tokens=2, top_p=0.0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(params, cfg, [[2, 3]], max_new_tokens=0)
    with pytest.raises(ValueError, match="prompt_bucket 4"):
        generate(params, cfg, [[2, 3, 4, 5, 6]], max_new_tokens=2, prompt_bucket=4)
    with pytest.raises(ValueError, match="decode_segment"):
        generate(params, cfg, [[2, 3]], max_new_tokens=2, decode_segment=0)
    with pytest.raises(ValueError, match="decode_weights must be one of"):
        generate(params, cfg, [[2, 3]], max_new_tokens=2, decode_weights="scan")
    with pytest.raises(ValueError, match=r"Gemma 4 \(cfg.layer_list\) keeps one pytree per layer"):
        decode.layer_groups(TINY_GEMMA4)


def test_decode_segments_and_buffer_lengths():
    """Steps 1..N-1 in segments whose capacity is exactly the slots they reach (P + last step - 1); the segment
    length doubles after the first four. Local layers keep min(capacity, window) slots, global the capacity."""
    assert decode_segments(16, 64) == [(64, 79)]
    assert decode_segments(128, 256) == [(65, 192), (129, 256), (193, 320), (256, 383)]
    assert decode_segments(128, 1024)[3:] == [(257, 384), (385, 512), (641, 768), (1024, 1151)]
    assert decode_segments(16, 1) == [] and decode_segments(4, 12, 2) == [(3, 6), (5, 8), (7, 10), (9, 12),
                                                                          (12, 15)]
    assert decode.buffer_lengths(g.TINY, 39) == (8, 39, 8, 39)  # TINY: local layers 0 and 2, window 8
    assert decode.buffer_lengths(g.TINY, 6) == (6, 6, 6, 6)
    assert decode.buffer_lengths(g.TINY_GEMMA1, 39) == (39,) * 4  # no window
    assert decode.layer_groups(g.GEMMA2_2B) == ((0, 2, 13),) and decode.layer_groups(g.TINY_GEMMA1) == ((0, 1, 4),)
    assert decode.layer_groups(g.GEMMA3_1B) == ((0, 6, 4), (24, 1, 2))  # 4 x (5 local, 1 global), 2 local


# Gemma 2 (local, global) x 2: one loop over 2 groups of 2; Gemma 3 with 8 layers: 5 local + 1 global, then a loop
# over the last 2 (local) layers.
STACKED_CASES = {"gemma2": g.TINY, "gemma3": dataclasses.replace(g.TINY_GEMMA3, num_layers=8)}
# Gemma 4: "stacked" reads its listed layers in place, "per_layer" copies gate and up (transposed).
STACKED_CASES["gemma4"] = TINY_GEMMA4


@pytest.mark.parametrize("name", sorted(STACKED_CASES))
def test_stacked_decode_weights_give_the_per_layer_output(name):
    """decode_weights="stacked" (layers read out of the stacked arrays in a loop, no copy) against "per_layer": a
    left-padded batch with LoRA on, greedy and sampled with a fixed seed; Gemma 2 with 8-step segments (the
    stacked buffers grow, and the local ones turn into rings). The same tokens exactly, log-probs within 1e-5."""
    import lora as lora_lib

    cfg = STACKED_CASES[name]
    params = _diverse_params(cfg, 3)
    adapters = lora_lib.init_lora(cfg, rank=4, alpha=8.0, seed=1)
    adapters = dataclasses.replace(adapters, layers=jax.tree.map(
        lambda b: 0.5 * jax.random.normal(jax.random.key(4), b.shape), adapters.layers))
    if name != "gemma4":
        assert decode.layer_groups(cfg) == {"gemma2": ((0, 2, 2),), "gemma3": ((0, 6, 1), (6, 1, 2))}[name]
    prompts = _prompts([3, 11, 16], seed=2)
    segment = 8 if name == "gemma2" else 64
    for kw in (dict(temperature=0.0), dict(temperature=0.9, top_k=30, seed=7, num_samples=2)):
        per_layer, stacked = (generate(params, cfg, prompts, max_new_tokens=N_NEW, stop_ids=(), lora=adapters,
                                       decode_segment=segment, decode_weights=w, **kw)
                              for w in ("per_layer", "stacked"))
        assert stacked.tokens.tolist() == per_layer.tokens.tolist()
        assert np.abs(stacked.logprobs - per_layer.logprobs).max() <= 1e-5
        assert np.abs(stacked.raw_logprobs - per_layer.raw_logprobs).max() <= 1e-5
        assert len({t for row in stacked.tokens.tolist() for t in row}) >= 15  # a non-degenerate output


def _generate_temp_bytes(cfg, params):
    """{decode_weights: XLA's temp bytes of generate compiled for abstract params} (2 prompts of 16 tokens, 8 new
    greedy tokens), for "per_layer" and "stacked"."""
    from gemma_jax.sampler import _generate_jit

    args = (params, None, jax.ShapeDtypeStruct((2, 16), jnp.int32), jax.ShapeDtypeStruct((2, 16), bool),
            jnp.uint32(0), jnp.float32(1.0), jnp.float32(1.0))
    return {w: _generate_jit.lower(*args, cfg=cfg, max_new_tokens=8, num_samples=1, top_k=None, greedy=True,
                                   use_top_p=False, stop_ids=(1,), pad_id=0, decode_segment=64,
                                   decode_weights=w).compile().memory_analysis().temp_size_in_bytes
            for w in ("per_layer", "stacked")}


def test_stacked_decode_weights_hold_no_copy():
    """XLA's own temp bytes of the compiled generate (4 layers whose weights dwarf the rest): the stacked path's
    temporaries are smaller than the per-layer path's by at least the weights of the L - p = 2 layers outside one
    group (p = 2: the slices of one group may be alive together, module docstring of gemma_jax/decode.py)."""
    cfg = dataclasses.replace(g.TINY, embed_dim=256, hidden_dim=1024, num_heads=4, num_kv_heads=2, head_dim=64,
                              query_pre_attn_scalar=64)
    params = abstract_params(cfg)
    layer_bytes = sum(x.size * 4 for x in jax.tree.leaves(params["layers"]))
    temp = _generate_temp_bytes(cfg, params)
    print(f"layer weights {layer_bytes} B, XLA temp bytes {temp}")
    assert temp["per_layer"] >= layer_bytes  # the copy is there
    assert temp["per_layer"] - temp["stacked"] >= layer_bytes * 2 // 4


def test_gemma4_per_layer_decode_copies_gate_and_up_only():
    """Gemma 4: XLA's temp bytes of the compiled generate with decode_weights="per_layer" exceed "stacked" (layers
    read in place) by at least the gate and up weights (their transposed copies) and by less than all the layer
    weights, and train/memory.py's decode_weights term is exactly those gate and up bytes."""
    from train import memory

    cfg = dataclasses.replace(TINY_GEMMA4, embed_dim=256, hidden_dim=1024, vocab_size=256)
    params = abstract_params(cfg)
    gate_up = sum((w["gate"].size + w["up"].size) * 4 for w in params["layers"])
    layer_bytes = sum(x.size * 4 for x in jax.tree.leaves(params["layers"]))
    temp = _generate_temp_bytes(cfg, params)
    print(f"gate+up {gate_up} B, layer weights {layer_bytes} B, XLA temp bytes {temp}")
    assert gate_up <= temp["per_layer"] - temp["stacked"] < layer_bytes
    est = memory.estimate_bytes(cfg, param_dtype="float32", lora_rank=4, batch=2, seq_len=24)
    assert est["decode_weights"] == gate_up


def test_segments_and_ring_buffers_equal_teacher_forcing(params):
    """A 4-token bucket with 2-step segments: the local layers' buffers start linear (6 slots), grow, then become
    rings of the 8-slot window, and the global buffers grow four times. Tokens and log-probs equal the one-segment
    run and the teacher-forced forward."""
    prompts = _prompts([3, 4], seed=1)
    outs = [generate(params, g.TINY, prompts, max_new_tokens=12, temperature=0.0, stop_ids=(), prompt_bucket=4,
                     decode_segment=seg) for seg in (2, 64)]
    np.testing.assert_array_equal(outs[0].tokens, outs[1].tokens)
    np.testing.assert_allclose(outs[0].logprobs, outs[1].logprobs, atol=1e-5)
    ref = _teacher_forced(params, g.TINY, prompts, outs[0].tokens)
    for i, logits in enumerate(ref):
        np.testing.assert_array_equal(outs[0].tokens[i], logits.argmax(-1))
        lp = np.take_along_axis(_log_softmax(logits), outs[0].tokens[i][:, None], -1)[:, 0]
        np.testing.assert_allclose(outs[0].logprobs[i], lp, atol=1e-5)
    assert min(len(set(row.tolist())) for row in outs[0].tokens) >= 8  # not a collapsed repetition


def test_argmax_first_equals_argmax_with_ties():
    x = np.array([[1.0, 3.0, 3.0, -2.0], [0.0, 0.0, 0.0, 0.0], [-5.0, -1.0, -7.0, -1.0]], np.float32)
    x = np.concatenate([x, np.random.RandomState(0).randn(5, 4).astype(np.float32)])
    assert np.asarray(argmax_first(jnp.asarray(x))).tolist() == np.argmax(x, -1).tolist()


def test_generate_cli_prints_the_greedy_completion(params, tokenizer, tokenizer_path, monkeypatch, capsys, tmp_path):
    """run.py --stage generate: chat template applied, greedy completion printed, stop ids from the tokenizer.
    The checkpoint loader (gemma_jax/checkpoint.py, tested on its own) is replaced by one returning our params."""
    import run

    monkeypatch.setattr(g, "load_checkpoint", lambda path, dtype=None: (g.TINY, params))
    rc = run.main(["--stage", "generate", "--base", str(tmp_path), "--tokenizer", tokenizer_path, "--prompt",
                   "what is 3 plus 9?", "--system", "Be brief.", "--max-new-tokens", "10"])
    assert rc == 0
    printed = capsys.readouterr().out
    ids = tokenizer.encode_chat("what is 3 plus 9?", "Be brief.")
    expected = generate(params, g.TINY, [ids], max_new_tokens=10, temperature=0.0, stop_ids=tokenizer.stop_ids)
    assert printed == tokenizer.decode(expected.tokens[0, : expected.lengths[0]]) + "\n"


def test_eval_cli_decode_weights_reach_the_sampler(params, tokenizer_path, monkeypatch, tmp_path):
    """run.py --stage eval --decode-weights stacked|per_layer: each value reaches the sampler, and both write the
    same greedy completions (the --samples file) for a small RL CSV."""
    import csv

    import run
    from grpo import evaluate as evaluate_mod

    monkeypatch.setattr(g, "load_checkpoint", lambda path, dtype=None: (g.TINY, params))
    seen = []

    def spy(*args, **kw):
        seen.append(kw["decode_weights"])
        return generate(*args, **kw)

    monkeypatch.setattr(evaluate_mod, "generate", spy)
    data = tmp_path / "rl.csv"
    with open(data, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["question", "answer", "domain"])
        w.writerows([["what is 3 plus 9?", "12", "math"], ["name a colour", "red", "general"],
                     ["count to three", "1 2 3", "general"]])
    texts = {}
    for weights in ("stacked", "per_layer"):
        out = tmp_path / f"{weights}.txt"
        assert run.main(["--stage", "eval", "--base", str(tmp_path), "--tokenizer", tokenizer_path, "--data",
                         str(data), "--max-new-tokens", "12", "--decode-weights", weights, "--samples",
                         str(out)]) == 0
        texts[weights] = out.read_text()
    assert seen == ["stacked", "per_layer"]
    assert texts["stacked"] == texts["per_layer"] and texts["stacked"].count("### reference:") == 3
