"""train/metrics.py: the hand-written TensorBoard event files read back by TensorBoard's own reader (tensorboard is
a test-only dependency), the CRC32C check value, and what the console line shows against what metrics.jsonl keeps."""

import json
import math
import re

import numpy as np
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.compat.proto.event_pb2 import Event
from tensorboard.summary.writer.record_writer import masked_crc32c

from train.metrics import (
    CONSOLE_KEYS,
    MetricsLogger,
    TensorBoardWriter,
    _masked_crc,
    crc32c,
    encode_event,
    read_metrics,
)

F32 = lambda v: float(np.float32(v))  # noqa: E731  TensorBoard keeps scalars as float32


def _read(log_dir) -> EventAccumulator:
    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return acc


def test_crc32c_check_value_and_mask_match_tensorboard():
    assert crc32c(b"123456789") == 0xE3069283  # the standard CRC-32C (Castagnoli) check value
    assert crc32c(b"") == 0
    for data in (b"", b"123456789", bytes(range(256)) * 3):
        assert _masked_crc(data) == masked_crc32c(data)


def test_encoded_event_is_the_protobuf_tensorboard_parses():
    ev = Event.FromString(encode_event(1234.5, 2**40 + 3, scalars={"train/loss": 1 / 3, "a/b c": -2.5}))
    assert (ev.wall_time, ev.step) == (1234.5, 2**40 + 3)
    assert [(v.tag, v.simple_value) for v in ev.summary.value] == [("train/loss", F32(1 / 3)), ("a/b c", -2.5)]
    header = Event.FromString(encode_event(7.0, 0, file_version="brain.Event:2"))
    assert (header.file_version, header.step, len(header.summary.value)) == ("brain.Event:2", 0, 0)
    assert Event.FromString(encode_event(0.0, -5)).step == -5  # int64 negatives: ten-byte varint


def test_writer_round_trips_through_event_accumulator(tmp_path):
    w = TensorBoardWriter(str(tmp_path))
    values = {0: {"loss": 2.0, "lr": 1e-6}, 1: {"loss": 1 / 3, "lr": 2e-6, "nan": float("nan")}, 100_000: {"loss": 0.1}}
    for step, scalars in values.items():
        w.scalars(step, scalars, wall_time=1000.0 + step)
    w.close()
    acc = _read(tmp_path)
    assert sorted(acc.Tags()["scalars"]) == ["loss", "lr"]  # the non-finite value is not written
    assert [(e.step, e.wall_time, e.value) for e in acc.Scalars("loss")] == [
        (0, 1000.0, 2.0), (1, 1001.0, F32(1 / 3)), (100_000, 101_000.0, F32(0.1))]
    assert [(e.step, e.value) for e in acc.Scalars("lr")] == [(0, F32(1e-6)), (1, F32(2e-6))]


# A GRPO step's metrics: some keys the console shows (CONSOLE_KEYS), some only metrics.jsonl keeps.
GRPO_METRICS = {"loss": 0.5, "reward/mean": 0.25, "reward/domain_math_mean": 0.75, "kl": np.float32(0.0123),
                "entropy": 1.5, "completion_len_mean": 37.5, "grad_norm": 2.0, "lr": 1e-6, "tokens": 1000,
                "ratio_max": 1.2, "ratio_min": 0.8, "clip_frac_lower": 0.0, "pg_loss": -0.125}


def test_console_line_shows_the_console_keys_and_jsonl_keeps_all(tmp_path):
    lines = []
    with MetricsLogger(str(tmp_path), total_steps=10, print_fn=lines.append) as log:
        log.start()
        row = log.log(3, GRPO_METRICS)
    parts = lines[0].split(" | ")
    assert parts[0] == "train 3/10" and parts[-1] == "eta ?"  # the first timed step is not in the ETA
    labels = [p.rsplit(" ", 1)[0] for p in parts[1:-1]]
    assert labels == ["loss", "reward", "math", "kl", "entropy", "len", "|g|", "lr", "tok/s"]
    assert labels == [label for key, label in CONSOLE_KEYS if key in row]
    assert re.fullmatch(r"train 3/10 \| loss 0\.5000 \| reward 0\.2500 \| math 0\.7500 \| kl 0\.0123 \| "
                        r"entropy 1\.5000 \| len 37\.5000 \| \|g\| 2 \| lr 1\.00e-06 \| tok/s \d+ \| eta \?", lines[0])
    assert not any(k in lines[0] for k in ("ratio", "clip_frac", "pg_loss", "tokens "))
    (saved,) = read_metrics(str(tmp_path))
    assert set(saved) == {"step", "kind", "time", *GRPO_METRICS, "step_s", "tokens_per_s", "eta_s"}
    assert {k: saved[k] for k in GRPO_METRICS} == {k: float(v) if k != "tokens" else v for k, v in GRPO_METRICS.items()}
    assert saved["eta_s"] is None and saved["tokens_per_s"] == 1000 / saved["step_s"]


def test_metrics_logger_tensorboard_matches_metrics_jsonl(tmp_path):
    with MetricsLogger(str(tmp_path), total_steps=3, print_fn=lambda s: None, tensorboard=True) as log:
        for step in (1, 2, 3):
            log.log(step, {"loss": 1 / step, "ratio_max": np.float32(1 + step / 10), "tokens": 10 * step})
        log.log(3, {"math_accuracy": 0.375, "completion_len_mean": float("nan")}, kind="eval")
    rows = read_metrics(str(tmp_path))
    acc = _read(tmp_path / "tensorboard")
    # every number of metrics.jsonl, under kind/key; None (the first ETAs) and NaN are not scalars
    expected = {f"{r['kind']}/{k}": [] for r in rows for k in r if k not in ("step", "kind", "time")}
    for r in rows:
        for k, v in r.items():
            if k not in ("step", "kind", "time") and v is not None and math.isfinite(v):
                expected[f"{r['kind']}/{k}"].append((r["step"], F32(v)))
    expected = {tag: points for tag, points in expected.items() if points}
    assert sorted(acc.Tags()["scalars"]) == sorted(expected)
    assert {"train/loss", "train/ratio_max", "train/tokens", "train/step_s", "eval/math_accuracy"} <= set(expected)
    assert "eval/completion_len_mean" not in expected and "eval/step_s" not in expected
    for tag, points in expected.items():
        assert [(e.step, e.value) for e in acc.Scalars(tag)] == points, tag
    assert [e.value for e in acc.Scalars("train/loss")] == [1.0, 0.5, F32(1 / 3)]
    assert [e.wall_time for e in acc.Scalars("train/loss")] == [r["time"] for r in rows if r["kind"] == "train"]
    assert json.loads(open(tmp_path / "metrics.jsonl").readline())["ratio_max"] == float(np.float32(1.1))
