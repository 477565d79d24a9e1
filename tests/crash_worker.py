"""A tiny LoRA training run that tests/test_train_state.py starts as a subprocess and SIGKILLs mid-run.

    python tests/crash_worker.py --dir CKPT --steps 12 --every 1 --seed 0 --out final.npz

TINY model (base weights from seed 0, frozen), LoRA rank 4 on q/kv/gate/up/down, masked next-token
cross-entropy on fixed synthetic rows, AdamW with warmup + cosine. The RNG in the state drops 20% of the loss
tokens each step and the data position picks the rows, so the result depends on every restored entry.
It resumes from the newest complete checkpoint in --dir, saves every --every steps, and writes the final
adapters to --out. Lines on stdout tell the test where it is: RESUMED s, SAVE s, STEP s, DONE.

CRASH_HOOK=commit|discard makes the run print HOOK and sleep inside the checkpoint save, just before the
atomic rename (commit) or after an old checkpoint was renamed for deletion, before its files go (discard),
so the test can kill it there.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from gemma_jax.config import TINY  # noqa: E402
from gemma_jax.model import forward, init_params  # noqa: E402
from lora import init_lora  # noqa: E402
from train import state as train_state  # noqa: E402
from train.optim import adamw_init, adamw_update, clip_by_global_norm, lr_schedule  # noqa: E402

ROWS, T, B = 16, 16, 4


def synthetic_data(seed):
    rng = np.random.default_rng(1000 + seed)
    tokens = rng.integers(4, TINY.vocab_size, (ROWS, T)).astype(np.int32)
    lengths = rng.integers(T // 2, T + 1, ROWS)
    mask = np.arange(T)[None, :] < lengths[:, None]
    return tokens, mask


def loss_fn(lora, params, tokens_BT, mask_BT, key):
    logits_BTV, _ = forward(params, tokens_BT, TINY, pad_mask_BT=mask_BT, lora=lora)
    logp_BTV = jax.nn.log_softmax(logits_BTV[:, :-1], axis=-1)
    nll_BT = -jnp.take_along_axis(logp_BTV, tokens_BT[:, 1:, None], axis=-1)[..., 0]
    keep_BT = mask_BT[:, 1:] & jax.random.bernoulli(key, 0.8, nll_BT.shape)
    return jnp.sum(nll_BT * keep_BT) / jnp.maximum(jnp.sum(keep_BT), 1)


@jax.jit
def train_step(lora, opt, rng_data, params, tokens_BT, mask_BT, step):
    key, sub = jax.random.split(jax.random.wrap_key_data(rng_data))
    loss, grads = jax.value_and_grad(loss_fn)(lora, params, tokens_BT, mask_BT, sub)
    grads, _ = clip_by_global_norm(grads, 1.0)
    lr = lr_schedule(step, peak_lr=1e-2, warmup_steps=3, total_steps=20)
    lora, opt = adamw_update(grads, opt, lora, lr, weight_decay=0.1)
    return lora, opt, jax.random.key_data(key), loss


def install_hook(kind):
    """Wrap the manager's commit or discard step so the test can kill the run inside a save."""
    name = {"commit": "_commit", "discard": "_remove_tree"}[kind]
    original = getattr(train_state, name)

    def hooked(*args):
        print("HOOK", flush=True)
        time.sleep(60)
        return original(*args)

    setattr(train_state, name, hooked)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--every", type=int, default=1)
    ap.add_argument("--keep", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    if os.environ.get("CRASH_HOOK"):
        install_hook(os.environ["CRASH_HOOK"])

    params = init_params(TINY, 0)
    lora = init_lora(TINY, 4, 8.0, seed=args.seed)
    state = {"lora": lora, "opt": adamw_init(lora), "step": 0, "data_pos": 0,
             "rng": jax.random.key_data(jax.random.key(args.seed))}
    meta = train_state.make_meta(TINY, lora, seed=args.seed)
    manager = train_state.CheckpointManager(args.dir, keep=args.keep)
    restored = manager.restore_latest(state, meta)
    if restored is not None:
        _, state, _ = restored
        print("RESUMED", state["step"], flush=True)
    tokens, mask = synthetic_data(args.seed)

    while state["step"] < args.steps:
        rows = (state["data_pos"] + np.arange(B)) % ROWS
        lora, opt, rng, _ = train_step(state["lora"], state["opt"], state["rng"], params, tokens[rows], mask[rows],
                                       state["step"])
        state = {"lora": lora, "opt": opt, "step": state["step"] + 1, "data_pos": state["data_pos"] + B, "rng": rng}
        if state["step"] % args.every == 0:
            print("SAVE", state["step"], flush=True)
            manager.save(state["step"], state, meta)
        print("STEP", state["step"], flush=True)
    flat = {f"{n}.{k}": np.asarray(v) for n, ab in state["lora"].layers.items() for k, v in ab.items()}
    np.savez(args.out, **flat)
    print("DONE", flush=True)


if __name__ == "__main__":
    if os.environ.get("CRASH_CACHE_DIR"):
        jax.config.update("jax_compilation_cache_dir", os.environ["CRASH_CACHE_DIR"])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    main()
