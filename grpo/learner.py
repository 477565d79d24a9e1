"""The GRPO loop written out: rollout -> num_iterations updates of the clipped surrogate + beta KL -> metrics,
evaluation, checkpoints (REFERENCE.md §4, §5; the structure of Tunix's GRPOLearner without its class tree).

One optimizer update (`train_step`):
    rollout rows [B = prompts x G] -> micro-batches [M, B/M] --lax.scan--> summed grads of the GRPO loss of each
    micro-batch, every aggregation normalised by the WHOLE batch's row / token counts (so M accumulated
    micro-batches equal one big batch exactly) -> global-norm clip -> AdamW (sft/optim.py).
Only the LoRA adapters are differentiated; the reference policy is the same base with lora=None.

Determinism and resume: the prompts of step s and its sampling seed are functions of (seed, s) alone, so a run
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

from gemma_jax.scoring import completion_logprobs
from gemma_jax.sharding import place_train_state
from grpo.loss import grpo_loss
from grpo.rollout import rollout as do_rollout
from lora.adapters import LoRA
from sft.metrics import MetricsLogger
from sft.optim import adamw_init, adamw_update, clip_by_global_norm, lr_schedule


@dataclasses.dataclass(frozen=True)
class GRPOHParams:
    """Every GRPO setting; frozen and hashable (a static jit argument). Defaults: the recipe (REFERENCE.md §5)."""

    group_size: int = 4  # G completions per prompt
    prompts_per_step: int = 2
    micro_batch: int = 4  # rows (completions) per forward/backward; prompts_per_step * G must be a multiple
    num_iterations: int = 1  # updates per rollout (GRPO's mu); > 1 computes old log-probs
    beta: float = 0.08  # KL coefficient
    kl: str = "k3"  # see grpo.loss.kl_penalty for why k3 is the default
    epsilon: float = 0.2
    epsilon_high: float | None = None  # None: = epsilon
    epsilon_c: float | None = None  # dual clip (Tunix), None: off
    loss_agg: str = "sequence-mean-token-mean"
    loss_norm: float | None = None  # normaliser of the sum-norm / token-scale modes (None: Tunix defaults)
    gspo: bool = False  # GSPO-token sequence-level ratio
    adv_scale: str = "group"  # group | batch | none (Dr.GRPO)
    mask_truncated: bool = False  # completions cut at max_new_tokens get no loss
    temperature: float = 0.6
    top_k: int | None = 50
    top_p: float | None = 1.0
    max_prompt_tokens: int = 256
    max_new_tokens: int = 768
    lr: float = 1e-6
    warmup_steps: int = 0
    final_lr_ratio: float = 1.0  # 1.0: constant lr after warmup; 0.0: cosine to zero
    total_steps: int = 100  # optimizer updates over the run (schedule length)
    weight_decay: float = 0.1
    clip: float = 0.1  # global-norm gradient clip
    b1: float = 0.9
    b2: float = 0.99

    def check(self):
        rows = self.prompts_per_step * self.group_size
        if self.group_size < 2:
            raise ValueError(f"group_size (G) must be >= 2 for group-relative advantages, got {self.group_size}")
        if self.micro_batch < 1 or rows % self.micro_batch:
            raise ValueError(f"micro_batch {self.micro_batch} must divide prompts_per_step x G = {rows}")
        if self.num_iterations < 1:
            raise ValueError(f"num_iterations must be >= 1, got {self.num_iterations}")
        return self


# ----------------------------------------------------------------------------------------------- one update
_SUMMED = ("loss", "pg_loss", "kl_loss", "entropy", "clip_frac_lower", "tokens")  # already / global count
_MAXED, _MINNED = ("ratio_max",), ("ratio_min",)  # everything else: a token-weighted mean


def _micro_loss(lora, params, mb, norms, *, cfg, hp: GRPOHParams):
    logp, ent = completion_logprobs(params, cfg, mb["prompt"], mb["prompt_mask"], mb["completion"],
                                mb["completion_mask"], lora=lora, temperature=hp.temperature, return_entropy=True)
    loss, m = grpo_loss(logp, mb["advantages"], mb["completion_mask"], old_logp_BC=mb.get("old_logp"),
                        ref_logp_BC=mb.get("ref_logp"), entropy_BC=ent, beta=hp.beta, epsilon=hp.epsilon,
                        epsilon_high=hp.epsilon_high, epsilon_c=hp.epsilon_c, kl=hp.kl, loss_agg=hp.loss_agg,
                        gspo=hp.gspo, num_rows=norms["rows"], num_tokens=norms["tokens"], norm=hp.loss_norm)
    return loss, {**m, "loss": loss}


def _combine(acc, m):
    out = {}
    for k, v in m.items():
        if k in _SUMMED:
            out[k] = acc[k] + v
        elif k in _MAXED:
            out[k] = jnp.maximum(acc[k], v)
        elif k in _MINNED:
            out[k] = jnp.minimum(acc[k], v)
        else:
            out[k] = acc[k] + v * m["tokens"]
    return out


def _train_step(lora, opt_state, params, batch, norms, *, cfg, hp: GRPOHParams):
    grad_fn = jax.value_and_grad(_micro_loss, has_aux=True)
    first = jax.tree.map(lambda x: x[0], batch)
    shapes = jax.eval_shape(lambda: grad_fn(lora, params, first, norms, cfg=cfg, hp=hp)[0][1])
    init = {k: jnp.full((), -jnp.inf if k in _MAXED else (jnp.inf if k in _MINNED else 0.0), v.dtype)
            for k, v in shapes.items()}

    def body(carry, mb):
        g_acc, m_acc = carry
        (_, m), g = grad_fn(lora, params, mb, norms, cfg=cfg, hp=hp)
        return (jax.tree.map(jnp.add, g_acc, g), _combine(m_acc, m)), None

    zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), lora)
    (grads, m), _ = jax.lax.scan(body, (zeros, init), batch)
    m = {k: v if k in _SUMMED + _MAXED + _MINNED else v / jnp.maximum(m["tokens"], 1) for k, v in m.items()}
    grads, grad_norm = clip_by_global_norm(grads, hp.clip)
    lr = lr_schedule(opt_state["count"], peak_lr=hp.lr, warmup_steps=hp.warmup_steps, total_steps=hp.total_steps,
                     final_ratio=hp.final_lr_ratio)
    lora, opt_state = adamw_update(grads, opt_state, lora, lr, b1=hp.b1, b2=hp.b2, eps=1e-8,
                                   weight_decay=hp.weight_decay)
    return lora, opt_state, {**m, "grad_norm": grad_norm, "lr": lr}


# train_step(lora, opt_state, params, batch [M, B/M, ...], norms {"rows", "tokens"}, *, cfg, hp)
#   -> (lora, opt_state, metrics). The adapters and optimizer state are donated (no second copy).
train_step = jax.jit(_train_step, static_argnames=("cfg", "hp"), donate_argnums=(0, 1))


def to_micro_batches(ro: dict, micro_batch: int) -> tuple[dict, dict]:
    """The rollout's training arrays as [M, micro_batch, ...] stacks, and the whole batch's normalisers."""
    keys = ("prompt", "prompt_mask", "completion", "completion_mask", "advantages", "ref_logp", "old_logp")
    B = ro["prompt"].shape[0]
    batch = {k: ro[k].reshape(B // micro_batch, micro_batch, *ro[k].shape[1:]) for k in keys if k in ro}
    mask = ro["completion_mask"]
    norms = {"rows": jnp.float32(max(int((mask.sum(-1) > 0).sum()), 1)), "tokens": jnp.float32(max(mask.sum(), 1))}
    return batch, norms


# ----------------------------------------------------------------------------------------------- the loop
def step_records(records, step: int, n: int, seed: int) -> list:
    """The `n` prompts of step `step`: a fresh seeded permutation per epoch, so they depend on (seed, step) only."""
    out = []
    for pos in range(step * n, step * n + n):
        epoch, i = divmod(pos, len(records))
        out.append(records[int(_epoch_order(len(records), seed, epoch)[i])])
    return out


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
    from rewards.prob import ProbState

    return ProbState(**obj)


def _print_samples(print_fn, records, texts, rewards, G, n=2):
    for i in range(min(n, len(records))):
        print_fn(f"--- sample: prompt {i}: {str(records[i].get('question', ''))[:200]!r}")
        print_fn(f"    reward {float(rewards[i * G]):.3f}; completion: {texts[i * G][:400]!r}")


def train(cfg, params, lora, records, tokenizer, hp: GRPOHParams, out_dir: str, *, reward_fn, reward_cfg=None,
          eval_records=None, eval_every: int = 0, save_every: int = 10, sample_every: int = 10, seed: int = 0,
          mesh=None, stop_at_step: int | None = None, print_fn=print):
    """Run GRPO until `hp.total_steps // hp.num_iterations` rollout steps are done (or `stop_at_step`).

    Resumes from the newest checkpoint under `{out_dir}/checkpoints` when there is one. Logs one line per step
    to `{out_dir}/metrics.jsonl` and the console. Returns (lora, opt_state, last step's metrics)."""
    from gemma_jax.train_state import CheckpointManager, make_meta

    hp.check()
    if not records:
        raise ValueError("train: no RL records")
    opt = adamw_init(lora)
    ckpt = CheckpointManager(os.path.join(out_dir, "checkpoints"))
    step, prob_state = 0, None
    ident = make_meta(cfg, lora, group_size=hp.group_size)  # a checkpoint of another model / LoRA shape raises
    restored = ckpt.restore_latest(_state_tree(lora, opt), expected_meta=ident)
    if restored is not None:
        step, tree, meta = restored
        lora, opt = _from_state_tree(tree, lora.scale)
        prob_state = _prob_state_from_json(meta.get("prob_state"))
        print_fn(f"resumed from {out_dir}/checkpoints step {step}")
    params, lora, opt = place_train_state(cfg, params, lora, opt, mesh)
    n_steps = hp.total_steps // hp.num_iterations
    end = n_steps if stop_at_step is None else min(stop_at_step, n_steps)
    last = {}
    with MetricsLogger(out_dir, n_steps, print_fn=print_fn) as log:
        log.start()
        while step < end:
            recs = step_records(records, step, hp.prompts_per_step, seed)
            ro, texts, metrics, prob_state = do_rollout(params, cfg, lora, recs, tokenizer, hp=hp,
                                                        reward_fn=reward_fn, reward_cfg=reward_cfg,
                                                        prob_state=prob_state, seed=seed * 1_000_003 + step)
            batch, norms = to_micro_batches(ro, hp.micro_batch)
            t0 = time.perf_counter()
            for _ in range(hp.num_iterations):
                lora, opt, m = train_step(lora, opt, params, batch, norms, cfg=cfg, hp=hp)
            m = {k: float(v) for k, v in m.items()}  # blocks: the timing below is the real training time
            train_s = time.perf_counter() - t0
            seq_tokens = float(ro["prompt_mask"].sum() + ro["completion_mask"].sum()) * hp.num_iterations
            step += 1
            last = {**metrics, **m, "train_s": train_s, "train_tokens_per_s": seq_tokens / max(train_s, 1e-9)}
            log.log(step, last)
            if sample_every and step % sample_every == 0:
                _print_samples(print_fn, recs, texts, ro["rewards"], hp.group_size)
            if eval_records and eval_every and (step % eval_every == 0 or step == n_steps):
                from grpo.evaluate import evaluate

                log.log(step, evaluate(params, cfg, lora, eval_records, tokenizer, hp=hp), kind="eval")
            if save_every and (step % save_every == 0 or step == end):
                ckpt.save(step, _state_tree(lora, opt), {**ident, "step": step, "seed": seed,
                                                        "prob_state": _prob_state_to_json(prob_state)})
    return lora, opt, last
