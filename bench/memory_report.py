"""Memory of a full-size LoRA train step (GEMMA2_2B by default, or any preset: --config): XLA's own numbers next to
train/memory.py's estimate, without and with vocabulary-chunked log-probs, then what fits on a few accelerators.

The step (rank 32 on q/kv/gate/up/down, bf16 base, float32 LoRA + AdamW, masked next-token CE, per-layer remat)
is lowered and compiled for a fake 8-device CPU mesh from abstract inputs (jax.ShapeDtypeStruct with shardings),
so nothing of the 2B model is allocated. `compiled.memory_analysis()` is per device. The activations are
constrained at block boundaries as in training (gemma_jax.sharding.ShardingCtx); --no-constraints lowers the
step without them (XLA's propagation alone), for comparison.

    python bench/memory_report.py                  # fsdp=2,tp=4 and fsdp=8, batch 2 x 2048, unchunked and chunked
    python bench/memory_report.py --batch 8 --seq 1024 --mesh fsdp=8 --chunk 8192
    python bench/memory_report.py --config GEMMA3_1B --fits-only    # the estimate's table only (seconds)
"""

import argparse
import dataclasses
import os
import sys
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from cli.common import CHUNKED_VOCAB, LOGITS_CHUNK  # noqa: E402
from gemma_jax import config as presets  # noqa: E402
from gemma_jax.model import ParamSpec, abstract_params, lora_specs  # noqa: E402
from gemma_jax.scoring import token_logprobs  # noqa: E402
from gemma_jax.sharding import (  # noqa: E402
    batch_sharding,
    lora_shardings,
    make_mesh,
    optimizer_shardings,
    param_shardings,
    parse_mesh_spec,
    sharding_ctx,
)
from lora.adapters import DEFAULT_TARGETS, LoRA  # noqa: E402
from train import memory  # noqa: E402
from train.optim import adamw_update, clip_by_global_norm  # noqa: E402

GB = 1e9


def make_train_step(cfg, lr=1e-5, shard=None):
    """(lora, opt, params, tokens_BT, mask_BT) -> (lora, opt, loss): masked next-token CE, grads of the adapters
    only, global-norm clip 1.0, AdamW. The loss is the project's token_logprobs (chunked with cfg.logits_chunk);
    shard: the ShardingCtx its activations are constrained with (None: none)."""
    def loss_fn(lora, params, tokens_BT, mask_BT):
        lp_BT = token_logprobs(params, tokens_BT, cfg, pad_mask_BT=mask_BT, lora=lora, shard=shard)
        m_BT = mask_BT[:, 1:].astype(jnp.float32)
        return -jnp.sum(lp_BT * m_BT) / jnp.maximum(jnp.sum(m_BT), 1.0)

    def step(lora, opt, params, tokens_BT, mask_BT):
        loss, grads = jax.value_and_grad(loss_fn)(lora, params, tokens_BT, mask_BT)
        grads, _ = clip_by_global_norm(grads, 1.0)
        lora, opt = adamw_update(grads, opt, lora, lr, weight_decay=0.1)
        return lora, opt, loss

    return step


def abstract_inputs(cfg, rank, batch, seq_len, mesh, lora_dtype=jnp.float32):
    """ShapeDtypeStructs (with shardings) of every train-step input: nothing is allocated."""
    def sds(shape, dtype, sharding):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

    specs = lora_specs(cfg, rank, DEFAULT_TARGETS)  # Gemma 4: per-layer tuples, None where a layer has no adapter
    lora_shape = LoRA(layers=jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, lora_dtype), specs,
                                          is_leaf=lambda x: isinstance(x, ParamSpec)), scale=2.0)
    l_sh = lora_shardings(lora_shape, mesh)
    lora = jax.tree.map(lambda x, s: sds(x.shape, x.dtype, s), lora_shape, l_sh)
    o_sh = optimizer_shardings(l_sh, mesh)
    opt = {"count": sds((), jnp.int32, o_sh["count"]),
           "mu": jax.tree.map(lambda x: sds(x.shape, jnp.float32, x.sharding), lora),
           "nu": jax.tree.map(lambda x: sds(x.shape, jnp.float32, x.sharding), lora)}
    params = jax.tree.map(lambda x, s: sds(x.shape, x.dtype, s), abstract_params(cfg), param_shardings(cfg, mesh))
    tokens = sds((batch, seq_len), jnp.int32, batch_sharding(mesh))
    mask = sds((batch, seq_len), jnp.bool_, batch_sharding(mesh))
    return lora, opt, params, tokens, mask


def compile_step(cfg, rank, batch, seq_len, mesh, constrain=True):
    """Lower and compile the step for abstract inputs; returns (compiled, seconds)."""
    args = abstract_inputs(cfg, rank, batch, seq_len, mesh)
    step = make_train_step(cfg, shard=sharding_ctx(mesh) if constrain else None)
    t0 = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(*args).compile()
    return compiled, time.perf_counter() - t0


def report_compiled(cfg, rank, batch, seq_len, mesh_spec, name="GEMMA2_2B", constrain=True):
    mesh = make_mesh(mesh_spec)
    compiled, secs = compile_step(cfg, rank, batch, seq_len, mesh, constrain)
    ma = compiled.memory_analysis()
    kw = dict(param_dtype=cfg.param_dtype, lora_rank=rank, batch=batch, seq_len=seq_len,
              mesh_shape=dict(mesh.shape), remat=cfg.remat)
    est, est_cpu = memory.estimate_bytes(cfg, **kw), memory.estimate_bytes(cfg, **kw, cpu_f32_copies=True)
    print(f"\n== {name} LoRA r{rank} step, batch {batch} x {seq_len}, mesh {mesh_spec}, remat {cfg.remat}, "
          f"logits chunk {cfg.logits_chunk}, activation constraints {'on' if constrain else 'off'} "
          f"(compiled in {secs:.0f} s), per device ==")
    print(f"XLA arguments   {ma.argument_size_in_bytes / GB:8.2f} GB   estimate params+LoRA+opt "
          f"{(est['base_params'] + est['lora_params'] + est['optimizer']) / GB:8.2f} GB")
    print(f"XLA outputs     {ma.output_size_in_bytes / GB:8.2f} GB   (aliased with donated inputs: "
          f"{ma.alias_size_in_bytes / GB:.2f} GB)")
    cpu = est_cpu["activations"] + est_cpu["grads"]
    print(f"XLA temps       {ma.temp_size_in_bytes / GB:8.2f} GB   estimate activations+grads "
          f"{(est['activations'] + est['grads']) / GB:8.2f} GB, with the CPU's f32 copies {cpu / GB:.2f} GB "
          f"(ratio XLA/estimate {ma.temp_size_in_bytes / cpu:.2f})")
    xla_peak = ma.argument_size_in_bytes + ma.output_size_in_bytes - ma.alias_size_in_bytes + ma.temp_size_in_bytes
    print(f"XLA total       {xla_peak / GB:8.2f} GB   estimate train_total {est['train_total'] / GB:8.2f} GB")
    return ma, est, est_cpu


def what_fits(cfg, rank, name="GEMMA2_2B"):
    """Largest SFT batch x length and GRPO group that fit in each device's memory, by the estimate (90% usable).
    The log-probs are chunked as the commands chunk them (cli/common.py: 8192 rows above a 65,536 vocabulary)."""
    if cfg.logits_chunk is None and cfg.vocab_size > CHUNKED_VOCAB:
        cfg = dataclasses.replace(cfg, logits_chunk=LOGITS_CHUNK)
    devices = [("TPU v5e-8, fsdp=1,tp=4 (per chip)", 16, {"tp": 4}), ("TPU v5e-8, fsdp=1,tp=8", 16, {"tp": 8}),
               ("TPU v5e-8, fsdp=8", 16, {"fsdp": 8}), ("H100 80 GB", 80, {}), ("24 GB GPU", 24, {})]
    print(f"\n== What fits: {name}, bf16 base, LoRA r{rank} f32 + AdamW, remat on, logits chunk {cfg.logits_chunk} "
          "(estimate, 90% of memory) ==")
    print(f"{'device':36s} {'SFT 2048: max batch':>20s} {'SFT batch 2: max len':>21s} {'GRPO G=4 x 1024':>16s} "
          f"{'sampling G=4, stacked / per-layer decode weights':>49s}")
    for name, gb, mesh_shape in devices:
        budget = 0.9 * gb * GB
        rows = []

        def fits(b, t, m=mesh_shape):
            return memory.estimate_bytes(cfg, param_dtype="bfloat16", lora_rank=rank, batch=b, seq_len=t,
                                         mesh_shape=m, remat=True)["train_total"] <= budget

        dp = mesh_shape.get("fsdp", 1)
        b = dp
        while fits(b + dp, 2048):
            b += dp
        rows.append(f"{b if fits(b, 2048) else 0}")
        t = 128
        while fits(max(2, dp), t * 2):
            t *= 2
        rows.append(f"{t if fits(max(2, dp), t) else 0}")
        grpo = {w: memory.estimate_bytes(cfg, param_dtype="bfloat16", lora_rank=rank, batch=4, seq_len=256 + 768,
                                         mesh_shape=mesh_shape, remat=True, cache_batch=4, cache_len=1024,
                                         decode_weights=w) for w in ("stacked", "per_layer")}
        train = grpo["stacked"]["train_total"]
        rows.append(f"{train / GB:.1f} GB {'fits' if train <= budget else 'NO'}")
        rows.append(f"{grpo['stacked']['sample_total'] / GB:.1f} / {grpo['per_layer']['sample_total'] / GB:.1f} GB")
        print(f"{name:36s} {rows[0]:>20s} {rows[1]:>21s} {rows[2]:>16s} {rows[3]:>49s}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, help="rows; default 2, or one per device of data x fsdp when that is more "
                    "(the rows are split over those axes, so they must divide the batch)")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--mesh", action="append", help="mesh spec(s); default fsdp=2,tp=4 and fsdp=8")
    ap.add_argument("--chunk", action="append", help="logits chunk(s) to compare, 'none' for the full logits; "
                    "default none and 8192")
    ap.add_argument("--no-constraints", action="store_true", help="lower without the activation constraints")
    ap.add_argument("--no-remat", action="store_true")
    ap.add_argument("--config", default="GEMMA2_2B", choices=sorted(
        n for n in dir(presets) if n.startswith("GEMMA") and isinstance(getattr(presets, n), presets.GemmaConfig)))
    ap.add_argument("--fits-only", action="store_true", help="skip the XLA compile; print the estimate tables")
    args = ap.parse_args(argv)
    cfg = dataclasses.replace(getattr(presets, args.config), param_dtype="bfloat16", remat=not args.no_remat)
    chunks = [None if c.lower() == "none" else int(c) for c in args.chunk or ["none", "8192"]]
    rows = []
    for spec in [] if args.fits_only else args.mesh or ["fsdp=2,tp=4", "fsdp=8"]:
        sizes = parse_mesh_spec(spec, len(jax.devices()))
        batch = args.batch or max(2, sizes["data"] * sizes["fsdp"])
        for chunk in chunks:
            c = dataclasses.replace(cfg, logits_chunk=chunk)
            ma, est, est_cpu = report_compiled(c, args.rank, batch, args.seq, spec, args.config,
                                               not args.no_constraints)
            rows.append((spec, batch, chunk, ma.temp_size_in_bytes, est["activations"] + est["grads"],
                         est_cpu["activations"] + est_cpu["grads"]))
    if rows:
        print(f"\n== {args.config} XLA temporaries vs estimate (activations + grads) per device, {args.seq} tokens per "
              f"row, before and after the logits chunking, constraints {'off' if args.no_constraints else 'on'} ==")
        print(f"{'mesh':14s} {'batch':>5s} {'logits chunk':>12s} {'XLA temps':>10s} {'TPU/GPU est.':>12s} "
              f"{'+ CPU f32 copies':>16s} {'XLA/estimate':>12s}")
        for spec, batch, chunk, xla, e, e_cpu in rows:
            print(f"{spec:14s} {batch:5d} {str(chunk):>12s} {xla / GB:7.2f} GB {e / GB:9.2f} GB {e_cpu / GB:13.2f} GB "
                  f"{xla / e_cpu:12.2f}")
    est = {}
    for m, ms in (("1 device", {}), ("fsdp=2,tp=4", {"fsdp": 2, "tp": 4}), ("tp=8", {"tp": 8})):
        one = {w: memory.estimate_bytes(cfg, param_dtype="bfloat16", lora_rank=args.rank, batch=args.batch or 2,
                                        seq_len=args.seq, mesh_shape=ms, remat=True, decode_weights=w)
               for w in ("per_layer", "stacked")}  # the sampler's two decode paths (gemma_jax/sampler.py)
        est[m] = {**one["per_layer"], "decode_w stacked": one["stacked"]["decode_weights"],
                  "sample_total stacked": one["stacked"]["sample_total"]}
    print(f"\n== Estimate per device, batch {args.batch or 2} x {args.seq} (decode weights per_layer; then stacked) ==")
    print(memory.format_table(est))
    what_fits(cfg, args.rank, args.config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
