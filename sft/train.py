"""The LoRA SFT train step, the held-out loss, and the training loop with checkpoint/resume.

One optimizer step (`train_step`):
    micro-batches [k, B, T] --lax.scan--> summed grads of (NLL sum / target tokens of all k)   (only LoRA is
    differentiated: jax.grad w.r.t. the adapters; the frozen base may be bf16, adapters and AdamW state are f32)
    -> global-norm clip -> AdamW with warmup + cosine lr (train/optim.py apply_update, shared with GRPO).
Dividing by the token count of all k micro-batches makes k accumulated micro-batches equal one big batch.

The loop logs loss, lr, grad norm, tokens/s and ETA each step (train/metrics.py), evaluates the held-out loss every
`eval_every` steps, and saves adapters + optimizer + step + data position + rng (train/state.py) so a
rerun resumes where it stopped.
"""

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp

from gemma_jax.sharding import batch_sharding, place_train_state, sharding_ctx
from sft.loss import nll_sum
from train.metrics import MetricsLogger
from train.optim import accumulate_grads, adamw_init, apply_update, check_nonfinite
from train.state import CheckpointManager, make_meta


@dataclasses.dataclass(frozen=True)
class HParams:
    """Every SFT setting; frozen and hashable (a static jit argument). Defaults: the recipe's stage 1
    (STAGE_DEFAULTS has stage 2's differences). The command-line flags are generated from these fields."""

    lr: float = 5e-5  # peak learning rate
    warmup_steps: int = 20  # linear warmup from 0, in optimizer steps
    steps: int | None = None  # optimizer steps (None: one epoch of the data)
    final_lr_ratio: float = 0.0  # cosine decay to this fraction of lr (1.0: constant after warmup)
    weight_decay: float = 0.1  # AdamW decoupled weight decay
    clip: float = 0.1  # global-norm gradient clip (<= 0: off)
    b1: float = 0.9  # AdamW first-moment decay
    b2: float = 0.999  # AdamW second-moment decay
    eps: float = 1e-8  # AdamW epsilon
    batch: int = 2  # rows per micro-batch
    grad_accum: int = 64  # micro-batches per optimizer step
    max_len: int = 2048  # tokens per row (prompt + completion)
    max_nonfinite: int = 3  # consecutive non-finite steps (skipped) that stop the run

    @property
    def total_updates(self) -> int:
        if self.steps is None:
            raise ValueError("HParams.steps is None: resolve it to a step count (e.g. one epoch) before training")
        return self.steps


# The recipe's stage 2 differs from stage 1 in these settings only (plus its data filter, in the CLI).
STAGE_DEFAULTS = {1: {}, 2: {"lr": 1e-5, "max_len": 1280}}


def accumulated_grads(lora, base_params, batch, cfg, shard=None):
    """(loss, summed LoRA grads, target tokens) of the k micro-batches of `batch` ([k, B, T] arrays). Each
    micro-batch's NLL sum is divided by the target tokens of all k, so k micro-batches equal one big batch.
    shard: the ShardingCtx of the mesh (activation constraints), or None on one device."""
    n_total = jnp.maximum(jnp.sum(batch["loss_mask"][:, :, 1:]).astype(jnp.float32), 1.0)

    def micro_loss(lo, mb):
        loss = nll_sum(lo, base_params, mb, cfg, shard)[0] / n_total
        return loss, {"loss": loss}

    grads, per_micro = accumulate_grads(micro_loss, lora, batch)
    return jnp.sum(per_micro["loss"]), grads, n_total


def _train_step(lora, opt_state, base_params, batch, *, cfg, hp: HParams, shard=None):
    loss, grads, n_total = accumulated_grads(lora, base_params, batch, cfg, shard)
    lora, opt_state, m = apply_update(grads, opt_state, lora, hp, loss=loss)
    return lora, opt_state, {"loss": loss, **m, "target_tokens": n_total,
                             "tokens": jnp.sum(batch["pad_mask"]).astype(jnp.float32)}


# train_step(lora, opt_state, base_params, batch [k,B,T], *, cfg, hp, shard=None) -> (lora, opt_state, metrics).
# The lr schedule is indexed by opt_state["count"] (updates done so far; lr(0) = 0 with warmup, optax's convention).
train_step = jax.jit(_train_step, static_argnames=("cfg", "hp", "shard"))
# Same, donating the old adapters and optimizer state (the loop's version: no second copy of either).
train_step_donated = jax.jit(_train_step, static_argnames=("cfg", "hp", "shard"), donate_argnums=(0, 1))


@functools.partial(jax.jit, static_argnames=("cfg", "shard"))
def eval_sums(lora, base_params, batch, *, cfg, shard=None):
    """(NLL sum, target tokens) of one [B, T] batch: accumulate over batches, then divide once."""
    return nll_sum(lora, base_params, batch, cfg, shard)


def eval_loss(lora, base_params, data, cfg, num_batches: int | None = None, shard=None) -> float:
    """Per-token mean NLL over the first `num_batches` batches of a held-out SFTData (default: one epoch)."""
    n = data.batches_per_epoch if num_batches is None else min(num_batches, data.batches_per_epoch)
    total, count = 0.0, 0.0
    for i in range(n):
        s, c = eval_sums(lora, base_params, data.batch(i), cfg=cfg, shard=shard)
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
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, *batch_sharding(mesh).spec))


def train_loop(cfg, base_params, lora, data, hp: HParams, out_dir: str, *, eval_data=None,
               eval_every: int = 0, eval_batches: int | None = None, save_every: int = 100, resume: bool = True,
               seed: int = 0, mesh=None, stop_at_step: int | None = None, print_fn=print, tensorboard: bool = False):
    """Train `lora` for hp.steps optimizer steps on `data` (sft.batches.SFTData); returns (lora, opt_state,
    last step's metrics as floats). Each step consumes hp.grad_accum batches. With resume and a checkpoint under
    `{out_dir}/checkpoints`, adapters, optimizer, step, data position and rng continue from the newest one.
    stop_at_step: end this run early at that step (saving it) while the schedule still spans hp.steps."""
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
    micro_sh, shard = _micro_sharding(mesh), sharding_ctx(mesh)

    def save(step):
        state = {"lora": lora, "opt": opt_state, "step": step, "data_pos": position, "rng": rng}
        ckpt.save(step, state, make_meta(cfg, lora, grad_accum=hp.grad_accum, batch_size=data.batch_size, seed=seed))

    last, streak = {}, 0
    with MetricsLogger(out_dir, hp.total_updates, print_fn=print_fn, tensorboard=tensorboard) as log:
        log.start()
        end = hp.total_updates if stop_at_step is None else min(stop_at_step, hp.total_updates)
        while step < end:
            batch = _place(data.micro_batches(position, hp.grad_accum), micro_sh)
            lora, opt_state, metrics = train_step_donated(lora, opt_state, base_params, batch, cfg=cfg, hp=hp,
                                                          shard=shard)
            step, position = step + 1, position + hp.grad_accum
            last = {k: float(v) for k, v in metrics.items()}  # blocks: the console line needs the values
            log.log(step, last)
            streak = check_nonfinite(last, step, streak, hp.max_nonfinite, print_fn)
            if eval_data is not None and eval_every and (step % eval_every == 0 or step == hp.total_updates):
                log.log(step, {"loss": eval_loss(lora, base_params, eval_data, cfg, eval_batches, shard)},
                        kind="eval")
            if save_every and (step % save_every == 0 or step == end):
                save(step)
    return lora, opt_state, last
