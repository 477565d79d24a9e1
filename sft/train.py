"""The LoRA SFT train step, the held-out loss, and the training loop with checkpoint/resume.

One optimizer step (`train_step`):
    micro-batches [k, B, T] --lax.scan--> summed grads of (NLL sum / target tokens of all k)   (only LoRA is
    differentiated: jax.grad w.r.t. the adapters; the frozen base may be bf16, adapters and AdamW state are f32)
    -> global-norm clip -> AdamW with warmup + cosine lr (sft/optim.py).
Dividing by the token count of all k micro-batches makes k accumulated micro-batches equal one big batch.

The loop logs loss, lr, grad norm, tokens/s and ETA each step (sft/metrics.py), evaluates the held-out loss every
`eval_every` steps, and saves adapters + optimizer + step + data position + rng (gemma_jax/train_state.py) so a
rerun resumes where it stopped.
"""

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp

from gemma_jax.sharding import place_train_state
from sft.loss import nll_sum
from sft.metrics import MetricsLogger
from sft.optim import adamw_init, adamw_update, clip_by_global_norm, lr_schedule


@dataclasses.dataclass(frozen=True)
class HParams:
    """Optimisation settings; frozen and hashable so it can be a static jit argument."""

    peak_lr: float = 5e-5
    warmup_steps: int = 20
    total_steps: int = 1000
    weight_decay: float = 0.1
    clip: float = 0.1  # global-norm clip; <= 0 disables
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    final_lr_ratio: float = 0.0


def _accumulate(lora, params, micro, cfg):
    """Summed grads and NLL over the k micro-batches of `micro` ([k, B, T] arrays), normalised by all k's tokens."""
    n_total = jnp.maximum(jnp.sum(micro["loss_mask"][:, :, 1:]).astype(jnp.float32), 1.0)

    def micro_loss(lo, batch):
        total, _ = nll_sum(lo, params, batch, cfg)
        return total / n_total

    grad_fn = jax.value_and_grad(micro_loss)

    def body(carry, batch):
        loss_acc, grad_acc = carry
        loss, grads = grad_fn(lora, batch)
        return (loss_acc + loss, jax.tree.map(jnp.add, grad_acc, grads)), None

    zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), lora)
    (loss, grads), _ = jax.lax.scan(body, (jnp.zeros((), jnp.float32), zeros), micro)
    return loss, grads, n_total


def _train_step(lora, opt_state, base_params, batch, step, *, cfg, hp: HParams):
    loss, grads, n_tokens = _accumulate(lora, base_params, batch, cfg)
    grads, grad_norm = clip_by_global_norm(grads, hp.clip)
    lr = lr_schedule(step, peak_lr=hp.peak_lr, warmup_steps=hp.warmup_steps, total_steps=hp.total_steps,
                     final_ratio=hp.final_lr_ratio)
    lora, opt_state = adamw_update(grads, opt_state, lora, lr, b1=hp.b1, b2=hp.b2, eps=hp.eps,
                                   weight_decay=hp.weight_decay)
    metrics = {"loss": loss, "grad_norm": grad_norm, "lr": lr, "target_tokens": n_tokens,
               "tokens": jnp.sum(batch["pad_mask"]).astype(jnp.float32)}
    return lora, opt_state, metrics


# train_step(lora, opt_state, base_params, batch [k,B,T], step, *, cfg, hp) -> (lora, opt_state, metrics).
# `step` is the 0-based count of updates done so far (optax's schedule convention: lr(0) = 0 with warmup).
train_step = jax.jit(_train_step, static_argnames=("cfg", "hp"))
# Same, donating the old adapters and optimizer state (the loop's version: no second copy of either).
train_step_donated = jax.jit(_train_step, static_argnames=("cfg", "hp"), donate_argnums=(0, 1))


@functools.partial(jax.jit, static_argnames=("cfg",))
def eval_sums(lora, base_params, batch, *, cfg):
    """(NLL sum, target tokens) of one [B, T] batch: accumulate over batches, then divide once."""
    return nll_sum(lora, base_params, batch, cfg)


def eval_loss(lora, base_params, data, cfg, num_batches: int | None = None) -> float:
    """Per-token mean NLL over the first `num_batches` batches of a held-out SFTData (default: one epoch)."""
    n = data.batches_per_epoch if num_batches is None else min(num_batches, data.batches_per_epoch)
    total, count = 0.0, 0.0
    for i in range(n):
        s, c = eval_sums(lora, base_params, data.batch(i), cfg=cfg)
        total, count = total + float(s), count + float(c)
    return total / max(count, 1.0)


# ----------------------------------------------------------------------------------------------------------------
# The loop.

def _place(tree, sharding):
    return tree if sharding is None else jax.device_put(tree, sharding)


def _micro_sharding(mesh):
    """[k, B, T] micro-batch stacks: rows split like a batch, the k axis replicated."""
    if mesh is None:
        return None
    from gemma_jax.sharding import batch_sharding

    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, *batch_sharding(mesh).spec))


def train_loop(cfg, base_params, lora, data, hp: HParams, out_dir: str, *, grad_accum: int = 1, eval_data=None,
               eval_every: int = 0, eval_batches: int | None = None, save_every: int = 100, resume: bool = True,
               seed: int = 0, mesh=None, stop_at_step: int | None = None, print_fn=print):
    """Train `lora` for hp.total_steps optimizer steps on `data` (sft.batches.SFTData); returns (lora, opt_state,
    last step's metrics as floats). Each step consumes `grad_accum` batches. With resume and a checkpoint under
    `{out_dir}/checkpoints`, adapters, optimizer, step, data position and rng continue from the newest one.
    stop_at_step: end this run early at that step (saving it) while the schedule still spans hp.total_steps."""
    from gemma_jax.train_state import CheckpointManager, make_meta

    lora = jax.tree.map(jnp.copy, lora)  # the loop donates its adapters: leave the caller's arrays alive
    base_params, lora, opt_state = place_train_state(cfg, base_params, lora, adamw_init(lora), mesh)
    state = {"lora": lora, "opt": opt_state, "step": 0, "data_pos": 0, "rng": jax.random.key(seed)}
    ckpt = CheckpointManager(os.path.join(out_dir, "checkpoints"))
    if resume:
        # a checkpoint of another model or LoRA shape raises CheckpointMismatchError naming the differing entry
        restored = ckpt.restore_latest(state, expected_meta=make_meta(cfg, lora))
        if restored is not None:
            _, state, _ = restored
            print_fn(f"resumed from {ckpt.directory} at step {state['step']} (data position {state['data_pos']})")
    lora, opt_state, step, position = state["lora"], state["opt"], state["step"], state["data_pos"]
    rng = state["rng"]  # SFT samples nothing; the key is carried so a resumed run hands later stages the same one
    micro_sh = _micro_sharding(mesh)

    def save(step):
        state = {"lora": lora, "opt": opt_state, "step": step, "data_pos": position, "rng": rng}
        ckpt.save(step, state, make_meta(cfg, lora, grad_accum=grad_accum, batch_size=data.batch_size, seed=seed))

    last = {}
    with MetricsLogger(out_dir, hp.total_steps, print_fn=print_fn) as log:
        log.start()
        end = hp.total_steps if stop_at_step is None else min(stop_at_step, hp.total_steps)
        while step < end:
            batch = _place(data.micro_batches(position, grad_accum), micro_sh)
            lora, opt_state, metrics = train_step_donated(lora, opt_state, base_params, batch, step, cfg=cfg, hp=hp)
            step, position = step + 1, position + grad_accum
            last = {k: float(v) for k, v in metrics.items()}  # blocks: the console line needs the values
            log.log(step, last)
            if eval_data is not None and eval_every and (step % eval_every == 0 or step == hp.total_steps):
                log.log(step, {"loss": eval_loss(lora, base_params, eval_data, cfg, eval_batches)}, kind="eval")
            if save_every and (step % save_every == 0 or step == end):
                save(step)
    return lora, opt_state, last
