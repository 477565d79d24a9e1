"""Sharding tests on the fake 8-device CPU mesh (tests/conftest.py): a sharded forward, LoRA gradient and AdamW
step (with the activation constraints of a ShardingCtx), chunked log-probs, a prefill and generation equal the
single-device results; the constraints are in the lowered program, one per block boundary; params, adapters,
optimizer state and caches carry the declared shardings; mesh spec parsing (plain and hybrid multi-slice), the
hybrid mesh's device order, and the divisibility fallback."""

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from gemma_jax import sharding as sh
from gemma_jax.config import GEMMA2_2B, TINY
from gemma_jax.model import ParamSpec, abstract_params, forward, init_cache, param_specs
from gemma_jax.scoring import token_logprobs
from lora import DEFAULT_TARGETS, LoRA, init_lora, lora_shapes
from train.optim import adamw_init, adamw_update

CFG = TINY
MESHES = ["fsdp=8", "fsdp=4,tp=2", "data=2,tp=4"]


def _params(cfg, seed=0):
    """Random params built in numpy (no per-op compiles): fan-in scaled normals, non-zero norm weights."""
    rng = np.random.RandomState(seed)

    def make(spec):
        std = 0.3 if spec.init == "zeros" else spec.fan_in ** -0.5
        return jnp.asarray(std * rng.standard_normal(spec.shape), jnp.float32)

    return jax.tree.map(make, param_specs(cfg), is_leaf=lambda x: isinstance(x, ParamSpec))


def _random_lora(cfg, rank=4, alpha=8.0, seed=0):
    """Adapters with non-zero B (a fresh B = 0 would make every A gradient zero and hide mistakes)."""
    rng = np.random.RandomState(seed)
    layers = {name: {"a": jnp.asarray(0.2 * rng.standard_normal((cfg.num_layers, *a)), jnp.float32),
                     "b": jnp.asarray(0.05 * rng.standard_normal((cfg.num_layers, *b)), jnp.float32)}
              for name, (a, b) in lora_shapes(cfg, rank, DEFAULT_TARGETS).items()}
    return LoRA(layers=layers, scale=alpha / rank)


def loss_fn(lora, params, tokens_BT, shard=None):
    """Mean log-softmax of the logits at the next-token targets (negated), differentiated w.r.t. LoRA only.
    Returns the logits too (as aux), so one compiled forward serves both comparisons. shard: the ShardingCtx
    whose activation constraints the sharded run goes through (None: the single-device reference)."""
    logits_BTV, _ = forward(params, tokens_BT, CFG, lora=lora, shard=shard)
    logp_BTV = jax.nn.log_softmax(logits_BTV[:, :-1], axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp_BTV, tokens_BT[:, 1:, None], axis=-1)), logits_BTV


def step(lora, opt, params, tokens_BT, shard=None):
    """Logits, loss, LoRA gradient and one AdamW update: everything the sharded run is compared on."""
    (loss, logits_BTV), grads = jax.value_and_grad(loss_fn, has_aux=True)(lora, params, tokens_BT, shard)
    # lr 1e-3: Adam's first step is ~ lr * sign(g), so float noise in a near-zero gradient entry moves the new
    # adapters by up to ~lr * 1e-3 (1e-5 at lr 1e-2, measured); the gradients themselves are compared directly.
    new_lora, new_opt = adamw_update(grads, opt, lora, 1e-3, weight_decay=0.1)
    return logits_BTV, loss, grads, new_lora, new_opt


@pytest.fixture(scope="module")
def setup():
    params = _params(CFG)
    lora = _random_lora(CFG)
    tokens = jnp.asarray(np.random.RandomState(0).randint(4, CFG.vocab_size, (8, 16)), jnp.int32)
    single = jax.jit(step)(lora, adamw_init(lora), params, tokens)
    return params, lora, tokens, jax.tree.map(np.asarray, single)


@pytest.fixture(scope="module", params=MESHES)
def sharded(request, setup):
    params, lora, tokens, _ = setup
    mesh = sh.make_mesh(request.param)
    p_sh, l_sh = sh.param_shardings(CFG, mesh), sh.lora_shardings(lora, mesh)
    o_sh, b_sh, rep = sh.optimizer_shardings(l_sh, mesh), sh.batch_sharding(mesh), sh.replicated(mesh)
    params_s, lora_s, tokens_s = sh.shard(params, p_sh), sh.shard(lora, l_sh), sh.global_batch(tokens, mesh)
    opt_s = jax.jit(adamw_init, out_shardings=o_sh)(lora_s)
    fn = sh.jit_sharded(functools.partial(step, shard=sh.sharding_ctx(mesh)), in_shardings=(l_sh, o_sh, p_sh, b_sh),
                        out_shardings=(b_sh, rep, l_sh, l_sh, o_sh))
    out = fn(lora_s, opt_s, params_s, tokens_s)
    declared = dict(params=p_sh, lora=l_sh, opt=o_sh)
    return request.param, mesh, declared, dict(params=params_s, lora=lora_s, opt=opt_s), out


def _max_diff(a, b):
    return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)))) for x, y in
               zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def test_sharded_forward_and_lora_grad_equal_single_device(setup, sharded):
    *_, single = setup
    spec, mesh, _, _, out = sharded
    logits, loss, grads, new_lora, new_opt = out
    assert _max_diff(logits, single[0]) <= 1e-5, spec
    assert abs(float(loss) - float(single[1])) <= 1e-5, spec
    assert _max_diff(grads, single[2]) <= 1e-5, spec
    assert _max_diff(new_lora, single[3]) <= 1e-5, spec
    assert _max_diff(new_opt, single[4]) <= 1e-5, spec
    assert float(np.abs(np.asarray(grads.layers["q"]["a"])).max()) > 1e-4  # the comparison is not of zeros
    assert logits.sharding.spec == sh.batch_sharding(mesh).spec


def test_arrays_carry_declared_shardings(sharded):
    spec, mesh, declared, placed, out = sharded
    _, _, grads, new_lora, new_opt = out
    pairs = [(placed["params"], declared["params"]), (placed["lora"], declared["lora"]),
             (placed["opt"], declared["opt"]), (grads, declared["lora"]), (new_lora, declared["lora"]),
             (new_opt, declared["opt"])]
    for tree, shardings in pairs:
        for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings), strict=True):
            assert x.sharding.spec == s.spec, (spec, x.shape, x.sharding.spec, s.spec)
            assert x.sharding.mesh.shape == mesh.shape
    # Something really is split: the embedding's per-device block is smaller than the whole.
    embed = placed["params"]["embed"]
    split = {"fsdp=8": 8, "fsdp=4,tp=2": 8, "data=2,tp=4": 4}[spec]
    assert embed.addressable_shards[0].data.size == embed.size // split


def test_declared_specs_follow_the_rules():
    mesh = sh.make_mesh("fsdp=4,tp=2")
    ps = sh.param_shardings(CFG, mesh)
    assert ps["embed"].spec == P("tp", "fsdp")
    assert ps["layers"]["q"].spec == P(None, "fsdp", "tp", None)
    assert ps["layers"]["k"].spec == P(None, "fsdp", "tp", None)  # K = 2 divisible by tp = 2
    assert ps["layers"]["o"].spec == P(None, "tp", None, "fsdp")
    assert ps["layers"]["down"].spec == P(None, "tp", "fsdp")
    assert ps["layers"]["attn_norm"].spec == P(None, None)
    ls = sh.lora_shardings(init_lora(CFG, 4, 8.0), mesh)
    assert ls.layers["q"]["a"].spec == P(None, "fsdp", None)
    assert ls.layers["q"]["b"].spec == P(None, None, "tp", None)
    assert ls.layers["kv"]["b"].spec == P(None, None, None, "tp", None)
    assert ls.layers["down"]["a"].spec == P(None, "tp", None)
    # Divisibility fallback: TINY has 2 kv heads, so on tp=4 the kv heads are replicated, q heads (4) are not.
    ps4 = sh.param_shardings(CFG, sh.make_mesh("data=2,tp=4"))
    assert ps4["layers"]["k"].spec == P(None, None, None, None)
    assert ps4["layers"]["q"].spec == P(None, None, "tp", None)
    assert sh.batch_sharding(sh.make_mesh("data=2,fsdp=2,tp=2")).spec == P(("data", "fsdp"))
    # Full-size Gemma 2 2B (no arrays built): vocab 256000 and width 2304 split over tp=2 / fsdp=4.
    full = sh.param_shardings(GEMMA2_2B, mesh)
    assert full["embed"].spec == P("tp", "fsdp") and full["layers"]["gate"].spec == P(None, "fsdp", "tp")
    # A mesh axis is used at most once per array: embed [V, D] with both mapped to tp -> D replicated.
    rules = {**sh.RULES, "embed": "tp"}
    assert sh.logical_to_spec(("vocab", "embed"), (512, 64), mesh, rules) == P("tp", None)


def test_sharded_cache_prefill_equals_single_device(setup):
    params, lora, tokens, _ = setup
    mesh = sh.make_mesh("fsdp=4,tp=2")
    cache = jax.jit(init_cache, static_argnums=(0, 1, 2))(CFG, 8, 24)
    c_sh, p_sh, l_sh = sh.cache_shardings(cache, mesh), sh.param_shardings(CFG, mesh), sh.lora_shardings(lora, mesh)
    assert c_sh["k"].spec == P(None, "fsdp", None, "tp", None) and c_sh["pos"].spec == P("fsdp", None)

    def prefill(params, lora, tokens, cache):
        return forward(params, tokens, CFG, cache=cache, lora=lora)

    ref_logits, ref_cache = jax.jit(prefill)(params, lora, tokens, cache)
    fn = sh.jit_sharded(prefill, (p_sh, l_sh, sh.batch_sharding(mesh), c_sh), (sh.batch_sharding(mesh), c_sh))
    logits, new_cache = fn(sh.shard(params, p_sh), sh.shard(lora, l_sh), tokens, sh.shard(cache, c_sh))
    assert _max_diff(logits, ref_logits) <= 1e-5
    assert _max_diff(new_cache, ref_cache) <= 1e-5
    assert new_cache["k"].sharding.spec == c_sh["k"].spec
    assert int(new_cache["index"]) == 16


def test_sharded_generation_equals_single_device(setup):
    """generate() on params and adapters placed on fsdp=4,tp=2 (how GRPO --mesh samples): the decode loop's
    per-layer weight copies and buffers are laid out by XLA's propagation; tokens and log-probs must not change."""
    from gemma_jax.sampler import generate

    params, lora, tokens, _ = setup
    mesh = sh.make_mesh("fsdp=4,tp=2")
    prompts = np.asarray(tokens)[:, :12].tolist()
    kw = dict(max_new_tokens=12, temperature=0.0, stop_ids=(), lora=lora, decode_segment=4)
    ref = generate(params, CFG, prompts, **kw)
    p_sh, l_sh = sh.param_shardings(CFG, mesh), sh.lora_shardings(lora, mesh)
    out = generate(sh.shard(params, p_sh), CFG, prompts, **{**kw, "lora": sh.shard(lora, l_sh)})
    np.testing.assert_array_equal(out.tokens, ref.tokens)
    assert _max_diff(out.logprobs, ref.logprobs) <= 1e-5
    assert len(set(ref.tokens.ravel().tolist())) > 10  # a real comparison, not one repeated token


def test_mesh_spec_parsing_and_errors():
    assert dict(sh.make_mesh("fsdp=-1,tp=2").shape) == {"data": 1, "fsdp": 4, "tp": 2}
    assert dict(sh.make_mesh("data=2,fsdp=2,tp=2").shape) == {"data": 2, "fsdp": 2, "tp": 2}
    assert dict(sh.make_mesh("tp=1", devices=jax.devices()[:1]).shape) == {"data": 1, "fsdp": 1, "tp": 1}
    assert sh.parse_mesh_spec("tp=-1", 8) == {"data": 1, "fsdp": 1, "tp": 8}
    bad = {
        "fsdp=3": "multiply to 3 but there are 8 devices",
        "tp=1": "multiply to 1 but there are 8 devices",
        "model=8": "bad item 'model=8'",
        "fsdp=two": "size of 'fsdp' must be an integer",
        "fsdp=-1,tp=-1": "only one axis may be -1",
        "tp=3,fsdp=-1": "not divisible by the fixed axes",
        "tp=2,tp=4": "axis 'tp' given twice",
        "fsdp=0,tp=8": "must be >= 1 or -1",
    }
    for spec, message in bad.items():
        with pytest.raises(ValueError, match=message):
            sh.make_mesh(spec)
    with pytest.raises(ValueError, match="logical axis 'bogus' has no sharding rule"):
        sh.logical_to_spec(("bogus",), (8,), sh.make_mesh("fsdp=8"))


def test_hybrid_mesh_spec_parsing_and_errors():
    """dcn_ sizes across slices, plain sizes inside one; the mesh's sizes are their products."""
    assert sh.parse_hybrid_mesh_spec("dcn_data=2,fsdp=2,tp=2", 8, 2) == (
        {"data": 1, "fsdp": 2, "tp": 2}, {"data": 2, "fsdp": 1, "tp": 1})
    assert sh.parse_mesh_spec("dcn_data=2,fsdp=2,tp=2", 8, 2) == {"data": 2, "fsdp": 2, "tp": 2}
    assert sh.parse_mesh_spec("dcn_data=-1,data=2,fsdp=-1", 16, 4) == {"data": 8, "fsdp": 2, "tp": 1}
    assert sh.parse_mesh_spec("dcn_fsdp=2,tp=4", 8, 2) == {"data": 1, "fsdp": 2, "tp": 4}
    bad = {  # spec, devices, slices -> message
        ("dcn_data=3,fsdp=2,tp=2", 8, 2): r"dcn_ sizes multiply to 3 but the devices form 2 slice\(s\)",
        ("dcn_data=2,fsdp=4,tp=2", 8, 2): "axis sizes multiply to 8 but there are 4 devices per slice",
        ("dcn_data=2,fsdp=4", 8, 1): r"dcn_ sizes multiply to 2 but the devices form 1 slice\(s\)",
        ("dcn_data=2,fsdp=2,tp=2", 8, 3): "8 devices do not split into 3 equal slices",
        ("dcn_data=-1,dcn_tp=-1,fsdp=4", 8, 2): "only one axis may be -1 .got 'dcn_data' and 'dcn_tp'.",
        ("dcn_model=2,fsdp=4", 8, 2): "bad item 'dcn_model=2'.*or dcn_AXIS=SIZE",
        ("dcn_data=2,dcn_data=2", 8, 2): "axis 'dcn_data' given twice",
        ("dcn_data=0,fsdp=4", 8, 2): "size of 'dcn_data' must be >= 1 or -1",
        ("fsdp=4", 8, 2): r"dcn_ sizes multiply to 1 but the devices form 2 slice\(s\)",
    }
    for (spec, n, slices), message in bad.items():
        with pytest.raises(ValueError, match=f"^mesh spec '{spec}': {message}"):
            sh.parse_hybrid_mesh_spec(spec, n, slices)
    with pytest.raises(ValueError, match="devices form 1 slice"):  # one CPU process: one slice
        sh.make_mesh("dcn_data=2,fsdp=2,tp=2")
    with pytest.raises(ValueError, match=r"slices of unequal size \[5, 3\]"):
        sh.make_mesh("dcn_data=2,fsdp=2,tp=2", slice_of=lambda d: int(d.id >= 5))


@pytest.mark.parametrize("spec, dcn_axis", [("dcn_data=2,fsdp=2,tp=2", 0), ("dcn_fsdp=2,data=2,tp=2", 1),
                                            ("dcn_data=4,tp=2", 0)])
def test_hybrid_mesh_puts_each_slice_on_one_dcn_index(spec, dcn_axis):
    """Slices made up by a function of the device (interleaved ids, so the order differs from the plain mesh's):
    every sub-mesh at one index of the dcn axis holds exactly one slice's devices, in slice order."""
    n_slices = 4 if "dcn_data=4" in spec else 2

    def slice_of(device):
        return device.id % n_slices

    mesh = sh.make_mesh(spec, slice_of=slice_of)
    assert dict(mesh.shape) == sh.parse_mesh_spec(spec, 8, n_slices)
    assert tuple(mesh.axis_names) == sh.MESH_AXES
    for k in range(n_slices):
        sub = np.take(mesh.devices, k, axis=dcn_axis)
        assert sorted(d.id for d in sub.flat) == list(range(k, 8, n_slices))
    # Rows of the batch (data x fsdp) a slice holds are one contiguous block when the data axis spans slices.
    if dcn_axis == 0:
        tokens = sh.global_batch(np.arange(8 * 2, dtype=np.int32).reshape(8, 2), mesh)
        per_slice = 8 // n_slices
        for shard in tokens.addressable_shards:
            k = slice_of(shard.device)
            rows = range(8)[shard.index[0]]
            assert rows.start >= k * per_slice and rows.stop <= (k + 1) * per_slice, (k, rows)


def test_device_slices_use_tpu_slice_index():
    """On a TPU pod the slices come from slice_index (stand-in TPU devices here), not from the process (2 hosts
    a slice); a plain spec over several TPU slices is refused with the dcn_ spelling to use."""
    from types import SimpleNamespace

    devices = [SimpleNamespace(id=i, platform="tpu", process_index=i // 2, slice_index=i // 4) for i in range(8)]
    assert [[d.id for d in s] for s in sh.device_slices(devices)] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert sh.device_slice(jax.devices()[3]) == 0  # a CPU device: its process
    with pytest.raises(ValueError, match=r"^mesh spec 'fsdp=8': the devices span 2 TPU slices; .*'dcn_data=2,"):
        sh.make_mesh("fsdp=8", devices=devices)
    with pytest.raises(ValueError, match="dcn_ sizes multiply to 4 but the devices form 2 slice"):
        sh.make_mesh("dcn_data=4,tp=2", devices=devices)


def _constraints(fn, *args):
    """How many sharding constraints the lowered program of fn(*args) holds (Shardy or GSPMD spelling)."""
    text = jax.jit(fn).lower(*args).as_text()
    return len(re.findall(r"sdy\.sharding_constraint|@Sharding\b", text))


def test_activation_constraints_are_in_the_lowered_program():
    """One constraint per block boundary, so they cannot silently disappear: the embedding output, per layer the
    residual after attention, the MLP hidden and the block output, then the final hidden and the logits; none
    without a ShardingCtx. Unrolled layers count each layer; the scan lowers its body once."""
    mesh = sh.make_mesh("fsdp=4,tp=2")
    ctx = sh.sharding_ctx(mesh)
    tokens = jax.ShapeDtypeStruct((8, 16), jnp.int32)
    for scan, per_program_layers in ((False, CFG.num_layers), (True, 1)):
        cfg = dataclasses.replace(CFG, scan_layers=scan)
        params = abstract_params(cfg)
        assert _constraints(lambda p, t, c=cfg: forward(p, t, c, shard=ctx)[0], params, tokens) == \
            1 + 3 * per_program_layers + 2
        assert _constraints(lambda p, t, c=cfg: forward(p, t, c)[0], params, tokens) == 0
    # The chunked scorer adds its own: the hidden [B,T,D] and [N,D], the embedding chunks and each chunk's logits.
    cfg = dataclasses.replace(CFG, logits_chunk=128)
    n_model = 1 + 3 + 1  # scanned: embedding, one layer body, final hidden (no full logits)
    assert _constraints(lambda p, t: token_logprobs(p, t, cfg, shard=ctx), abstract_params(cfg), tokens) == \
        n_model + 4
    # The layout asked for: rows over fsdp, the model width whole, the MLP hidden over tp.
    text = jax.jit(lambda p, t: forward(p, t, CFG, shard=ctx)[0]).lower(abstract_params(CFG), tokens).as_text()
    assert '[{"fsdp"}, {}, {}]> : tensor<8x16x64xf32>' in text
    assert f'[{{"fsdp"}}, {{}}, {{"tp"}}]> : tensor<8x16x{CFG.hidden_dim}xf32>' in text


@pytest.mark.parametrize("spec", ["fsdp=4,tp=2", "data=2,tp=4"])
def test_sharded_chunked_logprobs_and_grad_equal_single_device(setup, spec):
    """The chunked scorer under a ShardingCtx (chunks split over tp, rows over data x fsdp) gives the
    single-device, unchunked log-probs and LoRA gradient."""
    params, lora, tokens, _ = setup
    mesh = sh.make_mesh(spec)
    chunked = dataclasses.replace(CFG, logits_chunk=96)  # 512 = 5 x 96 + 32: a padded last chunk

    def loss(lora, params, tokens, cfg, shard=None):
        lp = token_logprobs(params, tokens, cfg, lora=lora, shard=shard)
        return -jnp.mean(lp), lp

    ref = jax.jit(jax.value_and_grad(functools.partial(loss, cfg=CFG), has_aux=True))(lora, params, tokens)
    p_sh, l_sh = sh.param_shardings(CFG, mesh), sh.lora_shardings(lora, mesh)
    fn = jax.jit(jax.value_and_grad(functools.partial(loss, cfg=chunked, shard=sh.sharding_ctx(mesh)), has_aux=True))
    out = fn(sh.shard(lora, l_sh), sh.shard(params, p_sh), sh.global_batch(tokens, mesh))
    assert _max_diff(out[0][1], ref[0][1]) <= 1e-5
    assert abs(float(out[0][0]) - float(ref[0][0])) <= 1e-5
    assert _max_diff(out[1], ref[1]) <= 1e-5
    assert float(np.abs(np.asarray(ref[1].layers["q"]["a"])).max()) > 1e-4
