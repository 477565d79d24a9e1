"""One way to score tokens: per-token log-probs (optionally the predictive entropy) of target tokens.

SFT's loss, GRPO's policy / reference / old log-probs and the probability reward's scoring all call
`target_logprobs` (from hidden states) or `token_logprobs` (from tokens, teacher forcing).

Logits are float32, Gemma 2's final softcap is applied, then they are divided by `temperature` (the sampler
draws from softmax(logits / T), so GRPO's ratio and KL must be taken under that distribution; Tunix
`rl/common.py: compute_per_token_logps(temperature=)` skips the division at T = 0 and T = 1, and so do we).
"""

import jax
import jax.numpy as jnp

from gemma_jax.config import GemmaConfig
from gemma_jax.model import forward_hidden, unembed


def _scaled(logits, temperature: float):
    if temperature not in (0.0, 1.0):
        logits = logits / temperature
    return logits


def logprobs_from_logits(logits_BTV, targets_BT, temperature: float = 1.0, *, return_entropy: bool = False):
    """log softmax(logits / T)[target] per position: [B, T] float32 (and the entropy [B, T], when asked)."""
    logits_BTV = _scaled(logits_BTV.astype(jnp.float32), temperature)
    lse_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
    lp_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None].astype(jnp.int32), axis=-1)[..., 0] - lse_BT
    if not return_entropy:
        return lp_BT
    p_BTV = jnp.exp(logits_BTV - lse_BT[..., None])
    return lp_BT, lse_BT - jnp.sum(p_BTV * logits_BTV, axis=-1)


def target_logprobs(params, h_BTD, targets_BT, cfg: GemmaConfig, *, temperature: float = 1.0,
                    return_entropy: bool = False):
    """log p(targets[b, t] | h[b, t]) through the tied unembedding: h are final-norm hidden states, one per
    target. Returns [B, T] float32, or (log-probs, entropy) with return_entropy."""
    logits_BTV = unembed(params, h_BTD, cfg)
    return logprobs_from_logits(logits_BTV, targets_BT, temperature, return_entropy=return_entropy)


def token_logprobs(params, tokens_BT, cfg: GemmaConfig, *, pad_mask_BT=None, positions_BT=None, lora=None,
                   temperature: float = 1.0, segment_ids_BT=None, return_entropy: bool = False):
    """Teacher forcing: log p(tokens[t+1] | tokens[:t+1]) for t in [0, T-1), a [B, T-1] float32 array (and the
    entropy [B, T-1] of each predictive distribution with return_entropy)."""
    h_BTD, _ = forward_hidden(params, tokens_BT, cfg, positions_BT=positions_BT, pad_mask_BT=pad_mask_BT,
                              segment_ids_BT=segment_ids_BT, lora=lora)
    return target_logprobs(params, h_BTD[:, :-1], tokens_BT[:, 1:], cfg, temperature=temperature,
                           return_entropy=return_entropy)


def completion_logprobs(params, cfg: GemmaConfig, prompt_BP, prompt_mask_BP, completion_BC, completion_mask_BC, *,
                        lora=None, temperature: float = 1.0, return_entropy: bool = False):
    """Per-token log-probs [B, C] of a completion given its prompt, in one forward pass.

    The prompt is left-padded and the completion right-padded, so their concatenation has no holes; positions
    count real tokens only. Only the C hidden states that predict completion tokens are unembedded. lora=None
    gives the reference policy: the same base weights with adapters off.
    """
    P, C = prompt_BP.shape[1], completion_BC.shape[1]
    tokens_BT = jnp.concatenate([prompt_BP, completion_BC], axis=1)
    mask_BT = jnp.concatenate([prompt_mask_BP, completion_mask_BC], axis=1).astype(bool)
    h_BTD, _ = forward_hidden(params, tokens_BT, cfg, pad_mask_BT=mask_BT, lora=lora)
    return target_logprobs(params, h_BTD[:, P - 1:P + C - 1], completion_BC, cfg, temperature=temperature,
                           return_entropy=return_entropy)
