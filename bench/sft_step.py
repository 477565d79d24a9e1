"""SFT train-step benchmark: our jitted LoRA step vs Tunix's PeftTrainer step (qwix LoRA), same run, same model,
same LoRA targets/rank, same batch, same optimizer (clip + AdamW); plus model-FLOPs utilisation against this
machine's float32 matmul peak, measured here.

    python bench/sft_step.py                  # MID, B=4 x T=256, LoRA rank 16 on q, kv, gate, up, down
    python bench/sft_step.py --config tiny    # quick check
    python bench/sft_step.py --model gemma3   # MID_GEMMA3 vs Tunix's Gemma 3 (configs: bench/configs.py)
    python bench/sft_step.py --model gemma4   # MID_GEMMA4 vs Tunix's Gemma 4

Before the times are taken, the loss of every implementation's first step (LoRA B = 0: the base model's loss) must
equal ours within 1e-4, so the rows compare the same work.

Model FLOPs of one LoRA step (the base is frozen, so no weight gradients for it):
    forward 2 * P_mm * tokens (+ attention 4 * B * T^2 * N * H per layer, + LoRA 2 * R * (in + out) per token);
    backward: activation gradients = the forward again (2x for the attention scores/values), and for LoRA the
    activation gradient plus the A and B weight gradients (3x its forward). P_mm counts every matmul weight once,
    including the tied unembedding (V x D). The softmax/norm elementwise work is not counted.
"""

import argparse
import dataclasses
import os
import sys
import time

sys.path[:0] = [os.path.join(os.path.dirname(__file__), ".."), os.path.join(os.path.dirname(__file__), "..", "tests")]

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from configs import MODELS, bench_configs, to_tunix_model  # noqa: E402

from gemma_jax.model import init_params, layer_kinds  # noqa: E402
from lora.adapters import init_lora  # noqa: E402
from sft.train import HParams, train_step  # noqa: E402
from train.optim import adamw_init  # noqa: E402

TARGETS = ("q", "kv", "gate", "up", "down")


def median_time(fn, repeats):
    """(median wall time of fn(), the result of the first call): one warm-up call that compiles, then `repeats`."""
    out = fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), out


def matmul_peak_gflops():
    """Best float32 GFLOP/s of a jitted square matmul on this machine (several sizes, median of 5 each)."""
    best = 0.0
    for n in (512, 1024, 2048):
        a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), jnp.float32)
        f = jax.jit(lambda x: x @ x)
        t, _ = median_time(lambda: f(a).block_until_ready(), 5)
        best = max(best, 2 * n**3 / t / 1e9)
    return best


def step_flops(cfg, B, T, rank):
    """Model FLOPs of one LoRA step (module docstring), layer by layer: Gemma 4's layers differ in head dim, kv
    heads, k/v projections (none on KV-shared layers, k only where k = v) and MLP width, and with per-layer
    embeddings add their model projection [D, L*P] and each layer's gate [D, P] and projection [P, D] (the table
    itself is a lookup). The fused kv adapter sits on the layers with both k and v weights."""
    D, N, V, P = cfg.embed_dim, cfg.num_heads, cfg.vocab_size, cfg.per_layer_input_dim
    tokens = B * T
    p_mm, attn, lora_io = V * D + D * cfg.num_layers * P, 0, 0
    for kind in layer_kinds(cfg):
        H, K, F = kind.head_dim, kind.kv_heads, kind.hidden
        kv = 0 if not kind.has_kv else 1 if kind.k_eq_v else 2  # k/v projections this layer computes
        p_mm += D * N * H + kv * D * K * H + N * H * D + 3 * D * F + 2 * D * P
        attn += 4 * B * T * T * N * H
        lora_io += (D + N * H) + (D + 2 * K * H if kv == 2 else 0) + 2 * (D + F) + (F + D)
    base = 2 * (2 * p_mm * tokens + attn)  # forward + activation gradients
    lora = 4 * 2 * rank * lora_io * tokens  # forward + activation grad + A and B grads
    return base + lora


def make_batch(cfg, B, T):
    rng = np.random.default_rng(0)
    tokens = rng.integers(4, cfg.vocab_size, (B, T)).astype(np.int32)
    loss_mask = np.zeros((B, T), bool)
    loss_mask[:, T // 4:] = True  # the last 3/4 of each row is "completion"
    return tokens, loss_mask


def ours(cfg, params, lora, tokens, loss_mask, hp, repeats):
    B, T = tokens.shape
    batch = {"tokens": tokens, "loss_mask": loss_mask, "pad_mask": np.ones((B, T), bool),
             "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)).copy(),
             "segment_ids": np.ones((B, T), np.int32)}
    batch = jax.tree.map(lambda x: jnp.asarray(x[None]), batch)
    state = {"lora": lora, "opt": adamw_init(lora)}

    def run():
        lo, opt, m = train_step(state["lora"], state["opt"], params, batch, cfg=cfg, hp=hp)
        state["lora"], state["opt"] = lo, opt
        return float(m["loss"])

    return median_time(run, repeats)


def tunix(cfg, params, lora_rank, tokens, loss_mask, hp, repeats):
    import optax
    import qwix
    from tunix.sft import peft_trainer
    from tunix.sft import utils as tunix_utils

    model = to_tunix_model(params, cfg)
    provider = qwix.LoraProvider(module_path=".*q_einsum|.*kv_einsum|.*gate_proj|.*up_proj|.*down_proj",
                                 rank=lora_rank, alpha=2.0 * lora_rank)
    model = qwix.apply_lora_to_model(model, provider, **model.get_model_input())
    tx = optax.chain(optax.clip_by_global_norm(hp.clip), optax.adamw(hp.lr, weight_decay=hp.weight_decay))
    trainer = peft_trainer.PeftTrainer(model, tx, peft_trainer.TrainingConfig(eval_every_n_steps=10**9))
    step, _ = trainer.jit_train_and_eval_step()
    pad = jnp.ones(tokens.shape, bool)
    inputs = {"input_tokens": jnp.asarray(tokens), "input_mask": jnp.asarray(loss_mask),
              "positions": tunix_utils.build_positions_from_mask(pad),
              "attention_mask": tunix_utils.make_causal_attn_mask(pad)}
    return median_time(lambda: float(step(inputs)[0]), repeats)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=MODELS, default="gemma2")
    ap.add_argument("--config", choices=("mid", "tiny"), default="mid")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    name, cfg = bench_configs(args.model)[args.config.upper()]
    B, T = args.batch, args.seq
    params = jax.jit(init_params, static_argnums=(0, 1))(cfg, 0)
    lora = init_lora(cfg, args.rank, 2.0 * args.rank, TARGETS, seed=0)
    hp = HParams(lr=1e-4, warmup_steps=0, steps=10**6, weight_decay=0.1, clip=1.0)
    tokens, loss_mask = make_batch(cfg, B, T)
    peak = matmul_peak_gflops()
    if cfg.layer_list:  # Gemma 4's layers differ in shape and always run unrolled: one row of ours
        variants = {"unrolled": cfg}
    else:  # scanned, and unrolled (cfg.scan_layers=False: longer compile, no scan loop on the CPU)
        variants = {"scan": cfg, "unrolled": dataclasses.replace(cfg, scan_layers=False)}
    timed = {what: ours(c, params, lora, tokens, loss_mask, hp, args.repeats) for what, c in variants.items()}
    t_tunix, loss_tunix = tunix(cfg, params, args.rank, tokens, loss_mask, hp, args.repeats)
    (first, (_, loss)), *_ = timed.items()
    for what, other in [*((w, lo) for w, (_, lo) in timed.items()), ("Tunix", loss_tunix)]:
        if not abs(other - loss) <= 1e-4:
            raise AssertionError(f"first-step loss of {what} {other:.6f} != {first} {loss:.6f}: not the same step")
    flops = step_flops(cfg, B, T, args.rank)
    print(f"config {name}, B={B} T={T}, LoRA rank {args.rank} on {','.join(TARGETS)}, float32, "
          f"{jax.device_count()} device(s): {jax.devices()[0].device_kind}")
    print(f"measured float32 matmul peak: {peak:.1f} GFLOP/s; model FLOPs per step: {flops / 1e9:.2f} GFLOP")
    print("first-step loss: " + ", ".join(f"ours {w} {lo:.6f}" for w, (_, lo) in timed.items())
          + f", Tunix {loss_tunix:.6f}")
    print("| implementation | step time (s) | tokens/s | GFLOP/s | MFU |")
    print("|---|---|---|---|---|")
    label = {"scan": "scan over layers", "unrolled": "unrolled layers"}
    rows = [(f"nanotunix train_step ({label[what]})", t) for what, (t, _) in timed.items()]
    for row, t in [*rows, ("Tunix PeftTrainer (qwix LoRA)", t_tunix)]:
        print(f"| {row} | {t:.4f} | {B * T / t:.0f} | {flops / t / 1e9:.1f} | {flops / t / 1e9 / peak:.1%} |")
    print("speed-up ours / Tunix: " + ", ".join(f"{w} {t_tunix / t:.2f}x" for w, (t, _) in timed.items()))


if __name__ == "__main__":
    main()
