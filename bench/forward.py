"""Forward-pass benchmark: ours vs Tunix's Gemma on the same weights, same run.

Rows: prefill tokens/s (B x T full forward) and one decode step with a KV cache, on TINY and MID; with --full, the
full-size GEMMA2_2B float32 forward of 1 x 64 tokens (time, compile time, peak RSS), each model in its own process
so peak RSS is its own.

    python bench/forward.py            # TINY and MID rows (~1 minute)
    python bench/forward.py --full     # adds the 2B rows (~12 GB RAM per process, several minutes)
"""

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import time

sys.path[:0] = [os.path.join(os.path.dirname(__file__), ".."), os.path.join(os.path.dirname(__file__), "..", "tests")]

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import gemma_jax as g  # noqa: E402
from gemma_jax.model import forward, init_cache, init_params  # noqa: E402


def timeit(fn, repeats):
    """Median wall time of fn() (which must block), after one warm-up call that also gives the compile time."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), first


def ours_fns(cfg, params, B, T, S):
    tokens = jnp.asarray(np.random.RandomState(0).randint(4, cfg.vocab_size, (B, T)))
    prefill = jax.jit(lambda p, t: forward(p, t, cfg)[0])
    step = jax.jit(lambda p, t, c: forward(p, t, cfg, cache=c))
    cache = init_cache(cfg, B, S)
    _, cache = jax.jit(lambda p, t, c: forward(p, t, cfg, cache=c))(params, tokens, cache)
    one = tokens[:, :1]
    return (lambda: prefill(params, tokens).block_until_ready(),
            lambda: step(params, one, cache)[0].block_until_ready())


def tunix_fns(cfg, params, B, T, S):
    from flax import nnx
    from tunix.rl import common
    from tunix_utils import to_tunix

    model = to_tunix(params, cfg) if params is not None else None
    graphdef, state = nnx.split(model)
    tokens = jnp.asarray(np.random.RandomState(0).randint(4, cfg.vocab_size, (B, T)))
    mask = jnp.ones((B, T), bool)
    positions = common.build_positions_from_mask(mask)
    attn = common.make_causal_attn_mask(mask)

    @jax.jit
    def prefill(state, tokens):
        return nnx.merge(graphdef, state)(tokens, positions, None, attn)[0]

    @jax.jit
    def step(state, tok, pos, cache, attn_1):
        return nnx.merge(graphdef, state)(tok, pos, cache, attn_1)

    cache = model.init_cache(B, S, jnp.float32)
    cache = {k: {**v, "end_index": v["end_index"] + T} for k, v in cache.items()}
    pos1 = jnp.full((B, 1), T, jnp.int32)
    attn_1 = (jnp.arange(S) <= T)[None, None, :].repeat(B, 0)
    one = tokens[:, :1]
    return (lambda: prefill(state, tokens).block_until_ready(),
            lambda: step(state, one, pos1, cache, attn_1)[0].block_until_ready())


def small_rows(repeats):
    rows = []
    for name, cfg, B, T in [("TINY", g.TINY, 4, 128), ("MID", g.MID, 4, 128)]:
        # Tunix hard-codes head_dim**-0.5 for the query scale: give both models the same config.
        cfg = dataclasses.replace(cfg, query_pre_attn_scalar=cfg.head_dim)
        params = init_params(cfg, 0)
        S = T + 16
        ours = [timeit(f, repeats) for f in ours_fns(cfg, params, B, T, S)]
        theirs = [timeit(f, repeats) for f in tunix_fns(cfg, params, B, T, S)]
        rows.append((name, f"prefill {B}x{T} tok/s", B * T / ours[0][0], B * T / theirs[0][0], True))
        rows.append((name, f"decode step B={B} ms", 1e3 * ours[1][0], 1e3 * theirs[1][0], False))
        rows.append((name, "prefill compile s", ours[0][1], theirs[0][1], False))
    return rows


def full_worker(which):
    """Run in a subprocess: full-size GEMMA2_2B float32 forward of 1 x 64 tokens, print JSON."""
    cfg = g.GEMMA2_2B
    tokens = jnp.asarray(np.random.RandomState(0).randint(4, cfg.vocab_size, (1, 64)))
    if which == "ours":
        params = init_params(cfg, 0)  # eager, one tensor at a time: a jitted init of all 2.6B at once needs 2x RAM
        jax.block_until_ready(params)  # dispatch is async: without this the first timed call would include init
        fn = jax.jit(lambda p, t: forward(p, t, cfg)[0])
        run = lambda: fn(params, tokens).block_until_ready()  # noqa: E731
    else:
        from flax import nnx
        from tunix.models.gemma import model as tunix_gemma
        from tunix.rl import common
        from tunix_utils import tunix_config

        cfg_t = dataclasses.replace(cfg, query_pre_attn_scalar=cfg.head_dim)
        model = nnx.eval_shape(lambda: tunix_gemma.Gemma(tunix_config(cfg_t), rngs=nnx.Rngs(params=0)))
        graphdef, abstract_state = nnx.split(model)
        state = jax.tree.map(lambda a: jnp.full(a.shape, 0.01, a.dtype), abstract_state)
        mask = jnp.ones((1, 64), bool)
        pos, attn = common.build_positions_from_mask(mask), common.make_causal_attn_mask(mask)
        fn = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t, pos, None, attn)[0])
        run = lambda: fn(state, tokens).block_until_ready()  # noqa: E731
    step, first = timeit(run, 3)
    rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(json.dumps({"time": step, "compile": first - step, "rss_gb": rss_gb}))


def full_rows():
    out = {}
    for which in ("ours", "tunix"):
        res = subprocess.run([sys.executable, __file__, "--full-worker", which], capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"{which} full-size worker failed (exit {res.returncode}; -9 is the OOM killer):\n"
                           f"{res.stderr[-2000:]}")
        out[which] = json.loads(res.stdout.strip().splitlines()[-1])
    return [("GEMMA2_2B", "forward 1x64 f32 s", out["ours"]["time"], out["tunix"]["time"], False),
            ("GEMMA2_2B", "compile s", out["ours"]["compile"], out["tunix"]["compile"], False),
            ("GEMMA2_2B", "peak RSS GB", out["ours"]["rss_gb"], out["tunix"]["rss_gb"], False)]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="also run the full-size GEMMA2_2B rows")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--full-worker", choices=["ours", "tunix"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.full_worker:
        return full_worker(args.full_worker)
    rows = small_rows(args.repeats) + (full_rows() if args.full else [])
    print(f"{'model':<10} {'metric':<24} {'ours':>12} {'tunix':>12} {'speed-up':>9}")
    for model, metric, ours, theirs, higher_better in rows:
        ratio = ours / theirs if higher_better else theirs / ours
        print(f"{model:<10} {metric:<24} {ours:>12.3f} {theirs:>12.3f} {ratio:>8.2f}x")


if __name__ == "__main__":
    main()
