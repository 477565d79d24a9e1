"""SFT: chat-template batches, truncation, packing, the masked loss (vs NumPy and vs Tunix's PeftTrainer),
gradient accumulation, and the training loop (learning, metrics, resume) on a tiny model."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma_jax.config import TINY
from gemma_jax.model import forward, init_params
from gemma_jax.scoring import logprobs_from_logits
from lora.adapters import LoRA, init_lora
from rewards.tags import render_completion
from sft.batches import SFTData, encode_example, make_batch
from sft.loss import sft_loss, token_nll
from sft.train import HParams, accumulated_grads, train_loop, train_step

# Tunix scales queries by head_dim**-0.5, so the shared config has query_pre_attn_scalar == head_dim.
CFG = dataclasses.replace(TINY, query_pre_attn_scalar=TINY.head_dim)
RANK, ALPHA = 4, 8.0

# Compiled once per module and shared by the tests below (compiles dominate this file's run time).
_loss = jax.jit(sft_loss, static_argnums=3)
_value_and_grad = jax.jit(jax.value_and_grad(lambda lo, p, b: sft_loss(lo, p, b, CFG)[0]))
_logits = jax.jit(lambda p, lo, b: forward(p, b["tokens"], CFG, positions_BT=b["positions"], pad_mask_BT=b["pad_mask"],
                                           segment_ids_BT=b["segment_ids"], lora=lo)[0])


def _record(i, system=None):
    a, b = 3 + 7 * i, 11 + 5 * (i % 4)
    return {"prompt": f"What is {a} plus {b}?", "reasoning": f"{a} plus {b} is {a + b}.", "answer": str(a + b),
            "system": system, "domain": "math", "source": "test"}


@pytest.fixture(scope="module")
def params():
    return jax.jit(init_params, static_argnums=(0, 1))(CFG, 0)  # one compile instead of one per eager op


@pytest.fixture(scope="module")
def lora():
    """Adapters with non-zero B, so the LoRA path changes the logits and gets real gradients."""
    lo = init_lora(CFG, RANK, ALPHA, seed=1)
    rng = np.random.default_rng(2)
    layers = {n: {"a": ab["a"], "b": jnp.asarray(0.3 * rng.standard_normal(ab["b"].shape), jnp.float32)}
              for n, ab in lo.layers.items()}
    return LoRA(layers=layers, scale=lo.scale)


@pytest.fixture(scope="module")
def batch(tokenizer):
    """4 right-padded rows of different lengths, one with a system prompt."""
    exs = [encode_example(_record(i, "Answer with reasoning." if i == 1 else None), tokenizer, 64) for i in range(4)]
    return {k: jnp.asarray(v) for k, v in make_batch([[e] for e in exs], 64).items()}


# ---------------------------------------------------------------------------------------------- tokenisation


def test_example_is_chat_template_plus_completion_and_end_of_turn(tokenizer):
    rec = _record(2, system="Be brief.")
    ex = encode_example(rec, tokenizer, 256)
    prompt = tokenizer.encode_chat(rec["prompt"], rec["system"])
    target = tokenizer.encode(render_completion(rec["reasoning"], rec["answer"])) + [tokenizer.end_of_turn_id]
    assert ex.tokens.tolist() == prompt + target
    assert ex.loss_mask.tolist() == [False] * len(prompt) + [True] * len(target)
    assert ex.tokens[0] == tokenizer.bos_id and ex.tokens[-1] == tokenizer.end_of_turn_id
    assert tokenizer.eos_id not in ex.tokens.tolist()


def test_gemma4_example_has_a_system_turn_and_ends_with_turn_end(gemma4_tokenizer):
    """With Gemma 4's turn markers the system prompt is its own turn and the target ends with <turn|>."""
    tok = gemma4_tokenizer
    rec = _record(2, system="Be brief.")
    ex = encode_example(rec, tok, 256)
    n_prompt = int((~ex.loss_mask).sum())
    assert tok.sp.DecodeIds(ex.tokens[1:n_prompt].tolist()) == (
        "<|turn>system\nBe brief.<turn|>\n<|turn>user\nWhat is 17 plus 21?<turn|>\n<|turn>model\n")
    assert ex.tokens[0] == tok.bos_id and ex.tokens[-1] == tok.end_of_turn_id == tok.sp.PieceToId("<turn|>")


def test_truncation_cuts_user_text_from_the_left_first(tokenizer):
    rec = _record(0)
    rec["prompt"] = " ".join(f"word{i}" for i in range(60)) + " What is 3 plus 11?"
    full = encode_example(rec, tokenizer, 10_000)
    head = tokenizer.encode("<start_of_turn>user\n", add_bos=True)
    tail = tokenizer.encode("<end_of_turn>\n<start_of_turn>model\n")
    n_target = int(full.loss_mask.sum())
    n_prompt = len(full) - n_target
    max_len = len(full) - 25
    ex = encode_example(rec, tokenizer, max_len)
    assert len(ex) == max_len
    toks, full_toks = ex.tokens.tolist(), full.tokens.tolist()
    assert toks[: len(head)] == head  # <bos> and the chat header kept
    # the user text lost exactly its first 25 tokens; its end, the tail and the whole target are unchanged
    assert toks[len(head):] == full_toks[len(head) + 25:]
    assert toks[n_prompt - 25 - len(tail): n_prompt - 25] == tail
    assert ex.loss_mask.sum() == n_target and ex.loss_mask[-n_target:].all()


def test_truncation_shortens_the_target_only_when_the_user_text_is_gone(tokenizer):
    rec = _record(1, system="Sys.")
    full = encode_example(rec, tokenizer, 10_000)
    head = tokenizer.encode("<start_of_turn>user\nSys.\n\n", add_bos=True)
    tail = tokenizer.encode("<end_of_turn>\n<start_of_turn>model\n")
    target = full.tokens[full.loss_mask].tolist()
    max_len = len(head) + len(tail) + 5
    ex = encode_example(rec, tokenizer, max_len)
    assert ex.tokens.tolist() == head + tail + target[:5]  # user text gone, target cut from the right
    assert ex.loss_mask.tolist() == [False] * (len(head) + len(tail)) + [True] * 5
    with pytest.raises(ValueError, match="max_len"):
        encode_example(rec, tokenizer, len(head) + len(tail))
    with pytest.raises(ValueError, match="row 7: field 'answer'"):
        encode_example({**rec, "answer": None}, tokenizer, 64, where="row 7")


# ---------------------------------------------------------------------------------------------- loss


def test_loss_matches_numpy_reference(params, lora, batch):
    loss, n = _loss(lora, params, batch, CFG)
    logits = np.asarray(_logits(params, lora, batch), np.float64)[:, :-1]
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    tokens, mask = np.asarray(batch["tokens"]), np.asarray(batch["loss_mask"])[:, 1:]
    nll = -np.take_along_axis(logp, tokens[:, 1:, None], -1)[..., 0]
    ref = (nll * mask).sum() / mask.sum()
    assert int(n) == mask.sum() and mask.sum() > 40
    assert float(loss) == pytest.approx(ref, rel=1e-6)


def test_masked_positions_contribute_exactly_nothing(params, lora, batch):
    loss0, g0 = _value_and_grad(lora, params, batch)
    # 1) other tokens under padding (masked targets, never attended): loss and grads bit-identical
    tokens = np.asarray(batch["tokens"]).copy()
    pad = ~np.asarray(batch["pad_mask"])
    assert pad.sum() > 10
    tokens[pad] = 77
    loss1, g1 = _value_and_grad(lora, params, {**batch, "tokens": jnp.asarray(tokens)})
    assert float(loss1) == float(loss0)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # 2) d loss / d logits is exactly 0 wherever the target is a prompt or padding token, non-zero elsewhere
    logits = _logits(params, lora, batch)

    def from_logits(lg):
        m = batch["loss_mask"][:, 1:]
        nll = -logprobs_from_logits(lg[:, :-1], batch["tokens"][:, 1:])
        return jnp.sum(jnp.where(m, nll, 0.0)) / jnp.sum(m)

    g = np.abs(np.asarray(jax.grad(from_logits)(logits))[:, :-1]).sum(-1)
    m = np.asarray(batch["loss_mask"])[:, 1:]
    assert (g[~m] == 0).all() and (g[m] > 0).all()


# ---------------------------------------------------------------------------------------------- Tunix parity


def _qwix_model(params, lora):
    """Tunix Gemma (our weights) with qwix LoRA on q, kv, gate, up, down holding our adapter values."""
    import qwix
    from flax import nnx
    from tunix_utils import to_tunix

    model = to_tunix(params, CFG)
    provider = qwix.LoraProvider(module_path=".*q_einsum|.*kv_einsum|.*gate_proj|.*up_proj|.*down_proj",
                                 rank=RANK, alpha=ALPHA)
    model = qwix.apply_lora_to_model(model, provider, **model.get_model_input())
    for i, layer in enumerate(model.layers):
        for name, mod, w in (("q", layer.attn.q_einsum, "w"), ("kv", layer.attn.kv_einsum, "w"),
                             ("gate", layer.mlp.gate_proj, "kernel"), ("up", layer.mlp.up_proj, "kernel"),
                             ("down", layer.mlp.down_proj, "kernel")):
            for ab in ("a", "b"):
                getattr(mod, f"{w}_lora_{ab}").value = jnp.asarray(lora.layers[name][ab][i])
    assert len(jax.tree.leaves(nnx.state(model, nnx.LoRAParam))) == 10 * CFG.num_layers
    return model


def _from_qwix(model):
    names = (("q", "attn", "q_einsum", "w"), ("kv", "attn", "kv_einsum", "w"), ("gate", "mlp", "gate_proj", "kernel"),
             ("up", "mlp", "up_proj", "kernel"), ("down", "mlp", "down_proj", "kernel"))
    out = {}
    for name, block, proj, w in names:
        mods = [getattr(getattr(layer, block), proj) for layer in model.layers]
        out[name] = {ab: np.stack([np.asarray(getattr(m, f"{w}_lora_{ab}").value) for m in mods]) for ab in "ab"}
    return out


def test_loss_grads_and_step_match_tunix_peft_trainer(params, lora, batch):
    import optax
    from flax import nnx
    from tunix.sft import peft_trainer
    from tunix.sft import utils as tunix_utils

    model = _qwix_model(params, lora)
    pad = batch["pad_mask"]
    inputs = {"input_tokens": batch["tokens"], "input_mask": batch["loss_mask"],
              "positions": tunix_utils.build_positions_from_mask(pad),
              "attention_mask": tunix_utils.make_causal_attn_mask(pad)}
    # Tunix's default loss and its LoRA-only gradient, exactly as PeftTrainer._train_step takes them
    grad_fn = nnx.value_and_grad(peft_trainer._default_loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))
    t_loss, t_grads = nnx.jit(lambda m, inp: grad_fn(m, **inp))(model, inputs)
    loss, grads = _value_and_grad(lora, params, batch)
    assert float(loss) == pytest.approx(float(t_loss), rel=1e-5)
    t_flat = {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(t_grads)}
    for i in range(CFG.num_layers):
        g = np.asarray(grads.layers["q"]["b"][i])
        ref = t_flat[f"['layers'][{i}]['attn']['q_einsum']['w_lora_b'].value"]
        np.testing.assert_allclose(g, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())

    # one full optimizer step through the PeftTrainer (clip + AdamW + cosine lr) vs our train_step
    hp = HParams(lr=1e-3, warmup_steps=0, steps=10, weight_decay=0.1, clip=0.5)
    tx = optax.chain(optax.clip_by_global_norm(hp.clip),
                     optax.adamw(optax.cosine_decay_schedule(hp.lr, hp.steps), weight_decay=hp.weight_decay))
    trainer = peft_trainer.PeftTrainer(model, tx, peft_trainer.TrainingConfig(eval_every_n_steps=100, max_steps=1))
    tunix_step, _ = trainer.jit_train_and_eval_step()
    t_loss2, _, t_norm = tunix_step(inputs)
    new_lora, _, metrics = train_step(lora, init_opt(lora), params, jax.tree.map(lambda x: x[None], batch),
                                      cfg=CFG, hp=hp)
    assert float(metrics["loss"]) == pytest.approx(float(t_loss2), rel=1e-5)
    assert float(metrics["grad_norm"]) == pytest.approx(float(t_norm), rel=1e-5)
    t_new = _from_qwix(model)
    for name in new_lora.layers:
        for ab in "ab":
            moved = np.abs(np.asarray(new_lora.layers[name][ab]) - np.asarray(lora.layers[name][ab])).max()
            assert moved > 5e-4  # each adapter really took a step (lr 1e-3)
            # AdamW's first step is lr * g / (|g| + eps): entries with |g| ~ 1e-7 turn float32 rounding of g into
            # a visible fraction of the step, so the bound is 2% of one step (lr); typical entries agree to ~1e-8.
            diff = np.abs(np.asarray(new_lora.layers[name][ab]) - t_new[name][ab])
            assert diff.max() <= 2e-5 and np.median(diff) <= 1e-7, (name, ab, diff.max(), np.median(diff))


def init_opt(lo):
    from train.optim import adamw_init

    return adamw_init(lo)


def per_example_loss(lora, params, batch, cfg, num_segments: int):
    """Mean NLL per packed segment: [B, num_segments] (segments 1..n; 0 where a segment has no target tokens).
    Used to check that packing several examples in a row gives each the loss it has alone."""
    nll, mask = token_nll(lora, params, batch, cfg)
    seg = batch["segment_ids"][:, 1:]
    onehot = seg[..., None] == jnp.arange(1, num_segments + 1)
    sums = jnp.einsum("BT,BTS->BS", nll, onehot.astype(nll.dtype))
    counts = jnp.einsum("BT,BTS->BS", mask.astype(nll.dtype), onehot.astype(nll.dtype))
    return jnp.where(counts > 0, sums / jnp.maximum(counts, 1.0), 0.0)


# ---------------------------------------------------------------------------------------------- accumulation, packing


def test_k_micro_batches_equal_one_big_batch(params, lora, tokenizer):
    exs = [encode_example(_record(i, "S." if i % 3 == 0 else None), tokenizer, 64) for i in range(6)]
    big = make_batch([[e] for e in exs], 64)
    micro = {k: v.reshape(3, 2, *v.shape[1:]) for k, v in big.items()}  # 3 micro-batches, unequal token counts
    counts = micro["loss_mask"][:, :, 1:].sum(axis=(1, 2))
    assert len(set(counts.tolist())) > 1
    acc = jax.jit(accumulated_grads, static_argnames="cfg")
    loss_k, g_k, n_k = acc(lora, params, micro, cfg=CFG)
    loss_1, g_1, n_1 = acc(lora, params, jax.tree.map(lambda x: x[None], big), cfg=CFG)
    assert float(n_k) == float(n_1) == big["loss_mask"][:, 1:].sum()
    assert abs(float(loss_k) - float(loss_1)) <= 1e-6 * abs(float(loss_1))
    for a, b in zip(jax.tree.leaves(g_k), jax.tree.leaves(g_1)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-6 * np.abs(np.asarray(b)).max())


def test_packed_row_gives_each_example_its_own_loss(params, lora, tokenizer):
    exs = [encode_example(_record(i), tokenizer, 64) for i in (0, 1, 2)]
    packed = make_batch([exs], 160)
    assert packed["segment_ids"].max() == 3 and packed["pad_mask"].sum() == sum(len(e) for e in exs)
    assert packed["positions"][0, len(exs[0])] == 0  # positions restart in each segment
    pel = jax.jit(per_example_loss, static_argnums=(3, 4))
    got = np.asarray(pel(lora, params, packed, CFG, 3))[0]
    alone = [float(pel(lora, params, make_batch([[e]], 160), CFG, 1)[0, 0]) for e in exs]
    np.testing.assert_allclose(got, alone, rtol=1e-5)
    # without segment ids the same row attends across examples: the later examples' losses change
    seg_loss = float(_loss(lora, params, packed, CFG)[0])
    leak_loss = float(_loss(lora, params, {**packed, "segment_ids": np.ones_like(packed["segment_ids"])}, CFG)[0])
    n = [int(e.loss_mask[1:].sum()) for e in exs]
    assert seg_loss == pytest.approx(np.dot(alone, n) / sum(n), rel=1e-5)
    assert abs(leak_loss - seg_loss) > 1e-3


# ---------------------------------------------------------------------------------------------- the loop


def test_train_loop_learns_logs_and_resumes_exactly(params, tokenizer, tmp_path):
    exs = [encode_example(_record(i), tokenizer, 64) for i in range(8)]
    data = SFTData(exs, batch_size=4, max_len=64, seed=0)
    hp = HParams(lr=1e-2, warmup_steps=10, steps=100, weight_decay=0.0, clip=1.0, grad_accum=2)
    lo = init_lora(CFG, 8, 16.0, seed=0)
    quiet = lambda *a: None  # noqa: E731
    run = lambda out, stop: train_loop(CFG, params, lo, data, hp, str(out), save_every=50,  # noqa: E731
                                       stop_at_step=stop, print_fn=quiet)
    a10, _, _ = run(tmp_path / "a", 10)
    run(tmp_path / "b", 6)
    b10, _, _ = run(tmp_path / "b", 10)  # resumes at step 6, data position 12
    for x, y in zip(jax.tree.leaves(a10), jax.tree.leaves(b10)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    rows = [json.loads(line) for line in open(tmp_path / "b" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == list(range(1, 11))
    assert all(r["tokens"] > 0 and r["grad_norm"] > 0 for r in rows)

    final, _, last = run(tmp_path / "a", None)  # continue run a to step 100
    rows = [json.loads(line) for line in open(tmp_path / "a" / "metrics.jsonl")]
    assert rows[-1]["step"] == 100 and rows[-1]["eta_s"] == 0
    assert rows[0]["loss"] > 4.0  # starts near ln(512) = 6.2
    eval_data = SFTData(exs, batch_size=4, max_len=64, shuffle=False)
    from sft.train import eval_loss

    held = eval_loss(final, params, eval_data, CFG)
    assert last["loss"] < 0.6 and held < 0.6, (last["loss"], held)
    assert os.path.isdir(tmp_path / "a" / "checkpoints")


def test_cli_trains_saves_adapters_and_resumes(tokenizer_path, tmp_path, capsys):
    import csv

    from cli.common import UsageError
    from cli.sft import main
    from gemma_jax.checkpoint import save_hf
    from lora.io import load_adapters

    save_hf(str(tmp_path / "base"), CFG, jax.jit(init_params, static_argnums=(0, 1))(CFG, 0))
    with open(tmp_path / "sft.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["user", "assistant"])
        for i in range(12):
            r = _record(i)
            w.writerow([r["prompt"], render_completion(r["reasoning"], r["answer"])])
    argv = ["--data", str(tmp_path / "sft.csv"), "--base", str(tmp_path / "base"), "--tokenizer", tokenizer_path,
            "--max-len", "64", "--batch", "2", "--grad-accum", "2", "--lr", "1e-2", "--lora-rank", "4",
            "--lora-alpha", "8", "--eval-fraction", "0.2", "--eval-every", "0", "--out", str(tmp_path / "run")]
    assert main(argv + ["--steps", "3"]) == 0
    assert main(argv + ["--steps", "5"]) == 0  # resumes at step 3
    out = capsys.readouterr().out
    assert "kept 12" in out and "resumed from" in out and "at step 3 (data position 6)" in out
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5] and rows[0]["lr"] == 0.0
    lo = load_adapters(str(tmp_path / "run" / "adapters"), CFG, rank=4, alpha=8.0)
    assert sorted(lo.layers) == sorted(["q", "kv", "gate", "up", "down"])
    assert float(jnp.abs(lo.layers["q"]["b"]).max()) > 0  # trained: B left its zero init
    with pytest.raises(UsageError, match="--base"):
        main(["--data", str(tmp_path / "sft.csv")])  # --data without --base


# ---------------------------------------------------------------------------------------------- non-finite guard


def test_nonfinite_steps_are_skipped_counted_and_stop_the_run(params, tokenizer, tmp_path, monkeypatch):
    """Fault injection: the loss of any micro-batch holding a token only example 5 contains is made NaN. Exactly
    the steps whose batch holds that example are skipped (AdamW count does not advance, adapters stay finite) and
    counted; max_nonfinite in a row stop the run with a NonFiniteError naming the step, leaving finite
    checkpoints up to the step before."""
    import sft.train as sft_train
    from train.optim import NonFiniteError
    from train.state import CheckpointManager

    exs = [encode_example(_record(i), tokenizer, 64) for i in range(8)]
    counts = [set(e.tokens.tolist()) for e in exs]
    marker = next(t for t in counts[5] if sum(t in c for c in counts) == 1)
    clean = sft_train.nll_sum

    def poisoned(lo, base, batch, cfg, shard=None):
        total, n = clean(lo, base, batch, cfg, shard)
        return jnp.where(jnp.any(batch["tokens"] == marker), jnp.nan, total), n

    monkeypatch.setattr(sft_train, "nll_sum", poisoned)
    data = SFTData(exs, batch_size=4, max_len=64, seed=0)
    hp = HParams(lr=1e-2, warmup_steps=0, steps=8, weight_decay=0.0, clip=1.0, grad_accum=1, max_nonfinite=3,
                 b2=0.9871)  # an hp no other test uses: the poisoned trace is never reused from jit's cache
    bad = [s for s in range(8) if marker in data.batch(s)["tokens"]]
    assert len(bad) == 4  # one of the 2 batches in each of the 4 epochs
    try:
        lo, opt, _ = train_loop(CFG, params, init_lora(CFG, 4, 8.0, seed=0), data, hp, str(tmp_path / "a"),
                                save_every=0, print_fn=lambda *a: None)
        rows = [json.loads(line) for line in open(tmp_path / "a" / "metrics.jsonl")]
        assert [r["step"] - 1 for r in rows if r["nonfinite_skipped"]] == bad
        assert int(opt["count"]) == 8 - len(bad)
        assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(lo))

        stop = dataclasses.replace(hp, max_nonfinite=1)
        with pytest.raises(NonFiniteError, match=f"step {bad[0] + 1}:"):
            train_loop(CFG, params, init_lora(CFG, 4, 8.0, seed=0), data, stop, str(tmp_path / "b"), save_every=1,
                       print_fn=lambda *a: None)
        assert CheckpointManager(str(tmp_path / "b" / "checkpoints")).steps() == list(range(1, bad[0] + 1))
    finally:
        jax.clear_caches()
