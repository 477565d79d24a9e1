"""`python run.py --stage grpo`: LoRA GRPO on RL records, resuming automatically after a kill.

    python run.py --stage grpo --base CKPT [--sft-adapters DIR] --data FILE [--eval-data FILE] [--tokenizer PATH]
        [--steps 100] [--group-size 4] [--beta 0.08] [--kl k3] [--loss-agg sequence-mean-token-mean] ...

Defaults are the recipe's (REFERENCE.md §5): G 4, beta 0.08, epsilon 0.2, temperature 0.6, top_k 50, top_p 1.0,
256 prompt + 768 generated tokens, lr 1e-6, grad clip 0.1, AdamW; LoRA rank 32 / alpha 64. SFT adapters, when
given, are merged into the frozen weights first: the SFT model is both the starting policy and the KL reference,
and the saved adapters are SFT + GRPO with their ranks concatenated (they load onto the plain base).
Outputs under --out: metrics.jsonl, checkpoints/, and the final adapters in adapters/ (lora/io.py).
Rerunning the same command continues from the newest checkpoint.
With neither --base nor --data, run.py runs the embedded default instead (grpo/embedded.py).
"""

import argparse
import os
import sys

from grpo.loss import KL_KINDS, LOSS_AGG_MODES


def parse_args(argv):
    p = argparse.ArgumentParser(prog="run.py --stage grpo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--base", default=None, help="base checkpoint: Hugging Face safetensors folder or Kaggle Flax/orbax folder")
    a("--sft-adapters", default=None, help="LoRA adapters from the SFT stage to start from (lora/io.py folder)")
    a("--data", default=None, help="RL training data (CSV/JSONL/parquet; see data/rl.py)")
    a("--data-kind", default="recipe_csv", help="data.rl source kind: recipe_csv, open_rs, litbench, rlpr")
    a("--eval-data", default=None, help="held-out RL data for greedy evaluation every --eval-every steps")
    a("--eval-limit", type=int, default=64, help="evaluate on the first N held-out records")
    a("--tokenizer", default=None, help="tokenizer.model (default: BASE/tokenizer.model)")
    a("--out", default="runs/grpo", help="output folder (metrics, checkpoints, adapters)")
    a("--steps", type=int, default=100, help="rollout steps (each does --iterations optimizer updates)")
    a("--prompts-per-step", type=int, default=2)
    a("--micro-batch", type=int, default=4, help="rows (completions) per forward/backward pass")
    a("--group-size", "-G", type=int, default=4)
    a("--iterations", type=int, default=1, help="GRPO mu: updates per rollout")
    a("--beta", type=float, default=0.08)
    a("--kl", choices=KL_KINDS, default="k3")
    a("--epsilon", type=float, default=0.2)
    a("--epsilon-high", type=float, default=None, help="upper clip (DAPO clip-higher, e.g. 0.28); default epsilon")
    a("--epsilon-c", type=float, default=None, help="dual-clip constant (> 1); default off")
    a("--loss-agg", choices=LOSS_AGG_MODES, default=LOSS_AGG_MODES[0])
    a("--loss-norm", type=float, default=None, help="normaliser for the sum-norm / token-scale aggregations")
    a("--gspo", action="store_true", help="GSPO-token sequence-level importance ratio")
    a("--adv-scale", choices=("group", "batch", "none"), default="group", help="none = Dr.GRPO (mean only)")
    a("--mask-truncated", action="store_true", help="no loss on completions cut at --max-new-tokens")
    a("--temperature", type=float, default=0.6)
    a("--top-k", type=int, default=50)
    a("--top-p", type=float, default=1.0)
    a("--max-prompt-tokens", type=int, default=256)
    a("--max-new-tokens", type=int, default=768)
    a("--lr", type=float, default=1e-6)
    a("--warmup-steps", type=int, default=0)
    a("--final-lr-ratio", type=float, default=1.0, help="1.0 constant lr; 0.0 cosine decay to zero")
    a("--weight-decay", type=float, default=0.1)
    a("--clip", type=float, default=0.1, help="global-norm gradient clip")
    a("--lora-rank", type=int, default=32)
    a("--lora-alpha", type=float, default=64.0)
    a("--prob-weight", type=float, default=2.0, help="weight of the RLPR probability reward (rule weight 1)")
    a("--mesh", default=None, help="device mesh, e.g. 'fsdp=4,tp=2' (gemma_jax/sharding.py); default one device")
    a("--dtype", default=None, choices=["float32", "bfloat16"], help="base weight dtype (default: checkpoint's)")
    a("--eval-every", type=int, default=20)
    a("--save-every", type=int, default=10)
    a("--sample-every", type=int, default=10, help="print sample completions every N steps")
    a("--seed", type=int, default=0)
    return p.parse_args(argv)


def load_model_and_tokenizer(base, tokenizer_path=None, adapters=None, dtype=None):
    """(cfg, params, lora or None, tokenizer) with the tokenizer's vocabulary checked against the model."""
    import gemma_jax

    tok_path = tokenizer_path or os.path.join(base, "tokenizer.model")
    if not os.path.exists(tok_path):
        raise FileNotFoundError(f"--tokenizer: {tok_path} does not exist (pass --tokenizer PATH/tokenizer.model)")
    tokenizer = gemma_jax.Tokenizer(tok_path)
    cfg, params = gemma_jax.load_checkpoint(base, dtype=dtype)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ValueError(f"{tok_path}: {tokenizer.vocab_size} pieces but the model vocab is {cfg.vocab_size}")
    lora = None
    if adapters:
        from lora.io import load_adapters

        lora = load_adapters(adapters, cfg)
    return cfg, params, lora, tokenizer


def hparams_from_args(args):
    from grpo.learner import GRPOHParams

    return GRPOHParams(
        group_size=args.group_size, prompts_per_step=args.prompts_per_step, micro_batch=args.micro_batch,
        num_iterations=args.iterations, beta=args.beta, kl=args.kl, epsilon=args.epsilon,
        epsilon_high=args.epsilon_high, epsilon_c=args.epsilon_c, loss_agg=args.loss_agg, loss_norm=args.loss_norm,
        gspo=args.gspo, adv_scale=args.adv_scale, mask_truncated=args.mask_truncated, temperature=args.temperature,
        top_k=args.top_k, top_p=args.top_p, max_prompt_tokens=args.max_prompt_tokens,
        max_new_tokens=args.max_new_tokens, lr=args.lr, warmup_steps=args.warmup_steps,
        final_lr_ratio=args.final_lr_ratio, total_steps=args.steps * args.iterations, weight_decay=args.weight_decay,
        clip=args.clip).check()


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.base is None or args.data is None:
        raise SystemExit("run.py --stage grpo: --base and --data are required (or neither, through run.py, for the "
                         "embedded default)")
    from grpo.evaluate import load_rl_records
    from grpo.learner import train
    from lora.adapters import DEFAULT_TARGETS, concat_lora, init_lora, merge
    from lora.io import save_adapters
    from rewards.router import RewardConfig, compute_rewards

    hp = hparams_from_args(args)
    cfg, params, sft_lora, tokenizer = load_model_and_tokenizer(args.base, args.tokenizer, args.sft_adapters,
                                                                args.dtype)
    if sft_lora is not None:
        # The SFT result is the policy GRPO starts from AND its reference: fold the SFT adapters into the frozen
        # weights (one merged copy replaces the base, no second copy), then train fresh adapters on top, so
        # lora=None is the SFT model and the KL term keeps the policy near it (as TRL's ref = initial policy).
        params = merge(params, sft_lora)
    targets = tuple(sft_lora.layers) if sft_lora is not None else DEFAULT_TARGETS
    lora = init_lora(cfg, args.lora_rank, args.lora_alpha, targets=targets, seed=args.seed)
    records = load_rl_records(args.data, tokenizer, kind=args.data_kind, prompt_budget=None)
    eval_records = None
    if args.eval_data:
        eval_records = load_rl_records(args.eval_data, tokenizer, kind=args.data_kind, limit=args.eval_limit)
    mesh = None
    if args.mesh:
        from gemma_jax.sharding import make_mesh

        mesh = make_mesh(args.mesh)
    print(f"GRPO: {len(records)} prompts, {args.steps} steps x {hp.prompts_per_step} prompts x G={hp.group_size}, "
          f"out {args.out}")
    lora, _, _ = train(cfg, params, lora, records, tokenizer, hp, args.out, reward_fn=compute_rewards,
                       reward_cfg=RewardConfig(prob_weight=args.prob_weight), eval_records=eval_records,
                       eval_every=args.eval_every, save_every=args.save_every, sample_every=args.sample_every,
                       seed=args.seed, mesh=mesh)
    extra = {"stage": "grpo", "steps": args.steps}
    if sft_lora is not None:  # saved adapters = SFT + GRPO (ranks concatenated): they load onto the plain base
        lora = concat_lora(sft_lora, lora)
        extra.update(sft_adapters=os.path.abspath(args.sft_adapters), composition="sft ranks then grpo ranks")
    save_adapters(os.path.join(args.out, "adapters"), lora, cfg, extra=extra)
    print(f"saved adapters to {os.path.join(args.out, 'adapters')}")
    return 0
