"""Per-step training metrics: one JSON line per record in `{out_dir}/metrics.jsonl` and one console line per step.

Shared by SFT and GRPO. Step time is the wall time between consecutive `log` calls; the first step (which
includes compilation) is left out of the ETA, which uses the median of the last 20 step times.
"""

import json
import math
import os
import time

_WINDOW = 20


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

    def __init__(self, out_dir: str, total_steps: int | None = None, *, print_fn=print, prefix: str = ""):
        os.makedirs(out_dir, exist_ok=True)
        self.path = os.path.join(out_dir, "metrics.jsonl")
        self.total_steps, self.print_fn, self.prefix = total_steps, print_fn, prefix
        self._file = open(self.path, "a")
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
        self.print_fn(self._console_line(row))
        return row

    def _console_line(self, row: dict) -> str:
        total = f"/{self.total_steps}" if self.total_steps else ""
        parts = [f"{self.prefix}{row['kind']} step {row['step']}{total}"]
        for k, v in row.items():
            if k in ("step", "kind", "time", "eta_s", "step_s"):
                continue
            parts.append(f"{k} {_fmt_value(k, v)}")
        if row["kind"] == "train":
            parts.append(f"eta {_fmt_duration(row.get('eta_s'))}")
        return " | ".join(parts)

    def close(self):
        self._file.close()

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
