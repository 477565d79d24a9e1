"""Checkpoint I/O: Hugging Face safetensors folders and Kaggle Flax/orbax Gemma checkpoints (load and save),
Gemma 1, 2, 3 and 4 (text; the text tower of the multimodal Gemma 3 and 4 releases).

Both loaders fill preallocated stacked numpy arrays one tensor (HF) or one layer (Kaggle) at a time, so peak host
memory is about one model plus one tensor, then hand the arrays to JAX leaf by leaf. Every tensor is checked: a
missing, unknown, wrongly shaped, wrongly typed or truncated tensor raises a ValueError naming the tensor and file.

HF names (docs/reference.md#checkpoint-layouts), linear weights stored [out, in]; ours are [in, ...out]
(model.py docstring):
    model.embed_tokens.weight [V,D] -> embed;  model.norm.weight [D] -> final_norm
    model.layers.{i}.self_attn.q_proj [N*H,D] -> q[i] [D,N,H];  k_proj / v_proj [K*H,D] -> k[i] / v[i] [D,K,H]
    model.layers.{i}.self_attn.o_proj [D,N*H] -> o[i] [N,H,D]
    model.layers.{i}.mlp.gate_proj / up_proj [F,D] -> gate[i] / up[i] [D,F];  down_proj [D,F] -> down[i] [F,D]
    Gemma 1: input_layernorm -> attn_norm, post_attention_layernorm -> ffw_norm
    Gemma 2: input_layernorm -> attn_norm, post_attention_layernorm -> post_attn_norm,
             pre_feedforward_layernorm -> ffw_norm, post_feedforward_layernorm -> post_ffw_norm
    Gemma 3: as Gemma 2, plus model.layers.{i}.self_attn.q_norm / k_norm [H] -> q_norm[i] / k_norm[i] [H].
    lm_head.weight: accepted only when equal to the embedding (Gemma ties them).
    Gemma3ForConditionalGeneration (multimodal) files hold the text tower under `language_model.model.` (what
    transformers 5 writes and the Hub files use) or `model.language_model.` (its in-memory names), plus
    `vision_tower.*` / `multi_modal_projector.*`, which are skipped (one log line says how many). Its embedding has
    the config's vocab_size rows (262,208: image tokens padded in); we keep the first image_token_index (262,144)
    rows, the text vocabulary (config_from_hf), and save_hf writes a text-only Gemma3ForCausalLM with those.

Kaggle names, as Tunix 0.1.7 `tunix/models/gemma/params.py` + `Gemma.from_params` read them (orbax PyTree whose
top-level keys are slash-joined module paths, leaves `w` / `scale` / `input_embedding`):
    transformer/embedder/input_embedding [Vp,D];  transformer/final_norm/scale [D]
    transformer/layer_{i}/attn/q_einsum/w [N,D,H] + kv_einsum/w [2,K,D,H], or qkv_einsum/w [3,N,D,H] (K == N)
    transformer/layer_{i}/attn/attn_vec_einsum/w [N,H,D]
    transformer/layer_{i}/mlp/gating_einsum/w [2,D,F] (Tunix, Gemma 1) or [2,F,D] (Gemma 2 releases); [0] gate, [1] up
    transformer/layer_{i}/mlp/linear/w [F,D]
    transformer/layer_{i}/{pre_attention_norm, pre_ffw_norm, post_attention_norm, post_ffw_norm}/scale [D]
    Gemma 3 (Tunix `tunix/models/gemma3/params.py` map_from_upstream_checkpoint): the same names, gating [2,F,D],
    plus transformer/layer_{i}/attn/_query_norm/scale and _key_norm/scale [H]; the multimodal releases also hold
    transformer/embedder/mm_* and SigLiPFromPatches_0/* (vision), which are skipped with one log line.
Decisions: (1) Tunix pads the embedding to 256128 rows; the real vocabulary (tokenizer, HF checkpoints) has 256000,
so we keep only the first cfg.vocab_size rows (256000 when the config is inferred from a 256128-row embedding).
The padded ids are never produced by the tokenizer, and the kept logits equal Tunix's for every real id.
(2) With D == F a gating tensor is ambiguous; we read it as [2,D,F], the layout Tunix assigns without transposing.
(3) An inferred Gemma 2 config takes the Gemma 2 2B constants: softcaps 50/30, window 4096 on even layers, and
query_pre_attn_scalar = head_dim (true for 2B and 9B, and what Tunix hard-codes). Pass `cfg` for anything else.
(4) An inferred Gemma 3 config is the GEMMA3_* preset with the same shapes (window, RoPE scaling and the 27B query
scale are not in the shapes); other shapes need `cfg`.
save_kaggle writes what Tunix reads: cfg.vocab_size embedding rows (no padding), qkv_einsum when K == N (Tunix's
Gemma then expects the fused weight), gating [2,D,F] for Gemma 1 / 2 (the layout Tunix assigns untransposed) and
[2,F,D] for Gemma 3 (its upstream layout, which Tunix's Gemma 3 mapping transposes; [2,D,F] when D == F, so that
load_kaggle reads it back, decision 2).

Gemma 4 (Tunix 0.1.7 `tunix/models/gemma4/params.py` create_model_from_checkpoint: map_from_upstream_checkpoint
renames a few leaves, then every name and shape must be one of its Gemma4 model's; `_kaggle4_name_map`). Per
layer i (transformer/layer_{i}/) in that layer's own shapes (gemma_jax.model.layer_kinds):
    attn/q_einsum/w [N,D,H];  attn/kv_einsum/w [2,K,D,H], or attn/k_einsum/w [K,D,H] on k = v global layers
    attn/attn_vec_einsum/w [N,H,D];  attn/_query_norm/scale, attn/_key_norm/scale [H]  (also read: query_norm)
    mlp/gating_einsum/w [2,F,D] (always: Tunix transposes each half);  mlp/linear/w [F,D]
    {pre_attention_norm, post_attention_norm, pre_ffw_norm, post_ffw_norm}/scale [D];  skip_scale [1] (layer scalar)
    PLE: per_layer_input_gate/w [D,P], per_layer_projection/w [P,D], post_per_layer_input_norm/scale [D]
    MoE: moe/router_logits [D,E], moe/router_scale [D], moe/per_expert_scale [E], moe/gating_einsum [E,2,M,D],
         moe/linear [E,M,D], dense_post_ffw_norm/scale, moe_pre_ffw_norm/scale, moe_post_ffw_norm/scale [D]
and transformer/embedder/per_layer_embeddings [Vp,L,P] (also read: per_layer_input_embedding),
per_layer_model_projection/w [D,L,P], per_layer_projection_norm/scale [P]; embedding [V,D] and final norm as above.
Gemma 4 decisions: (5) Tunix's model holds k/v weights and a key norm in KV-shared layers that it never reads;
save_kaggle writes them as zeros, load_kaggle checks their shapes if present and does not read them. A config
without layer scalars writes skip_scale as ones (Tunix multiplies by it), and load_kaggle refuses one that is not
all ones. (6) The layer pattern, KV sharing, window, RoPE and softcap are not in the shapes: save_kaggle writes the
config's fields as gemma_config.json next to the tensors (Tunix ignores it), which load_kaggle reads when no cfg is
given; without it the config is the GEMMA4_* preset with exactly the checkpoint's names and shapes, else pass cfg.
(7) Tunix's MoE routes from the pre_moe-normed residual, we (as transformers) from the residual: the files are the
same, the two models' logits agree only when pre_moe_norm's scale is constant (tests/test_gemma4_kaggle.py).
Leaves outside the text model (vision/audio parts of the multimodal releases) are skipped with one printed line.
"""

import dataclasses
import json
import math
import os
import re
import struct

import jax
import jax.numpy as jnp
import ml_dtypes  # registers bfloat16 with numpy: safetensors' numpy backend needs it to read BF16
import numpy as np
import orbax.checkpoint as ocp
from safetensors import safe_open

from gemma_jax.config import (
    GEMMA2_2B,
    GEMMA3_1B,
    GEMMA3_4B,
    GEMMA3_12B,
    GEMMA3_27B,
    GEMMA3_270M,
    GEMMA4_12B,
    GEMMA4_26B_A4B,
    GEMMA4_31B,
    GEMMA4_E2B,
    GEMMA4_E4B,
    GemmaConfig,
    config_from_hf,
    config_to_hf,
)
from gemma_jax.model import layer_kinds, param_specs

_ST_TO_NP = {"F32": np.dtype(np.float32), "BF16": np.dtype(ml_dtypes.bfloat16), "F16": np.dtype(np.float16)}
_NP_TO_ST = {v.name: k for k, v in _ST_TO_NP.items()}
_FLOAT_NAMES = ("float32", "bfloat16", "float16")
# Gemma3ForConditionalGeneration: text-tower prefixes (-> "model."), and the prefixes of what we skip.
_TEXT_TOWER_PREFIXES = ("language_model.model.", "model.language_model.")
_TEXT_TOWER_LM_HEAD = ("language_model.lm_head.weight", "lm_head.weight")
# The last 4: Gemma 4 (model.vision_embedder.: Gemma 4 12B's vision embedder as its files name it).
_NON_TEXT_PREFIXES = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.",
                      "model.audio_tower.", "model.embed_vision.", "model.embed_audio.", "model.vision_embedder.")
TUNIX_PADDED_VOCAB = 256_128  # Tunix's embedding rows for real Gemma checkpoints
GEMMA_VOCAB = 256_000  # the real tokenizer's vocabulary


def _dtype_name(dtype) -> str | None:
    if dtype is None:
        return None
    name = np.dtype(ml_dtypes.bfloat16 if str(dtype) == "bfloat16" else dtype).name
    if name not in _FLOAT_NAMES:
        raise ValueError(f"dtype must be one of {_FLOAT_NAMES}, got {dtype!r}")
    return name


def _empty_params(cfg: GemmaConfig) -> dict:
    """Uninitialised numpy arrays with the shapes of param_specs(cfg): every one is filled by a loader."""
    dtype = np.dtype(ml_dtypes.bfloat16) if cfg.param_dtype == "bfloat16" else np.dtype(cfg.param_dtype)
    return jax.tree.map(lambda s: np.empty(s.shape, dtype), param_specs(cfg), is_leaf=lambda x: hasattr(x, "axes"))


def _to_jax(params: dict) -> dict:
    """numpy -> jax arrays one leaf at a time, dropping each numpy array as soon as it is copied."""
    if isinstance(params["layers"], list):  # Gemma 4: a list of per-layer dicts
        layers = params.pop("layers")
        out = {key: jnp.asarray(params.pop(key)) for key in list(params)}
        out["layers"] = []
        while layers:
            layer = layers.pop(0)
            out["layers"].append({key: jnp.asarray(layer.pop(key)) for key in list(layer)})
        return out
    out = {"layers": {}}
    for key in ("embed", "final_norm"):
        out[key] = jnp.asarray(params.pop(key))
    layers = params.pop("layers")
    for key in list(layers):
        out["layers"][key] = jnp.asarray(layers.pop(key))
    return out


# ----------------------------------------------------------------------------------------------------------------
# Hugging Face safetensors


def _hf_name_map(cfg: GemmaConfig, embed_rows: int | None = None) -> dict:
    """HF tensor name -> (our layer key or top-level key, layer index or None, HF shape). The one name map.
    embed_rows: rows of the file's embedding when it is padded past cfg.vocab_size (Gemma 3 multimodal)."""
    D, F, N, K, H = cfg.embed_dim, cfg.hidden_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    per_layer = {
        "self_attn.q_proj.weight": ("q", (N * H, D)),
        "self_attn.k_proj.weight": ("k", (K * H, D)),
        "self_attn.v_proj.weight": ("v", (K * H, D)),
        "self_attn.o_proj.weight": ("o", (D, N * H)),
        "mlp.gate_proj.weight": ("gate", (F, D)),
        "mlp.up_proj.weight": ("up", (F, D)),
        "mlp.down_proj.weight": ("down", (D, F)),
        "input_layernorm.weight": ("attn_norm", (D,)),
    }
    if cfg.use_post_norms:
        per_layer.update({
            "post_attention_layernorm.weight": ("post_attn_norm", (D,)),
            "pre_feedforward_layernorm.weight": ("ffw_norm", (D,)),
            "post_feedforward_layernorm.weight": ("post_ffw_norm", (D,)),
        })
    else:
        per_layer["post_attention_layernorm.weight"] = ("ffw_norm", (D,))
    if cfg.use_qk_norm:
        per_layer["self_attn.q_norm.weight"] = ("q_norm", (H,))
        per_layer["self_attn.k_norm.weight"] = ("k_norm", (H,))
    out = {"model.embed_tokens.weight": ("embed", None, (embed_rows or cfg.vocab_size, D)),
           "model.norm.weight": ("final_norm", None, (D,))}
    if cfg.layer_list:
        return {**out, **_hf_gemma4_names(cfg)}
    for i in range(cfg.num_layers):
        for suffix, (ours, shape) in per_layer.items():
            out[f"model.layers.{i}.{suffix}"] = (ours, i, shape)
    return out


def _hf_gemma4_names(cfg: GemmaConfig) -> dict:
    """Gemma 4 (transformers Gemma4ForCausalLM) names past the embedding and final norm: each layer's own shapes
    (gemma_jax.model.layer_kinds); KV-shared layers have no k/v/k_norm tensors; v_norm has no weight; PLE tensors
    and layer_scalar [1] (a buffer in transformers, saved with the weights); a mixture of experts' router and
    experts (its router norm has no weight)."""
    D, N, P, L = cfg.embed_dim, cfg.num_heads, cfg.per_layer_input_dim, cfg.num_layers
    out = {}
    if P:
        out["model.embed_tokens_per_layer.weight"] = ("per_layer_embed", None,
                                                      (cfg.per_layer_vocab_size or cfg.vocab_size, L * P))
        out["model.per_layer_model_projection.weight"] = ("per_layer_proj", None, (L * P, D))
        out["model.per_layer_projection_norm.weight"] = ("per_layer_proj_norm", None, (P,))
    for i, kind in enumerate(layer_kinds(cfg)):
        H, K, F = kind.head_dim, kind.kv_heads, kind.hidden
        names = {
            "self_attn.q_proj.weight": ("q", (N * H, D)), "self_attn.o_proj.weight": ("o", (D, N * H)),
            "self_attn.q_norm.weight": ("q_norm", (H,)),
            "mlp.gate_proj.weight": ("gate", (F, D)), "mlp.up_proj.weight": ("up", (F, D)),
            "mlp.down_proj.weight": ("down", (D, F)),
            "input_layernorm.weight": ("attn_norm", (D,)), "post_attention_layernorm.weight": ("post_attn_norm", (D,)),
            "pre_feedforward_layernorm.weight": ("ffw_norm", (D,)),
            "post_feedforward_layernorm.weight": ("post_ffw_norm", (D,)),
        }
        if kind.has_kv:
            names["self_attn.k_proj.weight"] = ("k", (K * H, D))
            names["self_attn.k_norm.weight"] = ("k_norm", (H,))
            if not kind.k_eq_v:
                names["self_attn.v_proj.weight"] = ("v", (K * H, D))
        if P:
            names.update({"per_layer_input_gate.weight": ("ple_gate", (P, D)),
                          "per_layer_projection.weight": ("ple_proj", (D, P)),
                          "post_per_layer_input_norm.weight": ("ple_norm", (D,))})
        if cfg.use_layer_scalar:
            names["layer_scalar"] = ("layer_scalar", (1,))
        if cfg.num_experts:  # HF stores the experts as [E, out, in] tensors without a ".weight" suffix
            E, M = cfg.num_experts, cfg.moe_hidden_dim
            names.update({"router.proj.weight": ("router", (E, D)), "router.scale": ("router_scale", (D,)),
                          "router.per_expert_scale": ("per_expert_scale", (E,)),
                          "experts.gate_up_proj": ("experts_gate_up", (E, 2 * M, D)),
                          "experts.down_proj": ("experts_down", (E, D, M)),
                          "post_feedforward_layernorm_1.weight": ("post_mlp_norm", (D,)),
                          "pre_feedforward_layernorm_2.weight": ("pre_moe_norm", (D,)),
                          "post_feedforward_layernorm_2.weight": ("post_moe_norm", (D,))})
        out.update({f"model.layers.{i}.{suffix}": (ours, i, shape) for suffix, (ours, shape) in names.items()})
    return out


def _place(params, ours, i, w):
    """Write the HF tensor w into our params at (ours, layer i or None), converting its layout."""
    if i is None:
        target = params[ours]
        if ours == "per_layer_embed":  # [Vp, L*P] -> [Vp, L, P]
            target[...] = w.reshape(target.shape)
        elif ours == "per_layer_proj":  # a linear [L*P, D] -> [D, L, P]
            target[...] = _hf_to_ours(w, target.shape)
        else:
            target[...] = w[: target.shape[0]]  # the embedding: drop padded rows (Gemma 3 multimodal)
    elif isinstance(params["layers"], list):
        target = params["layers"][i][ours]
        target[...] = _hf_to_ours(w, target.shape)
    else:
        target = params["layers"][ours]
        target[i] = _hf_to_ours(w, target.shape[1:])


def _take(params, ours, i, hf_shape):
    """The HF tensor at (ours, layer i or None): the inverse of _place."""
    if i is None:
        x = np.asarray(params[ours])
        if ours == "per_layer_embed":
            return x.reshape(hf_shape)
        return _ours_to_hf(x, hf_shape) if ours == "per_layer_proj" else x  # the embedding is stored as it is
    if isinstance(params["layers"], list):
        return _ours_to_hf(np.asarray(params["layers"][i][ours]), hf_shape)
    return _ours_to_hf(np.asarray(params["layers"][ours][i]), hf_shape)


def _hf_to_ours(w, our_shape):
    """HF [out, in] linear -> ours [in, ...out] (or [...in, out] for o); 1-D norms pass through; Gemma 4 experts
    [E, out, in] -> ours [E, in, ...out] (gate_up [E, 2M, D] -> [E, D, 2, M]: gate first, as HF's chunk)."""
    if w.ndim == 3:
        return np.swapaxes(w, 1, 2).reshape(our_shape)
    return w if w.ndim == 1 else w.T.reshape(our_shape)


def _ours_to_hf(x, hf_shape):
    if len(hf_shape) == 3:
        return np.swapaxes(x.reshape(hf_shape[0], hf_shape[2], hf_shape[1]), 1, 2)
    return x if len(hf_shape) == 1 else x.reshape(hf_shape[1], hf_shape[0]).T


def _read_st_header(file: str) -> dict:
    """The tensor entries of a safetensors header, checked against the file size, so a truncated or corrupt file
    fails with the name of the first tensor that does not fit rather than a bare parser error."""
    size = os.path.getsize(file)
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{file}: not a safetensors file ({size} bytes, shorter than the 8-byte header length)")
        (n,) = struct.unpack("<Q", head)
        if 8 + n > size:
            raise ValueError(f"{file}: corrupt or truncated header (header length {n} > {size - 8} bytes left)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{file}: corrupt header, not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{file}: corrupt header, expected a JSON object")
    header.pop("__metadata__", None)
    data_bytes = size - 8 - n
    for name, info in header.items():
        try:
            shape, (start, end) = tuple(int(s) for s in info["shape"]), info["data_offsets"]
            dtype = info["dtype"]
        except (TypeError, KeyError, ValueError):
            raise ValueError(f"tensor {name!r} in {file}: corrupt header entry {info!r}") from None
        if end > data_bytes:
            raise ValueError(f"tensor {name!r} in {file}: data ends at byte {end} but the file holds only "
                             f"{data_bytes} data bytes (truncated file?)")
        if dtype in _ST_TO_NP and end - start != math.prod(shape) * _ST_TO_NP[dtype].itemsize:
            raise ValueError(f"tensor {name!r} in {file}: {end - start} data bytes for shape {shape} {dtype}")
    return header


def _hf_tensor_files(path: str) -> dict:
    """tensor name -> (file, header entry), from model.safetensors or the shards of model.safetensors.index.json."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            try:
                weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{index}: expected JSON with a 'weight_map' ({e!r})") from None
    else:
        single = os.path.join(path, "model.safetensors")
        if not os.path.exists(single):
            raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")
        weight_map = {name: "model.safetensors" for name in _read_st_header(single)}
    headers, out = {}, {}
    for name, shard in weight_map.items():
        file = os.path.join(path, shard)
        if file not in headers:
            if not os.path.exists(file):
                raise ValueError(f"tensor {name!r}: its shard {file} (from {index}) does not exist")
            headers[file] = _read_st_header(file)
        if name not in headers[file]:
            raise ValueError(f"tensor {name!r}: the index maps it to {file}, which does not contain it")
        out[name] = (file, headers[file][name])
    return out


def _text_tower(files: dict, path: str, model_type: str = "gemma3") -> dict:
    """A Gemma3ForConditionalGeneration (or Gemma4[Unified]ForConditionalGeneration) file's tensors renamed to
    Gemma3ForCausalLM (Gemma4ForCausalLM) names (module docstring); the vision (and Gemma 4 audio) towers and
    their projectors are dropped, with one printed line. Each entry gains the stored name:
    new name -> (file, header entry, name in the file)."""
    out, skipped = {}, 0
    for name, entry in files.items():
        prefix = next((p for p in _TEXT_TOWER_PREFIXES if name.startswith(p)), None)
        if prefix is not None:
            out["model." + name[len(prefix):]] = (*entry, name)
        elif name in _TEXT_TOWER_LM_HEAD:
            out["lm_head.weight"] = (*entry, name)
        elif name.startswith(_NON_TEXT_PREFIXES):
            skipped += 1
        else:
            raise ValueError(f"tensor {name!r} in {entry[0]}: neither the text tower ({_TEXT_TOWER_PREFIXES}) nor "
                             f"the vision/audio towers ({_NON_TEXT_PREFIXES}) of a multimodal Gemma checkpoint")
    what = "vision" if model_type == "gemma3" else "vision/audio"
    print(f"load_hf: {path}: multimodal {model_type}, read the text tower ({len(out)} tensors), skipped {skipped} "
          f"{what} tensors")
    return out


def load_hf(path, dtype=None) -> tuple[GemmaConfig, dict]:
    """(cfg, params) from a Hugging Face Gemma / Gemma 2 / Gemma 3 (text, or the text tower of a multimodal
    Gemma 3) safetensors folder, cast to `dtype` (default: the config's dtype). Peak memory: the model in `dtype`
    plus one tensor."""

    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"Hugging Face checkpoint folder not found: {path}")
    cfg = config_from_hf(path, param_dtype=_dtype_name(dtype))
    files = _hf_tensor_files(path)
    with open(os.path.join(path, "config.json")) as f:
        raw = json.load(f)
    embed_rows, stored = None, {}
    if raw.get("model_type") in ("gemma3", "gemma4", "gemma4_unified"):
        files = _text_tower(files, path, raw["model_type"])
        stored = {name: entry[2] for name, entry in files.items()}
        files = {name: entry[:2] for name, entry in files.items()}
        if raw["model_type"] == "gemma3":  # Gemma 4's text embedding has no image rows padded in
            embed_rows = int(raw["text_config"]["vocab_size"])
    expected = _hf_name_map(cfg, embed_rows)
    unknown = sorted(n for n in files if n not in expected and n != "lm_head.weight")
    if unknown:
        kind = "Gemma 3" if cfg.use_qk_norm else "Gemma 2" if cfg.use_post_norms else "Gemma"
        raise ValueError(f"{path}: unknown tensor(s) {unknown[:5]} in {sorted({files[n][0] for n in unknown})}; "
                         f"not part of a {kind} model per config.json")
    missing = [n for n in expected if n not in files]
    if missing:
        looked = sorted({f for f, _ in files.values()})
        raise ValueError(f"{path}: missing tensor(s) {missing[:5]} (looked in {looked})")
    for name, (file, info) in files.items():
        if info["dtype"] not in _ST_TO_NP:
            raise ValueError(f"tensor {name!r} in {file}: dtype {info['dtype']} not supported (F32, BF16 or F16)")
        want = expected[name][2] if name in expected else expected["model.embed_tokens.weight"][2]
        if tuple(info["shape"]) != want:
            raise ValueError(f"tensor {stored.get(name, name)!r} in {file}: shape {tuple(info['shape'])}, "
                             f"expected {want} for the config.json in {path}")

    params = _empty_params(cfg)
    by_file = {}
    for name, (file, _) in files.items():
        by_file.setdefault(file, []).append(name)
    for file, names in by_file.items():
        try:
            with safe_open(file, framework="numpy") as f:
                for name in names:
                    if name == "lm_head.weight":
                        continue  # checked below, once the embedding is in
                    ours, i, _ = expected[name]
                    _place(params, ours, i, f.get_tensor(stored.get(name, name)))
        except Exception as e:  # safetensors raises its own SafetensorError on bad files
            if isinstance(e, ValueError):
                raise
            raise ValueError(f"{file}: cannot read safetensors data ({e})") from None
    if "lm_head.weight" in files:
        file = files["lm_head.weight"][0]
        with safe_open(file, framework="numpy") as f:
            head = f.get_tensor(stored.get("lm_head.weight", "lm_head.weight"))[: cfg.vocab_size]
            if not np.array_equal(head.astype(params["embed"].dtype), params["embed"]):
                raise ValueError(f"tensor 'lm_head.weight' in {file}: differs from model.embed_tokens.weight; "
                                 "Gemma ties the output projection to the embedding")
    return cfg, _to_jax(params)


def _write_safetensors(file: str, entries: list) -> None:
    """Stream (name, shape, numpy dtype, make_array) entries into one safetensors file, one tensor in memory at a
    time. The header carries format "pt", which transformers requires."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape, dtype, _ in entries:
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": _NP_TO_ST[dtype.name], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # data starts 8-byte aligned, as the safetensors writer does
    with open(file, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for name, shape, dtype, make in entries:
            arr = np.ascontiguousarray(make(), dtype=dtype)
            assert arr.shape == tuple(shape), (name, arr.shape, shape)
            f.write(arr.tobytes())


def _check_params(cfg: GemmaConfig, params: dict) -> str:
    """Raise naming the first param missing or shaped unlike param_specs(cfg); returns the params' dtype name."""
    specs = param_specs(cfg)
    if cfg.layer_list:
        want = jax.tree_util.tree_flatten_with_path(specs, is_leaf=lambda x: hasattr(x, "axes"))[0]
        for path, spec in want:
            try:
                arr = params
                for k in path:
                    arr = arr[k.key if hasattr(k, "key") else k.idx]
            except (KeyError, IndexError):
                arr = None
            if arr is None or tuple(arr.shape) != spec.shape:
                raise ValueError(f"param {jax.tree_util.keystr(path)}: shape {None if arr is None else arr.shape}, "
                                 f"expected {spec.shape}")
        return _dtype_name(params["embed"].dtype)
    for key, spec in [("embed", specs["embed"]), ("final_norm", specs["final_norm"])] + [
            (f"layers/{k}", s) for k, s in specs["layers"].items()]:
        arr = params.get(key) if "/" not in key else params["layers"].get(key[7:])
        if arr is None or tuple(arr.shape) != spec.shape:
            raise ValueError(f"param {key!r}: shape {None if arr is None else tuple(arr.shape)}, expected {spec.shape}")
    return _dtype_name(params["embed"].dtype)


def save_hf(path, cfg: GemmaConfig, params: dict) -> None:
    """Write `model.safetensors` + `config.json` that transformers' AutoModelForCausalLM loads as the same model
    (GemmaForCausalLM, Gemma2ForCausalLM or Gemma3ForCausalLM, with cfg.vocab_size embedding rows). Tensors keep
    the params' dtype (bf16 params are saved as BF16)."""
    path = os.fspath(path)
    dtype = _check_params(cfg, params)
    np_dtype = _ST_TO_NP[_NP_TO_ST[dtype]]
    entries = []
    for name, (ours, i, hf_shape) in _hf_name_map(cfg).items():
        entries.append((name, hf_shape, np_dtype, lambda ours=ours, i=i, s=hf_shape: _take(params, ours, i, s)))
    os.makedirs(path, exist_ok=True)
    _write_safetensors(os.path.join(path, "model.safetensors"), entries)
    hf_cfg = config_to_hf(dataclasses.replace(cfg, param_dtype=dtype))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf_cfg, f, indent=2)


# ----------------------------------------------------------------------------------------------------------------
# Kaggle Flax / orbax

_KAGGLE_QK_NORM = "transformer/layer_0/attn/_query_norm/scale"


def _is_kaggle_vision(name: str) -> bool:
    """Leaves of Gemma 3's vision tower and its projection into the text embedding (not read)."""
    return not name.startswith("transformer/") or name.startswith("transformer/embedder/mm_")


def _orbax_leaves(path: str) -> dict:
    """'transformer/layer_0/attn/q_einsum/w' -> (key path tuple in the stored tree, shape, dtype name)."""

    try:
        meta = ocp.PyTreeCheckpointer().metadata(path)
    except Exception as e:  # orbax raises assorted errors on a folder it cannot read
        raise ValueError(f"{path}: cannot read orbax checkpoint metadata ({e})") from None
    meta = getattr(meta, "item_metadata", meta)
    meta = getattr(meta, "tree", meta)
    out = {}
    for keys, m in jax.tree_util.tree_flatten_with_path(meta)[0]:
        key_path = tuple(k.key for k in keys)
        out["/".join(key_path)] = (key_path, tuple(m.shape), np.dtype(m.dtype).name)
    return out


def _infer_kaggle_config(leaves: dict, path: str) -> GemmaConfig:
    """Config from tensor shapes (see the module docstring for the defaults a checkpoint cannot tell)."""
    def shape(name):
        if name not in leaves:
            raise ValueError(f"{path}: missing tensor {name!r}")
        return leaves[name][1]

    layer_ids = sorted({int(m.group(1)) for n in leaves if (m := re.match(r"transformer/layer_(\d+)/", n))})
    if not layer_ids or layer_ids != list(range(len(layer_ids))):
        raise ValueError(f"{path}: expected transformer/layer_0 .. layer_{{L-1}}, found layers {layer_ids[:10]}")
    V, D = shape("transformer/embedder/input_embedding")
    attn = "transformer/layer_0/attn/"
    if attn + "qkv_einsum/w" in leaves:
        _, N, _, H = shape(attn + "qkv_einsum/w")
        K = N
    else:
        N, _, H = shape(attn + "q_einsum/w")
        K = shape(attn + "kv_einsum/w")[1]
    F = shape("transformer/layer_0/mlp/linear/w")[0]
    if _KAGGLE_QK_NORM in leaves:
        dims = (len(layer_ids), D, F, N, K, H)
        for preset in (GEMMA3_270M, GEMMA3_1B, GEMMA3_4B, GEMMA3_12B, GEMMA3_27B):
            if dims == (preset.num_layers, preset.embed_dim, preset.hidden_dim, preset.num_heads,
                        preset.num_kv_heads, preset.head_dim):
                return dataclasses.replace(preset, vocab_size=min(V, preset.vocab_size),
                                           param_dtype=leaves["transformer/embedder/input_embedding"][2])
        raise ValueError(f"{path}: a Gemma 3 checkpoint with (layers, D, F, N, K, H) = {dims} matches no GEMMA3_* "
                         "preset; pass cfg (its window, RoPE scaling and query scale are not in the shapes)")
    kw = dict(num_layers=len(layer_ids), embed_dim=D, hidden_dim=F, num_heads=N, num_kv_heads=K, head_dim=H,
              vocab_size=GEMMA_VOCAB if V == TUNIX_PADDED_VOCAB else V, query_pre_attn_scalar=H,
              param_dtype=leaves["transformer/embedder/input_embedding"][2])
    if "transformer/layer_0/post_ffw_norm/scale" in leaves:
        return GemmaConfig(attn_logit_softcap=GEMMA2_2B.attn_logit_softcap,
                           final_logit_softcap=GEMMA2_2B.final_logit_softcap,
                           sliding_window=GEMMA2_2B.sliding_window, local_layer_period=2, use_post_norms=True, **kw)
    return GemmaConfig(**kw)


def _kaggle_layer_names(cfg: GemmaConfig, fused_qkv: bool) -> dict:
    """Kaggle leaf name (under transformer/layer_{i}/) -> expected shape."""
    D, F, N, K, H = cfg.embed_dim, cfg.hidden_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    names = {"attn/attn_vec_einsum/w": (N, H, D), "mlp/gating_einsum/w": (2, D, F), "mlp/linear/w": (F, D),
             "pre_attention_norm/scale": (D,), "pre_ffw_norm/scale": (D,)}
    if fused_qkv:
        names["attn/qkv_einsum/w"] = (3, N, D, H)
    else:
        names.update({"attn/q_einsum/w": (N, D, H), "attn/kv_einsum/w": (2, K, D, H)})
    if cfg.use_post_norms:
        names.update({"post_attention_norm/scale": (D,), "post_ffw_norm/scale": (D,)})
    if cfg.use_qk_norm:
        names.update({"attn/_query_norm/scale": (H,), "attn/_key_norm/scale": (H,)})
    return names


def _check_kaggle_leaves(leaves: dict, cfg: GemmaConfig, path: str) -> dict:
    """All expected Kaggle names with checked shapes and dtypes; returns name -> expected shape. Drops Gemma 3's
    vision leaves from `leaves` (one printed line)."""
    vision = [n for n in leaves if _is_kaggle_vision(n)] if cfg.use_qk_norm else []
    if vision:
        for n in vision:
            del leaves[n]
        print(f"load_kaggle: {path}: multimodal Gemma 3, skipped {len(vision)} vision tensors")
    fused = "transformer/layer_0/attn/qkv_einsum/w" in leaves
    expected = {"transformer/embedder/input_embedding": None, "transformer/final_norm/scale": (cfg.embed_dim,)}
    for i in range(cfg.num_layers):
        for name, shape in _kaggle_layer_names(cfg, fused).items():
            expected[f"transformer/layer_{i}/{name}"] = shape
    unknown = sorted(n for n in leaves if n not in expected)
    if unknown:
        raise ValueError(f"{path}: unknown tensor(s) {unknown[:5]} for this Gemma config")
    missing = [n for n in expected if n not in leaves]
    if missing:
        raise ValueError(f"{path}: missing tensor(s) {missing[:5]}")
    for name, (_, shape, dtype) in leaves.items():
        if dtype not in _FLOAT_NAMES:
            raise ValueError(f"tensor {name!r} in {path}: dtype {dtype} not supported (float32, bfloat16, float16)")
        want = expected[name]
        if name.endswith("gating_einsum/w") and shape == (2, cfg.hidden_dim, cfg.embed_dim):
            continue  # the transposed [2,F,D] layout of Gemma 2 releases
        if want is None:  # embedding: may carry Tunix's padding rows beyond the vocabulary
            want = (max(shape[0], cfg.vocab_size), cfg.embed_dim)
        if shape != want:
            raise ValueError(f"tensor {name!r} in {path}: shape {shape}, expected {want}")
    return expected


def _restore(path: str, leaves: dict, names: list) -> dict:
    """Partial orbax restore of `names` as numpy arrays: name -> array."""

    item, restore_args = {}, {}
    for name in names:
        *outer, leaf = leaves[name][0]
        node, args = item, restore_args
        for k in outer:
            node, args = node.setdefault(k, {}), args.setdefault(k, {})
        node[leaf], args[leaf] = 0, ocp.RestoreArgs(restore_type=np.ndarray)
    out = ocp.PyTreeCheckpointer().restore(path, args=ocp.args.PyTreeRestore(
        item=item, restore_args=restore_args, partial_restore=True))
    result = {}
    for name in names:
        node = out
        for k in leaves[name][0]:
            node = node[k]
        result[name] = np.asarray(node)
    return result


def _fill_kaggle_layer(params: dict, i: int, t: dict, cfg: GemmaConfig) -> None:
    """Write layer i's Kaggle tensors `t` (short names) into the stacked params, converting layouts."""
    lay = params["layers"]
    if "attn/qkv_einsum/w" in t:
        q_NDH, k_NDH, v_NDH = t["attn/qkv_einsum/w"]
        lay["k"][i], lay["v"][i] = k_NDH.transpose(1, 0, 2), v_NDH.transpose(1, 0, 2)
    else:
        q_NDH, (k_KDH, v_KDH) = t["attn/q_einsum/w"], t["attn/kv_einsum/w"]
        lay["k"][i], lay["v"][i] = k_KDH.transpose(1, 0, 2), v_KDH.transpose(1, 0, 2)
    lay["q"][i] = q_NDH.transpose(1, 0, 2)
    lay["o"][i] = t["attn/attn_vec_einsum/w"]
    gating = t["mlp/gating_einsum/w"]
    if gating.shape != (2, cfg.embed_dim, cfg.hidden_dim):  # [2,F,D]: checked in _check_kaggle_leaves
        gating = gating.transpose(0, 2, 1)
    lay["gate"][i], lay["up"][i] = gating[0], gating[1]
    lay["down"][i] = t["mlp/linear/w"]
    lay["attn_norm"][i], lay["ffw_norm"][i] = t["pre_attention_norm/scale"], t["pre_ffw_norm/scale"]
    if cfg.use_post_norms:
        lay["post_attn_norm"][i], lay["post_ffw_norm"][i] = t["post_attention_norm/scale"], t["post_ffw_norm/scale"]
    if cfg.use_qk_norm:
        lay["q_norm"][i], lay["k_norm"][i] = t["attn/_query_norm/scale"], t["attn/_key_norm/scale"]


def load_kaggle(path, cfg: GemmaConfig | None = None, dtype=None) -> tuple[GemmaConfig, dict]:
    """(cfg, params) from a Kaggle Flax/orbax Gemma checkpoint (the layout Tunix's load_and_format_params reads).

    cfg None: inferred from tensor shapes (module docstring). dtype None: cfg.param_dtype if cfg is given, else the
    stored dtype. The checkpoint is restored one layer at a time into preallocated stacked arrays.
    """
    path = os.path.abspath(os.fspath(path))  # orbax wants absolute paths
    if not os.path.isdir(path):
        raise FileNotFoundError(f"Kaggle/orbax checkpoint folder not found: {path}")
    leaves = _orbax_leaves(path)
    if (cfg is None and _KAGGLE4_MARKER in leaves) or (cfg is not None and cfg.layer_list):
        return _load_kaggle4(path, _kaggle4_leaves(leaves, path), cfg, dtype)
    if cfg is None:
        cfg = _infer_kaggle_config(leaves, path)
    cfg = dataclasses.replace(cfg, param_dtype=_dtype_name(dtype) or cfg.param_dtype)
    _check_kaggle_leaves(leaves, cfg, path)
    params = _empty_params(cfg)
    top = _restore(path, leaves, ["transformer/embedder/input_embedding", "transformer/final_norm/scale"])
    params["embed"][...] = top.pop("transformer/embedder/input_embedding")[: cfg.vocab_size]
    params["final_norm"][...] = top.pop("transformer/final_norm/scale")
    for i in range(cfg.num_layers):
        prefix = f"transformer/layer_{i}/"
        tensors = _restore(path, leaves, [n for n in leaves if n.startswith(prefix)])
        _fill_kaggle_layer(params, i, {n[len(prefix):]: v for n, v in tensors.items()}, cfg)
    return cfg, _to_jax(params)


def _kaggle_layer_tree(params: dict, i: int, cfg: GemmaConfig) -> dict:
    """Layer i of our stacked params as Kaggle leaves (short names): the inverse of _fill_kaggle_layer."""
    lay = {k: np.asarray(v[i]) for k, v in params["layers"].items()}
    q_NDH, k_KDH, v_KDH = (lay[n].transpose(1, 0, 2) for n in ("q", "k", "v"))
    t = {"attn/qkv_einsum/w": np.stack([q_NDH, k_KDH, v_KDH])} if cfg.num_kv_heads == cfg.num_heads else {
        "attn/q_einsum/w": q_NDH, "attn/kv_einsum/w": np.stack([k_KDH, v_KDH])}
    gating_2DF = np.stack([lay["gate"], lay["up"]])
    gemma3_layout = cfg.use_qk_norm and cfg.embed_dim != cfg.hidden_dim  # D == F reads back as [2,D,F]: decision 2
    t.update({"attn/attn_vec_einsum/w": lay["o"], "mlp/linear/w": lay["down"],
              "mlp/gating_einsum/w": gating_2DF.transpose(0, 2, 1) if gemma3_layout else gating_2DF,
              "pre_attention_norm/scale": lay["attn_norm"], "pre_ffw_norm/scale": lay["ffw_norm"]})
    if cfg.use_post_norms:
        t["post_attention_norm/scale"], t["post_ffw_norm/scale"] = lay["post_attn_norm"], lay["post_ffw_norm"]
    if cfg.use_qk_norm:
        t["attn/_query_norm/scale"], t["attn/_key_norm/scale"] = lay["q_norm"], lay["k_norm"]
    return t


def save_kaggle(path, cfg: GemmaConfig, params: dict) -> None:
    """Write `params` as a Kaggle Flax/orbax Gemma checkpoint folder at `path` (must not exist), the layout
    load_kaggle and Tunix's `params.load_and_format_params` read (module docstring). Tensors keep the params'
    dtype. Host memory: one numpy copy of the model, which orbax writes in one go."""
    path = os.path.abspath(os.fspath(path))  # orbax wants absolute paths
    _check_params(cfg, params)
    if cfg.layer_list:
        return _save_kaggle4(path, cfg, params)
    tree = {"transformer/embedder": {"input_embedding": np.asarray(params["embed"])},
            "transformer/final_norm": {"scale": np.asarray(params["final_norm"])}}
    for i in range(cfg.num_layers):
        for name, arr in _kaggle_layer_tree(params, i, cfg).items():
            module, leaf = name.rsplit("/", 1)
            tree.setdefault(f"transformer/layer_{i}/{module}", {})[leaf] = arr
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(path, tree)
    ckpt.wait_until_finished()


# ----------------------------------------------------------------------------------------------------------------
# Kaggle Flax / orbax, Gemma 4 (the layout Tunix's `tunix/models/gemma4/params.py` map_from_upstream_checkpoint
# reads; names and shapes in the module docstring)

_KAGGLE4_MARKER = "transformer/layer_0/skip_scale"  # every Gemma 4 layer has one in Tunix's model
KAGGLE4_CONFIG = "gemma_config.json"  # save_kaggle's GemmaConfig fields next to the tensors (Gemma 4 only)
# Other spellings Tunix's mapper accepts for the same tensors -> the names we write.
_KAGGLE4_ALIASES = {"/attn/query_norm/": "/attn/_query_norm/", "/attn/key_norm/": "/attn/_key_norm/",
                    "transformer/embedder/per_layer_input_embedding": "transformer/embedder/per_layer_embeddings"}


def _kaggle4_name_map(cfg: GemmaConfig) -> dict:
    """The one Gemma 4 Kaggle name map: name -> (our keys, layer index or None, Kaggle shape, layout). Layouts:
    same; heads: ours [D,K,H] <-> [K,D,H]; kv: ours (k, v) <-> [2,K,D,H]; gating: ours (gate [D,F], up [D,F]) <->
    [2,F,D]; experts: ours [E,D,2,M] <-> [E,2,M,D]; ones: a tensor Tunix's model uses that our config does not
    have (skip_scale without layer scalars), written as ones and read back only if it is all ones; unused: the
    k/v projections and key norm Tunix's model holds in KV-shared layers but never reads, written as zeros and
    optional on read."""
    D, N, P, L, V = cfg.embed_dim, cfg.num_heads, cfg.per_layer_input_dim, cfg.num_layers, cfg.vocab_size
    out = {"transformer/embedder/input_embedding": (("embed",), None, (V, D), "same"),
           "transformer/final_norm/scale": (("final_norm",), None, (D,), "same")}
    if P:
        out.update({
            "transformer/embedder/per_layer_embeddings": (("per_layer_embed",), None,
                                                          (cfg.per_layer_vocab_size or V, L, P), "same"),
            "transformer/embedder/per_layer_model_projection/w": (("per_layer_proj",), None, (D, L, P), "same"),
            "transformer/embedder/per_layer_projection_norm/scale": (("per_layer_proj_norm",), None, (P,), "same")})
    for i, kind in enumerate(layer_kinds(cfg)):
        H, K, F = kind.head_dim, kind.kv_heads, kind.hidden
        kv_name, kv_shape = ("attn/k_einsum/w", (K, D, H)) if kind.k_eq_v else ("attn/kv_einsum/w", (2, K, D, H))
        if kind.has_kv:
            kv = (("k",), kv_shape, "heads") if kind.k_eq_v else (("k", "v"), kv_shape, "kv")
            key_norm = (("k_norm",), (H,), "same")
        else:
            kv, key_norm = ((), kv_shape, "unused"), ((), (H,), "unused")
        names = {"attn/q_einsum/w": (("q",), (N, D, H), "heads"), kv_name: kv,
                 "attn/attn_vec_einsum/w": (("o",), (N, H, D), "same"),
                 "attn/_query_norm/scale": (("q_norm",), (H,), "same"), "attn/_key_norm/scale": key_norm,
                 "mlp/gating_einsum/w": (("gate", "up"), (2, F, D), "gating"),
                 "mlp/linear/w": (("down",), (F, D), "same"),
                 "pre_attention_norm/scale": (("attn_norm",), (D,), "same"),
                 "post_attention_norm/scale": (("post_attn_norm",), (D,), "same"),
                 "pre_ffw_norm/scale": (("ffw_norm",), (D,), "same"),
                 "post_ffw_norm/scale": (("post_ffw_norm",), (D,), "same"),
                 "skip_scale": (("layer_scalar",), (1,), "same") if cfg.use_layer_scalar else ((), (1,), "ones")}
        if P:
            names.update({"per_layer_input_gate/w": (("ple_gate",), (D, P), "same"),
                          "per_layer_projection/w": (("ple_proj",), (P, D), "same"),
                          "post_per_layer_input_norm/scale": (("ple_norm",), (D,), "same")})
        if cfg.num_experts:
            E, M = cfg.num_experts, cfg.moe_hidden_dim
            names.update({"moe/router_logits": (("router",), (D, E), "same"),
                          "moe/router_scale": (("router_scale",), (D,), "same"),
                          "moe/per_expert_scale": (("per_expert_scale",), (E,), "same"),
                          "moe/gating_einsum": (("experts_gate_up",), (E, 2, M, D), "experts"),
                          "moe/linear": (("experts_down",), (E, M, D), "same"),
                          "dense_post_ffw_norm/scale": (("post_mlp_norm",), (D,), "same"),
                          "moe_pre_ffw_norm/scale": (("pre_moe_norm",), (D,), "same"),
                          "moe_post_ffw_norm/scale": (("post_moe_norm",), (D,), "same")})
        out.update({f"transformer/layer_{i}/{n}": (ours, i, shape, layout)
                    for n, (ours, shape, layout) in names.items()})
    return out


def _to_kaggle4(xs: list, layout: str, shape: tuple, dtype) -> np.ndarray:
    """Our arrays `xs` (the map's keys, in order) -> the Kaggle tensor of `layout` (see _kaggle4_name_map)."""
    if layout in ("ones", "unused"):
        return (np.ones if layout == "ones" else np.zeros)(shape, dtype)
    if layout == "heads":
        return xs[0].transpose(1, 0, 2)
    if layout == "kv":
        return np.stack([x.transpose(1, 0, 2) for x in xs])
    if layout == "gating":
        return np.stack([x.T for x in xs])
    return xs[0].transpose(0, 2, 3, 1) if layout == "experts" else xs[0]


def _from_kaggle4(w: np.ndarray, layout: str) -> tuple:
    """The Kaggle tensor w -> our arrays (the map's keys, in order): the inverse of _to_kaggle4."""
    if layout == "heads":
        return (w.transpose(1, 0, 2),)
    if layout == "kv":
        return tuple(x.transpose(1, 0, 2) for x in w)
    if layout == "gating":
        return tuple(x.T for x in w)
    return (w.transpose(0, 3, 1, 2),) if layout == "experts" else (w,)


def _kaggle4_leaves(leaves: dict, path: str) -> dict:
    """The checkpoint's leaves under the names we write (Tunix's aliases renamed); leaves outside the text model
    (not under transformer/layer_*, transformer/final_norm or the embedder's PLE: Gemma 4's vision/audio parts,
    as Tunix prunes them) are dropped with one printed line."""
    out, skipped = {}, 0
    for name, leaf in leaves.items():
        for old, new in _KAGGLE4_ALIASES.items():
            name = name.replace(old, new)
        text = name.startswith(("transformer/layer_", "transformer/final_norm/")) or name in (
            "transformer/embedder/input_embedding", "transformer/embedder/per_layer_embeddings") or name.startswith(
            ("transformer/embedder/per_layer_model_projection/", "transformer/embedder/per_layer_projection_norm/"))
        if text:
            out[name] = leaf
        else:
            skipped += 1
    if skipped:
        print(f"load_kaggle: {path}: Gemma 4, skipped {skipped} tensors outside the text model")
    return out


def _check_kaggle4_leaves(leaves: dict, cfg: GemmaConfig, path: str) -> dict:
    """Every name of _kaggle4_name_map(cfg) present (unused ones may be absent) with its shape and a float dtype,
    and nothing else; returns the map."""
    expected = _kaggle4_name_map(cfg)
    unknown = sorted(n for n in leaves if n not in expected)
    if unknown:
        raise ValueError(f"{path}: unknown tensor(s) {unknown[:5]} for this Gemma 4 config")
    missing = [n for n, (_, _, _, layout) in expected.items() if n not in leaves and layout != "unused"]
    if missing:
        raise ValueError(f"{path}: missing tensor(s) {missing[:5]} for this Gemma 4 config")
    for name, (_, shape, dtype) in leaves.items():
        if dtype not in _FLOAT_NAMES:
            raise ValueError(f"tensor {name!r} in {path}: dtype {dtype} not supported (float32, bfloat16, float16)")
        if shape != expected[name][2]:
            raise ValueError(f"tensor {name!r} in {path}: shape {shape}, expected {expected[name][2]} for this "
                             "Gemma 4 config")
    return expected


def _same_shapes(leaves: dict, cfg: GemmaConfig) -> bool:
    expected = _kaggle4_name_map(cfg)
    return all(n in expected and leaves[n][1] == expected[n][2] for n in leaves) and all(
        n in leaves for n, e in expected.items() if e[3] != "unused")


def _infer_kaggle4_config(leaves: dict, path: str) -> GemmaConfig:
    """Gemma 4's config: the one save_kaggle wrote next to the tensors, else the GEMMA4_* preset whose every
    tensor name and shape the checkpoint has (module docstring, decision 6)."""
    dtype = leaves["transformer/embedder/input_embedding"][2]
    written = os.path.join(path, KAGGLE4_CONFIG)
    if os.path.exists(written):
        with open(written) as f:
            fields = json.load(f)
        try:
            return GemmaConfig(**{**fields, "param_dtype": dtype})
        except TypeError as e:  # an unknown or missing field
            raise ValueError(f"{written}: not a GemmaConfig ({e})") from None
    for preset in (GEMMA4_E2B, GEMMA4_E4B, GEMMA4_12B, GEMMA4_31B, GEMMA4_26B_A4B):
        if _same_shapes(leaves, preset):
            return dataclasses.replace(preset, param_dtype=dtype)
    raise ValueError(f"{path}: a Gemma 4 checkpoint whose tensor shapes match no GEMMA4_* preset and no "
                     f"{KAGGLE4_CONFIG}; pass cfg (the layer pattern, KV sharing, window and RoPE are not in the "
                     "shapes)")


def _load_kaggle4(path: str, leaves: dict, cfg: GemmaConfig | None, dtype) -> tuple[GemmaConfig, dict]:
    """load_kaggle for Gemma 4: checked against the name map, restored one layer at a time."""
    if cfg is None:
        cfg = _infer_kaggle4_config(leaves, path)
    cfg = dataclasses.replace(cfg, param_dtype=_dtype_name(dtype) or cfg.param_dtype)
    expected = _check_kaggle4_leaves(leaves, cfg, path)
    params = _empty_params(cfg)
    by_layer = {}
    for name, (_, i, _, layout) in expected.items():
        if name in leaves and layout != "unused":
            by_layer.setdefault(i, []).append(name)
    for i, names in by_layer.items():
        stored = _restore(path, leaves, names)
        for name in names:
            ours, _, _, layout = expected[name]
            if layout == "ones":
                if not np.all(stored[name] == 1):
                    raise ValueError(f"tensor {name!r} in {path}: not all ones, but the config has no layer scalars "
                                     "(use_layer_scalar False)")
                continue
            target = params if i is None else params["layers"][i]
            for key, x in zip(ours, _from_kaggle4(stored[name], layout)):
                target[key][...] = x
    return cfg, _to_jax(params)


def _save_kaggle4(path: str, cfg: GemmaConfig, params: dict) -> None:
    """save_kaggle for Gemma 4: every tensor of the name map, then the config as KAGGLE4_CONFIG."""
    tree = {}
    for name, (ours, i, shape, layout) in _kaggle4_name_map(cfg).items():
        source = params if i is None else params["layers"][i]
        xs = [np.asarray(source[k]) for k in ours]
        arr = _to_kaggle4(xs, layout, shape, np.asarray(params["embed"]).dtype)
        assert arr.shape == shape, (name, arr.shape, shape)
        module, leaf = name.rsplit("/", 1)
        tree.setdefault(module, {})[leaf] = arr
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(path, tree)
    ckpt.wait_until_finished()
    with open(os.path.join(path, KAGGLE4_CONFIG), "w") as f:
        json.dump(dataclasses.asdict(cfg), f, indent=2)  # every field: transformers' config.json cannot say all


# ----------------------------------------------------------------------------------------------------------------


_ORBAX_MARKERS = ("_METADATA", "_CHECKPOINT_METADATA", "manifest.ocdbt", "checkpoint")


def load_checkpoint(path, dtype=None) -> tuple[GemmaConfig, dict]:
    """(cfg, params) from a Hugging Face folder (config.json + safetensors) or a Kaggle orbax checkpoint folder."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if not os.path.isdir(path):
        raise ValueError(f"{path}: expected a checkpoint folder, got a file")
    names = set(os.listdir(path))
    if "config.json" in names:
        if not names & {"model.safetensors", "model.safetensors.index.json"}:
            raise ValueError(f"{path}: has config.json but no model.safetensors or model.safetensors.index.json "
                             f"(only safetensors weights are supported); found {sorted(names)[:20]}")
        return load_hf(path, dtype)
    if names & set(_ORBAX_MARKERS):
        return load_kaggle(path, dtype=dtype)
    raise ValueError(f"{path}: not a checkpoint: expected config.json + model.safetensors (Hugging Face) or an orbax "
                     f"checkpoint ({', '.join(_ORBAX_MARKERS)}); found {sorted(names)[:20]}")
