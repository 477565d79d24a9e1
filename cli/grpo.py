"""`python run.py --stage grpo`: LoRA GRPO on RL records, resuming automatically after a kill.

    python run.py --stage grpo --base CKPT [--init-adapters SFT_ADAPTERS] --data FILE [--eval-data FILE]
        [--tokenizer PATH] [--steps 100] [--group-size 4] [--beta 0.08] [--kl k3] [--loss-type dapo] ...

Defaults are the recipe's (docs/recipe.md): G 4, beta 0.08, epsilon 0.2, temperature 0.6, top_k 50, top_p 1.0,
256 prompt + 768 generated tokens, lr 1e-6, grad clip 0.1, AdamW; LoRA rank 32 / alpha 64. SFT adapters, when
given, are merged into the frozen weights first: the SFT model is both the starting policy and the KL reference,
and the saved adapters are SFT + GRPO with their ranks concatenated (they load onto the plain base).
Outputs under --out: metrics.jsonl, checkpoints/, and the final adapters in adapters/ (lora/io.py).
Rerunning the same command continues from the newest checkpoint.
With neither --base nor --data, run.py runs the embedded default instead (cli/embedded.py).
"""

import os
import sys

from cli.common import (
    UsageError,
    add_hparam_flags,
    check_files,
    hparams_from_args,
    load_model,
    mesh_from_args,
    need,
    parser,
    run_cli,
    user_input,
)
from data.rl import CONVERTERS, prepare_rl
from grpo.learner import GRPOHParams, train
from lora.adapters import DEFAULT_TARGETS, concat_lora, init_lora, merge
from lora.io import save_adapters
from rewards.prob import ProbRewardConfig
from rewards.router import GENERAL_REWARDS, RewardConfig


def build_parser():
    p = parser("run.py --stage grpo", __doc__, train=True)
    a = p.add_argument
    a("--data-kind", choices=sorted(CONVERTERS), default="recipe_csv", help="source format of --data and --eval-data "
      "(data/rl.py; default: recipe_csv)")
    a("--eval-limit", type=int, default=64, help="evaluate on the first N held-out records (default: 64)")
    a("--sample-every", type=int, default=10, help="print sample completions every N steps (default: 10)")
    a("--prob-weight", type=float, default=2.0, help="weight of the probability reward; the rule rewards weigh 1 "
      "(default: 2.0)")
    a("--no-prob-debias", dest="prob_debias", action="store_false", help="ablation: probability reward p instead "
      "of clip(p - p_base, 0, 1) (rewards/prob.py)")
    a("--no-prob-std-filter", dest="prob_std_filter", action="store_false", help="ablation: no RLPR std filter")
    a("--prob-notebook-defects", action="store_true", help="ablation: the seed notebook's probability reward "
      "(mean over the answer tags and end-of-turn too, last 256 tokens only; rewards/prob.py)")
    a("--general-reward", choices=GENERAL_REWARDS, default="prob", help="non-math prompts: format + probability "
      "reward, or the format reward only (ablation; default: prob)")
    add_hparam_flags(p, GRPOHParams, aliases={"group_size": ("-G",)})
    p.set_defaults(out="runs/grpo", eval_every=20, save_every=10)
    return p


def load_rl_records(paths, tokenizer, *, kind: str, limit: int | None = None) -> list:
    """RL records of the files `paths` (data.rl.prepare_rl: its report names every dropped row's reason)."""
    records = []
    for path in paths:
        with user_input(path):
            recs, report = prepare_rl(path, kind=kind, count_tokens=lambda t: len(tokenizer.encode(t)))
        if not recs:
            dropped = {r: n for r, n in report["dropped"].items() if n}
            raise UsageError(f"{path}: no usable RL records (read {report['read']}, dropped {dropped or 0})")
        records += recs
    return records[:limit] if limit else records


def start_policy(params, cfg, sft_lora, args):
    """The SFT result is the policy GRPO starts from AND its reference: its adapters are folded into the frozen
    weights (one merged copy replaces the base), and fresh adapters train on top, so lora=None is the SFT model
    and the KL term keeps the policy near it (TRL's reference is likewise the initial policy)."""
    if sft_lora is not None:
        params = merge(params, sft_lora)
    targets = tuple(sft_lora.layers) if sft_lora is not None else DEFAULT_TARGETS
    return params, init_lora(cfg, args.lora_rank, args.lora_alpha, targets=targets, seed=args.seed)


def save_result(args, cfg, sft_lora, lora, hp) -> str:
    """Saved adapters = SFT + GRPO (ranks concatenated), so they load onto the plain base model."""
    extra = {"stage": "grpo", "steps": hp.steps}
    if sft_lora is not None:
        lora = concat_lora(sft_lora, lora)
        extra.update(sft_adapters=os.path.abspath(args.init_adapters), composition="sft ranks then grpo ranks")
    out = os.path.join(args.out, "adapters")
    save_adapters(out, lora, cfg, extra=extra)
    return out


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    need(args, "--base", "--data")
    check_files("--data", args.data)
    check_files("--eval-data", args.eval_data)
    hp = hparams_from_args(GRPOHParams, args)
    cfg, params, sft_lora, tokenizer = load_model(args.base, args.tokenizer, args.init_adapters, dtype=args.dtype,
                                                  adapters_flag="--init-adapters")
    mesh = mesh_from_args(args.mesh)
    records = load_rl_records(args.data, tokenizer, kind=args.data_kind)
    eval_records = None
    if args.eval_data:
        eval_records = load_rl_records(args.eval_data, tokenizer, kind=args.data_kind, limit=args.eval_limit)
    params, lora = start_policy(params, cfg, sft_lora, args)
    prob_cfg = ProbRewardConfig(debias=args.prob_debias, std_filter=args.prob_std_filter,
                                notebook_defects=args.prob_notebook_defects)
    reward_cfg = RewardConfig(prob_weight=args.prob_weight, general_reward=args.general_reward, prob=prob_cfg)
    print(f"GRPO: {len(records)} prompts, {hp.steps} steps x {hp.prompts_per_step} prompts x G={hp.group_size}, "
          f"out {args.out}")
    with user_input(f"--out {args.out}"):  # a checkpoint there of another model or LoRA shape
        lora, _, _ = train(cfg, params, lora, records, tokenizer, hp, args.out,
                           reward_cfg=reward_cfg, eval_records=eval_records,
                           eval_every=args.eval_every, save_every=args.save_every, sample_every=args.sample_every,
                           seed=args.seed, mesh=mesh, tensorboard=args.tensorboard)
    print(f"saved adapters to {save_result(args, cfg, sft_lora, lora, hp)}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, sys.argv[1:], prog="run.py --stage grpo"))
