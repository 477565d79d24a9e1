"""Forward-pass benchmark: ours vs Tunix's Gemma on the same weights, same run.

Rows: prefill tokens/s (B x T full forward) and one decode step with a KV cache, on TINY and MID (bench/configs.py;
Gemma 2, or with --model gemma3 / gemma4 Gemma 3 / Gemma 4 against Tunix's tunix.models.gemma3 / gemma4); with
--full, the full-size GEMMA2_2B float32 forward of 1 x 64 tokens (time, compile time, peak RSS), each model in its
own process so peak RSS is its own. Before timing, each row checks that both models give the same prefill and
decode-step logits (within 1e-4; MID_GEMMA4 1e-3: bench/configs.py LOGIT_TOL).

    python bench/forward.py                   # TINY and MID rows (~1 minute)
    python bench/forward.py --model gemma3    # TINY_GEMMA3 and MID_GEMMA3 rows
    python bench/forward.py --model gemma4    # TINY_GEMMA4 and MID_GEMMA4 rows
    python bench/forward.py --full            # adds the 2B rows (~12 GB RAM per process, several minutes)
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
from configs import LOGIT_TOL, MODELS, bench_configs, to_tunix_model  # noqa: E402

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
    """(prefill fn, decode-step fn, (prefill logits, decode-step logits), first prefill call s) of our model."""
    tokens = jnp.asarray(np.random.RandomState(0).randint(4, cfg.vocab_size, (B, T)))
    prefill = jax.jit(lambda p, t: forward(p, t, cfg)[0])
    step = jax.jit(lambda p, t, c: forward(p, t, cfg, cache=c))
    _, cache = jax.jit(lambda p, t, c: forward(p, t, cfg, cache=c))(params, tokens, init_cache(cfg, B, S))
    one = tokens[:, :1]  # the token after the prompt, at position T
    t0 = time.perf_counter()
    logits = prefill(params, tokens).block_until_ready()
    first = time.perf_counter() - t0  # the first prefill call: compile + one run
    return (lambda: prefill(params, tokens).block_until_ready(),
            lambda: step(params, one, cache)[0].block_until_ready(), (logits, step(params, one, cache)[0]), first)


def tunix_fns(cfg, params, B, T, S):
    """The same for Tunix's Gemma (Gemma 2 configs), Gemma 3 or Gemma 4, its cache prefilled with the same prompt."""
    from flax import nnx
    from tunix.generate import sampler as tunix_sampler
    from tunix.rl import common

    model = to_tunix_model(params, cfg)
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

    # The cache Tunix's Sampler builds: the model's own init_cache (Gemma 4: per-layer shapes, none for KV-shared
    # layers, a window-long ring on sliding layers), else (Gemma 2, 3) this function.
    if hasattr(model, "init_cache"):
        cache = model.init_cache(B, S, jnp.float32)
    else:
        cache = tunix_sampler._init_cache(cfg.num_layers, S, B, cfg.num_kv_heads, cfg.head_dim, jnp.float32)
    _, cache = step(state, tokens, positions, cache, jnp.pad(attn, ((0, 0), (0, 0), (0, S - T))))
    pos1 = jnp.full((B, 1), T, jnp.int32)
    attn_1 = (jnp.arange(S) <= T)[None, None, :].repeat(B, 0)
    one = tokens[:, :1]
    t0 = time.perf_counter()
    logits = prefill(state, tokens).block_until_ready()
    first = time.perf_counter() - t0
    return (lambda: prefill(state, tokens).block_until_ready(),
            lambda: step(state, one, pos1, cache, attn_1)[0].block_until_ready(),
            (logits, step(state, one, pos1, cache, attn_1)[0]), first)


def check_same(name, ours, theirs):
    """Both models must give the same prefill and decode-step logits before their times are compared (within 1e-4,
    or the config's LOGIT_TOL)."""
    tol = LOGIT_TOL.get(name, 1e-4)
    for what, a, b in zip(("prefill", "decode step"), ours, theirs):
        diff = float(jnp.abs(a - b).max())
        if not diff <= tol:
            raise AssertionError(f"{name} {what} logits differ from Tunix's by {diff:.2e} > {tol}")


def small_rows(model, sizes, repeats):
    rows = []
    for size, (name, cfg) in bench_configs(model).items():
        if size not in sizes:
            continue
        B, T = 4, 128
        params = init_params(cfg, 0)
        S = T + 16
        *ours, ours_out, ours_first = ours_fns(cfg, params, B, T, S)
        *theirs, theirs_out, theirs_first = tunix_fns(cfg, params, B, T, S)
        check_same(name, ours_out, theirs_out)
        ours = [timeit(f, repeats)[0] for f in ours]
        theirs = [timeit(f, repeats)[0] for f in theirs]
        rows.append((name, f"prefill {B}x{T} tok/s", B * T / ours[0], B * T / theirs[0], True))
        rows.append((name, f"decode step B={B} ms", 1e3 * ours[1], 1e3 * theirs[1], False))
        rows.append((name, "prefill compile s", ours_first, theirs_first, False))
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
    ap.add_argument("--model", choices=MODELS, default="gemma2")
    ap.add_argument("--sizes", nargs="+", choices=["TINY", "MID"], default=["TINY", "MID"])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--full-worker", choices=["ours", "tunix"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.full_worker:
        return full_worker(args.full_worker)
    if args.full and args.model != "gemma2":
        ap.error("--full runs GEMMA2_2B only")
    rows = small_rows(args.model, args.sizes, args.repeats) + (full_rows() if args.full else [])
    print(f"{'model':<11} {'metric':<24} {'ours':>12} {'tunix':>12} {'speed-up':>9}")
    for model, metric, ours, theirs, higher_better in rows:
        ratio = ours / theirs if higher_better else theirs / ours
        print(f"{model:<11} {metric:<24} {ours:>12.3f} {theirs:>12.3f} {ratio:>8.2f}x")


if __name__ == "__main__":
    main()
