"""Worker for tests/test_multihost.py: a few sharded LoRA AdamW steps on the tiny model over an 8-device mesh.

`train(mesh, local_tokens)` is the shared training code: the test calls it in its own process (one process,
8 devices) for the reference, and `main` runs it as one of two processes (4 CPU devices each) joined with
jax.distributed over gloo:

    XLA_FLAGS=--xla_force_host_platform_device_count=4 python tests/multihost_worker.py PORT PROCESS_ID OUT_DIR

It trains once on each mesh of MESHES: the plain spec over all 8 devices, and the hybrid one with each process
as one slice (data across the two, fsdp x tp inside each). Each process feeds only its own half of the batch
rows; process 0 writes the trained adapters to OUT_DIR/NAME.
"""

import os
import sys

import numpy as np

# The reference mesh (one process) and the specs two processes train on: all must give the same adapters.
MESH = "data=2,fsdp=2,tp=2"
MESHES = {"plain": MESH, "hybrid": "dcn_data=2,fsdp=2,tp=2"}
RANK, ALPHA, STEPS, LR = 4, 8.0, 3, 1e-2


def batch_rows():
    """The global batch [8, 16]; process p of 2 feeds rows [4p, 4p + 4)."""
    return np.random.RandomState(0).randint(4, 512, (8, 16)).astype(np.int32)


def train(mesh, local_tokens):
    """STEPS AdamW steps on the LoRA of TINY (base params and adapters from fixed seeds, the same in every
    process). Returns (adapters as a global LoRA, the loss of every step)."""
    import jax
    import jax.numpy as jnp

    from gemma_jax import sharding as sh
    from gemma_jax.config import TINY
    from gemma_jax.model import forward, init_params
    from lora import init_lora
    from train.optim import adamw_init, adamw_update

    def loss_fn(lora, params, tokens_BT):
        logits_BTV, _ = forward(params, tokens_BT, TINY, lora=lora)
        logp_BTV = jax.nn.log_softmax(logits_BTV[:, :-1], axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp_BTV, tokens_BT[:, 1:, None], axis=-1))

    def step(lora, opt, params, tokens_BT):
        loss, grads = jax.value_and_grad(loss_fn)(lora, params, tokens_BT)
        lora, opt = adamw_update(grads, opt, lora, LR, weight_decay=0.1)
        return lora, opt, loss

    params = jax.tree.map(np.asarray, init_params(TINY, 0))
    lora = jax.tree.map(np.asarray, init_lora(TINY, RANK, ALPHA, seed=1))
    p_sh, l_sh = sh.param_shardings(TINY, mesh), sh.lora_shardings(lora, mesh)
    o_sh = sh.optimizer_shardings(l_sh, mesh)
    params, lora = sh.shard(params, p_sh), sh.shard(lora, l_sh)
    opt = jax.jit(adamw_init, out_shardings=o_sh)(lora)
    tokens = sh.global_batch(local_tokens, mesh)
    fn = sh.jit_sharded(step, (l_sh, o_sh, p_sh, sh.batch_sharding(mesh)), (l_sh, o_sh, sh.replicated(mesh)))
    losses = []
    for _ in range(STEPS):
        lora, opt, loss = fn(lora, opt, params, tokens)
        losses.append(float(loss))  # replicated: every process holds the value
    return lora, losses


def main(argv):
    port, process_id, out_dir = int(argv[0]), int(argv[1]), argv[2]
    from gemma_jax import sharding as sh

    index, count = sh.initialize_distributed(f"127.0.0.1:{port}", 2, process_id, cpu_collectives="gloo")
    import jax

    assert (index, count) == (process_id, 2) and len(jax.devices()) == 8 and len(jax.local_devices()) == 4
    from jax.experimental import mesh_utils

    from gemma_jax.config import TINY
    from lora import save_adapters

    rows = batch_rows()[4 * process_id: 4 * process_id + 4]
    for name, spec in MESHES.items():
        mesh = sh.make_mesh(spec)
        if name == "hybrid":  # the same device order as JAX's own hybrid mesh, each process (slice) one data index
            expected = mesh_utils.create_hybrid_device_mesh((1, 2, 2), (2, 1, 1), process_is_granule=True)
            assert (mesh.devices == expected).all(), (mesh.devices, expected)
        data_processes = [sorted({d.process_index for d in mesh.devices[i].flat}) for i in range(2)]
        lora, losses = train(mesh, rows)
        extra = {"losses": losses, "process_count": count, "spec": spec, "data_processes": data_processes}
        save_adapters(os.path.join(out_dir, name), lora, TINY, extra=extra)  # process 0 writes
        print(f"process {process_id}: {name} losses {losses}", flush=True)
    jax.distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
