"""Training-state checkpoints (train/state.py): exact round trip, keep-last-N, stale folders,
mismatch errors, restoring onto a mesh, resuming past damaged checkpoints (each one set aside, renamed), and a real
crash test: a training subprocess (tests/crash_worker.py) is SIGKILLed at several points, including inside a save,
and resumed; its final adapters must equal an uninterrupted run's, and every checkpoint left behind must be
readable."""

import glob
import os
import random
import subprocess
import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma_jax.config import TINY, TINY_GEMMA1
from lora import init_lora
from train import state as ts
from train.optim import adamw_init, adamw_update

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "crash_worker.py")


def make_state(rank=4, seed=1, step=7, data_pos=123):
    lora = init_lora(TINY, rank, 8.0, seed=seed)
    opt = adamw_init(lora)
    # Non-zero moments and count, so a restore that silently returned zeros would fail.
    opt = {"count": jnp.int32(5), "mu": jax.tree.map(lambda x: x + 0.5, lora), "nu": jax.tree.map(jnp.square, lora)}
    return {"lora": lora, "opt": opt, "step": step, "data_pos": np.int64(data_pos),
            "rng": jax.random.key_data(jax.random.key(seed + 100)), "typed_key": jax.random.key(seed + 7)}


def zeros_like_state(state):
    """A template with the same tree, shapes and dtypes but different values."""
    def zero(x):
        if ts._is_key(x):
            return jax.random.key(0)
        if isinstance(x, (int, np.generic)):
            return type(x)(0)
        return jnp.zeros_like(x)
    return jax.tree.map(zero, state)


def leaves_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(la, lb):
        if ts._is_key(x):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        assert type(x) is type(y) or (hasattr(x, "sharding") and hasattr(y, "sharding")), (type(x), type(y))
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        assert np.asarray(x).dtype == np.asarray(y).dtype


def test_round_trip_exact(tmp_path):
    state = make_state()
    meta = ts.make_meta(TINY, state["lora"], seed=3)
    mgr = ts.CheckpointManager(tmp_path, keep=3)
    assert mgr.restore_latest(zeros_like_state(state)) is None
    mgr.save(7, state, meta)
    step, restored, got_meta = ts.CheckpointManager(tmp_path).restore_latest(zeros_like_state(state), meta)
    assert step == 7 and got_meta == meta
    leaves_equal(state, restored)
    assert restored["step"] == 7 and isinstance(restored["step"], int)
    assert restored["data_pos"] == 123 and restored["data_pos"].dtype == np.int64
    assert restored["lora"].scale == state["lora"].scale == 2.0
    # The restored RNG continues the same stream.
    k1 = jax.random.uniform(jax.random.wrap_key_data(state["rng"]), (3,))
    k2 = jax.random.uniform(jax.random.wrap_key_data(restored["rng"]), (3,))
    np.testing.assert_array_equal(k1, k2)
    assert sorted(os.listdir(mgr.path(7))) == ["COMMIT", "meta.json", "state"]


def test_keep_last_n_and_stale_folders(tmp_path):
    state = make_state()
    meta = ts.make_meta(TINY, state["lora"])
    mgr = ts.CheckpointManager(tmp_path, keep=2)
    for s in range(1, 6):
        mgr.save(s, {**state, "step": s}, meta)
    assert mgr.steps() == [4, 5]
    assert sorted(os.listdir(tmp_path)) == ["step_00000004", "step_00000005"]
    with pytest.raises(FileExistsError, match="step_00000005"):
        mgr.save(5, state, meta)
    # What killed runs leave: a tmp folder of a newer step, a half-deleted folder, a folder without COMMIT.
    os.makedirs(tmp_path / "step_00000009.tmp-1-2" / "state")
    os.makedirs(tmp_path / "step_00000003.deleting-1-2")
    os.makedirs(tmp_path / "step_00000008")
    assert mgr.steps() == [4, 5]
    assert mgr.restore_latest(state, meta)[0] == 5  # the folder without COMMIT is set aside as damaged
    mgr2 = ts.CheckpointManager(tmp_path, keep=2)
    assert sorted(os.listdir(tmp_path)) == ["step_00000004", "step_00000005", "step_00000008.damaged-no-commit"]
    assert mgr2.steps() == [4, 5]
    with pytest.raises(TypeError, match="not JSON serializable"):
        mgr2.save(6, state, {"bad": object()})
    assert mgr2.steps() == [4, 5] and not any(".tmp-" in n for n in os.listdir(tmp_path))


def test_mismatch_errors_name_the_entry(tmp_path):
    state = make_state(rank=4)
    meta = ts.make_meta(TINY, state["lora"])
    mgr = ts.CheckpointManager(tmp_path)
    mgr.save(1, state, meta)
    other_model = ts.make_meta(TINY_GEMMA1, state["lora"])
    with pytest.raises(ts.CheckpointMismatchError, match=r"meta\['model'\]\['num_kv_heads'\] is 2 .* but 1"):
        mgr.restore_latest(state, other_model)
    rank8 = make_state(rank=8)
    with pytest.raises(ts.CheckpointMismatchError, match=r"meta\['lora'\]\['scale'\] is 2.0 .* but 1.0"):
        mgr.restore_latest(rank8, ts.make_meta(TINY, rank8["lora"]))
    # Without meta the shape check still catches it, naming the tree path.
    with pytest.raises(ts.CheckpointMismatchError, match=r"'lora\.layers\.down\.a' has shape \(4, 128, 4\) .* "
                                                         r"\(4, 128, 8\)"):
        mgr.restore_latest(rank8)
    with pytest.raises(ts.CheckpointMismatchError, match=r"'extra' is not in the checkpoint"):
        mgr.restore_latest({**state, "extra": jnp.zeros(3)})
    with pytest.raises(ts.CheckpointMismatchError, match=r"lacks: \['data_pos'\]"):
        mgr.restore_latest({k: v for k, v in state.items() if k != "data_pos"})
    with pytest.raises(ts.CheckpointMismatchError, match=r"meta\['seed'\] is missing"):
        mgr.restore_latest(state, {**meta, "seed": 3})
    assert os.listdir(tmp_path) == ["step_00000001"]  # the caller's mistake: nothing was set aside


def test_restore_onto_mesh(tmp_path):
    from gemma_jax.sharding import lora_shardings, make_mesh

    state = make_state()
    meta = ts.make_meta(TINY, state["lora"])
    mesh = make_mesh("fsdp=4,tp=2")
    shardings = lora_shardings(state["lora"], mesh)
    sharded = {**state, "lora": jax.device_put(state["lora"], shardings)}
    mgr = ts.CheckpointManager(tmp_path)
    mgr.save(1, sharded, meta)
    # Saved sharded, restored onto one device, and saved on one device, restored sharded: values equal exactly.
    _, single, _ = mgr.restore_latest(zeros_like_state(state), meta)
    leaves_equal(state, single)
    template = {**zeros_like_state(state), "lora": jax.device_put(zeros_like_state(state)["lora"], shardings)}
    _, on_mesh, _ = mgr.restore_latest(template, meta)
    leaves_equal(state, on_mesh)
    want = jax.tree.leaves(shardings)
    got = [x.sharding for x in jax.tree.leaves(on_mesh["lora"])]
    assert got == want and any(len(s.device_set) == 8 for s in got)
    assert on_mesh["lora"].layers["gate"]["b"].sharding.spec == jax.sharding.PartitionSpec(None, None, "tp")
    # An abstract template (ShapeDtypeStructs with shardings) restores too: nothing allocated up front.
    abstract = {**template, "lora": jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                                                 template["lora"])}
    _, from_abstract, _ = mgr.restore_latest(abstract, meta)
    leaves_equal(state["lora"], from_abstract["lora"])


# ---- damaged checkpoints ----------------------------------------------------------------------------------------

TOY_META = ts.make_meta(TINY, init_lora(TINY, 4, 8.0, seed=0), seed=0)


@jax.jit
def toy_update(lora, opt, rng):
    key, sub = jax.random.split(jax.random.wrap_key_data(rng))
    grads = jax.tree.map(lambda x: x + jax.random.normal(sub, x.shape), lora)
    lora, opt = adamw_update(grads, opt, lora, 1e-2, weight_decay=0.1)
    return lora, opt, jax.random.key_data(key)


def toy_run(directory, steps):
    """A deterministic stand-in for a training run: resume from the newest intact checkpoint in `directory`,
    step to `steps`, saving every step (keep 3). Returns (step resumed from, final state)."""
    lora = init_lora(TINY, 4, 8.0, seed=0)
    state = {"lora": lora, "opt": adamw_init(lora), "step": 0, "data_pos": np.int64(0),
             "rng": jax.random.key_data(jax.random.key(0))}
    mgr = ts.CheckpointManager(directory, keep=3)
    resumed = mgr.restore_latest(state, TOY_META)
    if resumed:
        state = resumed[1]
    while state["step"] < steps:
        lora, opt, rng = toy_update(state["lora"], state["opt"], state["rng"])
        state = {"lora": lora, "opt": opt, "step": state["step"] + 1, "data_pos": state["data_pos"] + 4, "rng": rng}
        mgr.save(state["step"], state, TOY_META)
    return (resumed[0] if resumed else 0), state


def largest_blob(step_dir):
    """The biggest array-data file orbax's OCDBT store wrote under the step folder (the LoRA/optimiser arrays)."""
    return max(glob.glob(os.path.join(step_dir, "state", "ocdbt.process_0", "d", "*")), key=os.path.getsize)


def damage(step_dir, kind):
    if kind == "meta":
        with open(os.path.join(step_dir, "meta.json"), "wb") as f:
            f.write(np.random.default_rng(0).bytes(300))
    elif kind == "blob-garbage":
        blob = largest_blob(step_dir)
        size = os.path.getsize(blob)
        with open(blob, "wb") as f:
            f.write(np.random.default_rng(0).bytes(size))
    elif kind == "blob-truncated":
        blob = largest_blob(step_dir)
        os.truncate(blob, os.path.getsize(blob) // 2)
    elif kind == "commit":
        os.remove(os.path.join(step_dir, "COMMIT"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The 6-step toy run without a break: the state every damaged-and-resumed run must end with."""
    resumed_from, want = toy_run(tmp_path_factory.mktemp("ref"), 6)
    assert resumed_from == 0
    return want


@pytest.mark.parametrize("kind,reason", [("meta", "meta"), ("blob-garbage", "data"), ("blob-truncated", "data"),
                                         ("commit", "no-commit")])
def test_damaged_newest_resumes_from_previous(tmp_path, capsys, kind, reason, uninterrupted):
    want = uninterrupted
    run = tmp_path / "run"
    toy_run(run, 4)
    damage(run / "step_00000004", kind)
    capsys.readouterr()
    resumed_from, got = toy_run(run, 6)
    out = capsys.readouterr().out
    assert resumed_from == 3
    set_aside = f"step_00000004.damaged-{reason}"
    assert out.count("\n") == 1 and "step_00000004" in out and set_aside in out, out
    # The damaged folder is kept under its new name; keep-N counted only the intact checkpoints.
    assert sorted(os.listdir(run)) == ["step_00000004", set_aside, "step_00000005", "step_00000006"]
    leaves_equal(want, got)
    assert want["step"] == got["step"] == 6 and int(got["opt"]["count"]) == 6


def test_all_damaged_raises_naming_each(tmp_path, capsys):
    toy_run(tmp_path, 2)
    damage(tmp_path / "step_00000002", "blob-truncated")
    damage(tmp_path / "step_00000001", "meta")
    with pytest.raises(ts.CheckpointDamagedError, match=r"no intact checkpoint.*step_00000002\.damaged-data.*"
                                                        r"step_00000001\.damaged-meta"):
        toy_run(tmp_path, 4)
    assert len(capsys.readouterr().out.splitlines()) == 2
    assert sorted(os.listdir(tmp_path)) == ["step_00000001.damaged-meta", "step_00000002.damaged-data"]
    # A rerun after that starts afresh: set-aside folders are never read, and a damaged name is not reused.
    assert toy_run(tmp_path, 2)[0] == 0
    damage(tmp_path / "step_00000002", "commit")
    assert toy_run(tmp_path, 2)[0] == 1
    assert "step_00000002.damaged-no-commit" in os.listdir(tmp_path)


def test_damage_is_not_a_mismatch(tmp_path):
    """Damage behind a config change is not looked at: the mismatch is raised first and nothing is renamed."""
    toy_run(tmp_path, 2)
    damage(tmp_path / "step_00000002", "blob-garbage")
    with pytest.raises(ts.CheckpointMismatchError, match="num_kv_heads"):
        ts.CheckpointManager(tmp_path).restore_latest({}, ts.make_meta(TINY_GEMMA1))
    assert sorted(os.listdir(tmp_path)) == ["step_00000001", "step_00000002"]


# ---- crash test -------------------------------------------------------------------------------------------------

STEPS = 8


class Worker:
    """tests/crash_worker.py as a subprocess whose stdout lines we wait for."""

    def __init__(self, ckpt_dir, out, env, log):
        self.log = log
        self.proc = subprocess.Popen(
            [sys.executable, WORKER, "--dir", str(ckpt_dir), "--steps", str(STEPS), "--every", "1", "--keep", "3",
             "--seed", "0", "--out", str(out)],
            stdout=subprocess.PIPE, stderr=open(log, "w"), text=True, env=env)
        self.lines = []
        self.watchdog = threading.Timer(120, self.proc.kill)  # never hang the suite
        self.watchdog.start()

    def wait_for(self, prefix):
        for line in self.proc.stdout:
            self.lines.append(line.strip())
            if line.startswith(prefix):
                return line.strip()
        raise AssertionError(f"worker ended before {prefix!r}: {self.lines}\n{open(self.log).read()[-3000:]}")

    def kill(self):
        self.proc.kill()
        rc = self.proc.wait()
        self.watchdog.cancel()
        assert rc == -9, f"worker was not killed (rc {rc}): {self.lines}"

    def finish(self):
        rest = self.proc.stdout.read()
        self.lines += rest.split()
        rc = self.proc.wait()
        self.watchdog.cancel()
        assert rc == 0, f"worker failed (rc {rc}): {self.lines}\n{open(self.log).read()[-3000:]}"


def check_left_behind(ckpt_dir):
    """Every complete checkpoint left is readable, and holds the state of its own step."""
    mgr = ts.CheckpointManager.__new__(ts.CheckpointManager)  # do not clean stale folders: inspect them as left
    mgr.directory, mgr.keep, mgr._checkpointer = str(ckpt_dir), 3, None
    lora = init_lora(TINY, 4, 8.0, seed=0)
    template = {"lora": lora, "opt": adamw_init(lora), "step": 0, "data_pos": 0,
                "rng": jax.random.key_data(jax.random.key(0))}
    steps = mgr.steps()
    for s in steps:
        state, meta = mgr.restore(s, template, ts.make_meta(TINY, lora, seed=0))
        assert state["step"] == s and state["data_pos"] == 4 * s and int(state["opt"]["count"]) == s
    return steps


def test_crash_and_resume_matches_uninterrupted_run(tmp_path):
    # Optimisation level 0 halves the worker's compile time; the reference and the crashed runs use the same flags.
    xla_flags = os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
    env = {**os.environ, "CRASH_CACHE_DIR": str(tmp_path / "jax_cache"), "PYTHONPATH": os.getcwd(),
           "XLA_FLAGS": xla_flags}
    ref = Worker(tmp_path / "ref", tmp_path / "ref.npz", env, tmp_path / "ref.log")
    ref.finish()
    assert ref.lines[-1] == "DONE"

    ckpt, out, rng = tmp_path / "crash", tmp_path / "crash.npz", random.Random(0)
    plan = [  # (hook, line to kill at, extra delay in seconds)
        (None, "STEP 2", rng.uniform(0.0, 0.3)),  # anywhere: a step or a save
        ("commit", "HOOK", 0.0),  # state and meta written, COMMIT not yet renamed into place
        (None, "SAVE", 0.05),  # inside orbax's write
        ("discard", "HOOK", 0.0),  # an old checkpoint renamed for deletion, files not yet removed
    ]
    progress = [0]
    for i, (hook, kill_at, delay) in enumerate(plan):
        run_env = {**env, "CRASH_HOOK": hook} if hook else env
        w = Worker(ckpt, out, run_env, tmp_path / f"crash{i}.log")
        if progress[-1]:
            assert w.wait_for("RESUMED") == f"RESUMED {progress[-1]}"
        w.wait_for(kill_at)
        threading.Event().wait(delay)
        w.kill()
        left = os.listdir(ckpt)
        if hook == "commit":
            assert any(".tmp-" in n for n in left), left  # killed mid-save: the unfinished folder is there
        if hook == "discard":
            assert any(".deleting-" in n for n in left), left
        steps = check_left_behind(ckpt)
        assert steps and len(steps) <= 4 and steps[-1] >= progress[-1], (steps, progress)
        progress.append(steps[-1])
    final = Worker(ckpt, out, env, tmp_path / "final.log")
    assert final.wait_for("RESUMED") == f"RESUMED {progress[-1]}"
    final.finish()
    assert progress[-1] < STEPS and progress[1] < progress[-1], progress
    assert check_left_behind(ckpt) == [STEPS - 2, STEPS - 1, STEPS]
    assert not any(("tmp-" in n or "deleting-" in n) for n in os.listdir(ckpt))

    want, got = np.load(tmp_path / "ref.npz"), np.load(out)
    assert sorted(want) == sorted(got) and len(want) == 10
    diff = max(float(np.max(np.abs(want[k] - got[k]))) for k in want)
    assert diff <= 1e-6, diff
    assert max(float(np.max(np.abs(want[k]))) for k in want if k.endswith(".b")) > 1e-3  # training moved B
