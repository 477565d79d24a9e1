"""Streaming readers: parquet (nested columns, batches), CSV (strings only, multi-line values, bad rows), JSONL
(bad lines counted or fatal), required/optional columns, and errors that name the file."""

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data.readers import BadRow, file_format, iter_rows, iter_sources

CONV = pa.list_(pa.struct([("from", pa.string()), ("value", pa.string())]))


def _bespoke_table(n):
    return pa.table({
        "system": pa.array([f"sys {i}" for i in range(n)], pa.string()),
        "conversations": pa.array([[{"from": "user", "value": f"q{i}"}, {"from": "assistant", "value": f"a{i}"}]
                                   for i in range(n)], CONV),
    })


def test_parquet_streams_nested_rows_in_batches(tmp_path):
    path = tmp_path / "b.parquet"
    pq.write_table(_bespoke_table(5), path, row_group_size=2)
    rows = list(iter_rows(path, ["conversations"], batch_size=2))
    assert [i for i, _ in rows] == [0, 1, 2, 3, 4]
    assert rows[3][1] == {"conversations": [{"from": "user", "value": "q3"}, {"from": "assistant", "value": "a3"}]}
    # Optional columns come along only when present.
    row = next(iter_rows(path, ["conversations"], optional_columns=("system", "nope")))[1]
    assert sorted(row) == ["conversations", "system"] and row["system"] == "sys 0"
    assert sorted(next(iter_rows(path))[1]) == ["conversations", "system"]


def test_parquet_missing_column_names_file_and_columns_found(tmp_path):
    path = tmp_path / "b.parquet"
    pq.write_table(_bespoke_table(2), path)
    with pytest.raises(ValueError) as e:
        list(iter_rows(path, ["prompt", "conversations"]))
    msg = str(e.value)
    assert str(path) in msg and "['prompt']" in msg and "['system', 'conversations']" in msg


def test_corrupt_and_unknown_files(tmp_path):
    bad = tmp_path / "x.parquet"
    bad.write_bytes(b"not parquet at all")
    with pytest.raises(ValueError, match="x.parquet: not a readable parquet file"):
        list(iter_rows(bad))
    with pytest.raises(ValueError, match=r"y.txt: unsupported file type"):
        iter_rows(tmp_path / "y.txt")
    with pytest.raises(FileNotFoundError, match="z.jsonl"):
        iter_rows(tmp_path / "z.jsonl")
    assert [file_format(p) for p in ("a.PARQUET", "a.pq", "a.csv.gz", "a.ndjson", "a.jsonl.gz")] == \
        ["parquet", "parquet", "csv", "jsonl", "jsonl"]


def test_csv_reads_strings_multiline_values_and_counts_bad_rows(tmp_path):
    path = tmp_path / "r.csv"
    path.write_text('question,answer,domain\n"What is 2+2?\nThink.",007,math\n'
                    'only one field\nq3,,\n"q4, with comma",NA,general\n')
    rows = list(iter_rows(path, ["question", "answer"], optional_columns=("domain",)))
    assert len(rows) == 4
    bad = [r for _, r in rows if isinstance(r, BadRow)]
    assert len(bad) == 1 and bad[0].reason == "bad_csv_row" and "r.csv" in bad[0].message
    assert bad[0].message == f"{path}: line 4: CSV row with 1 fields, expected 3: 'only one field'"
    good = [r for _, r in rows if not isinstance(r, BadRow)]
    assert good == [
        {"question": "What is 2+2?\nThink.", "answer": "007", "domain": "math"},
        {"question": "q3", "answer": "", "domain": ""},
        {"question": "q4, with comma", "answer": "NA", "domain": "general"},
    ]
    with pytest.raises(ValueError, match=r"missing required column\(s\) \['user'\]; columns found: \['question'"):
        list(iter_rows(path, ["user"]))
    with pytest.raises(ValueError, match=r"r\.csv: line 4: CSV row with 1 fields, expected 3"):
        list(iter_rows(path, ["question"], on_bad_line="raise"))


# Headers whose names must come out as pyarrow's own CSV reader reads them (the reader parses the header itself).
HEADERS = {"bom": b"\xef\xbb\xbfq,a\n1,2\n", "blank_lines_first": b"\r\n\nq,a\r\n1,2\r\n",
           "quoted": b'"q\nx","a,""b""",\n1,2,3\n', "spaces_and_empty": b" q ,,a\n1,2,3\n",
           "carriage_returns": b"q,a\r1,2\r", "bad_first_row": b"q,a\n1\n1,2\n", "duplicate": b"q,q\n1,2\n",
           "non_ascii": "préface,答え\n1,2\n".encode()}


@pytest.mark.parametrize("name", sorted(HEADERS))
@pytest.mark.parametrize("suffix", [".csv", ".csv.gz"])
def test_csv_header_names_equal_pyarrows(tmp_path, name, suffix):
    import pyarrow.csv as pacsv

    path = tmp_path / f"h{suffix}"
    with (gzip.open if suffix.endswith(".gz") else open)(path, "wb") as f:
        f.write(HEADERS[name])
    skip = pacsv.ParseOptions(newlines_in_values=True, invalid_row_handler=lambda row: "skip")
    expected = pacsv.open_csv(path, parse_options=skip).schema.names
    with pytest.raises(ValueError) as e:
        next(iter_rows(path, ["not_there"]))
    assert e.value.args[0].endswith(f"missing required column(s) ['not_there']; columns found: {expected}")


# Rows as pyarrow's CSV reader reads them (every column a string): the reader parses CSV with Python's csv module.
ROWS = b'q,a,d\r\n"x\r\ny",1,\r\n\r\n"a ""b"", c",NA,null\n"p"s, 007 ,\n\n,,\n' + "é,答,\n".encode() + b"last,1,2"


@pytest.mark.parametrize("suffix", [".csv", ".csv.gz"])
def test_csv_rows_equal_pyarrows(tmp_path, suffix):
    import pyarrow.csv as pacsv

    path = tmp_path / f"r{suffix}"
    with (gzip.open if suffix.endswith(".gz") else open)(path, "wb") as f:
        f.write(ROWS)
    strings = pacsv.ConvertOptions(column_types={c: pa.string() for c in "qad"})
    expected = pacsv.read_csv(path, parse_options=pacsv.ParseOptions(newlines_in_values=True),
                              convert_options=strings).to_pylist()
    assert len(expected) == 6 and [row for _, row in iter_rows(path, ["q", "a", "d"])] == expected


@pytest.mark.parametrize("content, reason", [
    (b"", "no header row"), (b"\n\n", "no header row"), (b'"q,a\n1,2\n', "unexpected end of data"),
    (b"caf\xe9,a\n1,2\n", "a column name is not valid UTF-8"), (b'"q"x,a\n1,2\n', "',' expected after '\"'")])
def test_csv_bad_header_is_one_error_naming_the_file(tmp_path, content, reason):
    path = tmp_path / "h.csv"
    path.write_bytes(content)
    with pytest.raises(ValueError) as e:
        next(iter_rows(path, ["q"]))
    assert e.value.args[0] == f"{path}: not a readable CSV file (header: {reason})"


def test_csv_row_not_utf8_is_a_bad_row_naming_its_lines(tmp_path):
    """A byte that is not UTF-8 spoils its row only (the header reader decodes it too, in its first 8 KB, and lets
    it pass); a row over two lines is named by both."""
    path = tmp_path / "h.csv"
    path.write_bytes(b'q,a\ncaf\xe9,2\n"x\n\xff",3\nok,4\n')
    rows = list(iter_rows(path, ["q"]))
    assert [r.message for _, r in rows[:2]] == [f"{path}: line 2: not valid UTF-8: 'caf\\udce9,2'",
                                               f"{path}: lines 3-4: not valid UTF-8: 'x\\n\\udcff,3'"]
    assert rows[2] == (2, {"q": "ok"})
    with pytest.raises(ValueError, match=r"h\.csv: line 2: not valid UTF-8"):
        list(iter_rows(path, ["q"], on_bad_line="raise"))


def test_csv_gz(tmp_path):
    path = tmp_path / "r.csv.gz"
    with gzip.open(path, "wt") as f:
        f.write("user,assistant\nhi,there\n")
    assert list(iter_rows(path, ["user"])) == [(0, {"user": "hi"})]


def test_jsonl_bad_lines_are_counted_or_fatal(tmp_path):
    path = tmp_path / "g.jsonl"
    lines = [json.dumps({"prompt": "p0", "response": "r0", "extra": 1}), "", "{not json",
             json.dumps(["a", "list"]), json.dumps({"prompt": "p4"})]
    path.write_text("\n".join(lines) + "\n")
    rows = list(iter_rows(path, ["prompt", "response"]))
    assert [i for i, _ in rows] == [0, 2, 3, 4]  # line numbers; the blank line 1 is skipped
    assert rows[0][1] == {"prompt": "p0", "response": "r0"}  # projected to the asked columns
    assert isinstance(rows[1][1], BadRow) and rows[1][1].reason == "bad_json"
    assert "g.jsonl: line 3: invalid JSONL row" in rows[1][1].message
    assert "expected a JSON object, got list" in rows[2][1].message
    assert rows[3][1] == {"prompt": "p4"}  # a missing key is left for the converter to count
    with pytest.raises(ValueError, match="g.jsonl: line 3: invalid JSONL row"):
        list(iter_rows(path, on_bad_line="raise"))


def test_jsonl_invalid_utf8_is_a_bad_row(tmp_path):
    path = tmp_path / "u.jsonl"
    path.write_bytes(b'{"a": "ok"}\n{"a": "\xff\xfe"}\n')
    rows = list(iter_rows(path))
    assert rows[0] == (0, {"a": "ok"}) and rows[1][1].reason == "bad_json" and "line 2" in rows[1][1].message


def test_iter_sources_paths_and_records(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text('{"x": 1}\n')
    b.write_text('{"x": 2}\n{"x": 3}\n')
    assert [(w.split("/")[-1], r) for w, r in iter_sources([a, str(b)])] == \
        [("a.jsonl: row 0", {"x": 1}), ("b.jsonl: row 0", {"x": 2}), ("b.jsonl: row 1", {"x": 3})]
    out = list(iter_sources(iter([{"x": 1}, "oops"])))
    assert out[0] == ("<records>[0]", {"x": 1}) and out[1][1].reason == "wrong_type"
    assert list(iter_sources([])) == []
    with pytest.raises(ValueError, match="one dict"):
        list(iter_sources({"x": 1}))


def test_readers_stream_without_reading_the_whole_file(tmp_path):
    """A fatal error placed at the end of a large file is not hit when only the first rows are taken."""
    import itertools

    jl = tmp_path / "big.jsonl"
    jl.write_text('{"a": "x"}\n' * 50_000 + "{broken\n")
    assert len(list(itertools.islice(iter_rows(jl, on_bad_line="raise"), 10))) == 10
    cv = tmp_path / "big.csv"
    cv.write_text("a,b\n" + "x,y\n" * 1_000_000 + "only_one_field\n")  # ~4 MB
    assert list(itertools.islice(iter_rows(cv, ["a"], on_bad_line="raise"), 3)) == [(i, {"a": "x"}) for i in range(3)]
    with pytest.raises(ValueError, match=r"big\.csv: line 1000002: CSV row with 1 fields, expected 2"):
        list(iter_rows(cv, ["a"], on_bad_line="raise"))
