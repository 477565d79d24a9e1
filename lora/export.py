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

adapter_config.json names every adapted module in full (`model.layers.3.self_attn.q_proj`: PEFT matches a
target equal to a module's name exactly), so PEFT wraps exactly the modules that have tensors. That matters for
Gemma 4, whose adapters are per layer and absent where a layer lacks the weight: transformers'
Gemma4ForCausalLM has no k_proj/v_proj on KV-shared layers and no v_proj on k = v layers (their values are
k_proj's output, so a "k" adapter there reaches the values too, in both models).
"""

import json
import os

import jax
import numpy as np
from safetensors.numpy import save_file

from gemma_jax.checkpoint import save_hf
from gemma_jax.config import GemmaConfig
from gemma_jax.model import lora_layer_slice, lora_target
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


def _peft_pairs(name, a, b):
    """[(hf module, lora_A [R,in], lora_B [out,R])] for one layer's adapter `name` (float32 numpy, no L axis):
    one pair per base weight it adds to (gemma_jax.model.LORA_TARGETS), the fused kv adapter's B split along C."""
    t = lora_target(name)
    R = a.shape[-1]
    a_RI = a.reshape(-1, R).T  # o: A [N,H,R] -> [N*H, R] -> [R, N*H]
    b_parts = [b] if "C" not in t.b else [np.take(b, c, axis=t.b.index("C")) for c in range(len(t.adds_to))]
    # q: B [R,N,H] -> [R, N*H] -> [N*H, R]
    return [(_PEFT_MODULES[w], a_RI, bw.reshape(R, -1).T) for w, bw in zip(t.adds_to, b_parts)]


def peft_tensors(lora: LoRA) -> dict:
    """PEFT state dict names -> numpy arrays (float32), e.g.
    base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight [R, D]; stacked [L, ...] adapters and Gemma 4's
    per-layer tuples alike (a layer without the adapter gets no tensors)."""
    host = to_host(lora.layers)
    for name in host:
        if not all(w in _PEFT_MODULES for w in lora_target(name).adds_to):
            raise ValueError(f"LoRA target {name!r} has no Hugging Face module to export to")
    num_layers = len(next(iter(host.values()))["a"])
    out = {}
    for i in range(num_layers):
        for name, ab in lora_layer_slice(host, i).items():
            a, b = np.asarray(ab["a"], np.float32), np.asarray(ab["b"], np.float32)
            for module, a_RI, b_OR in _peft_pairs(name, a, b):
                prefix = f"base_model.model.model.layers.{i}.{module}"
                out[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(a_RI)
                out[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(b_OR)
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
    # base_model.model.{module}.lora_A.weight -> {module}, the name PEFT matches inside the PeftModel's base model
    modules = sorted({k.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
                      for k in tensors if k.endswith(".lora_A.weight")})
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
