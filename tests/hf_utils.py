"""Test-only helpers shared by the transformers parity tests (test_model_hf.py, test_gemma3.py, test_gemma4.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import torch

from gemma_jax.config import config_to_hf
from gemma_jax.model import forward, init_cache, init_params


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


def cached_logits(params, cfg, tokens, mask, prefill: int = 12):
    """Logits [B, T, V] from model.forward with a KV cache: a left-padded prefill of `prefill` tokens, then one
    token at a time to the end (to compare with one full forward)."""
    cache = init_cache(cfg, tokens.shape[0], tokens.shape[1])
    logits, cache = forward(params, jnp.asarray(tokens[:, :prefill]), cfg, pad_mask_BT=jnp.asarray(mask[:, :prefill]),
                            cache=cache)
    steps = [logits]
    for t in range(prefill, tokens.shape[1]):
        logits, cache = forward(params, jnp.asarray(tokens[:, t:t + 1]), cfg, cache=cache)
        steps.append(logits)
    return np.concatenate([np.asarray(s) for s in steps], axis=1)


def hf_config(config_cls, cfg, **extra):
    """A transformers config object (e.g. Gemma4TextConfig) of our config, with extra keyword overrides."""
    d = {k: v for k, v in config_to_hf(cfg).items() if k not in ("architectures", "model_type", "torch_dtype")}
    return config_cls(**{**d, **extra})


def randomize_hf(model, seed, around_one=("norm",)):
    """Parameters whose name contains one of `around_one` N(1, 0.3) (not all equal), the others N(0, 0.2);
    Gemma 4's layer_scalar buffers U(0.5, 1.5)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            one = any(s in name for s in around_one)
            p.normal_(1.0 if one else 0.0, 0.3 if one else 0.2)
        for name, b in model.named_buffers():
            if name.endswith("layer_scalar"):
                b.uniform_(0.5, 1.5)
    return model.eval()


def random_params(cfg, seed, around_one=("norm", "layer_scalar")):
    """init_params with every leaf whose path contains one of `around_one` randomised around 1."""
    params = init_params(cfg, seed)
    rng = np.random.RandomState(seed)
    return jax.tree_util.tree_map_with_path(
        lambda path, v: jnp.asarray(1.0 + 0.3 * rng.randn(*v.shape), v.dtype)
        if any(s in jax.tree_util.keystr(path) for s in around_one) else v, params)
