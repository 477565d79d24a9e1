"""Saving and loading LoRA adapters: one folder with `lora.safetensors` (the A and B tensors) and `lora.json`
(rank, alpha, targets, dtype, the model config they were trained on and its fingerprint, plus free-form `extra`).

Tensor names are "{target}.a" / "{target}.b", each with the leading L axis, exactly as in `LoRA.layers`.
Loading checks everything it can and names the mismatch: another model (the config fields that differ),
another rank, alpha or target set than the caller expects, a missing, extra or mis-shaped tensor.
"""

import dataclasses
import hashlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from gemma_jax.config import GemmaConfig
from gemma_jax.model import lora_specs
from gemma_jax.sharding import to_host
from lora.adapters import LoRA, lora_shapes

TENSORS_FILE = "lora.safetensors"
META_FILE = "lora.json"
FORMAT = "nanotunix-lora"
VERSION = 1
# Config fields that do not change what the adapters compute: excluded from the model fingerprint.
_NOT_ARCHITECTURE = ("param_dtype", "scan_layers", "remat", "logits_chunk")
# Gemma 4 fields: left out of the fingerprint at their defaults, so a Gemma 1-3 digest is what it was before.
_GEMMA4_FIELDS = ("norm_plus_one", "per_layer_input_dim", "per_layer_vocab_size", "num_kv_shared_layers",
                  "global_head_dim", "num_global_kv_heads", "attention_k_eq_v", "use_value_norm",
                  "global_rope_fraction", "double_wide_mlp", "use_layer_scalar", "num_experts", "top_k_experts",
                  "moe_hidden_dim")
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(GemmaConfig)}


def model_fingerprint(cfg: GemmaConfig) -> tuple[dict, str]:
    """(the architecture fields of cfg, a short sha256 of them). Adapters only fit a model with equal fields."""
    fields = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _NOT_ARCHITECTURE
              and not (k in _GEMMA4_FIELDS and v == _DEFAULTS[k])}
    # Numbers as floats so that 24 (a preset) and 24.0 (read from an HF config.json) fingerprint alike.
    norm = {k: float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v for k, v in fields.items()}
    digest = hashlib.sha256(json.dumps(norm, sort_keys=True).encode()).hexdigest()[:16]
    return fields, digest


def _to_host(tree):
    return to_host(tree)


def check_lora_fits(cfg: GemmaConfig, lora: LoRA) -> int:
    """Raise a ValueError naming the first adapter tensor whose shape does not fit cfg; returns the rank."""
    rank = _rank(lora)
    if cfg.layer_list:
        want, got = _tensor_shapes(cfg, rank, list(lora.layers)), _flat_tensors(lora.layers)
        for name in sorted(set(want) | set(got)):
            if name not in got or name not in want or tuple(got[name].shape) != want[name]:
                raise ValueError(f"LoRA tensor {name} has shape {got[name].shape if name in got else None}, but "
                                 f"this model needs {want.get(name)}")
        return rank
    for name, (a_shape, b_shape) in lora_shapes(cfg, rank, list(lora.layers)).items():
        for ab, shape in (("a", a_shape), ("b", b_shape)):
            got, want = tuple(lora.layers[name][ab].shape), (cfg.num_layers, *shape)
            if got != want:
                raise ValueError(f"LoRA tensor {name}.{ab} has shape {got}, but this model needs {want}")
    return rank


def save_adapters(path, lora: LoRA, cfg: GemmaConfig, extra: dict | None = None) -> None:
    """Write `lora` to the folder `path` (created if needed). extra: JSON-serialisable (e.g. step, data hash).

    Multi-host: every process must call this (the adapters are gathered collectively); only process 0 writes.
    Files are written to temporary names and renamed, so a crash never leaves a half-written adapter.
    """
    rank = check_lora_fits(cfg, lora)
    targets = list(lora.layers)
    host = _to_host(lora.layers)
    if jax.process_index() != 0:
        return
    tensors = {n: np.ascontiguousarray(x) for n, x in _flat_tensors(host).items()}
    dtypes = {str(t.dtype) for t in tensors.values()}
    _, digest = model_fingerprint(cfg)
    meta = {
        "format": FORMAT, "version": VERSION, "rank": rank, "alpha": lora.scale * rank, "scale": lora.scale,
        "targets": targets, "dtype": dtypes.pop() if len(dtypes) == 1 else "mixed",
        "model_config": dataclasses.asdict(cfg), "model_fingerprint": digest, "extra": extra or {},
    }
    os.makedirs(path, exist_ok=True)
    tmp_t, tmp_m = os.path.join(path, TENSORS_FILE + ".tmp"), os.path.join(path, META_FILE + ".tmp")
    save_file(tensors, tmp_t, metadata={"format": FORMAT})
    with open(tmp_m, "w") as f:
        json.dump(meta, f, indent=2)
    os.replace(tmp_t, os.path.join(path, TENSORS_FILE))
    os.replace(tmp_m, os.path.join(path, META_FILE))


def _flat_tensors(layers: dict) -> dict:
    """File name -> array: "{target}.a" / "{target}.b" stacked [L, ...]; Gemma 4's per-layer tuples as
    "{target}.{i}.a" / "{target}.{i}.b" for the layers that carry the adapter."""
    out = {}
    for name, ab in layers.items():
        for k in ("a", "b"):
            if isinstance(ab[k], tuple):
                out.update({f"{name}.{i}.{k}": x for i, x in enumerate(ab[k]) if x is not None})
            else:
                out[f"{name}.{k}"] = ab[k]
    return out


def _tensor_shapes(cfg: GemmaConfig, rank: int, targets) -> dict:
    """File name -> shape of every adapter tensor of cfg (names as _flat_tensors)."""
    if not cfg.layer_list:
        return {f"{n}.{k}": (cfg.num_layers, *shape) for n, shapes in lora_shapes(cfg, rank, targets).items()
                for k, shape in zip("ab", shapes)}
    return {f"{n}.{i}.{k}": s.shape for n, ab in lora_specs(cfg, rank, targets).items() for k in "ab"
            for i, s in enumerate(ab[k]) if s is not None}


def _rank(lora: LoRA) -> int:
    per_layer = [ab for ab in lora.layers.values() if isinstance(ab["a"], tuple)]
    if per_layer:  # Gemma 4: A [..., R], B [R, ...] per layer
        ranks = {x.shape[-1] for ab in per_layer for x in ab["a"] if x is not None}
        ranks |= {x.shape[0] for ab in per_layer for x in ab["b"] if x is not None}
    else:
        ranks = {ab["a"].shape[-1] for ab in lora.layers.values()} | {ab["b"].shape[1] for ab in lora.layers.values()}
    if len(ranks) != 1:
        raise ValueError(f"LoRA adapters have inconsistent ranks {sorted(ranks)}")
    return ranks.pop()


def read_adapter_meta(path) -> dict:
    """The lora.json of an adapter folder (rank, alpha, targets, model_config, model_fingerprint, extra, ...)."""
    meta_path = os.path.join(path, META_FILE)
    if not os.path.exists(meta_path):
        raise FileNotFoundError(f"no LoRA adapters in {path}: {META_FILE} not found")
    with open(meta_path) as f:
        try:
            meta = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{meta_path}: not valid JSON ({e})") from None
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ValueError(f"{meta_path}: expected format {FORMAT!r} version {VERSION}, "
                         f"got {meta.get('format')!r} version {meta.get('version')!r}")
    return meta


def _differs(a, b) -> bool:
    """Config values differ (24 and 24.0 are the same number; lists read from JSON equal tuples)."""
    norm = lambda v: float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else (  # noqa: E731
        tuple(v) if isinstance(v, list) else v)
    return norm(a) != norm(b)


def _check_expected(meta_path, meta, cfg, rank, alpha, targets):
    """Raise a ValueError naming every way the stored adapters differ from what the caller expects."""
    problems = []
    if cfg is not None:
        given, digest = model_fingerprint(cfg)
        # Rebuilt through GemmaConfig, a field the file lacks (added to the config after the file was written)
        # takes its default, which keeps the older architectures as they were.
        stored, stored_digest = model_fingerprint(GemmaConfig(**meta["model_config"]))
        if stored_digest != digest:
            # Named over every field: one at its default is left out of the fingerprint but still differs.
            full = lambda c: {k: v for k, v in dataclasses.asdict(c).items() if k not in _NOT_ARCHITECTURE}  # noqa
            stored, given = full(GemmaConfig(**meta["model_config"])), full(cfg)
            diffs = [f"{k}: file {stored[k]!r} vs given {v!r}" for k, v in given.items() if _differs(stored[k], v)]
            problems.append("trained for a different model (" + ("; ".join(diffs) or "fingerprint differs") + ")")
    if rank is not None and rank != meta["rank"]:
        problems.append(f"rank: file {meta['rank']} vs expected {rank}")
    if alpha is not None and not np.isclose(alpha, meta["alpha"], rtol=1e-6):
        problems.append(f"alpha: file {meta['alpha']} vs expected {alpha}")
    if targets is not None and sorted(targets) != sorted(meta["targets"]):
        problems.append(f"targets: file {sorted(meta['targets'])} vs expected {sorted(targets)}")
    if problems:
        raise ValueError(f"LoRA adapters in {meta_path} do not fit: " + "; ".join(problems))


def load_adapters(path, cfg: GemmaConfig | None = None, *, rank: int | None = None, alpha: float | None = None,
                  targets=None, dtype=None) -> LoRA:
    """Read adapters written by `save_adapters`. Every given expectation is checked against the file:
    cfg (the model: every architecture field must match), rank, alpha, targets (as a set). dtype: cast to it
    (default: keep the stored dtype). The arrays are placed on the default device; use
    gemma_jax.sharding.shard(lora, lora_shardings(lora, mesh)) to shard them."""
    meta = read_adapter_meta(path)
    meta_path = os.path.join(path, META_FILE)
    _check_expected(meta_path, meta, cfg, rank, alpha, targets)
    stored_cfg = GemmaConfig(**meta["model_config"])
    if stored_cfg.layer_list:
        return _load_per_layer(path, stored_cfg, meta, dtype)
    shapes = lora_shapes(stored_cfg, meta["rank"], meta["targets"])
    tensors_path = os.path.join(path, TENSORS_FILE)
    if not os.path.exists(tensors_path):
        raise FileNotFoundError(f"{tensors_path} not found (its {META_FILE} exists)")
    with safe_open(tensors_path, "np") as f:
        names = set(f.keys())
        expected = {f"{t}.{ab}" for t in meta["targets"] for ab in ("a", "b")}
        if names != expected:
            raise ValueError(f"{tensors_path}: tensors {sorted(names)} do not match the targets in {META_FILE}; "
                             f"missing {sorted(expected - names)}, unexpected {sorted(names - expected)}")
        layers = {}
        for name, (a_shape, b_shape) in shapes.items():
            layers[name] = {}
            for ab, shape in (("a", a_shape), ("b", b_shape)):
                x = f.get_tensor(f"{name}.{ab}")
                want = (stored_cfg.num_layers, *shape)
                if x.shape != want:
                    raise ValueError(f"{tensors_path}: tensor {name}.{ab} has shape {x.shape}, expected {want}")
                layers[name][ab] = jnp.asarray(x if dtype is None else x.astype(dtype))
    return LoRA(layers=layers, scale=float(meta["scale"]))


def _load_per_layer(path, cfg: GemmaConfig, meta: dict, dtype) -> LoRA:
    """load_adapters for Gemma 4: per-layer tensors "{target}.{i}.a|b" back into tuples (None where a layer has
    no adapter), each name and shape checked against lora_specs of the stored config."""
    tensors_path = os.path.join(path, TENSORS_FILE)
    if not os.path.exists(tensors_path):
        raise FileNotFoundError(f"{tensors_path} not found (its {META_FILE} exists)")
    want = _tensor_shapes(cfg, meta["rank"], meta["targets"])
    with safe_open(tensors_path, "np") as f:
        names = set(f.keys())
        if names != set(want):
            raise ValueError(f"{tensors_path}: tensors do not match the targets in {META_FILE}; "
                             f"missing {sorted(set(want) - names)}, unexpected {sorted(names - set(want))}")
        layers = {}
        for name in meta["targets"]:
            layers[name] = {}
            for k in "ab":
                per_layer = []
                for i in range(cfg.num_layers):
                    key = f"{name}.{i}.{k}"
                    if key not in want:
                        per_layer.append(None)
                        continue
                    x = f.get_tensor(key)
                    if x.shape != want[key]:
                        raise ValueError(f"{tensors_path}: tensor {key} has shape {x.shape}, expected {want[key]}")
                    per_layer.append(jnp.asarray(x if dtype is None else x.astype(dtype)))
                layers[name][k] = tuple(per_layer)
    return LoRA(layers=layers, scale=float(meta["scale"]))
