"""Masked next-token cross-entropy for SFT, over the LoRA-adapted model.

    loss = sum_{b,t} m[b,t+1] * -log p(x[b,t+1] | x[b,:t+1]) / sum_{b,t} m[b,t+1]

a per-TOKEN mean over every completion token in the batch (long completions weigh more than short ones), which
is Tunix PeftTrainer's `_default_loss_fn` (0.1.7: `-sum(log_softmax(logits) * one_hot * mask) / (sum(mask) +
1e-8)` with `target_mask = input_mask[:, 1:]`). Our `loss_mask` is Tunix's `input_mask`: True on target tokens.

`nll_sum` returns the un-normalised sum and the token count so gradient accumulation can divide by the token
count of the whole accumulated batch (k micro-batches then equal one big batch exactly; Tunix's optax.MultiSteps
instead averages the k per-micro-batch means, which differs when micro-batches hold different token counts).
"""

import jax.numpy as jnp

from gemma_jax.model import forward_hidden
from gemma_jax.scoring import target_logprobs


def token_nll(lora, params, batch, cfg, shard=None):
    """-log p(tokens[:, t+1] | tokens[:, :t+1]): [B, T-1] float32, and the target mask [B, T-1]. shard: the
    gemma_jax.sharding.ShardingCtx the activations are constrained with, or None."""
    h_BTD, _ = forward_hidden(params, batch["tokens"], cfg, positions_BT=batch.get("positions"),
                              pad_mask_BT=batch.get("pad_mask"), segment_ids_BT=batch.get("segment_ids"), lora=lora,
                              shard=shard)
    nll_BT = -target_logprobs(params, h_BTD[:, :-1], batch["tokens"][:, 1:], cfg, shard=shard)
    mask_BT = batch["loss_mask"][:, 1:]
    # where(), not multiply: a masked position's NLL (even inf/nan from a padded row) contributes exactly zero.
    return jnp.where(mask_BT, nll_BT, 0.0), mask_BT


def nll_sum(lora, params, batch, cfg, shard=None):
    """(sum of target-token NLL, number of target tokens) for one batch dict (see sft/batches.py)."""
    nll, mask = token_nll(lora, params, batch, cfg, shard)
    return jnp.sum(nll), jnp.sum(mask).astype(jnp.float32)


def sft_loss(lora, params, batch, cfg, shard=None):
    """Per-token mean NLL over the batch's target tokens (Tunix PeftTrainer default). Returns (loss, n_tokens)."""
    total, n = nll_sum(lora, params, batch, cfg, shard)
    return total / jnp.maximum(n, 1.0), n
