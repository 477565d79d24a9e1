"""train/optim.py against optax: AdamW (decoupled weight decay) + warmup-cosine schedule + global-norm clipping."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from train.optim import adamw_init, adamw_update, clip_by_global_norm, global_norm, lr_schedule

PEAK, WARMUP, TOTAL, WD, CLIP = 3e-3, 5, 20, 0.1, 1.0


def _tree(rng):
    return {"a": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32),
            "b": {"c": jnp.asarray(rng.normal(size=(5,)), jnp.float32), "d": jnp.asarray(rng.normal(size=(2, 2, 2)))}}


def test_schedule_matches_optax():
    sched = optax.warmup_cosine_decay_schedule(0.0, PEAK, WARMUP, TOTAL, end_value=0.1 * PEAK)
    for step in range(TOTAL + 3):
        ours = float(lr_schedule(step, peak_lr=PEAK, warmup_steps=WARMUP, total_steps=TOTAL, final_ratio=0.1))
        assert ours == pytest.approx(float(sched(step)), rel=1e-6, abs=1e-12), step


def test_clip_matches_optax():
    g = _tree(np.random.default_rng(1))
    for max_norm in (0.5, 1e3):  # clipping active, then inactive
        ours, norm = clip_by_global_norm(g, max_norm)
        ref, _ = optax.clip_by_global_norm(max_norm).update(g, optax.EmptyState())
        assert float(norm) == pytest.approx(float(optax.global_norm(g)), rel=1e-6)
        for x, y in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7)


def test_adamw_with_schedule_and_clip_tracks_optax_20_steps():
    rng = np.random.default_rng(0)
    params = _tree(rng)
    sched = optax.warmup_cosine_decay_schedule(0.0, PEAK, WARMUP, TOTAL)
    tx = optax.chain(optax.clip_by_global_norm(CLIP),
                     optax.adamw(sched, b1=0.9, b2=0.999, eps=1e-8, weight_decay=WD))
    ref_params, ref_state = params, tx.init(params)
    ours, state = params, adamw_init(params)
    clipped_steps = 0
    for step in range(TOTAL):
        # gradient scale varies so that some steps are clipped and some are not
        grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape) * (0.05 + step % 3), jnp.float32), params)
        clipped_steps += int(float(global_norm(grads)) > CLIP)
        updates, ref_state = tx.update(grads, ref_state, ref_params)
        ref_params = optax.apply_updates(ref_params, updates)
        g, _ = clip_by_global_norm(grads, CLIP)
        lr = lr_schedule(step, peak_lr=PEAK, warmup_steps=WARMUP, total_steps=TOTAL)
        ours, state = adamw_update(g, state, ours, lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=WD)
        for x, y in zip(jax.tree.leaves(ours), jax.tree.leaves(ref_params)):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=1e-6, err_msg=f"step {step}")
    assert 0 < clipped_steps < TOTAL
    moved = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(params)))
    assert moved > 1e-3  # the parity is not between two copies of params that never moved
    assert int(state["count"]) == TOTAL
