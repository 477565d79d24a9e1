"""Sharding as data: a device mesh from a spec string, a logical-axis -> mesh-axis rules table, and the
`NamedSharding`s of params, LoRA adapters, optimizer state, batches and KV caches derived from it.

The mesh always has the three axes ("data", "fsdp", "tp"), in that order (outermost first); a spec string only
sets their sizes, e.g. "fsdp=4,tp=2" -> data=1, fsdp=4, tp=2. The axes mean:
    data  pure data parallelism: params replicated, the batch split (put it across hosts / slices, where links
          are slowest, since it only all-reduces gradients once per step);
    fsdp  the batch split AND the weights split along their model width (embed), gathered layer by layer;
    tp    tensor parallelism: heads, kv heads, MLP hidden and vocab split (keep it within one host: it talks
          in every layer).
Every weight declares logical axis names once (gemma_jax.model.param_specs); `RULES` maps each name to a mesh
axis. Divisibility fallback: when a dimension's size is not divisible by the size of the mesh axis (or axes) it
maps to, that dimension is replicated instead (e.g. TINY's 2 kv heads on tp=4), and a mesh axis is used at most
once per array (a later dimension that maps to an already used mesh axis is replicated). So every rule is
always legal; it may just shard less than asked.

Mesh axes are `AxisType.Auto`: XLA's sharding propagation places the activations from the input and weight
shardings. Left alone, it often keeps the batch whole on fsdp and splits the activations' width like the weights
instead (each device then holds every row); so the model also constrains its activations at block boundaries
(the embedding output, each block's residual, the MLP hidden, the final hidden and the logits or logit chunks)
to the "act_*" rows of the same table: batch over data x fsdp, MLP hidden and vocabulary over tp. The mesh reaches
the model explicitly, as a `ShardingCtx` argument (`shard=`, static under jit) of gemma_jax.model.forward_hidden
and gemma_jax.scoring; shard=None (the default, one device) constrains nothing.

Multi-host (TPU pods, several GPU hosts, or several processes on one machine): every process runs the same
program. Call `initialize_distributed(...)` first, before any other JAX call (on Cloud TPU pods and SLURM the
arguments are detected automatically: call it with none), then `make_mesh` over `jax.devices()` which lists
the devices of *all* processes. Each process loads only its share of the batch and turns it into one global
array with `global_batch(local_rows, mesh)` (jax.make_array_from_process_local_data). Params initialised
inside a jit with `out_shardings` (or placed with `shard`, when every process holds the same full values) are
global arrays too. Only process 0 should write files (`jax.process_index() == 0`), after fetching values with
`to_host` (a process cannot read shards that live on another host). On a TPU pod slice, e.g. v5e-16
(4 hosts x 4 chips), run the same command on every host (`gcloud compute tpus tpu-vm ssh --worker=all`) with
a mesh such as "data=4,tp=4" or "fsdp=4,tp=4".

Multi-slice (several TPU slices joined by the data-center network, DCN; or several GPU hosts, one process each):
a hybrid spec gives an axis's size across slices with a dcn_ prefix, the plain sizes staying inside each slice,
e.g. "dcn_data=2,fsdp=4,tp=4" on 2 x v5e-16: data=2 over DCN (one gradient all-reduce per step crosses it),
fsdp=4 and tp=4 over each slice's fast ICI links. The mesh keeps the same three axes (each of size dcn_ x plain),
so every rule above applies unchanged. `make_mesh` groups the devices into slices (`device_slice`: a TPU
device's slice_index; off TPU each process is one slice), lays each slice out with jax.make_mesh and tiles the
slices along the dcn_ axes, as mesh_utils.create_hybrid_device_mesh does. The dcn_ sizes must multiply to the
number of slices, the plain ones to the devices per slice; a plain spec on devices of several TPU slices raises
(jax.make_mesh refuses them). What is tested: two processes, each one slice of 4 CPU devices, train like one
process on the plain mesh, and their device order equals create_hybrid_device_mesh(process_is_granule=True)'s
(tests/test_multihost.py); the grouping by slice_index only on stand-in TPU device objects; a real pod (its
per-slice topology order, DCN speed) not at all.
"""

import dataclasses
import math

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from gemma_jax.config import GemmaConfig
from gemma_jax.model import lora_axes, param_axes, param_specs

MESH_AXES = ("data", "fsdp", "tp")
DCN = "dcn_"  # spec prefix of an axis's size across slices (over the data-center network)

# Logical axis -> mesh axis (a name, a tuple of names sharing one dimension, or None for replicated).
RULES = {
    "batch": ("data", "fsdp"),
    "vocab": "tp",
    "embed": "fsdp",
    "heads": "tp",
    "kv_heads": "tp",
    "mlp": "tp",
    "expert": "tp",  # Gemma 4 MoE: experts split over tp (expert parallel); their "mlp" axis then stays whole
    "head_dim": None,
    "layers": None,
    "norm": None,
    "rank": None,  # LoRA rank: small, replicated
    "pair": None,  # the (k, v) axis of the fused kv adapter
    "seq": None,
    "cache_seq": None,
    # Activations (ShardingCtx.constrain): rows split like the batch, the model width whole on every device, the
    # MLP hidden, heads and vocabulary (logits, logit chunks) split like the weights that produce them.
    "act_batch": ("data", "fsdp"),
    "act_seq": None,
    "act_embed": None,
    "act_mlp": "tp",
    "act_heads": "tp",
    "act_kv_heads": "tp",
    "act_vocab": "tp",
}

CACHE_AXES = {
    "k": ("layers", "batch", "cache_seq", "kv_heads", "head_dim"),
    "v": ("layers", "batch", "cache_seq", "kv_heads", "head_dim"),
    "pos": ("batch", "cache_seq"),
    "valid": ("batch", "cache_seq"),
    "index": (),
}


def _parse_items(spec: str) -> dict:
    """'dcn_data=2,fsdp=-1' -> {'dcn_data': 2, 'fsdp': -1}: names and sizes checked, their products not yet."""
    known = MESH_AXES + tuple(DCN + a for a in MESH_AXES)
    items = {}
    for item in (s.strip() for s in spec.split(",")):
        name, eq, value = item.partition("=")
        name = name.strip()
        if not eq or name not in known:
            raise ValueError(f"mesh spec {spec!r}: bad item {item!r}; expected AXIS=SIZE with AXIS in {MESH_AXES}, "
                             "or dcn_AXIS=SIZE for its size across slices")
        if name in items:
            raise ValueError(f"mesh spec {spec!r}: axis {name!r} given twice")
        try:
            size = int(value)
        except ValueError:
            raise ValueError(f"mesh spec {spec!r}: size of {name!r} must be an integer, got {value!r}") from None
        if size < 1 and size != -1:
            raise ValueError(f"mesh spec {spec!r}: size of {name!r} must be >= 1 or -1, got {size}")
        items[name] = size
    return items


def _resolve(spec: str, items: dict, names: tuple, total: int, found: str) -> tuple:
    """The sizes of `names` (missing ones 1; at most one -1, "the rest") that multiply to `total`, which the
    phrase `found` states for the error messages (e.g. "there are 8 devices")."""
    sizes = {n: items[n] for n in names if n in items}
    rest = [n for n, s in sizes.items() if s == -1]
    if len(rest) > 1:
        raise ValueError(f"mesh spec {spec!r}: only one axis may be -1 (got {rest[0]!r} and {rest[1]!r})")
    fixed = math.prod(s for s in sizes.values() if s != -1)
    if rest:
        if total % fixed:
            raise ValueError(f"mesh spec {spec!r}: {found}, not divisible by the fixed axes (product {fixed}), "
                             f"so {rest[0]}=-1 has no integer size")
        sizes[rest[0]] = total // fixed
    elif fixed != total:
        kind = "dcn_ sizes" if names[0].startswith(DCN) else "axis sizes"
        raise ValueError(f"mesh spec {spec!r}: {kind} multiply to {fixed} but {found}; make them match "
                         "(or use -1 for one axis)")
    return tuple(sizes.get(n, 1) for n in names)


def parse_hybrid_mesh_spec(spec: str, num_devices: int, num_slices: int = 1) -> tuple[dict, dict]:
    """'dcn_data=2,fsdp=2,tp=2' on 8 devices in 2 slices -> ({'data': 1, 'fsdp': 2, 'tp': 2}, {'data': 2,
    'fsdp': 1, 'tp': 1}): the sizes inside one slice (ICI) and across slices (DCN). The dcn_ sizes must multiply
    to `num_slices` and the plain ones to the devices of one slice; each group may have one -1 ("the rest").

    Raises ValueError naming the spec and what was expected when an axis is unknown or repeated, a size is not
    an integer >= 1 (or -1), the devices do not split into `num_slices` equal slices, or a product is off.
    """
    items = _parse_items(spec)
    if num_devices % num_slices:
        raise ValueError(f"mesh spec {spec!r}: {num_devices} devices do not split into {num_slices} equal slices")
    dcn = _resolve(spec, items, tuple(DCN + a for a in MESH_AXES), num_slices,
                   f"the devices form {num_slices} slice(s) (by TPU slice_index, else one per process)")
    per_slice = num_devices // num_slices
    ici = _resolve(spec, items, MESH_AXES, per_slice,
                   f"there are {per_slice} devices" + (" per slice" if num_slices > 1 else ""))
    return dict(zip(MESH_AXES, ici)), dict(zip(MESH_AXES, dcn))


def parse_mesh_spec(spec: str, num_devices: int, num_slices: int = 1) -> dict:
    """'fsdp=4,tp=2' -> {'data': 1, 'fsdp': 4, 'tp': 2}: the size of each mesh axis, across slices times inside
    one (parse_hybrid_mesh_spec; without dcn_ items simply the sizes given). One size may be -1 ("all remaining
    devices"). Raises ValueError naming the bad item (see parse_hybrid_mesh_spec)."""
    ici, dcn = parse_hybrid_mesh_spec(spec, num_devices, num_slices)
    return {a: ici[a] * dcn[a] for a in MESH_AXES}


def device_slice(device) -> int:
    """The slice a device belongs to: its `slice_index` on TPU, else its process, as
    mesh_utils.create_hybrid_device_mesh(process_is_granule=True) does. (CPU devices of a multi-process job have
    a slice_index too, but 0 on every process, so off TPU it does not tell the slices apart.)"""
    return device.slice_index if device.platform == "tpu" else device.process_index


def device_slices(devices, slice_of=device_slice) -> list[list]:
    """`devices` grouped by `slice_of(device)`, slices in key order and devices in their given order within each.
    Raises ValueError when the slices are not all the same size (a hybrid mesh tiles equal slices)."""
    groups = {}
    for d in devices:
        groups.setdefault(slice_of(d), []).append(d)
    slices = [groups[k] for k in sorted(groups)]
    if len({len(s) for s in slices}) > 1:
        raise ValueError(f"devices form slices of unequal size {[len(s) for s in slices]} (keys {sorted(groups)}); "
                         "a hybrid mesh needs equal slices")
    return slices


def make_mesh(spec: str, devices=None, *, slice_of=device_slice) -> Mesh:
    """A ("data", "fsdp", "tp") mesh over `devices` (default: all devices of all processes) from a spec string
    such as "fsdp=4,tp=2", "data=2,fsdp=2,tp=2", "tp=1" (a single device), "fsdp=-1,tp=2", or a hybrid one
    spanning slices, "dcn_data=2,fsdp=2,tp=2" (data over 2 slices, fsdp x tp inside each).

    Plain spec: jax.make_mesh orders the devices by the physical topology (rings on TPU), so neighbouring tp
    devices are close; it refuses devices of several TPU slices, and so does this (naming the dcn_ spelling).
    Hybrid spec: the devices are grouped into slices by `slice_of` (default device_slice: slice_index on TPU,
    else the process), each slice is laid out by jax.make_mesh with the plain sizes, and the slices are tiled
    along the axes with dcn_ sizes (slice k at position k of the dcn grid, in row-major order), as
    jax.experimental.mesh_utils.create_hybrid_device_mesh does; so the devices of one index of a dcn axis all
    lie in one slice. Axis types are Auto: XLA propagates shardings through the unannotated model code.
    """
    devices = list(jax.devices() if devices is None else devices)
    auto = (AxisType.Auto,) * len(MESH_AXES)
    if DCN not in spec:
        sizes = parse_mesh_spec(spec, len(devices))
        tpu_slices = {d.slice_index for d in devices if d.platform == "tpu"}
        if len(tpu_slices) > 1:
            raise ValueError(f"mesh spec {spec!r}: the devices span {len(tpu_slices)} TPU slices; put an axis "
                             f"across them, e.g. 'dcn_data={len(tpu_slices)},...' (data parallel over DCN)")
        return jax.make_mesh(tuple(sizes[a] for a in MESH_AXES), MESH_AXES, axis_types=auto, devices=devices)
    slices = device_slices(devices, slice_of)
    ici, dcn = parse_hybrid_mesh_spec(spec, len(devices), len(slices))
    ici_shape, dcn_shape = tuple(ici[a] for a in MESH_AXES), tuple(dcn[a] for a in MESH_AXES)
    blocks = np.empty(dcn_shape, dtype=object)
    for k, index in enumerate(np.ndindex(*dcn_shape)):
        blocks[index] = jax.make_mesh(ici_shape, MESH_AXES, axis_types=auto, devices=slices[k]).devices
    return Mesh(np.block(blocks.tolist()), MESH_AXES, axis_types=auto)


def _mesh_size(mesh: Mesh, axis) -> int:
    names = axis if isinstance(axis, tuple) else (axis,)
    return math.prod(mesh.shape[n] for n in names)


def logical_to_spec(axes, shape, mesh: Mesh, rules=None) -> PartitionSpec:
    """PartitionSpec for an array with these logical axes and shape, with the divisibility fallback:
    a dimension whose size the mesh axis size does not divide, or whose mesh axis is already used by an earlier
    dimension, is replicated. Mesh axes of size 1 are dropped (they shard nothing). Unknown names raise.
    Only `mesh.shape` (axis name -> size) is read, so a stand-in object works for planning without devices."""
    rules = RULES if rules is None else rules
    if len(axes) != len(shape):
        raise ValueError(f"logical axes {axes} do not match shape {tuple(shape)}")
    used, out = set(), []
    for name, size in zip(axes, shape):
        if name is not None and name not in rules:
            raise ValueError(f"logical axis {name!r} has no sharding rule; known: {sorted(rules)}")
        target = None if name is None else rules[name]
        names = () if target is None else (target if isinstance(target, tuple) else (target,))
        names = tuple(n for n in names if n in mesh.shape and mesh.shape[n] > 1)
        if not names or used & set(names) or size % _mesh_size(mesh, names):
            out.append(None)
            continue
        used |= set(names)
        out.append(names[0] if len(names) == 1 else names)
    return PartitionSpec(*out)


def named_sharding(axes, shape, mesh: Mesh, rules=None) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(axes, shape, mesh, rules))


@dataclasses.dataclass(frozen=True)
class ShardingCtx:
    """The mesh and rules that activations are constrained with: the `shard=` argument of
    gemma_jax.model.forward_hidden / forward and gemma_jax.scoring. Frozen and hashable (rules as a tuple of
    (name, mesh axes) pairs), so it is a static jit argument like the config."""
    mesh: Mesh
    rules: tuple = tuple(RULES.items())

    def constrain(self, x, axes):
        """x under jax.lax.with_sharding_constraint to the layout of its logical `axes` (logical_to_spec, with the
        divisibility fallback: e.g. a batch of 2 on fsdp=8 stays whole)."""
        spec = logical_to_spec(tuple(axes), x.shape, self.mesh, dict(self.rules))
        return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, spec))


def sharding_ctx(mesh: Mesh | None, rules=None) -> ShardingCtx | None:
    """The ShardingCtx of `mesh` (rules default RULES), or None without a mesh (no constraints)."""
    if mesh is None:
        return None
    return ShardingCtx(mesh, tuple((RULES if rules is None else rules).items()))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def param_shardings(cfg: GemmaConfig, mesh: Mesh, rules=None) -> dict:
    """NamedSharding of every weight (same tree as the params), from gemma_jax.model.param_specs' logical axes."""
    shapes = jax.tree.map(lambda s: s.shape, param_specs(cfg), is_leaf=lambda x: hasattr(x, "axes"))
    axes = param_axes(cfg)
    return jax.tree.map(lambda a, s: named_sharding(a, s, mesh, rules), axes, shapes, is_leaf=_is_axes)


def _is_axes(x):
    return isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)


def lora_shardings(lora, mesh: Mesh, rules=None):
    """Shardings of a `lora.LoRA` (a LoRA with NamedShardings as leaves; works on abstract adapters too).

    A follows the input dimension of the weight it adapts (e.g. embed -> fsdp), B the output (heads/mlp -> tp),
    the rank axis is replicated (logical axes from gemma_jax.model.lora_axes; an unknown adapter name raises)."""
    layers = {}
    for name, ab in lora.layers.items():
        a_axes, b_axes = lora_axes(name)
        if isinstance(ab["a"], tuple):  # Gemma 4: per-layer adapters, no L axis
            layers[name] = {k: tuple(None if x is None else named_sharding(axes[1:], x.shape, mesh, rules)
                                     for x in ab[k]) for k, axes in (("a", a_axes), ("b", b_axes))}
            continue
        layers[name] = {"a": named_sharding(a_axes, ab["a"].shape, mesh, rules),
                        "b": named_sharding(b_axes, ab["b"].shape, mesh, rules)}
    return type(lora)(layers=layers, scale=lora.scale)


def optimizer_shardings(param_shardings_tree, mesh: Mesh) -> dict:
    """Shardings of train.optim.adamw_init's state: moments shaped (and sharded) like the params, scalar count."""
    return {"count": replicated(mesh), "mu": param_shardings_tree, "nu": param_shardings_tree}


def place_train_state(cfg: GemmaConfig, params, lora, opt_state, mesh: Mesh | None):
    """device_put frozen params, LoRA adapters and their AdamW state on `mesh` with the declared shardings
    (one process; with several, see `shard`). mesh None: returned as they are."""
    if mesh is None:
        return params, lora, opt_state
    lora_sh = lora_shardings(lora, mesh)
    return (jax.device_put(params, param_shardings(cfg, mesh)), jax.device_put(lora, lora_sh),
            jax.device_put(opt_state, optimizer_shardings(lora_sh, mesh)))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batch arrays ([B, ...]): rows split over data x fsdp, everything else replicated. B must be divisible by
    mesh.shape['data'] * mesh.shape['fsdp']."""
    names = tuple(n for n in RULES["batch"] if mesh.shape[n] > 1)
    return NamedSharding(mesh, PartitionSpec(names or None))


def cache_shardings(cache: dict, mesh: Mesh, rules=None) -> dict:
    """Shardings of a KV cache from gemma_jax.model.init_cache (or its jax.eval_shape): k/v [L,B,S,K,H] split
    by batch and kv heads, pos/valid [B,S] by batch, index replicated. Gemma 4: k/v are tuples over layers of
    [B,S,K,H] (None for KV-shared layers), each split the same way without the layers axis."""
    out = {}
    for k, v in cache.items():
        if isinstance(v, tuple):
            out[k] = tuple(None if x is None else named_sharding(CACHE_AXES[k][1:], x.shape, mesh, rules) for x in v)
        else:
            out[k] = named_sharding(CACHE_AXES[k], v.shape, mesh, rules)
    return out


def shard(tree, shardings):
    """Place every leaf on its sharding (shardings: a tree matching `tree`, or one sharding for all leaves).

    Single process: jax.device_put. Multi-host: every process must pass the same full values (e.g. params from
    the same seed or file); each process then builds only its own shards (jax.make_array_from_callback), so
    nothing crosses the network. For per-process data (batches) use `global_batch`.
    """
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)
    if isinstance(shardings, jax.sharding.Sharding):
        shardings = jax.tree.map(lambda _: shardings, tree)

    def put(x, sharding):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree.map(put, tree, shardings)


def jit_sharded(fn, in_shardings, out_shardings, *, static_argnums=(), donate_argnums=()):
    """jax.jit with explicit input/output shardings (trees matching the arguments / outputs; None entries leave
    a placement to XLA). Inputs already on the declared shardings are used as they are; outputs land on theirs,
    e.g. the new LoRA and optimizer state of a train step keep the layout of the old ones."""
    return jax.jit(fn, in_shardings=in_shardings, out_shardings=out_shardings, static_argnums=static_argnums,
                   donate_argnums=donate_argnums)


def initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, *, cpu_collectives: str | None = None):
    """Join the processes of a multi-host job (wraps jax.distributed.initialize); call before any other JAX use.

    coordinator "host:port" of process 0. On Cloud TPU pods, SLURM and Open MPI all three arguments may be None
    (auto-detected). cpu_collectives="gloo" lets CPU-only processes run cross-process collectives (tests and
    laptops); GPUs and TPUs bring their own. Returns (process_index, process_count).
    """
    if cpu_collectives is not None:
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
    return jax.process_index(), jax.process_count()


def global_batch(local_tree, mesh: Mesh):
    """One global batch from the rows this process loaded: every leaf [B_local, ...] becomes a global array
    [B_local * process_count, ...] split by `batch_sharding(mesh)` (jax.make_array_from_process_local_data).

    Process p's rows become global rows [p * B_local, (p + 1) * B_local) when the mesh puts each process's
    devices on a contiguous block of the batch axes (the default device order does). With one process this
    is just a sharded device_put."""
    sharding = batch_sharding(mesh)

    def make(x):
        x = np.asarray(x)
        return jax.make_array_from_process_local_data(sharding, x, (x.shape[0] * jax.process_count(), *x.shape[1:]))

    return jax.tree.map(make, local_tree)


def to_host(tree):
    """Fully replicated numpy copies of (possibly multi-host) global arrays, on every process."""
    if jax.process_count() == 1:
        return jax.tree.map(np.asarray, tree)
    return multihost_utils.process_allgather(tree, tiled=True)
