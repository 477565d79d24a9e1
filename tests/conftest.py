"""Shared test setup: 8 fake CPU devices (for sharding tests), float32 everywhere, and small real artifacts
(sentencepiece tokenizers trained here: Gemma 1-3's turn markers, and Gemma 4's) built once per session."""

import os

# Must happen before jax is imported anywhere: the sharding tests need a fake 8-device CPU mesh.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

SPECIAL_PIECES = ["<start_of_turn>", "<end_of_turn>", "<reasoning>", "</reasoning>", "<answer>", "</answer>"]
# Gemma 4's turn markers in place of Gemma 1-3's (gemma_jax/tokenizer.py picks the format by these pieces).
GEMMA4_PIECES = ["<|turn>", "<turn|>", "<reasoning>", "</reasoning>", "<answer>", "</answer>"]


def train_test_tokenizer(out_dir, vocab_size=512, corpus_lines=None, pieces=SPECIAL_PIECES):
    """Train a small BPE sentencepiece model with Gemma's special-id layout: pad 0, eos 1, bos 2, unk 3, then
    `pieces` (the turn markers and the reasoning/answer tags) as user-defined pieces. Returns the path of
    tokenizer.model."""
    import sentencepiece as spm

    os.makedirs(out_dir, exist_ok=True)
    corpus = os.path.join(out_dir, "corpus.txt")
    lines = corpus_lines or [
        f"Question {i}: what is {i} plus {i * 3}? The answer is {i * 4}. Reasoning step by step about numbers."
        for i in range(400)
    ] + ["The quick brown fox jumps over the lazy dog. Write a short story about a cat named Tom."] * 50
    with open(corpus, "w") as f:
        f.write("\n".join(lines))
    prefix = os.path.join(out_dir, "tokenizer")
    spm.SentencePieceTrainer.Train(
        input=corpus, model_prefix=prefix, vocab_size=vocab_size, model_type="bpe",
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, user_defined_symbols=list(pieces),
        byte_fallback=True, character_coverage=1.0, num_threads=1, minloglevel=2,
        # Like Gemma's tokenizer: keep text as is (newlines, runs of spaces), no dummy prefix.
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
    )
    return prefix + ".model"


@pytest.fixture(scope="session")
def tokenizer_path(tmp_path_factory):
    return train_test_tokenizer(str(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="session")
def tokenizer(tokenizer_path):
    from gemma_jax.tokenizer import Tokenizer

    return Tokenizer(tokenizer_path)


@pytest.fixture(scope="session")
def gemma4_tokenizer(tmp_path_factory):
    from gemma_jax.tokenizer import Tokenizer

    return Tokenizer(train_test_tokenizer(str(tmp_path_factory.mktemp("tok4")), pieces=GEMMA4_PIECES))
