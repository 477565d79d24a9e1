"""One full GRPO step, ours vs Tunix 0.1.7's GRPOLearner, same run, same weights (docs/reference.md#grpo-in-tunix).

A step = sampling (P prompts x G completions) + rewards + reference log-probs + advantages + one update.
Both sides: the same TINY-shaped Gemma 2 (query_pre_attn_scalar = head_dim, Tunix's fixed query scale), LoRA
rank 8 on q, kv, gate, up, down (ours: lora/; Tunix: qwix on the same einsums), the same prompts, G, lengths,
temperature, a toy reward, beta 0.08, AdamW. Tunix's step is timed through its own pieces:
`GRPOLearner._generate_and_compute_advantage` (sampling + ref log-probs + rewards + advantages) and
`RLCluster.update_actor` (the update); ours through `grpo.rollout.rollout` and `grpo.learner.train_step`.
Each side is warmed up (compiled) with one step first, then the median of --repeats steps is reported. With
--model gemma3 both sides run TINY_GEMMA3 (bench/configs.py; Tunix: tunix.models.gemma3), with --model gemma4
TINY_GEMMA4 (Tunix: tunix.models.gemma4; the test tokenizer has Gemma 4's turn markers). Before timing, the Tunix
actor (LoRA applied, B = 0) and reference must give our logits on the prompts within 1e-4: sampled completions
differ by RNG, so the check is on the models, not on the steps' outputs.

    python bench/grpo_step.py [--model gemma2|gemma3|gemma4] [--prompts 2] [--G 4] [--new-tokens 32] [--repeats 5]
"""

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time

sys.path[:0] = [os.path.join(os.path.dirname(__file__), ".."), os.path.join(os.path.dirname(__file__), "..", "tests")]

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from configs import MODELS, bench_configs, to_tunix_model  # noqa: E402
from tunix_utils import tunix_logits  # noqa: E402

from gemma_jax.model import forward, init_params  # noqa: E402
from gemma_jax.tokenizer import Tokenizer  # noqa: E402
from grpo.learner import GRPOHParams, to_micro_batches, train_step  # noqa: E402
from grpo.rollout import rollout  # noqa: E402
from lora.adapters import init_lora  # noqa: E402
from train.optim import adamw_init  # noqa: E402

QUESTIONS = ["what is 3 plus 9?", "write a short story about a cat named Tom.", "what is 12 plus 36?",
             "the quick brown fox jumps over the lazy dog?"]


def toy_reward_values(texts):
    return np.array([float(t.count("e")) for t in texts])


def ours_step_fn(cfg, params, tokenizer, hp, records, extra_records=None):
    lora = init_lora(cfg, 8, 16.0, targets=("q", "kv", "gate", "up", "down"), seed=0)
    opt = adamw_init(lora)

    def reward_fn(texts, recs, *, prob_state, **kw):
        r = toy_reward_values(texts)
        return r, {"toy": r}, {}, prob_state

    state = {"lora": lora, "opt": opt, "seed": 0}

    def step():
        t0 = time.perf_counter()
        ro, _, _, _ = rollout(params, cfg, state["lora"], records, tokenizer, hp=hp, reward_fn=reward_fn,
                              seed=state["seed"], extra_records=extra_records)
        t1 = time.perf_counter()
        batch, norms = to_micro_batches(ro, hp.micro_batch)
        state["lora"], state["opt"], m = train_step(state["lora"], state["opt"], params, batch, norms, cfg=cfg, hp=hp)
        jax.block_until_ready(m["loss"])
        state["seed"] += 1
        return t1 - t0, time.perf_counter() - t1

    return step


def check_same_logits(cfg, params, tunix_models, tokenizer, records):
    """Each Tunix model must give our base model's logits on the (unpadded, one at a time) prompts within 1e-4."""
    for r in records:
        tokens = np.asarray([tokenizer.encode_chat(r["question"], r["system"])])
        ours = np.asarray(forward(params, jnp.asarray(tokens), cfg)[0])
        for name, model in tunix_models.items():
            diff = float(np.abs(tunix_logits(model, tokens) - ours).max())
            if not diff <= 1e-4:
                raise AssertionError(f"Tunix {name} logits differ from ours by {diff:.2e} > 1e-4")


def tunix_step_fn(cfg, params, tokenizer, hp, records):
    import optax
    import qwix
    from flax import nnx
    from tunix.rl import rl_cluster as rlc
    from tunix.rl.grpo import grpo_learner as gl
    from tunix.rl.rollout import base_rollout

    base = to_tunix_model(params, cfg)
    provider = qwix.LoraProvider(module_path=".*q_einsum|.*kv_einsum|.*gate_proj|.*up_proj|.*down_proj", rank=8,
                                 alpha=16.0)
    actor = qwix.apply_lora_to_model(to_tunix_model(params, cfg), provider, rngs=nnx.Rngs(0), **base.get_model_input())
    check_same_logits(cfg, params, {"actor": actor, "reference": base}, tokenizer, records)
    auto = (jax.sharding.AxisType.Auto,) * 2  # Explicit axes (jax 0.10's default) break Tunix's embedding gather
    mesh = jax.make_mesh((1, 1), ("fsdp", "tp"), axis_types=auto, devices=jax.devices()[:1])
    cluster = rlc.RLCluster(
        actor=actor, reference=base, tokenizer=tokenizer.sp,
        cluster_config=rlc.ClusterConfig(
            role_to_mesh={rlc.Role.ACTOR: mesh, rlc.Role.REFERENCE: mesh, rlc.Role.ROLLOUT: mesh},
            rollout_engine="vanilla", offload_to_cpu=False,
            training_config=rlc.RLTrainingConfig(actor_optimizer=optax.adamw(hp.lr, b1=hp.b1, b2=hp.b2),
                                                 eval_every_n_steps=10_000, max_steps=10_000,
                                                 checkpoint_root_directory=None,
                                                 metrics_logging_options=None),
            rollout_config=base_rollout.RolloutConfig(max_tokens_to_generate=hp.max_new_tokens,
                                                      max_prompt_length=hp.max_prompt_tokens,
                                                      kv_cache_size=2 * (hp.max_prompt_tokens + hp.max_new_tokens) + 64,
                                                      temperature=hp.temperature, top_k=hp.top_k, top_p=hp.top_p)))

    def reward(prompts, completions, **kw):
        return list(toy_reward_values(completions))

    learner = gl.GRPOLearner(rl_cluster=cluster, reward_fns=reward,
                             algo_config=gl.GRPOConfig(num_generations=hp.group_size, num_iterations=1,
                                                       beta=hp.beta, epsilon=hp.epsilon, kl_loss_mode="low_var_kl"))
    # set by GRPOLearner.train() in Tunix; we call its step pieces directly: all prompts in one micro-batch
    learner._rollout_micro_batch_size = learner._compute_logps_micro_batch_size = len(records)
    prompts = [tokenizer.chat_prompt(r["question"], r["system"]) for r in records]
    rep = [p for p in prompts for _ in range(hp.group_size)]

    def step():
        t0 = time.perf_counter()
        example = learner._generate_and_compute_advantage({"prompts": rep})
        jax.block_until_ready(example.advantages)
        t1 = time.perf_counter()
        cluster.update_actor([example], None)
        jax.block_until_ready(nnx.state(actor, nnx.LoRAParam))
        return t1 - t0, time.perf_counter() - t1

    return step


def measure(step, repeats):
    compile_s = sum(step())
    runs = [step() for _ in range(repeats)]
    total = [a + b for a, b in runs]
    i = int(np.argsort(total)[len(total) // 2])
    return {"step_s": statistics.median(total), "sample_s": runs[i][0], "train_s": runs[i][1], "first_s": compile_s}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=MODELS, default="gemma2")
    p.add_argument("--prompts", type=int, default=2)
    p.add_argument("--G", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--tokenizer", default=None, help="tokenizer.model (default: a test tokenizer trained here)")
    p.add_argument("--variants", action="store_true", help="also time the GRPO variants that change the step's work "
                   "(sequence-level IS, sampler IS, dynamic sampling) against our default, same run")
    args = p.parse_args(argv)
    tok_path = args.tokenizer
    if tok_path is None:  # Gemma 4 with its own turn markers, so both sides prompt in Gemma 4's chat format
        from conftest import GEMMA4_PIECES, SPECIAL_PIECES, train_test_tokenizer

        pieces = GEMMA4_PIECES if args.model == "gemma4" else SPECIAL_PIECES
        tok_path = train_test_tokenizer(tempfile.mkdtemp(prefix="grpo_bench_tok_"), pieces=pieces)
    tokenizer = Tokenizer(tok_path)
    name, cfg = bench_configs(args.model)["TINY"]
    params = init_params(cfg, seed=0)
    records = [{"question": QUESTIONS[i % len(QUESTIONS)], "answer": "1", "domain": "general", "system": "Be brief."}
               for i in range(args.prompts)]
    hp = GRPOHParams(group_size=args.G, prompts_per_step=args.prompts, micro_batch=args.prompts * args.G,
                     max_prompt_tokens=32, max_new_tokens=args.new_tokens, temperature=0.6, top_k=50, top_p=1.0,
                     lr=1e-6, beta=0.08, clip=0.0, weight_decay=0.0)
    rows = {"ours": measure(ours_step_fn(cfg, params, tokenizer, hp, records), args.repeats),
            "tunix": measure(tunix_step_fn(cfg, params, tokenizer, hp, records), args.repeats)}
    print(f"GRPO step, {name}, {args.prompts} prompts x G={args.G}, {args.new_tokens} new tokens, LoRA r8, "
          f"{jax.devices()[0].platform}")
    print(f"{'':<8}{'step s':>10}{'sampling+rewards s':>20}{'update s':>10}{'first step s':>14}")
    for name, r in rows.items():
        print(f"{name:<8}{r['step_s']:>10.4f}{r['sample_s']:>20.4f}{r['train_s']:>10.4f}{r['first_s']:>14.2f}")
    print(f"speed-up (tunix / ours): {rows['tunix']['step_s'] / rows['ours']['step_s']:.2f}x")
    if args.variants:
        print_variants(cfg, params, tokenizer, hp, records, rows["ours"], args.repeats)
    return 0


# Variants whose step does different work than the default (the loss types only reweight the same tokens).
VARIANTS = {
    "--importance-sampling sequence": dict(importance_sampling="sequence"),
    "--sampler-is token_truncate": dict(sampler_is="token_truncate"),
    "--loss-type dapo --dynamic-sampling": dict(loss_type="dapo", dynamic_sampling=True, max_extra_draws=2),
}


def print_variants(cfg, params, tokenizer, hp, records, default, repeats):
    """Ours with each variant on, timed in the same run as the default row (the toy reward gives many zero-spread
    groups, so dynamic sampling draws extra rounds of the same prompts: its cost per draw)."""
    print(f"\n{'variant':<40}{'step s':>10}{'sampling+rewards s':>20}{'update s':>10}{'vs default':>12}")
    print(f"{'(default)':<40}{default['step_s']:>10.4f}{default['sample_s']:>20.4f}{default['train_s']:>10.4f}"
          f"{1.0:>11.2f}x")
    for name, overrides in VARIANTS.items():
        v_hp = dataclasses.replace(hp, **overrides)
        extra = (lambda k: records) if v_hp.dynamic_sampling else None
        r = measure(ours_step_fn(cfg, params, tokenizer, v_hp, records, extra_records=extra), repeats)
        print(f"{name:<40}{r['step_s']:>10.4f}{r['sample_s']:>20.4f}{r['train_s']:>10.4f}"
              f"{r['step_s'] / default['step_s']:>11.2f}x")


if __name__ == "__main__":
    sys.exit(main())
