"""Multi-host on one machine: two processes (4 fake CPU devices each) joined with jax.distributed over gloo form
one 8-device mesh, train the tiny model's LoRA for a few sharded AdamW steps, and process 0 writes the adapters;
once on the plain mesh spec, once on the hybrid one (each process one slice: data across them over "DCN", fsdp x
tp inside). Both must equal the same training run in this single process on 8 devices and the plain mesh."""

import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 420


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_two_processes(out_dir):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "tests")])}
    port = _free_port()
    worker = os.path.join(ROOT, "tests", "multihost_worker.py")
    procs = [subprocess.Popen([sys.executable, worker, str(port), str(i), out_dir], env=env, cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=TIMEOUT_S)[0])
    finally:
        for p in procs:  # never leave a child behind (a hung peer waits forever for the other)
            if p.poll() is None:
                p.kill()
                p.wait()
    codes = [p.returncode for p in procs]
    assert codes == [0, 0], "\n".join(f"--- process {i} (rc {c}) ---\n{o[-3000:]}"
                                      for i, (c, o) in enumerate(zip(codes, outputs)))
    return outputs


@pytest.mark.slow
def test_two_processes_train_like_one(tmp_path):
    from multihost_worker import MESH, MESHES, batch_rows, train

    from gemma_jax import sharding as sh
    from gemma_jax.config import TINY
    from lora import load_adapters, read_adapter_meta

    out_dir = str(tmp_path / "adapters")
    outputs = _run_two_processes(out_dir)
    assert "process 1: hybrid losses" in outputs[1]

    assert len(jax.devices()) == 8
    ref_lora, ref_losses = train(sh.make_mesh(MESH), batch_rows())
    assert ref_losses[-1] < ref_losses[0]  # the steps really trained
    for name, spec in MESHES.items():
        got = load_adapters(os.path.join(out_dir, name), TINY)
        meta = read_adapter_meta(os.path.join(out_dir, name))["extra"]
        assert (meta["process_count"], meta["spec"]) == (2, spec)
        assert meta["data_processes"] == [[0], [1]]  # each data index (slice) lies within one process
        np.testing.assert_allclose(meta["losses"], ref_losses, rtol=0, atol=1e-5, err_msg=name)
        for layer, ab in got.layers.items():
            for k in ("a", "b"):
                ref = np.asarray(ref_lora.layers[layer][k])
                assert np.abs(np.asarray(ab[k]) - ref).max() <= 1e-5, (name, layer, k)
        # B started at zero: the comparison covers real updates, not the initial values.
        assert np.abs(np.asarray(got.layers["q"]["b"])).max() > 1e-3
