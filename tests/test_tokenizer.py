"""Tokenizer tests on a small sentencepiece model trained in conftest with Gemma's special-id layout: special and
turn-marker ids, stop ids, encode/decode round trips, the exact chat template, and errors on bad files; the same
for a model with Gemma 4's turn markers `<|turn>` / `<turn|>` and its system turn."""

import os

import pytest
import sentencepiece as spm

from gemma_jax.tokenizer import Tokenizer

CHAT = "<start_of_turn>user\n{}<end_of_turn>\n<start_of_turn>model\n"


def test_special_ids_follow_gemma_layout(tokenizer):
    assert (tokenizer.pad_id, tokenizer.eos_id, tokenizer.bos_id, tokenizer.sp.unk_id()) == (0, 1, 2, 3)
    assert [tokenizer.sp.IdToPiece(i) for i in range(4)] == ["<pad>", "</s>", "<s>", "<unk>"]


def test_turn_markers_and_tags_are_single_pieces(tokenizer):
    # The conftest model puts the user-defined pieces right after the specials (the real Gemma has 106 / 107).
    assert (tokenizer.start_of_turn_id, tokenizer.end_of_turn_id) == (4, 5)
    assert tokenizer.sp.IdToPiece(tokenizer.end_of_turn_id) == "<end_of_turn>"
    for piece in ["<start_of_turn>", "<end_of_turn>", "<reasoning>", "</reasoning>", "<answer>", "</answer>"]:
        assert tokenizer.encode(piece) == [tokenizer.sp.PieceToId(piece)]
    assert tokenizer.encode("<answer>42</answer>")[0] == tokenizer.sp.PieceToId("<answer>")


def test_stop_ids_are_eos_and_end_of_turn(tokenizer):
    assert tokenizer.stop_ids == (1, 5)


@pytest.mark.parametrize("text", [
    "The answer is 4.", "  two  spaces,\nnewline\n\n\ttab", "unicode: é ü 漢字 🙂 (byte fallback)",
    "<reasoning>2 + 2 = 4</reasoning><answer>4</answer>", "",
])
def test_encode_decode_round_trip(tokenizer, text):
    ids = tokenizer.encode(text)
    assert tokenizer.sp.unk_id() not in ids
    assert tokenizer.decode(ids) == text
    with_specials = tokenizer.encode(text, add_bos=True, add_eos=True)
    assert with_specials == [2] + ids + [1]
    assert tokenizer.decode(with_specials) == text  # bos dropped, stops at eos
    assert tokenizer.decode([0, 0] + ids) == text  # left padding dropped


def test_chat_template_exact_strings(tokenizer):
    assert tokenizer.chat_prompt("What is 2+2?") == CHAT.format("What is 2+2?")
    assert tokenizer.chat_prompt("What is 2+2?", "Be brief.") == CHAT.format("Be brief.\n\nWhat is 2+2?")
    assert tokenizer.chat_prompt("Hi", "") == CHAT.format("Hi")
    ids = tokenizer.encode_chat("What is 2+2?", "Be brief.")
    assert ids == [2] + tokenizer.encode(CHAT.format("Be brief.\n\nWhat is 2+2?"))
    assert ids[1] == 4 and ids.count(4) == 2 and ids.count(5) == 1
    assert tokenizer.sp.DecodeIds(ids[1:]) == CHAT.format("Be brief.\n\nWhat is 2+2?")


def test_decode_stops_at_end_of_turn_and_eos(tokenizer):
    answer, rest = tokenizer.encode("<answer>4</answer>"), tokenizer.encode(" trailing text")
    assert tokenizer.decode(answer + [5] + rest) == "<answer>4</answer>"
    assert tokenizer.decode(answer + [1] + rest) == "<answer>4</answer>"
    assert tokenizer.decode([5] + answer) == ""


def test_missing_tokenizer_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"tokenizer model not found: .*nowhere/tok.model"):
        Tokenizer(tmp_path / "nowhere" / "tok.model")
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path}/tokenizer.model"):
        Tokenizer(tmp_path)  # a folder means folder/tokenizer.model


def test_corrupt_tokenizer_file(tokenizer_path, tmp_path):
    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(open(tokenizer_path, "rb").read()[:200])
    with pytest.raises(ValueError, match=rf"{bad}: not a valid sentencepiece model"):
        Tokenizer(bad)
    garbage = tmp_path / "garbage.model"
    garbage.write_bytes(b"this is not a protobuf" * 10)
    with pytest.raises(ValueError, match=r"garbage.model: not a valid sentencepiece model"):
        Tokenizer(garbage)


def test_chat_needs_turn_markers(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"plain text line {i} with some words" for i in range(200)))
    spm.SentencePieceTrainer.Train(input=str(corpus), model_prefix=str(tmp_path / "plain"), vocab_size=64,
                                   model_type="bpe", pad_id=0, eos_id=1, bos_id=2, unk_id=3, minloglevel=2,
                                   num_threads=1)
    tok = Tokenizer(os.path.join(tmp_path, "plain.model"))
    assert tok.end_of_turn_id is None and tok.stop_ids == (1,)
    with pytest.raises(ValueError, match=r"plain.model: tokenizer lacks <start_of_turn> / <end_of_turn>"):
        tok.encode_chat("hi")


def test_encode_chat_within_keeps_the_template_and_the_last_message_tokens(tokenizer):
    """The one prompt-truncation rule (SFT and GRPO): head and tail kept, the oldest message tokens dropped."""
    message = " ".join(f"word{i}" for i in range(40)) + " What is 2+2?"
    full = tokenizer.encode_chat(message, "Be brief.")
    head, msg, tail = tokenizer.chat_parts(message, "Be brief.")
    assert head + msg + tail == full and head[0] == tokenizer.bos_id
    assert tokenizer.encode_chat_within(message, "Be brief.", len(full)) == full
    cut = tokenizer.encode_chat_within(message, "Be brief.", len(full) - 7)
    assert cut == head + msg[7:] + tail
    assert tokenizer.encode_chat_within(message, "Be brief.", len(head) + len(tail) + 1) == head + msg[-1:] + tail
    with pytest.raises(ValueError, match="no room for the message"):
        tokenizer.encode_chat_within(message, "Be brief.", len(head) + len(tail))
    assert tokenizer.encode_chat_within(message, "Be brief.", len(head) + len(tail), min_message_tokens=0) == \
        head + tail


# Gemma 4's published format (ai.google.dev/gemma/docs/core/prompt-formatting-gemma4; the generation prompt of the
# E2B/E4B chat_template.jinja): a system turn of its own, then the user turn, then the model turn's opener.
CHAT4 = "<|turn>system\n{}<turn|>\n<|turn>user\n{}<turn|>\n<|turn>model\n"


def test_gemma4_turn_markers_and_stop_ids(gemma4_tokenizer):
    tok = gemma4_tokenizer
    assert (tok.start_of_turn, tok.end_of_turn, tok.system_turn) == ("<|turn>", "<turn|>", True)
    assert (tok.start_of_turn_id, tok.end_of_turn_id) == (4, 5)  # read from the pieces (the real vocabulary: 105/106)
    assert tok.sp.PieceToId("<start_of_turn>") == tok.sp.unk_id()
    assert tok.stop_ids == (1, 5)
    answer = tok.encode("<answer>4</answer>")
    assert tok.decode(answer + [5] + tok.encode(" more")) == "<answer>4</answer>"


def test_gemma4_chat_template_exact_ids(gemma4_tokenizer):
    tok = gemma4_tokenizer
    assert tok.chat_prompt("What is 2+2?", "Be brief.") == CHAT4.format("Be brief.", "What is 2+2?")
    assert tok.chat_prompt("What is 2+2?") == "<|turn>user\nWhat is 2+2?<turn|>\n<|turn>model\n"
    assert tok.chat_prompt("Hi", "") == "<|turn>user\nHi<turn|>\n<|turn>model\n"
    e = tok.encode
    want = ([2, 4] + e("system\nBe brief.") + [5] + e("\n") + [4] + e("user\nWhat is 2+2?") + [5] + e("\n")
            + [4] + e("model\n"))
    assert tok.encode_chat("What is 2+2?", "Be brief.") == want
    assert want.count(4) == 3 and want.count(5) == 2 and tok.sp.DecodeIds(want[1:]) == CHAT4.format(
        "Be brief.", "What is 2+2?")


def test_gemma4_truncation_keeps_the_system_turn(gemma4_tokenizer):
    tok = gemma4_tokenizer
    message = " ".join(f"word{i}" for i in range(40)) + " What is 2+2?"
    full = tok.encode_chat(message, "Be brief.")
    head, msg, tail = tok.chat_parts(message, "Be brief.")
    assert head + msg + tail == full
    assert tok.sp.DecodeIds(head[1:]) == "<|turn>system\nBe brief.<turn|>\n<|turn>user\n"
    assert tok.sp.DecodeIds(tail) == "<turn|>\n<|turn>model\n"
    assert tok.encode_chat_within(message, "Be brief.", len(full) - 7) == head + msg[7:] + tail
