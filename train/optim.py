"""Our own AdamW (decoupled weight decay), warmup + cosine schedule and global-norm clipping.

Written out instead of using optax so a reader sees every line of the update. Parity with optax `adamw` +
`clip_by_global_norm` is checked in tests/test_optim.py.

    g   <- g * min(1, clip / ||g||)                  (global norm over the whole pytree; clip <= 0 disables)
    m   <- b1 m + (1 - b1) g ;  v <- b2 v + (1 - b2) g^2
    m^  =  m / (1 - b1^t)    ;  v^ =  v / (1 - b2^t)
    p   <- p - lr_t (m^ / (sqrt(v^) + eps) + wd p)    (decoupled decay, as optax.adamw)
"""

import math

import jax
import jax.numpy as jnp


def lr_schedule(step, *, peak_lr: float, warmup_steps: int, total_steps: int, final_ratio: float = 0.0):
    """Linear warmup from 0 to peak_lr over `warmup_steps`, then cosine decay to final_ratio * peak_lr.

    Same shape as optax.warmup_cosine_decay_schedule(0, peak, warmup, total, final_ratio * peak).
    """
    step = jnp.asarray(step, jnp.float32)
    warm = peak_lr * step / max(warmup_steps, 1)
    decay_steps = max(total_steps - warmup_steps, 1)
    frac = jnp.clip((step - warmup_steps) / decay_steps, 0.0, 1.0)
    cos = peak_lr * (final_ratio + (1 - final_ratio) * 0.5 * (1 + jnp.cos(math.pi * frac)))
    return jnp.where(step < warmup_steps, warm, cos)


def global_norm(tree):
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def clip_by_global_norm(grads, max_norm: float):
    """Scale grads so their global norm is at most max_norm; returns (grads, norm before clipping)."""
    norm = global_norm(grads)
    if max_norm is None or max_norm <= 0:
        return grads, norm
    factor = jnp.minimum(1.0, max_norm / jnp.maximum(norm, 1e-30))
    return jax.tree.map(lambda g: (g * factor).astype(g.dtype), grads), norm


def adamw_init(params):
    """Optimizer state: step count and float32 first/second moments shaped like params."""
    zeros = lambda p: jnp.zeros(p.shape, jnp.float32)  # noqa: E731
    return {"count": jnp.zeros((), jnp.int32), "mu": jax.tree.map(zeros, params), "nu": jax.tree.map(zeros, params)}


def adamw_update(grads, state, params, lr, *, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0):
    """One AdamW step. Returns (new params, new state). lr may be a traced scalar (from lr_schedule)."""
    count = state["count"] + 1
    mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g.astype(jnp.float32), state["mu"], grads)
    nu = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * jnp.square(g.astype(jnp.float32)), state["nu"], grads)
    c1 = 1 - b1 ** count.astype(jnp.float32)
    c2 = 1 - b2 ** count.astype(jnp.float32)

    def step(p, m, v):
        update = (m / c1) / (jnp.sqrt(v / c2) + eps) + weight_decay * p.astype(jnp.float32)
        return (p.astype(jnp.float32) - lr * update).astype(p.dtype)

    new_params = jax.tree.map(step, params, mu, nu)
    return new_params, {"count": count, "mu": mu, "nu": nu}


def accumulate_grads(loss_fn, lora, micro):
    """Gradients of `loss_fn` summed over the leading (micro-batch) axis of `micro`, in one `lax.scan`.

    loss_fn(lora, mb) -> (loss, metrics dict); each micro-batch's loss must already be divided by the WHOLE
    batch's normaliser, so the summed gradient equals one big batch's. Returns (summed grads in float32, the
    metrics stacked along a leading [M] axis): the caller reduces them (a sum, a mean, a max) after the scan.
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def body(acc, mb):
        (_, metrics), grads = grad_fn(lora, mb)
        return jax.tree.map(lambda a, g: a + g.astype(jnp.float32), acc, grads), metrics

    zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), lora)
    return jax.lax.scan(body, zeros, micro)


def apply_update(grads, opt_state, params, hp, loss=None):
    """The step SFT and GRPO share: global-norm clip -> learning rate of this update -> AdamW.

    Reads from `hp`: clip, lr, warmup_steps, total_updates, final_lr_ratio, b1, b2, eps, weight_decay. The lr
    schedule is indexed by the optimizer's own update count (0 before the first update, optax's convention), so a
    resumed run continues the schedule from its restored state.
    Non-finite guard: when the gradient norm (or `loss`, if given) is not finite, the update is skipped: params
    and optimizer state come back unchanged (the count too, so the schedule does not advance) and the metric
    `nonfinite_skipped` is 1. Returns (params, opt_state, {grad_norm, lr, nonfinite_skipped})."""
    grads, grad_norm = clip_by_global_norm(grads, hp.clip)
    lr = lr_schedule(opt_state["count"], peak_lr=hp.lr, warmup_steps=hp.warmup_steps, total_steps=hp.total_updates,
                     final_ratio=hp.final_lr_ratio)
    new_params, new_state = adamw_update(grads, opt_state, params, lr, b1=hp.b1, b2=hp.b2, eps=hp.eps,
                                         weight_decay=hp.weight_decay)
    finite = jnp.isfinite(grad_norm) if loss is None else jnp.isfinite(grad_norm) & jnp.isfinite(loss)
    keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
    params, opt_state = jax.tree.map(keep, new_params, params), jax.tree.map(keep, new_state, opt_state)
    return params, opt_state, {"grad_norm": grad_norm, "lr": lr, "nonfinite_skipped": 1.0 - finite.astype(jnp.float32)}


class NonFiniteError(ValueError):
    """Too many consecutive steps with a non-finite loss or gradient: the run stops (its last checkpoint holds the
    last finite state)."""


def check_nonfinite(metrics: dict, step: int, streak: int, limit: int, print_fn=print) -> int:
    """The loops' side of the guard: count consecutive skipped updates; raise NonFiniteError at `limit` in a row.
    Returns the new streak."""
    if not metrics.get("nonfinite_skipped"):
        return 0
    streak += 1
    print_fn(f"step {step}: non-finite loss or gradient (loss {metrics.get('loss')}, grad norm "
             f"{metrics.get('grad_norm')}); update skipped ({streak} in a row, limit {limit})")
    if streak >= limit:
        raise NonFiniteError(f"step {step}: {streak} consecutive updates with a non-finite loss or gradient; "
                             "stopping (the last checkpoint holds the last finite state)")
    return streak
