"""Time and XLA temporary memory of an SFT-like step (value_and_grad of the mean token log-prob w.r.t. LoRA
adapters) with unchunked vs vocabulary-chunked log-probs (gemma_jax/scoring.py).

    python bench/chunked_logprobs.py                      # MID (V = 8192), B=4 x T=129, chunks 4096 / 2048 / 1024
    python bench/chunked_logprobs.py --batch 2 --seq 65 --repeats 3
"""

import argparse
import dataclasses
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from gemma_jax.config import MID  # noqa: E402
from gemma_jax.model import init_params  # noqa: E402
from gemma_jax.scoring import token_logprobs  # noqa: E402
from lora.adapters import init_lora  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=129)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--chunks", default="4096,2048,1024")
    args = ap.parse_args()
    params = init_params(MID)
    lora = init_lora(MID, 16, 32.0)
    tokens = jax.random.randint(jax.random.key(0), (args.batch, args.seq), 0, MID.vocab_size)
    rows = []
    for chunk in [None] + [int(c) for c in args.chunks.split(",")]:
        cfg = dataclasses.replace(MID, logits_chunk=chunk)

        def loss(lora, params, tokens, cfg=cfg):
            return -jnp.mean(token_logprobs(params, tokens, cfg, lora=lora))

        step = jax.jit(jax.value_and_grad(loss))
        temp = step.lower(lora, params, tokens).compile().memory_analysis().temp_size_in_bytes
        jax.block_until_ready(step(lora, params, tokens))  # compile + warm-up
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(step(lora, params, tokens))
            times.append(time.perf_counter() - t0)
        rows.append((chunk, float(np.median(times)), min(times), temp))
    base = rows[0][1]
    print(f"MID, B={args.batch} x T={args.seq}, {args.repeats} repeats after compile, {jax.devices()[0].platform}")
    print(f"{'chunk':>6} {'median s':>9} {'min s':>7} {'vs unchunked':>12} {'XLA temp MiB':>12}")
    for chunk, med, best, temp in rows:
        print(f"{str(chunk):>6} {med:9.3f} {best:7.3f} {med / base:11.2f}x {temp / 2**20:12.1f}")


if __name__ == "__main__":
    main()
