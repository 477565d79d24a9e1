"""Per-step training metrics, shared by SFT and GRPO: every metric as one JSON line per record in
`{out_dir}/metrics.jsonl` (and, optionally, as TensorBoard scalars), and a short console line per step with the
handful of numbers a person watches (CONSOLE_KEYS).

Step time is the wall time between consecutive `log` calls; the first step (which includes compilation) is left
out of the ETA, which uses the median of the last 20 step times.
"""

import json
import math
import os
import struct
import time

_WINDOW = 20
# (metric key, console label) in print order; a key missing from a step's metrics is skipped.
CONSOLE_KEYS = (
    ("loss", "loss"), ("reward/mean", "reward"), ("reward/domain_math_mean", "math"),
    ("reward/domain_general_mean", "general"), ("strict_format_rate", "format"), ("math_accuracy", "math acc"),
    ("prob_reward_mean", "prob"), ("kl", "kl"), ("entropy", "entropy"), ("completion_len_mean", "len"),
    ("grad_norm", "|g|"), ("lr", "lr"), ("tokens_per_s", "tok/s"),
)


def _fmt_duration(seconds: float) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def _fmt_value(key: str, v) -> str:
    if key == "lr":
        return f"{v:.2e}"
    if float(v).is_integer() or key.endswith("_per_s"):
        return f"{v:.0f}"
    return f"{v:.3e}" if abs(v) < 1e-3 or abs(v) >= 1e5 else f"{v:.4f}"


class MetricsLogger:
    """`log(step, metrics)` appends {"step", "time", **metrics, "step_s", "tokens_per_s", "eta_s"} to metrics.jsonl
    and prints one line. Values must be numbers (jax/numpy scalars are converted). `tokens` in metrics (tokens
    processed this step) gives tokens/s."""

    def __init__(self, out_dir: str, total_steps: int | None = None, *, print_fn=print, prefix: str = "",
                 tensorboard: bool = False):
        os.makedirs(out_dir, exist_ok=True)
        self.path = os.path.join(out_dir, "metrics.jsonl")
        self.total_steps, self.print_fn, self.prefix = total_steps, print_fn, prefix
        self._file = open(self.path, "a")
        self._tb = TensorBoardWriter(os.path.join(out_dir, "tensorboard")) if tensorboard else None
        self._last_time = None
        self._step_times = []
        self._timed = 0

    def start(self):
        """Mark the start of the first timed step (otherwise the first step is timed from its own log call)."""
        self._last_time = time.perf_counter()

    def eta_seconds(self, step: int) -> float | None:
        if self.total_steps is None or not self._step_times:
            return None
        recent = sorted(self._step_times[-_WINDOW:])
        return recent[len(recent) // 2] * max(self.total_steps - step, 0)

    def log(self, step: int, metrics: dict, *, kind: str = "train") -> dict:
        """Record one step (kind "train") or an evaluation (any other kind: no timing, no ETA)."""
        now = time.perf_counter()
        row = {"step": int(step), "kind": kind, "time": time.time()}
        row.update({k: _to_number(k, v) for k, v in metrics.items()})
        if kind == "train":
            if self._last_time is not None:
                dt = now - self._last_time
                row["step_s"] = dt
                if self._timed:  # the first timed step includes compilation: not in the ETA
                    self._step_times.append(dt)
                self._timed += 1
                if "tokens" in row and dt > 0:
                    row["tokens_per_s"] = row["tokens"] / dt
            self._last_time = now
            row["eta_s"] = self.eta_seconds(step)
        elif self._last_time is not None:
            self._last_time = time.perf_counter()  # an evaluation's time is not the next train step's
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._tb is not None:
            self._tb.scalars(step, {f"{kind}/{k}": v for k, v in row.items() if k not in ("step", "kind", "time")
                                    and v is not None}, wall_time=row["time"])
        self.print_fn(self._console_line(row))
        return row

    def _console_line(self, row: dict) -> str:
        total = f"/{self.total_steps}" if self.total_steps else ""
        parts = [f"{self.prefix}{row['kind']} {row['step']}{total}"]
        for key, label in CONSOLE_KEYS:
            v = row.get(key)
            if v is not None and not (isinstance(v, float) and math.isnan(v)):
                parts.append(f"{label} {_fmt_value(key, v)}")
        if row["kind"] == "train":
            parts.append(f"eta {_fmt_duration(row.get('eta_s'))}")
        return " | ".join(parts)

    def close(self):
        self._file.close()
        if self._tb is not None:
            self._tb.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _to_number(key, v):
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise ValueError(f"metric {key!r}: expected a number, got {type(v).__name__}") from None
    return int(f) if isinstance(v, int) else f


def read_metrics(out_dir: str, kind: str | None = None) -> list[dict]:
    """All records of `{out_dir}/metrics.jsonl` (optionally only one kind)."""
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r for r in rows if kind is None or r["kind"] == kind]


# ---------------------------------------------------------------------------------------------- TensorBoard
# TensorBoard reads "event files": TFRecord framing around serialized `Event` protocol buffers. Writing scalars
# needs only three messages, so they are encoded here by hand instead of depending on tensorboard or tensorflow:
#   Event   {1: wall_time (double), 2: step (int64), 3: file_version (string), 5: summary (Summary)}
#   Summary {1: value (repeated Value)};  Value {1: tag (string), 2: simple_value (float)}
# (tensorboard/compat/proto/event.proto and summary.proto). TFRecord: length (uint64 LE), masked CRC32C of the
# length, the data, masked CRC32C of the data (tensorflow/core/lib/io/record_writer.cc).

def _crc32c_table():
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_CRC32C = _crc32c_table()


def crc32c(data: bytes) -> int:
    c = 0xFFFFFFFF
    for b in data:
        c = _CRC32C[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
    c = crc32c(data)
    return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # int64 fields encode negatives as ten-byte two's complement
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, wire: int, payload: bytes) -> bytes:
    return _varint(number << 3 | wire) + payload


def _bytes_field(number: int, data: bytes) -> bytes:
    return _field(number, 2, _varint(len(data)) + data)


def encode_event(wall_time: float, step: int, *, scalars: dict | None = None, file_version: str | None = None):
    """One serialized Event: a file-version header, or scalar summaries {tag: value} at `step`."""
    msg = _field(1, 1, struct.pack("<d", wall_time)) + _field(2, 0, _varint(int(step)))
    if file_version is not None:
        msg += _bytes_field(3, file_version.encode())
    if scalars:
        values = b"".join(_bytes_field(1, _bytes_field(1, tag.encode()) + _field(2, 5, struct.pack("<f", v)))
                          for tag, v in scalars.items())
        msg += _bytes_field(5, values)
    return msg


class TensorBoardWriter:
    """Scalars into `{log_dir}/events.out.tfevents.<time>.nanotunix` (view with `tensorboard --logdir log_dir`)."""

    def __init__(self, log_dir: str):
        os.makedirs(log_dir, exist_ok=True)
        self.path = os.path.join(log_dir, f"events.out.tfevents.{int(time.time())}.nanotunix")
        self._file = open(self.path, "ab")
        self._write(encode_event(time.time(), 0, file_version="brain.Event:2"))

    def _write(self, data: bytes):
        header = struct.pack("<Q", len(data))
        self._file.write(header + struct.pack("<I", _masked_crc(header)) + data + struct.pack("<I", _masked_crc(data)))
        self._file.flush()

    def scalars(self, step: int, values: dict, wall_time: float | None = None):
        finite = {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        if finite:
            self._write(encode_event(time.time() if wall_time is None else wall_time, step, scalars=finite))

    def close(self):
        self._file.close()
