"""Test-only helpers shared by the transformers parity tests (test_model_hf.py, test_gemma3.py, test_gemma4.py)."""

import jax.numpy as jnp
import numpy as np
import torch

from gemma_jax.model import forward


def padded_batch(T: int, vocab: int = 512, pad: int = 5):
    """Two rows of T random tokens; the second left-padded by `pad` (token 0, mask False)."""
    tokens = np.random.RandomState(0).randint(4, vocab, size=(2, T))
    mask = np.ones((2, T), bool)
    mask[1, :pad] = False
    tokens[1, :pad] = 0
    return tokens, mask


def hf_logits(model, tokens, mask):
    """A transformers causal LM's float32 logits, with positions counting real tokens only (as ours do)."""
    positions = np.maximum(mask.cumsum(1) - 1, 0)
    with torch.no_grad():
        out = model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask.astype(np.int64)),
                    position_ids=torch.tensor(positions))
    return out.logits.float().numpy()


def our_logits(params, cfg, tokens, mask):
    return np.asarray(forward(params, jnp.asarray(tokens), cfg, pad_mask_BT=jnp.asarray(mask))[0])


def hf_greedy_tokens(model, prompts, N: int) -> np.ndarray:
    """transformers' greedy `generate` of N new tokens for token-id prompts left-padded into one batch (pad 0,
    eos 1), right-padded with 0 to N columns as our sampler returns them."""
    P = max(map(len, prompts))
    ids = np.zeros((len(prompts), P), np.int64)
    am = np.zeros((len(prompts), P), np.int64)
    for i, p in enumerate(prompts):
        ids[i, P - len(p):], am[i, P - len(p):] = p, 1
    with torch.no_grad():
        ref = model.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(am), max_new_tokens=N,
                             do_sample=False, pad_token_id=0, eos_token_id=1)[:, P:].numpy()
    return np.pad(ref, ((0, 0), (0, N - ref.shape[1])))
