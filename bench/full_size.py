"""Full-size benchmark on this CPU: one LoRA SFT step and one GRPO step of GEMMA2_2B (or GEMMA3_1B) in float32,
random weights of the real shapes, with wall times and peak RSS next to the planner's estimate (train/memory.py).

A benchmark, not a test: its numbers go to docs/full_size.md with the date and the machine, never into tests/.

    python bench/full_size.py                             # GEMMA2_2B, SFT then GRPO (~11 GB RAM, many minutes)
    python bench/full_size.py --config GEMMA3_1B          # Gemma 3 1B (~4 GB of weights)
    python bench/full_size.py --config GEMMA2_2B --part sft    # one part only: sft, grpo or both
    python bench/full_size.py --config TINY               # smoke run (also TINY_GEMMA3), seconds
    python bench/full_size.py --part grpo --decode-weights stacked   # sample from the stacked weights (no copy)

SFT: batch 1 x 512 tokens (the last 3/4 of the row in the loss), LoRA r32 on the default targets, remat on, through
`sft.train.train_step`; the first call is compile + run, the second a run only. GRPO: 1 prompt x G 2, a 64-token
prompt, 32 new tokens, beta 0.08 (the reference pass runs), through `grpo.rollout.rollout` (sampling + rewards +
reference log-probs) and `grpo.learner.train_step` (the update), twice; `--decode-weights` picks the sampler's
decode weights (per_layer, the CPU default: a per-layer copy of the weights; stacked: no copy). The tokenizer is a
small sentencepiece model trained here (tests/conftest.py), so nothing is downloaded. Each part runs in its own
subprocess, so each peak RSS (VmHWM) is its own; it includes the Python + XLA runtime (the `baseline` column) and
compile memory, which the planner does not count.
"""

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path[:0] = [os.path.join(os.path.dirname(__file__), ".."), os.path.join(os.path.dirname(__file__), "..", "tests")]

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from gemma_jax import config as presets  # noqa: E402
from gemma_jax.model import ParamSpec, count_params, param_specs  # noqa: E402
from gemma_jax.tokenizer import Tokenizer  # noqa: E402
from grpo.learner import GRPOHParams, to_micro_batches  # noqa: E402
from grpo.learner import train_step as grpo_train_step  # noqa: E402
from grpo.rollout import rollout  # noqa: E402
from lora.adapters import DEFAULT_TARGETS, init_lora  # noqa: E402
from sft.train import HParams  # noqa: E402
from sft.train import train_step as sft_train_step  # noqa: E402
from train import memory  # noqa: E402
from train.optim import adamw_init  # noqa: E402

CONFIGS = ("GEMMA2_2B", "GEMMA3_1B", "TINY", "TINY_GEMMA3")
RANK, SFT_LEN, PROMPT_LEN, NEW_TOKENS, G = 32, 512, 64, 32, 2
GB = 1e9


def peak_rss_bytes() -> int:
    """This process's peak resident set (VmHWM), in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _is_spec(x):
    return isinstance(x, ParamSpec)


def _normal_fn(spec, dtype):
    """A jitted key -> one weight of `spec` (init_params' formula: fan-in scaled normal, drawn in float32)."""
    return jax.jit(lambda key: (spec.fan_in ** -0.5 * jax.random.normal(key, spec.shape, jnp.float32)).astype(dtype))


def lean_init_params(cfg, seed=0):
    """gemma_jax.model.init_params' weights (same keys and formula; equal up to float32 rounding), one jitted call
    per weight, so the peak is the weights plus one weight's random draw. Eagerly, `std * normal(...)` holds two
    copies of the largest tensor (the 2.4 GB embedding of GEMMA2_2B); one jit of the whole init can hold the
    weights twice (bench/forward.py's note)."""
    leaves, treedef = jax.tree.flatten(param_specs(cfg), is_leaf=_is_spec)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    out = []
    for spec, key in zip(leaves, keys):
        if spec.init == "zeros":
            out.append(jnp.zeros(spec.shape, cfg.dtype))
        else:
            out.append(_normal_fn(spec, cfg.dtype)(key).block_until_ready())
    return jax.tree.unflatten(treedef, out)


def bench_cfg(name):
    return dataclasses.replace(getattr(presets, name), param_dtype="float32", remat=True)


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def sft_worker(cfg):
    """One SFT step twice on [1 micro-batch, 1 row, 512 tokens]; returns the result dict."""
    baseline = peak_rss_bytes()
    params = lean_init_params(cfg, 0)
    lora = init_lora(cfg, RANK, 2.0 * RANK, DEFAULT_TARGETS, seed=0)
    state = {"lora": lora, "opt": adamw_init(lora)}
    hp = HParams(lr=1e-4, warmup_steps=0, steps=10**6, weight_decay=0.1, clip=1.0, batch=1, grad_accum=1,
                 max_len=SFT_LEN)
    T = SFT_LEN
    loss_mask = np.zeros((1, T), bool)
    loss_mask[:, T // 4:] = True
    batch = {"tokens": np.random.default_rng(0).integers(4, cfg.vocab_size, (1, T)).astype(np.int32),
             "loss_mask": loss_mask, "pad_mask": np.ones((1, T), bool),
             "positions": np.arange(T, dtype=np.int32)[None], "segment_ids": np.ones((1, T), np.int32)}
    batch = jax.tree.map(lambda x: jnp.asarray(x[None]), batch)  # [k=1, B=1, T]
    weights_rss = peak_rss_bytes()

    def step():
        state["lora"], state["opt"], m = sft_train_step(state["lora"], state["opt"], params, batch, cfg=cfg, hp=hp)
        return float(m["loss"])  # float() blocks until the step is done

    first_s, loss1 = timed(step)
    second_s, loss2 = timed(step)
    est = memory.estimate_bytes(cfg, param_dtype="float32", lora_rank=RANK, batch=1, seq_len=T, remat=True)
    return {"first_s": first_s, "second_s": second_s, "loss1": loss1, "loss2": loss2, "baseline": baseline,
            "weights_rss": weights_rss, "peak": peak_rss_bytes(), "planner": est["train_total"],
            "params": count_params(params)}


class WideTokenizer(Tokenizer):
    """The test tokenizer under a model with a larger vocabulary: ids past its pieces (which random weights sample)
    decode as unk instead of raising. Text only feeds the toy reward, so this changes no timed array work."""

    def decode(self, ids) -> str:
        n = self.vocab_size
        return super().decode([i if i < n else self.sp.unk_id() for i in (int(i) for i in ids)])


def toy_reward(texts, records, *, prob_state, **kw):
    r = np.array([float(len(t)) for t in texts])
    return r, {"toy": r}, {}, prob_state


def grpo_worker(cfg, decode_weights="per_layer"):
    """Two GRPO steps of 1 prompt x G 2, sampling with `decode_weights`; returns the result dict."""
    from conftest import train_test_tokenizer

    tokenizer = WideTokenizer(train_test_tokenizer(tempfile.mkdtemp(prefix="full_size_tok_")))
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ValueError(f"tokenizer vocabulary {tokenizer.vocab_size} > model vocabulary {cfg.vocab_size}")
    baseline = peak_rss_bytes()
    params = lean_init_params(cfg, 0)
    lora = init_lora(cfg, RANK, 2.0 * RANK, DEFAULT_TARGETS, seed=0)
    state = {"lora": lora, "opt": adamw_init(lora)}
    # long enough that the prompt budget cuts it: the prompt is exactly PROMPT_LEN tokens
    records = [{"question": "Write a short story about a cat named Tom. " * 20, "answer": "1", "domain": "general",
                "system": "Be brief."}]
    hp = GRPOHParams(group_size=G, prompts_per_step=1, micro_batch=G, max_prompt_tokens=PROMPT_LEN,
                     max_new_tokens=NEW_TOKENS, temperature=0.6, top_k=50, top_p=1.0, beta=0.08, lr=1e-6,
                     decode_weights=decode_weights).check()
    weights_rss = peak_rss_bytes()
    calls = []
    for seed in range(2):
        sample_s, (ro, _, metrics, _) = timed(lambda: rollout(params, cfg, state["lora"], records, tokenizer, hp=hp,
                                                              reward_fn=toy_reward, seed=seed))
        sample_rss = peak_rss_bytes()
        batch, norms = to_micro_batches(ro, hp.micro_batch)

        def update():
            state["lora"], state["opt"], m = grpo_train_step(state["lora"], state["opt"], params, batch, norms,
                                                             cfg=cfg, hp=hp)
            return float(m["loss"])

        update_s, loss = timed(update)
        calls.append({"sample_s": sample_s, "update_s": update_s, "loss": loss, "ref_logp_s": metrics["ref_logp_s"],
                      "completion_len": metrics["completion_len_mean"], "sample_rss": sample_rss,
                      "prompt_len": int(ro["prompt"].shape[1]), "completion_width": int(ro["completion"].shape[1])})
    T = PROMPT_LEN + NEW_TOKENS
    est = memory.estimate_bytes(cfg, param_dtype="float32", lora_rank=RANK, batch=G, seq_len=T, remat=True,
                                cache_batch=G, cache_len=T, decode_weights=decode_weights)
    return {"calls": calls, "decode_weights": decode_weights, "baseline": baseline, "weights_rss": weights_rss,
            "sample_peak": calls[0]["sample_rss"],
            "peak": peak_rss_bytes(), "planner_train": est["train_total"], "planner_sample": est["sample_total"],
            "params": count_params(params)}


def run_part(part, name, decode_weights):
    res = subprocess.run([sys.executable, __file__, "--worker", part, "--config", name, "--decode-weights",
                          decode_weights], capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{part} worker for {name} failed (exit {res.returncode}; -9 is the OOM killer):\n"
                           f"{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def print_report(name, cfg, out):
    print(f"{name}, float32, remat on, LoRA r{RANK} on {','.join(DEFAULT_TARGETS)}, {jax.devices()[0].platform}, "
          f"{os.cpu_count()} CPU(s)")
    if "sft" in out:
        s = out["sft"]
        print(f"\nSFT step, 1 x {SFT_LEN} tokens ({s['params'] / 1e6:,.1f} M params): loss {s['loss1']:.4f} (first), "
              f"{s['loss2']:.4f} (second)")
        print("| call | wall s |\n|---|---|")
        print(f"| first (compile + run) | {s['first_s']:.2f} |\n| second (run) | {s['second_s']:.2f} |")
    if "grpo" in out:
        g = out["grpo"]
        c = g["calls"]
        print(f"\nGRPO step, 1 prompt x G {G}, prompt {c[0]['prompt_len']} tokens, {NEW_TOKENS} new tokens "
              f"(completion width {c[0]['completion_width']}, mean length {c[0]['completion_len']:.0f}), beta 0.08, "
              f"decode weights {g['decode_weights']}: "
              f"loss {c[0]['loss']:.4f} (first), {c[1]['loss']:.4f} (second)")
        print("| call | sampling + rewards + ref log-probs s | of it ref log-probs s | update s |\n|---|---|---|---|")
        for what, r in zip(("first (compile + run)", "second (run)"), c):
            print(f"| {what} | {r['sample_s']:.2f} | {r['ref_logp_s']:.2f} | {r['update_s']:.2f} |")
    print("\n| phase | peak RSS GB | planner GB | RSS / planner | RSS before weights GB | RSS after setup GB |")
    print("|---|---|---|---|---|---|")
    rows = []
    if "sft" in out:
        s = out["sft"]
        rows.append(("SFT train step (train_total)", s["peak"], s["planner"], s))
    if "grpo" in out:
        g = out["grpo"]
        rows.append(("GRPO sampling (sample_total)", g["sample_peak"], g["planner_sample"], g))
        rows.append(("GRPO whole step (train_total)", g["peak"], g["planner_train"], g))
    for what, peak, plan, r in rows:
        print(f"| {what} | {peak / GB:.3f} | {plan / GB:.3f} | {peak / plan:.2f} | {r['baseline'] / GB:.3f} | "
              f"{r['weights_rss'] / GB:.3f} |")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=CONFIGS, default="GEMMA2_2B")
    ap.add_argument("--part", choices=("sft", "grpo", "both"), default="both")
    ap.add_argument("--decode-weights", choices=("per_layer", "stacked"), default="per_layer",
                    help="GRPO: the sampler's decode weights (per_layer: a per-layer copy; stacked: none)")
    ap.add_argument("--worker", choices=("sft", "grpo"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    cfg = bench_cfg(args.config)
    if args.worker:
        out = sft_worker(cfg) if args.worker == "sft" else grpo_worker(cfg, args.decode_weights)
        print(json.dumps(out))
        return 0
    parts = ("sft", "grpo") if args.part == "both" else (args.part,)
    print_report(args.config, cfg, {p: run_part(p, args.config, args.decode_weights) for p in parts})
    return 0


if __name__ == "__main__":
    sys.exit(main())
