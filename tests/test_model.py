"""Model tests: parity with Tunix's Gemma, KV-cache decode, full-size shapes without memory, scan vs unrolled."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tunix_utils import to_tunix, tunix_logits

import gemma_jax as g
from gemma_jax.model import forward, init_cache, init_params

# Tunix hard-codes the query scale to head_dim**-0.5, so its parity configs use query_pre_attn_scalar = head_dim.
TUNIX_GEMMA2 = dataclasses.replace(g.TINY, query_pre_attn_scalar=16)
TUNIX_GEMMA1 = g.TINY_GEMMA1  # MQA, no softcaps, no window, no post-norms
TUNIX_MHA = dataclasses.replace(TUNIX_GEMMA2, num_kv_heads=4)  # K == N: Tunix's fused qkv_einsum path


def _params_with_norms(cfg, seed):
    """Random params whose norm weights are non-zero (zero norms would hide a missing `1 + w`)."""
    params = init_params(cfg, seed)
    key = jax.random.key(seed + 100)
    layers = {k: (0.3 * jax.random.normal(jax.random.fold_in(key, i), v.shape) if "norm" in k else v)
              for i, (k, v) in enumerate(params["layers"].items())}
    final = 0.3 * jax.random.normal(jax.random.fold_in(key, 99), params["final_norm"].shape)
    return {**params, "layers": layers, "final_norm": final}


@pytest.mark.parametrize("cfg", [TUNIX_GEMMA2, TUNIX_GEMMA1, TUNIX_MHA], ids=["gemma2", "gemma1_mqa", "mha"])
def test_logits_match_tunix(cfg):
    params = _params_with_norms(cfg, 1)
    tokens = np.random.RandomState(0).randint(4, cfg.vocab_size, (2, 20))  # T 20 > window 8
    ours, _ = forward(params, jnp.asarray(tokens), cfg)
    ref = tunix_logits(to_tunix(params, cfg), tokens)
    assert np.abs(np.asarray(ours) - ref).max() <= 1e-4


def test_tunix_left_padding_window_differs_and_we_follow_positions():
    """Tunix's sliding mask compares the query *position* with the key's *slot index*
    (docs/reference.md#window-and-left-padding). For a left-padded row longer than the window that drops in-window
    keys, so Tunix's logits move; ours depend only on positions, so the padded row equals the same tokens unpadded."""
    cfg = TUNIX_GEMMA2
    params = _params_with_norms(cfg, 2)
    pad = 6
    row = np.random.RandomState(3).randint(4, cfg.vocab_size, 20)
    tokens = np.concatenate([np.zeros(pad, int), row])[None]
    mask = np.arange(pad + 20)[None] >= pad
    ours_padded = np.asarray(forward(params, jnp.asarray(tokens), cfg, pad_mask_BT=jnp.asarray(mask))[0])[0, pad:]
    ours_alone = np.asarray(forward(params, jnp.asarray(row[None]), cfg)[0])[0]
    tunix_padded = tunix_logits(to_tunix(params, cfg), tokens, mask)[0, pad:]
    assert np.abs(ours_padded - ours_alone).max() <= 1e-4
    # Within the first window positions Tunix agrees; beyond it, its slot-based window cuts real keys.
    w = cfg.sliding_window
    assert np.abs(tunix_padded[: w - pad] - ours_alone[: w - pad]).max() <= 1e-4
    assert np.abs(tunix_padded[w:] - ours_alone[w:]).max() > 1e-2


@pytest.mark.parametrize("cfg", [g.TINY, g.TINY_GEMMA1], ids=["gemma2", "gemma1"])
def test_cached_decode_equals_full_forward(cfg):
    params = _params_with_norms(cfg, 4)
    T, P = 24, 10  # prefill 10 tokens, then decode 14 one at a time; T beyond the window
    tokens = np.random.RandomState(5).randint(4, cfg.vocab_size, (3, T))
    mask = np.ones((3, T), bool)
    mask[1, :4] = False  # one left-padded row
    tokens[1, :4] = 0
    full = np.asarray(forward(params, jnp.asarray(tokens), cfg, pad_mask_BT=jnp.asarray(mask))[0])
    cache = init_cache(cfg, 3, 32)
    logits, cache = forward(params, jnp.asarray(tokens[:, :P]), cfg, pad_mask_BT=jnp.asarray(mask[:, :P]), cache=cache)
    steps = [np.asarray(logits)]
    for t in range(P, T):
        logits, cache = forward(params, jnp.asarray(tokens[:, t:t + 1]), cfg, cache=cache)
        steps.append(np.asarray(logits))
    decoded = np.concatenate(steps, axis=1)
    assert int(cache["index"]) == T
    assert np.abs(decoded - full)[mask].max() <= 1e-5


def test_scan_and_unrolled_layers_agree():
    params = _params_with_norms(g.TINY, 6)
    tokens = jnp.asarray(np.random.RandomState(7).randint(4, 512, (2, 16)))
    scanned = forward(params, tokens, g.TINY)[0]
    unrolled = forward(params, tokens, dataclasses.replace(g.TINY, scan_layers=False))[0]
    assert np.abs(np.asarray(scanned) - np.asarray(unrolled)).max() <= 1e-5


@pytest.mark.parametrize("cfg,count", [(g.GEMMA2_2B, 2_614_341_888), (g.GEMMA_2B, 2_506_172_416)],
                         ids=["gemma2_2b", "gemma_2b"])
def test_full_size_shapes_without_memory(cfg, count):
    """eval_shape traces init and the forward of the real 2B configs without allocating a single weight."""
    abstract = jax.eval_shape(lambda: init_params(cfg, 0))
    assert g.count_params(abstract) == count
    assert abstract["layers"]["q"].shape == (cfg.num_layers, cfg.embed_dim, cfg.num_heads, cfg.head_dim)
    out = jax.eval_shape(lambda p, t: forward(p, t, cfg)[0], abstract, jax.ShapeDtypeStruct((1, 64), jnp.int32))
    assert out.shape == (1, 64, 256_000) and out.dtype == jnp.float32


def test_bfloat16_weights_track_float32():
    """bf16 weights/activations (norms, softmax, logits in f32): bf16 has 8 mantissa bits (rel. step 2^-8 ~ 0.4%),
    and errors compound over 4 layers, so we bound the logit error at 5% of the logit scale and require the
    argmax to agree on at least 90% of positions."""
    params = _params_with_norms(g.TINY, 8)
    bf16 = dataclasses.replace(g.TINY, param_dtype="bfloat16")
    params16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    tokens = jnp.asarray(np.random.RandomState(9).randint(4, 512, (4, 32)))
    ref = np.asarray(forward(params, tokens, g.TINY)[0])
    got = np.asarray(forward(params16, tokens, bf16)[0])
    assert got.dtype == np.float32
    assert np.abs(got - ref).max() <= 0.05 * np.abs(ref).max()
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.9


def test_embedding_scale_is_cast_to_weight_dtype_first():
    """sqrt(2304) = 48.0 exactly, but sqrt(2048) = 45.2548... rounds to 45.25 in bf16: HF and Tunix multiply by the
    rounded value, so must we."""
    cfg = dataclasses.replace(g.TINY, embed_dim=2048, param_dtype="bfloat16")
    params = {"embed": jnp.ones((4, 2048), jnp.bfloat16)}
    out = g.model.embed(params, jnp.array([[1]]), cfg)
    assert float(out[0, 0, 0]) == 45.25
