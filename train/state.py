"""Crash-safe training-state checkpoints (orbax-checkpoint 0.12.8 underneath).

A training state is any pytree of arrays: typically {"lora": lora.LoRA, "opt": train.optim.adamw_init(...),
"step": int, "data_pos": int, "rng": uint32 key data}. Typed jax keys are accepted too (stored as key data).
Each checkpoint is a folder `<directory>/step_<8 digits>/` holding
    state/       the arrays, written by orbax's StandardCheckpointer (sharded arrays are written shard by shard)
    meta.json    a JSON dict from the caller: model config, LoRA shapes (see `make_meta`), anything else
    COMMIT       written last: {"step": s, "meta_sha256": ...}; a folder without it is never read

Why a kill at any moment leaves the last good checkpoint intact:
  1. everything is written into `step_<s>.tmp-<pid>-<ns>/`, a name that readers ignore;
  2. files are fsynced, COMMIT is written, then the folder is renamed to `step_<s>` (atomic on POSIX);
  3. only then are old checkpoints beyond `keep` removed, each first renamed to `*.deleting-*` (atomic) and then
     deleted, so a half-deleted folder never carries a checkpoint's name.
Leftover `.tmp-`/`.deleting-` folders of killed runs are removed when a manager opens the directory.
One writing process per directory is assumed. Multi-host runs: fetch the state with gemma_jax.sharding.to_host
and save from process 0 only (this manager does not coordinate orbax's multi-process writes); restoring works
on every process from a shared file system. Saved dtypes are cast to the template's on restore.

Restore compares the saved meta with the caller's first (a model or LoRA config change names the key), then
every array's shape against the template (naming the tree path), and puts each array on the template leaf's
sharding, so a state saved on one mesh can be restored onto another.

Damage from outside (a disk or copy gone wrong: unreadable meta.json or COMMIT, missing or corrupt array data, a
restored array of the wrong shape or dtype) raises CheckpointDamagedError. `restore_latest` then prints one line,
sets the folder aside as `step_<s>.damaged-<reason>` (never deleted; keep-N and readers ignore it) and tries the
next older checkpoint. A CheckpointMismatchError (another model, other LoRA shapes) is the caller's mistake and is
raised as it is: the checkpoint is fine.
"""

import dataclasses
import hashlib
import json
import os
import re
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

_STEP_DIR = re.compile(r"^step_(\d{8,})$")
_STALE = re.compile(r"^step_\d{8,}\.(tmp|deleting)-")


def make_meta(cfg, lora=None, **extra) -> dict:
    """The meta dict that identifies a run's shapes: the model config fields, and the LoRA scale and A/B shapes
    of each adapter. Extra JSON-able entries (e.g. data file, seed) are added as given."""
    # Gemma 4's adapters are tuples over layers (None where a layer lacks the weight): a list of shapes per layer.
    shape = lambda x: [shape(y) for y in x] if isinstance(x, tuple) else None if x is None else list(x.shape)  # noqa: E731
    meta = {"model": dataclasses.asdict(cfg)}
    if lora is not None:
        meta["lora"] = {"scale": float(lora.scale), "shapes": {
            name: {"a": shape(ab["a"]), "b": shape(ab["b"])} for name, ab in sorted(lora.layers.items())}}
    meta.update(extra)
    return json.loads(json.dumps(meta))  # normalise tuples to lists, so a saved meta compares equal to a fresh one


class CheckpointMismatchError(ValueError):
    """The checkpoint does not belong to this run (different model, LoRA shapes or state tree)."""


class CheckpointDamagedError(ValueError):
    """A checkpoint folder cannot be read back as it was written; `reason` is a short slug for the folder name."""

    def __init__(self, message, reason="unreadable"):
        super().__init__(message)
        self.reason = reason


def _damaged(path, reason, what, err=None):
    """The error for a damaged folder, with the first line of the reader's error (tensorstore's run to pages)."""
    detail = ""
    if err is not None:
        first = (str(err).splitlines() or [""])[0].split(" See full TensorStore details")[0]
        detail = f": {type(err).__name__}: {first[:200]}"
    return CheckpointDamagedError(f"{path}: {what}{detail}", reason)


def _fsync_path(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root):
    """fsync every file and folder below root: the rename in step 2 must not overtake the data on power loss."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            _fsync_path(os.path.join(dirpath, name))
        _fsync_path(dirpath)


def _write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


def _commit(tmp_dir, final_dir, step, meta_sha):
    """Steps 2 of the protocol above: COMMIT marker, then the atomic rename that publishes the checkpoint."""
    _write_json(os.path.join(tmp_dir, "COMMIT"), {"step": step, "meta_sha256": meta_sha})
    _fsync_path(tmp_dir)
    os.rename(tmp_dir, final_dir)
    _fsync_path(os.path.dirname(final_dir))


def _discard(path):
    """Remove a checkpoint folder without ever leaving a partial folder under a checkpoint's name."""
    trash = f"{path}.deleting-{os.getpid()}-{time.time_ns()}"
    os.rename(path, trash)
    _remove_tree(trash)


def _remove_tree(path):
    shutil.rmtree(path)


def _keystr(path) -> str:
    parts = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
    bad = [p for p in parts if "." in p or not p]
    if bad:
        raise ValueError(f"train state key {bad[0]!r} (in {parts}) must be non-empty and contain no '.'")
    return ".".join(parts)


def _is_key(x) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _to_saveable(state) -> dict:
    """Flat {path: array} of the state's leaves (python ints -> numpy int64, typed keys -> uint32 key data)."""
    flat = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        if isinstance(leaf, (bool, int, float, np.generic)):
            leaf = np.asarray(leaf)
        elif _is_key(leaf):
            leaf = jax.random.key_data(leaf)
        if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
            raise TypeError(f"train state leaf {_keystr(path)!r} is a {type(leaf).__name__}, not an array")
        flat[_keystr(path)] = leaf
    return flat


def _nest(flat: dict) -> dict:
    """{'a.b': x} -> {'a': {'b': x}}: orbax stores nested dicts with readable names."""
    out = {}
    for key, value in flat.items():
        node = out
        *heads, last = key.split(".")
        for h in heads:
            node = node.setdefault(h, {})
        node[last] = value
    return out


def _flatten_nested(tree, prefix="") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten_nested(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _restore_target(leaf):
    """What orbax should restore a template leaf as: numpy for host values, else an array on the leaf's sharding."""
    if isinstance(leaf, (bool, int, float, np.generic, np.ndarray)):
        return np.zeros(np.shape(leaf), np.asarray(leaf).dtype)
    if _is_key(leaf):
        data = jax.eval_shape(jax.random.key_data, leaf)
        return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=getattr(leaf, "sharding", None))
    sharding = getattr(leaf, "sharding", None) or jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)


def _from_restored(template_leaf, value):
    if isinstance(template_leaf, (bool, int, float)):
        return type(template_leaf)(value)
    if isinstance(template_leaf, np.generic):
        return np.asarray(value, template_leaf.dtype)[()]
    if _is_key(template_leaf):
        return jax.random.wrap_key_data(value, impl=jax.random.key_impl(template_leaf))
    return value


def _check_meta(saved, expected, where, prefix="meta"):
    """Raise naming the first entry of `expected` that differs in `saved` (nested dicts compared key by key)."""
    for key, want in expected.items():
        name = f"{prefix}[{key!r}]"
        if key not in saved:
            raise CheckpointMismatchError(f"{where}: {name} is missing in the checkpoint (this run has {want!r})")
        have = saved[key]
        if isinstance(want, dict) and isinstance(have, dict):
            _check_meta(have, want, where, name)
        elif have != want:
            raise CheckpointMismatchError(f"{where}: {name} is {have!r} in the checkpoint but {want!r} in this run")


class CheckpointManager:
    """Atomic, keep-last-N checkpoints of a training state in one directory (see the module docstring)."""

    def __init__(self, directory, keep: int = 3):
        if keep < 1:
            raise ValueError(f"CheckpointManager keep must be >= 1, got {keep}")
        self.directory = os.path.abspath(os.fspath(directory))
        self.keep = keep
        os.makedirs(self.directory, exist_ok=True)
        self._checkpointer = None
        self._remove_stale()

    def _orbax(self):
        if self._checkpointer is None:
            self._checkpointer = ocp.StandardCheckpointer()
        return self._checkpointer

    def _remove_stale(self):
        """Delete the tmp / half-deleted folders that killed runs left (a single writer owns the directory)."""
        for name in os.listdir(self.directory):
            if _STALE.match(name):
                shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)

    def path(self, step: int) -> str:
        return os.path.join(self.directory, f"step_{step:08d}")

    def _step_folders(self) -> list[int]:
        """Steps of every folder with a checkpoint's name, complete or not, ascending."""
        return sorted(int(m.group(1)) for m in map(_STEP_DIR.match, os.listdir(self.directory)) if m)

    def steps(self) -> list[int]:
        """Steps of the complete checkpoints (final name and a COMMIT marker), ascending."""
        return [s for s in self._step_folders() if os.path.exists(os.path.join(self.path(s), "COMMIT"))]

    def save(self, step: int, state, meta: dict) -> str:
        """Write `state` (pytree of arrays / ints) and `meta` (JSON dict) as checkpoint `step`; returns its path.

        Blocks until the checkpoint is complete and published; then removes the oldest beyond `keep`."""
        step = int(step)
        final = self.path(step)
        if os.path.exists(final):
            raise FileExistsError(f"checkpoint {final} already exists; steps must increase within a run")
        meta_text = json.dumps(meta, sort_keys=True)  # fails early, before any file is written, if not JSON-able
        flat = _to_saveable(state)
        for name, leaf in flat.items():  # a checkpoint never holds a NaN or inf: a resume would start from it
            if jnp.issubdtype(leaf.dtype, jnp.floating) and not bool(jnp.all(jnp.isfinite(leaf))):
                raise ValueError(f"checkpoint {final}: leaf {name!r} holds non-finite values; not saved")
        tmp = f"{final}.tmp-{os.getpid()}-{time.time_ns()}"
        os.makedirs(tmp)
        try:
            ckpt = self._orbax()
            ckpt.save(os.path.join(tmp, "state"), _nest(flat))
            ckpt.wait_until_finished()
            _write_json(os.path.join(tmp, "meta.json"), meta)
            _fsync_tree(tmp)
            _commit(tmp, final, step, hashlib.sha256(meta_text.encode()).hexdigest())
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)  # a Python-level failure; a kill leaves it to _remove_stale
            raise
        for old in self.steps()[:-self.keep]:
            _discard(self.path(old))
        return final

    def read_meta(self, step: int) -> dict:
        """The folder's meta.json, checked against its COMMIT marker; CheckpointDamagedError if either is bad."""
        path = self.path(step)
        try:
            with open(os.path.join(path, "COMMIT")) as f:
                commit = json.load(f)
        except FileNotFoundError:
            raise _damaged(path, "no-commit", "COMMIT marker is missing") from None
        except ValueError as e:  # JSONDecodeError and UnicodeDecodeError both are
            raise _damaged(path, "commit", "COMMIT is not valid JSON", e) from None
        try:
            with open(os.path.join(path, "meta.json")) as f:
                meta = json.load(f)
        except (OSError, ValueError) as e:
            raise _damaged(path, "meta", "meta.json cannot be read", e) from None
        sha = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()
        if not isinstance(commit, dict) or commit.get("step") != step or commit.get("meta_sha256") != sha:
            raise _damaged(path, "meta", "meta.json does not match the sha256 in COMMIT")
        return meta

    def restore(self, step: int, template_state, expected_meta: dict | None = None):
        """(state, meta) of checkpoint `step`, shaped and sharded like `template_state` (arrays, numpy values,
        ints or jax.ShapeDtypeStructs with shardings). With `expected_meta`, each of its entries must equal the
        saved one. Raises CheckpointMismatchError naming the first differing meta entry or array path, and
        CheckpointDamagedError when the folder cannot be read back as written."""
        path = self.path(step)
        leaves, treedef = jax.tree_util.tree_flatten_with_path(template_state)
        names = [_keystr(p) for p, _ in leaves]
        targets = {name: _restore_target(leaf) for name, (_, leaf) in zip(names, leaves)}  # template errors first
        meta = self.read_meta(step)
        if expected_meta is not None:
            _check_meta(meta, expected_meta, path)
        state_dir = os.path.join(path, "state")
        try:
            stored = _flatten_nested(self._orbax().metadata(state_dir).item_metadata.tree)
        except Exception as e:  # orbax / tensorstore raise many types for a missing or garbled file
            raise _damaged(path, "data", "the array metadata cannot be read", e) from None
        for name, target in targets.items():
            if name not in stored:
                raise CheckpointMismatchError(f"{path}: state entry {name!r} is not in the checkpoint")
            if tuple(stored[name].shape) != tuple(target.shape):
                raise CheckpointMismatchError(f"{path}: state entry {name!r} has shape {tuple(stored[name].shape)} "
                                              f"in the checkpoint but {tuple(target.shape)} in this run")
        extra = sorted(set(stored) - set(names))
        if extra:
            raise CheckpointMismatchError(f"{path}: checkpoint has state entries this run lacks: {extra}")
        try:
            restored = _flatten_nested(self._orbax().restore(state_dir, _nest(targets)))
        except Exception as e:
            raise _damaged(path, "data", "the array data cannot be read", e) from None
        for name, target in targets.items():
            got = restored.get(name)
            if got is None or tuple(np.shape(got)) != tuple(target.shape) or got.dtype != target.dtype:
                raise _damaged(path, "data", f"state entry {name!r} came back as "
                               f"{getattr(got, 'dtype', None)}{tuple(np.shape(got))}, not {target.dtype}{target.shape}")
        values = [_from_restored(leaf, restored[name]) for name, (_, leaf) in zip(names, leaves)]
        return jax.tree.unflatten(treedef, values), meta

    def set_aside(self, step: int, reason: str) -> str:
        """Rename a damaged checkpoint to `step_<s>.damaged-<reason>[-n]`, out of every reader's way; returns it."""
        base = f"{self.path(step)}.damaged-{reason}"
        dest, n = base, 1
        while os.path.exists(dest):
            dest, n = f"{base}-{n}", n + 1
        os.rename(self.path(step), dest)
        _fsync_path(self.directory)
        return dest

    def restore_latest(self, template_state, expected_meta: dict | None = None):
        """(step, state, meta) of the newest intact checkpoint, or None when there is none at all.

        Newest first: a damaged one is reported in one printed line, set aside (see `set_aside`) and the next
        older one tried. With every checkpoint damaged, raises CheckpointDamagedError naming them all."""
        damaged = []
        for step in reversed(self._step_folders()):
            try:
                state, meta = self.restore(step, template_state, expected_meta)
            except CheckpointDamagedError as e:
                dest = self.set_aside(step, e.reason)
                print(f"damaged checkpoint {e}; set aside as {os.path.basename(dest)}, trying the previous one",
                      flush=True)
                damaged.append(dest)
                continue
            return step, state, meta
        if damaged:
            raise CheckpointDamagedError(f"no intact checkpoint in {self.directory}: every one was damaged and set "
                                         f"aside: {', '.join(damaged)}", "all")
        return None
