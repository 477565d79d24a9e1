"""Streaming row readers for parquet, CSV and JSONL files (chosen by file extension), yielding plain dicts.

`iter_rows(path, columns)` yields `(row_index, row)` one row at a time, reading the file in batches, so a multi-GB
file never has to fit in memory. `row` is a dict, or a `BadRow` for a row that could not be parsed at all:

- parquet (`.parquet`, `.pq`): `pyarrow.parquet.ParquetFile.iter_batches`; nested columns (list<struct>, struct)
  come back as Python lists and dicts, exactly as `datasets` shows them.
- CSV (`.csv`, `.csv.gz`): Python's `csv` module, every value a string (so "007" stays "007" and an answer column
  is never guessed to be a number), quoted values may hold newlines, blank lines skipped. A row with the wrong
  number of fields, or with bytes that are not UTF-8, is yielded as a `BadRow` naming its line(s) (or, with
  `on_bad_line="raise"`, raised as a ValueError).
- JSONL (`.jsonl`, `.jsonl.gz`, `.ndjson`): one JSON object per line, blank lines skipped. Decision: a line that is
  not valid UTF-8 JSON, or not an object, is yielded as a `BadRow` naming the file and line (so it is counted as a
  dropped row, never fatal) unless `on_bad_line="raise"`, which raises a ValueError naming the file and line.

Required columns: for parquet and CSV the file has a schema, so a missing required column is a file-level mistake
and raises a ValueError naming the file, the missing columns and the columns found. JSONL has no schema: a line
that lacks a key simply comes back without it (the converters count it as a `missing_column` drop).
"""

import csv
import gzip
import json
import os
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

FORMATS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".csv.gz": "csv",
           ".jsonl": "jsonl", ".jsonl.gz": "jsonl", ".ndjson": "jsonl"}


@dataclass(frozen=True)
class BadRow:
    """A row that could not be parsed; `reason` is the drop-report key, `message` names the file and row."""
    reason: str
    message: str


def file_format(path) -> str:
    """'parquet' | 'csv' | 'jsonl', from the file name's extension."""
    name = os.fspath(path).lower()
    for ext in sorted(FORMATS, key=len, reverse=True):
        if name.endswith(ext):
            return FORMATS[ext]
    raise ValueError(f"{path}: unsupported file type; expected one of {sorted(FORMATS)}")


def iter_rows(path, columns=None, batch_size: int = 1024, *, optional_columns=(),
              on_bad_line: str = "drop") -> Iterator[tuple[int, dict | BadRow]]:
    """Stream `(row_index, row)` from a parquet, CSV or JSONL file.

    columns: required columns (None: all columns); optional_columns: also read when the file has them.
    row_index is the 0-based data row for parquet/CSV and the 0-based line number for JSONL.
    """
    path = os.fspath(path)
    fmt = file_format(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if on_bad_line not in ("drop", "raise"):
        raise ValueError(f"on_bad_line must be 'drop' or 'raise', got {on_bad_line!r}")
    columns = None if columns is None else list(columns)
    if fmt == "parquet":
        return _iter_parquet(path, columns, tuple(optional_columns), batch_size)
    if fmt == "csv":
        return _iter_csv(path, columns, tuple(optional_columns), on_bad_line)
    return _iter_jsonl(path, columns, tuple(optional_columns), on_bad_line)


def _select(path, found, columns, optional):
    if columns is None:
        return list(found)
    missing = [c for c in columns if c not in found]
    if missing:
        raise ValueError(f"{path}: missing required column(s) {missing}; columns found: {list(found)}")
    return columns + [c for c in optional if c in found and c not in columns]


def _iter_parquet(path, columns, optional, batch_size):
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"{path}: not a readable parquet file ({e})") from None
    read = _select(path, pf.schema_arrow.names, columns, optional)
    i = 0
    try:
        for batch in pf.iter_batches(batch_size=batch_size, columns=read):
            for row in batch.to_pylist():
                yield i, row
                i += 1
    except pa.ArrowException as e:
        raise ValueError(f"{path}: failed reading parquet near row {i} ({e})") from None


def _open_text(path):
    """A CSV file as text: gzip by its name, UTF-8 with an optional BOM, undecodable bytes kept as surrogates (each
    reader checks its own rows), newlines left to the csv module (quoted values may hold them)."""
    opener = gzip.open if path.lower().endswith(".gz") else open
    return opener(path, "rt", encoding="utf-8-sig", errors="surrogateescape", newline="")


def _not_utf8(fields) -> bool:
    try:
        "".join(fields).encode("utf-8")
        return False
    except UnicodeEncodeError:  # a byte surrogateescape kept
        return True


def _csv_header(path, f) -> tuple[list, int]:
    """(column names, lines read): the first non-empty record of the open CSV file f, which is left just past it.
    The names equal pyarrow's CSV reader's (UTF-8 BOM dropped, blank lines before them skipped, quoted names
    holding commas, quotes and newlines: tests compare them); a header that only a lenient parser reads (an
    unterminated quote, text after a closing quote) is an error."""
    try:
        records = csv.reader(f, strict=True)
        names = next((record for record in records if record), None)
        if names is None:
            raise ValueError("no header row")
        if _not_utf8(names):
            raise ValueError("a column name is not valid UTF-8")
    except (OSError, EOFError, zlib.error, ValueError, csv.Error) as e:
        raise ValueError(f"{path}: not a readable CSV file (header: {e})") from None
    return names, records.line_num


def _iter_csv(path, columns, optional, on_bad_line):
    """Python's csv module, not pyarrow's CSV reader: it tells each record's line, and it runs no threads. (pyarrow's
    streaming reader reads ahead on threads of its own that hold our Python bad-row handler; a process that exited
    right after dropping such a reader, as a missing-column error does, aborted now and then with "terminate called
    without an active exception" when one of those threads let go of the handler. The price: 300k rows of 3
    columns take 0.31-0.38 s here against pyarrow's 0.10-0.19 s, little next to tokenizing them.)"""
    csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))  # long traces: the default limit is 128 KB a field
    with _open_text(path) as f:
        header, header_lines = _csv_header(path, f)
        where = {c: header.index(c) for c in _select(path, header, columns, optional)}  # column -> field number
        records = csv.reader(f)  # the rest of f, lenient as pyarrow is: '"a"b' reads as 'ab'
        i, line = 0, header_lines  # i: the data row's index; line: the last line read
        try:
            for record in records:
                first, line = line + 1, header_lines + records.line_num
                if not record:  # a blank line
                    continue
                problem = (f"CSV row with {len(record)} fields, expected {len(header)}" if len(record) != len(header)
                           else "not valid UTF-8" if _not_utf8([record[j] for j in where.values()]) else None)
                if problem:
                    at = f"line {first}" if first == line else f"lines {first}-{line}"
                    msg = f"{path}: {at}: {problem}: {','.join(record)[:80]!r}"
                    if on_bad_line == "raise":
                        raise ValueError(msg)
                    yield i, BadRow("bad_csv_row", msg)
                else:
                    yield i, {c: record[j] for c, j in where.items()}
                i += 1
        except (OSError, EOFError, zlib.error, csv.Error) as e:
            raise ValueError(f"{path}: failed reading CSV after line {line} ({e})") from None


def _iter_jsonl(path, columns, optional, on_bad_line):
    keys = None if columns is None else columns + [c for c in optional if c not in columns]
    opener = gzip.open if path.lower().endswith(".gz") else open
    with opener(path, "rb") as f:
        for lineno, raw in enumerate(f):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw.decode("utf-8"))
                if not isinstance(obj, dict):
                    raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
            except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
                msg = f"{path}: line {lineno + 1}: invalid JSONL row ({e})"
                if on_bad_line == "raise":
                    raise ValueError(msg) from None
                yield lineno, BadRow("bad_json", msg)
                continue
            yield lineno, obj if keys is None else {k: obj[k] for k in keys if k in obj}


def iter_sources(sources, columns=None, *, optional_columns=(), batch_size: int = 1024,
                 on_bad_line: str = "drop") -> Iterator[tuple[str, dict | BadRow]]:
    """Stream `(where, row)` over one path, several paths, or an iterable of dicts; `where` is "file:row N"
    (or "<records>[i]") for drop reports and error messages."""
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    elif isinstance(sources, dict):
        raise ValueError("sources must be a path, a list of paths or an iterable of row dicts, got one dict")
    sources = iter(sources)
    first = next(sources, None)
    if first is None:
        return
    if isinstance(first, (str, os.PathLike)):
        for path in _chain(first, sources):
            if not isinstance(path, (str, os.PathLike)):
                raise ValueError(f"sources mixes paths and {type(path).__name__}")
            for i, row in iter_rows(path, columns, batch_size, optional_columns=optional_columns,
                                    on_bad_line=on_bad_line):
                yield f"{os.fspath(path)}: row {i}", row
        return
    for i, row in enumerate(_chain(first, sources)):
        yield f"<records>[{i}]", row if isinstance(row, dict) else BadRow(
            "wrong_type", f"<records>[{i}]: expected a dict, got {type(row).__name__}")


def _chain(first, rest: Iterable):
    yield first
    yield from rest
