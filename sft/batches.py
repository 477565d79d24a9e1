"""SFT examples to training batches: chat-template tokenisation, completion-only loss mask, truncation, packing.

One example is the Gemma-IT chat turn pair (docs/reference.md#tokenizer-and-chat-template):

    <bos><start_of_turn>user\\n{system}\\n\\n{prompt}<end_of_turn>\\n<start_of_turn>model\\n   (prompt: masked)
    {render_completion(reasoning, answer)}<end_of_turn>                                  (target: trained)

The target ends with `<end_of_turn>` and nothing else. Gemma-IT closes every model turn with `<end_of_turn>` and
stops there (its generation config stops on eos 1 or `<end_of_turn>` 107); the template's "\\n" after it and an
eos are never sampled, so training on them would only teach tokens the sampler never reaches.

Truncation when prompt + target > max_len, in this order:
  1. the prompt's user text is cut from the LEFT (the question is usually at its end); the head
     `<bos><start_of_turn>user\\n{system}\\n\\n` and the tail `<end_of_turn>\\n<start_of_turn>model\\n` are kept whole;
  2. only when the user text is gone, the target is cut from the right (it then lacks its `<end_of_turn>`).

Batches are dicts of numpy arrays, all [B, T]:
    tokens int32; loss_mask bool (True where the token is a TARGET: a completion token, never prompt or padding;
    token t+1 is predicted from position t, so the loss reads loss_mask[:, 1:], as Tunix's `input_mask` does);
    pad_mask bool (real tokens); positions int32 (restart at 0 in every packed segment); segment_ids int32
    (1, 2, ... per packed example, 0 on padding).
"""

import dataclasses

import numpy as np

from gemma_jax.tokenizer import END_OF_TURN
from rewards.tags import render_completion


@dataclasses.dataclass(frozen=True)
class Example:
    tokens: np.ndarray  # int32 [n]
    loss_mask: np.ndarray  # bool [n], True on target tokens

    def __len__(self):
        return len(self.tokens)


def encode_example(record: dict, tokenizer, max_len: int, *, where: str = "record") -> Example:
    """Tokenise one SFT record {"prompt", "reasoning", "answer", "system"?} and truncate it to max_len tokens."""
    for key in ("prompt", "reasoning", "answer"):
        if not isinstance(record.get(key), str):
            raise ValueError(f"{where}: field {key!r} must be a string, got {type(record.get(key)).__name__}")
    if tokenizer.end_of_turn_id is None:
        raise ValueError(f"{tokenizer.path}: tokenizer has no {END_OF_TURN} piece (needed to end the target)")
    system = record.get("system") or None
    head, _, tail = tokenizer.chat_parts(record["prompt"], system)
    target = tokenizer.encode(render_completion(record["reasoning"], record["answer"])) + [tokenizer.end_of_turn_id]
    fixed = len(head) + len(tail)
    if fixed >= max_len:
        raise ValueError(f"{where}: max_len {max_len} leaves no room after the chat head and tail ({fixed} tokens)")
    # Too long: first drop the oldest user text (the shared rule, Tokenizer.encode_chat_within), then shorten the
    # target from its end.
    prompt_ids = tokenizer.encode_chat_within(record["prompt"], system, max(max_len - len(target), fixed),
                                              min_message_tokens=0)
    target = target[:max_len - len(prompt_ids)]
    tokens = np.asarray(prompt_ids + target, np.int32)
    mask = np.zeros(len(tokens), bool)
    mask[len(prompt_ids):] = True
    return Example(tokens=tokens, loss_mask=mask)


def plan_rows(lengths, max_len: int, pack: bool) -> list[list[int]]:
    """Which examples go in which row. Without packing one example per row; with packing, consecutive examples
    share a row while they fit (data order kept, so resuming at a row index is deterministic)."""
    rows, current, used = [], [], 0
    for i, n in enumerate(lengths):
        if n > max_len:
            raise ValueError(f"example {i} has {n} tokens > max_len {max_len}; encode it with the same max_len")
        if not pack:
            rows.append([i])
            continue
        if current and used + n > max_len:
            rows.append(current)
            current, used = [], 0
        current.append(i)
        used += n
    if current:
        rows.append(current)
    return rows


def make_batch(rows: list[list[Example]], seq_len: int, pad_id: int = 0) -> dict:
    """Right-padded [B, seq_len] arrays from rows of one or more (packed) examples."""
    B = len(rows)
    out = {
        "tokens": np.full((B, seq_len), pad_id, np.int32),
        "loss_mask": np.zeros((B, seq_len), bool),
        "pad_mask": np.zeros((B, seq_len), bool),
        "positions": np.zeros((B, seq_len), np.int32),
        "segment_ids": np.zeros((B, seq_len), np.int32),
    }
    for b, row in enumerate(rows):
        t = 0
        for seg, ex in enumerate(row, start=1):
            n = len(ex)
            if t + n > seq_len:
                raise ValueError(f"batch row {b}: {t + n} tokens do not fit seq_len {seq_len}")
            out["tokens"][b, t: t + n] = ex.tokens
            out["loss_mask"][b, t: t + n] = ex.loss_mask
            out["loss_mask"][b, t] = False  # a segment's first token is never a target (no cross-segment target)
            out["pad_mask"][b, t: t + n] = True
            out["positions"][b, t: t + n] = np.arange(n)
            out["segment_ids"][b, t: t + n] = seg
            t += n
    return out


def bucket_length(n: int, max_len: int, buckets=None) -> int:
    """Smallest bucket >= n (buckets sorted ascending, each <= max_len), or max_len without buckets.
    Few distinct lengths means few compiles while short batches stay short."""
    for size in sorted(buckets or ()):
        if size >= n and size <= max_len:
            return size
    return max_len


class SFTData:
    """Encoded examples served as deterministic batches: batch `i` depends only on (seed, i), so resuming at a
    saved batch index replays exactly the same stream. Rows are shuffled per epoch with seed + epoch."""

    def __init__(self, examples: list[Example], batch_size: int, max_len: int, *, pack: bool = False,
                 buckets=None, seed: int = 0, shuffle: bool = True, pad_id: int = 0):
        if not examples:
            raise ValueError("SFTData: no examples")
        self.examples, self.batch_size, self.max_len = examples, batch_size, max_len
        self.rows = plan_rows([len(e) for e in examples], max_len, pack)
        if len(self.rows) < batch_size:
            raise ValueError(f"SFTData: {len(self.rows)} rows < batch size {batch_size}")
        self.buckets, self.seed, self.shuffle, self.pad_id = buckets, seed, shuffle, pad_id
        self.batches_per_epoch = len(self.rows) // batch_size  # the last partial batch of an epoch is dropped

    def _order(self, epoch: int):
        if not self.shuffle:
            return np.arange(len(self.rows))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.rows))

    def batch(self, index: int) -> dict:
        epoch, k = divmod(index, self.batches_per_epoch)
        picks = self._order(epoch)[k * self.batch_size: (k + 1) * self.batch_size]
        rows = [[self.examples[i] for i in self.rows[r]] for r in picks]
        longest = max(sum(len(e) for e in row) for row in rows)
        return make_batch(rows, bucket_length(longest, self.max_len, self.buckets), self.pad_id)

    def micro_batches(self, start: int, k: int) -> dict:
        """Batches start ... start + k - 1 stacked on a leading axis [k, B, T] (one optimizer step).
        All k are padded to the longest of them so they stack."""
        parts = [self.batch(start + j) for j in range(k)]
        T = max(p["tokens"].shape[1] for p in parts)
        pad = {"tokens": self.pad_id}
        return {key: np.stack([np.pad(p[key], ((0, 0), (0, T - p[key].shape[1])), constant_values=pad.get(key, 0))
                               for p in parts]) for key in parts[0]}
