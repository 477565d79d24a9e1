"""Exporting trained adapters for Hugging Face users.

- `export_merged_hf`: W' = W + (alpha/rank) A B folded into the base weights, written as a plain transformers
  Gemma checkpoint (via gemma_jax.save_hf). Loads with `AutoModelForCausalLM.from_pretrained(path)`.
- `export_peft`: the adapters alone as a PEFT LoRA adapter (`adapter_model.safetensors` + `adapter_config.json`),
  loaded with `peft.PeftModel.from_pretrained(hf_gemma_model, path)`. No peft import is needed to write it.

PEFT computes `y = x W^T + (x A_p^T B_p^T) * lora_alpha / r` per nn.Linear (weights [out, in]), so our adapters
map as A_p = A^T [R, in] and B_p = B^T [out, R], with the output (or input) head axes flattened in HF's (N, H)
order: q_proj out = N*H, k_proj/v_proj out = K*H, o_proj in = N*H. Our fused "kv" adapter (Tunix's: one A,
B [R,2,K,H]) becomes separate k_proj and v_proj adapters that each carry a copy of the shared A; that is exact,
because (x A) B_k and (x A) B_v are what the fused adapter computes too.
"""

import json
import os

import jax
import numpy as np
from safetensors.numpy import save_file

from gemma_jax.checkpoint import save_hf
from gemma_jax.config import GemmaConfig
from gemma_jax.model import lora_target
from gemma_jax.sharding import to_host
from lora.adapters import LoRA, merge
from lora.io import check_lora_fits

# base weight (gemma_jax.model.LORA_TARGETS adds_to) -> the Hugging Face module it is, inside model.layers.{i}.
_PEFT_MODULES = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}


def export_merged_hf(path, cfg: GemmaConfig, params: dict, lora: LoRA | None) -> None:
    """Write base params with the adapters merged in as a Hugging Face Gemma checkpoint (safetensors +
    config.json), in the params' dtype. The merge runs in float32 and is cast back once."""
    if lora is not None:
        check_lora_fits(cfg, lora)
    merged = params if lora is None else merge(params, lora)
    save_hf(path, cfg, merged)


def _peft_pairs(name, a_LX, b_LX):
    """[(hf module, lora_A [L,R,in], lora_B [L,out,R])] for one of our adapters (float32 numpy, L axis first):
    one pair per base weight it adds to (gemma_jax.model.LORA_TARGETS), the fused kv adapter's B split along C."""
    t = lora_target(name)
    L, R = a_LX.shape[0], a_LX.shape[-1]
    a_LRI = np.swapaxes(a_LX.reshape(L, -1, R), 1, 2)  # o: A [L,N,H,R] -> [L, N*H, R] -> [L, R, N*H]
    b_parts = [b_LX] if "C" not in t.b else [np.take(b_LX, c, axis=1 + t.b.index("C")) for c in range(len(t.adds_to))]
    # q: B [L,R,N,H] -> [L,R,N*H] -> [L, N*H, R]
    return [(_PEFT_MODULES[w], a_LRI, np.swapaxes(b.reshape(L, R, -1), 1, 2)) for w, b in zip(t.adds_to, b_parts)]


def peft_tensors(lora: LoRA) -> dict:
    """PEFT state dict names -> numpy arrays (float32), e.g.
    base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight [R, D]."""
    host = to_host(lora.layers)
    out = {}
    for name, ab in host.items():
        if not all(w in _PEFT_MODULES for w in lora_target(name).adds_to):
            raise ValueError(f"LoRA target {name!r} has no Hugging Face module to export to")
        a, b = np.asarray(ab["a"], np.float32), np.asarray(ab["b"], np.float32)
        for module, a_LRI, b_LOR in _peft_pairs(name, a, b):
            for i in range(a.shape[0]):
                prefix = f"base_model.model.model.layers.{i}.{module}"
                out[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(a_LRI[i])
                out[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(b_LOR[i])
    return out


def export_peft(path, cfg: GemmaConfig, lora: LoRA, *, base_model_name_or_path: str | None = None) -> None:
    """Write `adapter_model.safetensors` + `adapter_config.json` into the folder `path` (created if needed).

    lora_alpha = scale * r, so PEFT's scaling lora_alpha / r equals ours. Tensors are float32 (PEFT casts them
    to the base model's dtype on load). Multi-host: every process calls it, process 0 writes.
    """
    rank = check_lora_fits(cfg, lora)
    tensors = peft_tensors(lora)
    if jax.process_index() != 0:
        return
    alpha = lora.scale * rank
    hf_targets = [w for n in lora.layers for w in lora_target(n).adds_to]
    modules = sorted({_PEFT_MODULES[t].split(".")[-1] for t in hf_targets})
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "r": rank, "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
        "target_modules": modules, "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
        "use_rslora": False, "use_dora": False, "inference_mode": True, "init_lora_weights": True,
        "layers_to_transform": None, "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {},
    }
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)
