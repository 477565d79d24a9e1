"""Sampler benchmark: generated tokens/s of our `generate` vs Tunix's `Sampler`, same weights, same run.

Each row: B prompts of P tokens (unpadded, random ids), N new tokens, no stop id that can fire, so both samplers
generate exactly B*N tokens. Times are the best wall time of a whole call over --repeats rounds (ours and Tunix
alternating), after a warm-up call that compiles. Two rates per sampler:
    decode tok/s   B*(N-1) / (time of the call with N new tokens - time of the same call with 1 new token):
                   the decode loop alone (the call with 1 new token is the prefill plus the first sample);
    total tok/s    B*N / time of the call with N new tokens: prefill of B*P tokens included.
Per row also the decode step's weight-matmul floor: the time of that step's weight matmuls alone (q, k, v, o,
gate, up, down in every layer and the tied logits, chained layer to layer over the same per-layer weights the
sampler uses, gate and up output-major as its decode loop holds them; no attention over the cache, no norms, no
sampling), and the ratio ceiling, Tunix's decode ms/step over that floor: no sampler that runs these matmuls in
this layout through XLA's CPU kernels can beat Tunix by more (another layout can move the floor: it did).
Greedy unless --sample (T 0.6, top-k 50, as in the GRPO recipe; Tunix needs top_p for that mode, so top_p=1.0
there). Configs from bench/configs.py: Gemma 2's TINY and MID with query_pre_attn_scalar = head_dim (Tunix's Gemma
hard-codes that query scale) or, with --model gemma3, TINY_GEMMA3 and MID_GEMMA3 on Tunix's Gemma 3 (--model
gemma4: TINY_GEMMA4 and MID_GEMMA4 on Tunix's Gemma 4, whose own init_cache gives the Sampler its cache). Before timing,
each row checks that both samplers give the same greedy tokens on its prompts: in greedy mode on the warm-up
calls, with --sample on one greedy call of each made before the warm-up (so there the 1st-call columns come after
the greedy path has compiled).

    python bench/sampler.py                 # default grid: TINY and MID, ~6 minutes on a 2-core CPU
    python bench/sampler.py --model gemma3  # the same grid on TINY_GEMMA3 and MID_GEMMA3
    python bench/sampler.py --model gemma4 --models MID   # MID_GEMMA4's rows
    python bench/sampler.py --sweep         # B in {8,32} x N in {64,128,256} x P in {16,64,128}, TINY and MID
    python bench/sampler.py --sample        # the same rows with top-k sampling
    python bench/sampler.py --gpu           # GEMMA2_2B-shaped random bf16 weights, B 1 and 64: tok/s and the
                                            # fraction of the HBM-bandwidth roofline (ours only; needs a GPU)
    python bench/sampler.py --decode-weights-table --models TINY --rows 8 16 64
                                            # ours only: decode ms/step with per-layer vs stacked decode weights
"""

import argparse
import dataclasses
import os
import sys
import time

sys.path[:0] = [os.path.join(os.path.dirname(__file__), ".."), os.path.join(os.path.dirname(__file__), "..", "tests")]

import jax  # noqa: E402
import numpy as np  # noqa: E402
from configs import MODELS, bench_configs, to_tunix_model  # noqa: E402
from tunix_utils import IdTokenizer  # noqa: E402

import gemma_jax as g  # noqa: E402
from gemma_jax.decode import decode_layers, unstack_layers  # noqa: E402
from gemma_jax.model import _mlp, count_params, init_params  # noqa: E402
from gemma_jax.sampler import generate  # noqa: E402

NEVER = 10**9  # a stop id no model can emit: every row runs to N tokens


def best_of(fns, repeats, check=None):
    """[(best wall time, first-call time)] per fn. One warm-up call each (it compiles; `check` is then called with
    their results), then `repeats` rounds that alternate the fns, keeping each one's minimum: on a shared machine
    the minimum is the least disturbed run, and alternating exposes both to the same background load."""
    first, outputs = [], []
    for fn in fns:
        t0 = time.perf_counter()
        outputs.append(fn())
        first.append(time.perf_counter() - t0)
    if check is not None:
        check(outputs)
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - t0)
    return list(zip(best, first))


def matmul_floor_s(cfg, params, B, repeats, steps=32):
    """Seconds per decode step spent in the weight matmuls alone: every layer's projections (attention replaced by
    adding the keys and values to the queries, so that no projection is dead code) and the tied logits, each
    step's input depending on the last step's logits, over the per-layer weight copies the sampler uses
    (decode_weights="per_layer": gate and up transposed, gemma_jax/decode.py `decode_layers`). Gemma 4:
    each layer's own projections (k only where k = v, no k/v on KV-shared layers) and the per-layer-embedding
    matmuls (the model projection once per step, each layer's gate and projection)."""
    D = cfg.embed_dim
    ein = lambda eq, x, w: jax.numpy.einsum(eq, x, w)  # noqa: E731

    def step(_, x_B1D, layers, params):
        ple_B1LP = ein("BTD,DLP->BTLP", x_B1D, params["per_layer_proj"]) if cfg.per_layer_input_dim else None
        for i, w in enumerate(layers):
            q = ein("BTD,DNH->BTNH", x_B1D, w["q"])
            kv = [ein("BTD,DKH->BTKH", x_B1D, w[n]) for n in ("k", "v") if n in w]
            if kv:
                q = q + jax.numpy.repeat(sum(kv), cfg.num_heads // kv[0].shape[2], 2)
            x_B1D = x_B1D + ein("BTNH,NHD->BTD", q, w["o"])
            if ple_B1LP is not None:
                gate_B1P = ein("BTD,DP->BTP", x_B1D, w["ple_gate"]) * ple_B1LP[:, :, i]
                x_B1D = x_B1D + ein("BTP,PD->BTD", gate_B1P, w["ple_proj"])
            x_B1D = x_B1D + _mlp(x_B1D, w, None, 0.0)  # the model's gate, up, gelu, down
        logits_B1V = ein("BTD,VD->BTV", x_B1D, params["embed"])
        return x_B1D + 1e-6 * logits_B1V[..., :D]  # V >= D in the configs benchmarked here

    run = jax.jit(lambda x, layers, p: jax.lax.fori_loop(0, steps, lambda i, x: step(i, x, layers, p), x))
    per_layer = (lambda p: tuple(p)) if cfg.layer_list else (lambda p: unstack_layers(p, cfg.num_layers))
    layers = jax.jit(lambda p: decode_layers(per_layer(p)))(params["layers"])  # gate and up [F, D], as decoded
    top = {k: v for k, v in params.items() if k in ("embed", "per_layer_proj")}
    x = jax.numpy.full((B, 1, D), 0.01, jax.numpy.float32)
    [(t, _)] = best_of([lambda: jax.block_until_ready(run(x, layers, top))], repeats)
    return t / steps


def bench_row(cfg, params, tunix_model, B, P, N, sample, repeats):
    """[(best time with N new tokens, first-call time), (best time with 1 new token, _)] for ours, then Tunix."""
    from tunix.generate import sampler as tunix_sampler

    prompts = [[2] + r for r in np.random.RandomState(B * P + N).randint(4, cfg.vocab_size, (B, P - 1)).tolist()]
    samp = dict(temperature=0.6, top_k=50) if sample else dict(temperature=0.0)
    cache = tunix_sampler.CacheConfig(cache_size=P + N, num_layers=cfg.num_layers, num_kv_heads=cfg.num_kv_heads,
                                      head_dim=cfg.head_dim)
    smp = tunix_sampler.Sampler(tunix_model, IdTokenizer(), cache)
    texts = [" ".join(map(str, p)) for p in prompts]
    t_samp = dict(temperature=0.6, top_k=50, top_p=1.0) if sample else dict(temperature=0.0)
    ours = lambda n, **kw: lambda: generate(params, cfg, prompts, max_new_tokens=n, stop_ids=(NEVER,),  # noqa
                                            seed=0, prompt_bucket=P, **{**samp, **kw})
    theirs = lambda n, **kw: lambda: smp(texts, max_generation_steps=n, max_prompt_length=P,  # noqa
                                         eos_tokens=[NEVER], seed=0, **{**t_samp, **kw})
    greedy = lambda ours_N, theirs_N: check_same_greedy(ours_N.tokens, theirs_N.tokens, N)  # noqa: E731
    if sample:  # sampled tokens differ by RNG: check a greedy call of each first (it compiles the greedy path)
        greedy(ours(N, temperature=0.0, top_k=None)(), theirs(N, temperature=0.0, top_k=None, top_p=None)())
    res = best_of([ours(N), ours(1), theirs(N), theirs(1)], repeats,
                  check=None if sample else lambda outs: greedy(outs[0], outs[2]))
    return res[:2], res[2:]


def check_same_greedy(ours, theirs, N):
    """Both samplers should pick the same greedy tokens, all N of them in every row. A divergence is printed (row
    and step), not raised: with no stop token both decode exactly N steps either way, so the timed work is the
    same. Seen with Tunix's Gemma 3 at TINY_GEMMA3 B 32, P 128: from new token 16 of row 7 Tunix keeps emitting 0
    where ours, teacher forcing and transformers' Gemma3ForCausalLM (ours within 4.6e-6 of it over the whole
    sequence) all give 275, by a logit margin of 0.076 (docs/benchmarks.md)."""
    for i, row in enumerate(theirs):
        a, b = np.asarray(ours[i, :N]), np.asarray(row)
        if a.tolist() != b.tolist():
            step = int(np.argmax(a != b))
            print(f"note: greedy tokens differ from Tunix's Sampler from row {i}, new token {step} "
                  f"(ours {a[step]}, Tunix {b[step]})")
            return


def cpu_table(args):
    if args.sweep:
        grid = [(b, p, n) for b in (8, 32) for n in (64, 128, 256) for p in (16, 64, 128)]
        grids = {"TINY": grid, "MID": grid}
    else:
        grids = {"TINY": [(8, 16, 64), (32, 64, 128), (32, 128, 256)], "MID": [(8, 16, 64), (32, 128, 128)]}
    if args.rows:
        grids = {"TINY": [tuple(args.rows)], "MID": [tuple(args.rows)]}
    print(f"{'':<22} {'---------- decode tok/s ----------':>34}  {'---------- total tok/s ----------':>33}  "
          f"{'------- decode ms/step -------':>40}")
    print(f"{'model':<11} {'B':>3} {'P':>4} {'N':>4} {'ours':>10} {'tunix':>10} {'ratio':>7}  {'ours':>10} "
          f"{'tunix':>10} {'ratio':>7}  {'ours':>7} {'tunix':>7} {'mm floor':>8} {'ceiling':>7}  {'ours 1st s':>10} "
          f"{'tunix 1st s':>11}", flush=True)
    configs = bench_configs(args.model)
    for size, rows in grids.items():
        if args.models and size not in args.models:
            continue
        name, cfg = configs[size]
        params = init_params(cfg, 0)
        tunix_model = to_tunix_model(params, cfg)
        for B, P, N in rows:
            ((ours, ours_first), (ours1, _)), ((theirs, theirs_first), (theirs1, _)) = bench_row(
                cfg, params, tunix_model, B, P, N, args.sample, args.repeats)
            step_ours, step_theirs = (ours - ours1) / (N - 1), (theirs - theirs1) / (N - 1)
            floor = matmul_floor_s(cfg, params, B, args.repeats)
            print(f"{name:<11} {B:>3} {P:>4} {N:>4} {B / step_ours:>10.0f} {B / step_theirs:>10.0f} "
                  f"{step_theirs / step_ours:>6.2f}x  {B * N / ours:>10.0f} {B * N / theirs:>10.0f} "
                  f"{theirs / ours:>6.2f}x  {1e3 * step_ours:>7.2f} {1e3 * step_theirs:>7.2f} {1e3 * floor:>8.2f} "
                  f"{step_theirs / floor:>6.2f}x  {ours_first:>10.1f} {theirs_first:>11.1f}", flush=True)


def decode_weights_table(args):
    """Ours only, the two decode paths of `generate(decode_weights=...)` alternating on the same rows: decode
    ms/step as in the main table (time with N new tokens minus time with 1, over N - 1), and the ratio."""
    print(f"{'model':<11} {'B':>3} {'P':>4} {'N':>4} {'per_layer ms':>12} {'stacked ms':>10} {'stacked/per_layer':>17}")
    configs = bench_configs(args.model)
    rows = [tuple(args.rows)] if args.rows else [(8, 16, 64), (32, 64, 128)]
    for size in args.models or ["TINY", "MID"]:
        name, cfg = configs[size]
        params = init_params(cfg, 0)
        for B, P, N in rows:
            prompts = np.random.RandomState(B * P + N).randint(4, cfg.vocab_size, (B, P)).tolist()
            call = lambda n, w: lambda: generate(params, cfg, prompts, max_new_tokens=n, temperature=0.0,  # noqa
                                                 stop_ids=(NEVER,), prompt_bucket=P, decode_weights=w)
            same = lambda outs: np.testing.assert_array_equal(outs[0].tokens, outs[2].tokens)  # noqa: E731
            res = best_of([call(N, "per_layer"), call(1, "per_layer"), call(N, "stacked"), call(1, "stacked")],
                          args.repeats, check=same)
            per_layer, stacked = ((res[i][0] - res[i + 1][0]) / (N - 1) for i in (0, 2))
            print(f"{name:<11} {B:>3} {P:>4} {N:>4} {1e3 * per_layer:>12.2f} {1e3 * stacked:>10.2f} "
                  f"{stacked / per_layer:>16.2f}x", flush=True)


def gpu_table(args):
    """Decode roofline on an accelerator: each decode step must read every weight and the KV cache once, so
    bytes/step = weight bytes + B * cache bytes in use; time/step >= bytes / HBM bandwidth."""
    cfg = dataclasses.replace(g.GEMMA2_2B, param_dtype="bfloat16")
    params = jax.jit(lambda: init_params(cfg, 0))()
    wbytes = 2 * count_params(params)
    P, N = 128, args.gpu_new_tokens
    print(f"device {jax.devices()[0].device_kind}, weights {wbytes / 1e9:.2f} GB bf16, HBM {args.hbm_gbs:.0f} GB/s")
    print(f"{'B':>3} {'P':>4} {'N':>4} {'tok/s':>9} {'ms/step':>8} {'roofline ms/step':>16} {'fraction':>8}")
    for B in (1, 64):
        prompts = np.random.RandomState(B).randint(4, cfg.vocab_size, (B, P)).tolist()
        [(t, _)] = best_of([lambda: generate(params, cfg, prompts, max_new_tokens=N, temperature=0.0,
                                             stop_ids=(NEVER,), prompt_bucket=P)], args.repeats)
        step_s = t / N
        # Average cache in use over the run (keys + values, all layers, bf16).
        avg_len = P + N / 2
        kv_bytes = 2 * 2 * cfg.num_layers * B * avg_len * cfg.num_kv_heads * cfg.head_dim
        roof_s = (wbytes + kv_bytes) / (args.hbm_gbs * 1e9)
        print(f"{B:>3} {P:>4} {N:>4} {B * N / t:>9.0f} {1e3 * step_s:>8.2f} {1e3 * roof_s:>16.2f} "
              f"{roof_s / step_s:>8.2f}", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sweep", action="store_true", help="full grid (tens of minutes on a 2-core CPU)")
    ap.add_argument("--sample", action="store_true", help="top-k sampling (T 0.6, k 50) instead of greedy")
    ap.add_argument("--model", choices=MODELS, default="gemma2", help="model family of the CPU table")
    ap.add_argument("--models", nargs="*", choices=["TINY", "MID"], help="restrict the CPU table to these sizes")
    ap.add_argument("--rows", nargs=3, type=int, metavar=("B", "P", "N"), help="one row (B, P, N) instead of the grid")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--gpu", action="store_true", help="GEMMA2_2B-shaped bf16 decode roofline (ours only)")
    ap.add_argument("--gpu-new-tokens", type=int, default=256)
    ap.add_argument("--hbm-gbs", type=float, default=3350.0, help="HBM bandwidth GB/s (H100 SXM 3350, H200 4800)")
    ap.add_argument("--decode-weights-table", action="store_true", help="ours only: per_layer vs stacked decode")
    args = ap.parse_args()
    if args.decode_weights_table:
        return decode_weights_table(args)
    if args.gpu:
        return gpu_table(args)
    mode = "top-k sampling" if args.sample else "greedy"
    print(f"jax {jax.__version__}, {jax.devices()[0].platform}, float32, {mode}")
    cpu_table(args)


if __name__ == "__main__":
    main()
