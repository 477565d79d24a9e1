"""The GRPO loop written out: rollout -> num_iterations updates of the clipped surrogate + beta KL -> metrics,
evaluation, checkpoints (the structure of Tunix's `rl/grpo/grpo_learner.py` GRPOLearner without its class tree).

One optimizer update (`train_step`):
    rollout rows [B = prompts x G] -> micro-batches [M, B/M] --lax.scan--> summed grads of the GRPO loss of each
    micro-batch, every aggregation normalised by the WHOLE batch's row / token counts (so M accumulated
    micro-batches equal one big batch exactly) -> global-norm clip -> AdamW (train/optim.py).
Only the LoRA adapters are differentiated; the reference policy is the same base with lora=None.

Determinism and resume: the prompts of step s (and of its dynamic-sampling rounds, `extra_step_records`) and its
sampling seeds are functions of (seed, s) alone, so a run
killed after checkpoint s and restarted continues exactly like an uninterrupted run. A checkpoint holds the
adapters, the AdamW state, the step, and the probability reward's state (cached baselines and std EMA) in its
meta.json.
"""

import dataclasses
import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from gemma_jax.sampler import DECODE_WEIGHTS
from gemma_jax.scoring import completion_logprobs
from gemma_jax.sharding import place_train_state, sharding_ctx
from grpo.advantages import ESTIMATORS
from grpo.evaluate import evaluate
from grpo.loss import IS_LEVELS, KL_KINDS, LOSS_AGG_MODES, LOSS_TYPES, SAMPLER_IS_MODES, grpo_loss, sampler_is_weights
from grpo.rollout import rollout as do_rollout
from lora.adapters import LoRA
from rewards.prob import ProbState
from rewards.router import compute_rewards
from train.metrics import MetricsLogger
from train.optim import accumulate_grads, adamw_init, apply_update, check_nonfinite
from train.state import CheckpointManager, make_meta


@dataclasses.dataclass(frozen=True)
class GRPOHParams:
    """Every GRPO setting; frozen and hashable (a static jit argument). Defaults: the recipe's (docs/recipe.md).
    The command-line flags are generated from these fields, with these comments as their help."""

    steps: int = 100  # rollout steps; each does num_iterations optimizer updates
    group_size: int = 4  # G: completions sampled per prompt
    prompts_per_step: int = 2  # prompts per rollout step (rows = prompts_per_step x G)
    micro_batch: int = 4  # rows per forward/backward pass; must divide prompts_per_step x G
    num_iterations: int = 1  # updates per rollout (GRPO's mu); > 1 computes old log-probs
    beta: float = 0.08  # KL coefficient (0: no reference pass)
    kl: str = "k3"  # KL estimator: k3 (low-variance, >= 0) or k1
    epsilon: float = 0.2  # PPO clip: ratio kept in [1 - epsilon, 1 + epsilon_high]
    epsilon_high: float | None = None  # upper clip (DAPO clip-higher, e.g. 0.28); default: epsilon
    epsilon_c: float | None = None  # dual-clip constant (> 1) for negative advantages; default: off
    loss_agg: str = "sequence-mean-token-mean"  # Tunix loss aggregation (ignored when loss_type is set)
    loss_norm: float | None = None  # normaliser of the sum-norm / token-scale aggregations (None: Tunix's)
    loss_type: str | None = None  # a TRL loss type (grpo, bnpo, dr_grpo, dapo, cispo, sapo, luspo, vespo); None: Tunix
    gspo: bool = False  # GSPO-token: sequence-level importance ratio (Tunix loss_algo gspo-token)
    importance_sampling: str = "token"  # token or sequence (TRL importance_sampling_level)
    delta: float | None = None  # two-sided clip: ratio also capped at delta (TRL delta); default: off
    kl_is_weight: bool = False  # KL term weighted by the importance ratio (TRL use_bias_correction_kl)
    top_entropy_quantile: float = 1.0  # < 1: policy loss only on the highest-entropy tokens (TRL)
    entropy_coef: float = 0.0  # entropy bonus: loss -= entropy_coef x token-mean entropy
    adv_scale: str = "group"  # advantage std scaling: group, batch, or none (Dr. GRPO)
    adv_estimator: str = "grpo"  # grpo (scaled by adv_scale) or rloo (leave-one-out baseline, no std; Tunix)
    sampler_is: str | None = None  # sampler/learner IS correction (TRL vllm_importance_sampling_mode); None: off
    sampler_is_min: float | None = None  # sampler IS weights below this are truncated / masked (None: no bound)
    sampler_is_max: float | None = 3.0  # sampler IS weights above this are truncated / masked (None: no bound)
    overlong_buffer: int = 0  # DAPO soft overlong punishment over the last N tokens of max_new_tokens (0: off)
    overlong_penalty: float = 1.0  # factor of the overlong punishment (-factor at max_new_tokens)
    dynamic_sampling: bool = False  # DAPO: replace groups with all-equal rewards by groups of extra prompts
    max_extra_draws: int = 4  # dynamic sampling: at most this many extra rounds of prompts_per_step prompts
    mask_truncated: bool = False  # no loss on completions cut at max_new_tokens (DAPO overlong filter)
    temperature: float = 0.6  # sampling temperature (the log-probs are taken at the same temperature)
    top_k: int | None = 50  # sample among the k most likely tokens (None: all)
    top_p: float | None = 1.0  # nucleus threshold (None or 1.0: off)
    max_prompt_tokens: int = 256  # prompts longer than this keep their last tokens
    max_new_tokens: int = 768  # completion budget
    decode_weights: str = "auto"  # sampler decode weights: per_layer (a copy), stacked (none), auto (CPU: per_layer)
    lr: float = 1e-6  # peak learning rate
    warmup_steps: int = 0  # linear warmup, in optimizer updates
    final_lr_ratio: float = 1.0  # 1.0: constant lr after warmup; 0.0: cosine decay to zero
    weight_decay: float = 0.1  # AdamW decoupled weight decay
    clip: float = 0.1  # global-norm gradient clip (<= 0: off)
    b1: float = 0.9  # AdamW first-moment decay
    b2: float = 0.99  # AdamW second-moment decay
    eps: float = 1e-8  # AdamW epsilon
    max_nonfinite: int = 3  # consecutive rollout steps with a non-finite update (skipped) that stop the run

    @property
    def total_updates(self) -> int:
        return self.steps * self.num_iterations

    def check(self):
        """Raise ValueError naming the first inconsistent setting; returns self."""
        rows = self.prompts_per_step * self.group_size
        choices = {"kl": KL_KINDS, "loss_agg": LOSS_AGG_MODES, "adv_scale": ("group", "batch", "none"),
                   "loss_type": (None, *LOSS_TYPES), "importance_sampling": IS_LEVELS, "adv_estimator": ESTIMATORS,
                   "sampler_is": (None, *SAMPLER_IS_MODES), "decode_weights": DECODE_WEIGHTS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.group_size < 2:
            raise ValueError(f"group_size (G) must be >= 2 for group-relative advantages, got {self.group_size}")
        if self.micro_batch < 1 or rows % self.micro_batch:
            raise ValueError(f"micro_batch {self.micro_batch} must divide prompts_per_step x G = {rows}")
        if self.num_iterations < 1 or self.steps < 1:
            raise ValueError(f"steps and num_iterations must be >= 1, got {self.steps}, {self.num_iterations}")
        if not 0.0 < self.top_entropy_quantile <= 1.0:
            raise ValueError(f"top_entropy_quantile must be in (0, 1], got {self.top_entropy_quantile}")
        if not 0 <= self.overlong_buffer <= self.max_new_tokens:
            raise ValueError(f"overlong_buffer must be in [0, max_new_tokens={self.max_new_tokens}], "
                             f"got {self.overlong_buffer}")
        if self.max_extra_draws < 0:
            raise ValueError(f"max_extra_draws must be >= 0, got {self.max_extra_draws}")
        return self


# ----------------------------------------------------------------------------------------------- one update
# Metrics the loss already divides by the whole batch's rows / tokens: their sum over micro-batches is the batch's
# value. Names ending in max / min reduce by max / min; every other metric is a token-weighted mean.
BATCH_NORMALISED = ("loss", "policy_loss", "pg_loss", "kl_loss", "entropy", "clip_frac_lower", "tokens")


def reduce_micro_metrics(per_micro: dict) -> dict:
    """{name: [M] values of the M micro-batches} -> {name: the whole batch's value}."""
    w = per_micro["tokens"]
    out = {}
    for k, v in per_micro.items():
        if k in BATCH_NORMALISED:
            out[k] = jnp.sum(v)
        elif k.endswith("max"):
            out[k] = jnp.nanmax(v)
        elif k.endswith("min"):
            out[k] = jnp.nanmin(v)
        else:
            out[k] = jnp.sum(v * w) / jnp.maximum(jnp.sum(w), 1)
    return out


def _micro_loss(lora, mb, params, norms, cfg, hp: GRPOHParams, shard=None):
    logp, ent = completion_logprobs(params, cfg, mb["prompt"], mb["prompt_mask"], mb["completion"],
                                    mb["completion_mask"], lora=lora, temperature=hp.temperature, return_entropy=True,
                                    shard=shard)
    # TRL's loss types average over every row of the batch; the Tunix aggregations over the non-empty rows
    rows = norms["rows"] if hp.loss_type is None else norms["all_rows"]
    loss, m = grpo_loss(logp, mb["advantages"], mb["completion_mask"], old_logp_BC=mb.get("old_logp"),
                        ref_logp_BC=mb.get("ref_logp"), entropy_BC=ent, beta=hp.beta, epsilon=hp.epsilon,
                        epsilon_high=hp.epsilon_high, epsilon_c=hp.epsilon_c, kl=hp.kl, loss_agg=hp.loss_agg,
                        gspo=hp.gspo, num_rows=rows, num_tokens=norms["tokens"], norm=hp.loss_norm,
                        loss_type=hp.loss_type, importance_sampling=hp.importance_sampling, delta=hp.delta,
                        max_completion_length=hp.max_new_tokens, kl_is_weight=hp.kl_is_weight,
                        top_entropy_quantile=hp.top_entropy_quantile, entropy_coef=hp.entropy_coef,
                        sampler_logp_BC=mb["sampler_logp"] if hp.sampler_is else None,
                        sampler_is_mode=hp.sampler_is or "token_truncate", sampler_is_min=hp.sampler_is_min,
                        sampler_is_max=hp.sampler_is_max)
    if not hp.sampler_is and "sampler_logp" in mb:
        # Without the correction, still log the sampler/learner mismatch, measured where the correction would be:
        # against the loss's old log-probs (old_logp, or at num_iterations == 1 this very forward pass, which is
        # the policy that sampled). One place for both cases; the micro-batch token-weighted reduction of the mean
        # is the whole batch's mean over its tokens.
        old = jax.lax.stop_gradient(logp) if mb.get("old_logp") is None else mb["old_logp"]
        _, is_m = sampler_is_weights(mb["sampler_logp"], old, mb["completion_mask"])
        m = {**m, **{k: v for k, v in is_m.items() if k.startswith("sampling/sampling_logp_difference")}}
    return loss, {**m, "loss": loss}


def _train_step(lora, opt_state, params, batch, norms, *, cfg, hp: GRPOHParams, shard=None):
    loss_fn = lambda lo, mb: _micro_loss(lo, mb, params, norms, cfg, hp, shard)  # noqa: E731
    grads, per_micro = accumulate_grads(loss_fn, lora, batch)
    metrics = reduce_micro_metrics(per_micro)
    lora, opt_state, m = apply_update(grads, opt_state, lora, hp, loss=metrics["loss"])
    return lora, opt_state, {**metrics, **m}


# train_step(lora, opt_state, params, batch [M, B/M, ...], norms {"rows", "all_rows", "tokens"}, *, cfg, hp,
#   shard=None) -> (lora, opt_state, metrics). The adapters and optimizer state are donated (no second copy);
#   shard: the mesh's gemma_jax.sharding.ShardingCtx (activation constraints), None on one device.
train_step = jax.jit(_train_step, static_argnames=("cfg", "hp", "shard"), donate_argnums=(0, 1))


def to_micro_batches(ro: dict, micro_batch: int) -> tuple[dict, dict]:
    """The rollout's training arrays as [M, micro_batch, ...] stacks, and the whole batch's normalisers."""
    keys = ("prompt", "prompt_mask", "completion", "completion_mask", "advantages", "ref_logp", "old_logp",
            "sampler_logp")
    B = ro["prompt"].shape[0]
    batch = {k: ro[k].reshape(B // micro_batch, micro_batch, *ro[k].shape[1:]) for k in keys if k in ro}
    mask = ro["completion_mask"]
    norms = {"rows": jnp.float32(max(int((mask.sum(-1) > 0).sum()), 1)), "all_rows": jnp.float32(B),
             "tokens": jnp.float32(max(mask.sum(), 1))}
    return batch, norms


# ----------------------------------------------------------------------------------------------- the loop
def step_records(records, step: int, n: int, seed: int) -> list:
    """The `n` prompts of step `step`: a fresh seeded permutation per epoch, so they depend on (seed, step) only."""
    out = []
    for pos in range(step * n, step * n + n):
        epoch, i = divmod(pos, len(records))
        out.append(records[int(_epoch_order(len(records), seed, epoch)[i])])
    return out


def extra_step_records(records, step: int, round_: int, n: int, seed: int) -> list:
    """The `n` prompts of dynamic-sampling round `round_` >= 1 of step `step`: a stream of its own, seeded by
    (seed, step, round), so the main stream `step_records` is untouched and a resumed run draws the same extras."""
    rng = np.random.default_rng([seed, step, round_])
    return [records[int(i)] for i in rng.choice(len(records), n, replace=n > len(records))]


@functools.lru_cache(maxsize=4)
def _epoch_order(n, seed, epoch):
    return np.random.default_rng([seed, epoch]).permutation(n)


def _state_tree(lora, opt):
    return {"lora": lora.layers, "mu": opt["mu"].layers, "nu": opt["nu"].layers, "count": opt["count"]}


def _from_state_tree(tree, scale):
    opt = {"count": jnp.asarray(tree["count"], jnp.int32), "mu": LoRA(tree["mu"], scale),
           "nu": LoRA(tree["nu"], scale)}
    return LoRA(tree["lora"], scale), opt


def _prob_state_to_json(state):
    return None if state is None else {k: v for k, v in dataclasses.asdict(state).items()}


def _prob_state_from_json(obj):
    if obj is None:
        return None
    return ProbState(**obj)


def _print_samples(print_fn, records, texts, rewards, G, n=2):
    for i in range(min(n, len(records))):
        print_fn(f"--- sample: prompt {i}: {str(records[i].get('question', ''))[:200]!r}")
        print_fn(f"    reward {float(rewards[i * G]):.3f}; completion: {texts[i * G][:400]!r}")


def updates(lora, opt, params, ro: dict, hp: GRPOHParams, cfg, shard=None):
    """hp.num_iterations optimizer updates on one rollout. Returns (lora, opt, metrics as floats incl. train_s and
    train_tokens_per_s; nonfinite_skipped counts the skipped updates of all iterations)."""
    batch, norms = to_micro_batches(ro, hp.micro_batch)
    t0, skipped = time.perf_counter(), 0.0
    for _ in range(hp.num_iterations):
        lora, opt, m = train_step(lora, opt, params, batch, norms, cfg=cfg, hp=hp, shard=shard)
        skipped = skipped + m["nonfinite_skipped"]
    m = {k: float(v) for k, v in m.items()}  # blocks: the timing below is the real training time
    m["nonfinite_skipped"] = float(skipped)
    m["train_s"] = time.perf_counter() - t0
    seq_tokens = float(ro["prompt_mask"].sum() + ro["completion_mask"].sum()) * hp.num_iterations
    m["train_tokens_per_s"] = seq_tokens / max(m["train_s"], 1e-9)
    return lora, opt, m


def _resume(ckpt, lora, opt, ident, print_fn):
    """(step, lora, opt, prob_state) from the newest intact checkpoint, or the fresh ones at step 0."""
    restored = ckpt.restore_latest(_state_tree(lora, opt), expected_meta=ident)
    if restored is None:
        return 0, lora, opt, None
    step, tree, meta = restored
    lora, opt = _from_state_tree(tree, lora.scale)
    print_fn(f"resumed from {ckpt.directory} step {step}")
    return step, lora, opt, _prob_state_from_json(meta.get("prob_state"))


def train(cfg, params, lora, records, tokenizer, hp: GRPOHParams, out_dir: str, *, reward_fn=compute_rewards,
          reward_cfg=None, eval_records=None, eval_every: int = 0, save_every: int = 10, sample_every: int = 10,
          seed: int = 0, mesh=None, stop_at_step: int | None = None, print_fn=print, tensorboard: bool = False):
    """Run GRPO until `hp.steps` rollout steps are done (or `stop_at_step`).

    Resumes from the newest checkpoint under `{out_dir}/checkpoints` when there is one. Logs one line per step
    to `{out_dir}/metrics.jsonl` and the console. Returns (lora, opt_state, last step's metrics)."""
    hp.check()
    if not records:
        raise ValueError("train: no RL records")
    ckpt = CheckpointManager(os.path.join(out_dir, "checkpoints"))
    ident = make_meta(cfg, lora, group_size=hp.group_size)  # a checkpoint of another model / LoRA shape raises
    step, lora, opt, prob_state = _resume(ckpt, lora, adamw_init(lora), ident, print_fn)
    params, lora, opt = place_train_state(cfg, params, lora, opt, mesh)
    end = hp.steps if stop_at_step is None else min(stop_at_step, hp.steps)
    last, streak = {}, 0
    with MetricsLogger(out_dir, hp.steps, print_fn=print_fn, tensorboard=tensorboard) as log:
        log.start()
        while step < end:
            recs = step_records(records, step, hp.prompts_per_step, seed)
            extra = functools.partial(extra_step_records, records, step, n=hp.prompts_per_step, seed=seed)
            ro, texts, metrics, prob_state = do_rollout(params, cfg, lora, recs, tokenizer, hp=hp,
                                                        reward_fn=reward_fn, reward_cfg=reward_cfg,
                                                        prob_state=prob_state, seed=seed * 1_000_003 + step,
                                                        extra_records=extra)
            lora, opt, m = updates(lora, opt, params, ro, hp, cfg, sharding_ctx(mesh))
            step += 1
            last = {**metrics, **m}
            log.log(step, last)
            streak = check_nonfinite(last, step, streak, hp.max_nonfinite, print_fn)
            if sample_every and step % sample_every == 0:
                _print_samples(print_fn, recs, texts, ro["rewards"], hp.group_size)
            if eval_records and eval_every and (step % eval_every == 0 or step == hp.steps):
                log.log(step, evaluate(params, cfg, lora, eval_records, tokenizer, hp=hp), kind="eval")
            if save_every and (step % save_every == 0 or step == end):
                ckpt.save(step, _state_tree(lora, opt), {**ident, "step": step, "seed": seed,
                                                        "prob_state": _prob_state_to_json(prob_state)})
    return lora, opt, last
