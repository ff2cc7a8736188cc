"""Training data: local JSONL / JSON / CSV / parquet, a `save_to_disk` directory, or a hub id
(when online), in TRL's column conventions.

`read_data(spec, kind)` loads and validates every row before training starts. Every error names
the file, and the line where the format has lines, counted from 1 as editors do
(`prefs.jsonl:7: field `chosen` is empty`); rows of parquet files and directories are numbered
from 1. JSONL is parsed here, line by line, so that an error can name its line.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Callable, Iterable

from datasets import Dataset, load_dataset, load_from_disk

from aligndial.prompts import decode_utf8, read_jsonl_lines

_LOCAL = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def _read_bytes(spec: str) -> bytes:
    if not os.path.exists(spec):
        raise FileNotFoundError(f"`--data {spec}`: no such file")
    with open(spec, "rb") as f:
        data = f.read()
    if not data.strip():
        raise ValueError(f"`--data {spec}`: the file is empty; it needs one row per line")
    return data


def _json_rows(spec: str) -> tuple[list[dict], list[int] | None]:
    """Rows of a .jsonl file, or of a .json file holding either JSON lines or one array of objects."""
    text = decode_utf8(spec, _read_bytes(spec))
    if spec.lower().endswith(".json") and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{spec}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
        bad = next((i for i, r in enumerate(rows, 1) if not isinstance(r, dict)), None)
        if bad is not None:
            raise ValueError(f"{spec}: row {bad} must be a JSON object; got {type(rows[bad - 1]).__name__}")
        return rows, None
    numbered = read_jsonl_lines(spec)
    return [row for _, row in numbered], [n for n, _ in numbered]


def _from_rows(spec: str, rows: list[dict]) -> Dataset:
    columns: dict[str, None] = {}
    for row in rows:
        columns.update(dict.fromkeys(row))
    data = {c: [row.get(c) for row in rows] for c in columns}
    try:
        return Dataset.from_dict(data)
    except Exception:  # pyarrow cannot hold one column of mixed types: find which one
        for c, values in data.items():
            try:
                Dataset.from_dict({c: values})
            except Exception as e:
                raise ValueError(f"{spec}: column `{c}` mixes value types across rows ({type(e).__name__}: {e})") from None
        raise


def _csv_lines(text: str) -> list[int]:
    """The line (1-based) where each CSV record after the header starts; blank lines are no record."""
    reader = csv.reader(io.StringIO(text))
    starts, previous_end = [], 0
    for i, record in enumerate(reader):
        if i > 0 and record:
            starts.append(previous_end + 1)
        previous_end = reader.line_num
    return starts


def _load(spec: str, split: str) -> tuple[Dataset, Callable[[int], str]]:
    """The dataset and a function naming its row n (1-based) in error messages."""
    if os.path.isdir(spec):
        try:
            ds = load_from_disk(spec)
        except (FileNotFoundError, ValueError) as e:
            raise ValueError(f"`--data {spec}`: not a directory written by `save_to_disk` ({e})") from None
        if hasattr(ds, "keys"):
            if split not in ds:
                raise ValueError(f"`--data {spec}` has splits {sorted(ds)}, not {split!r}")
            ds = ds[split]
        return ds, lambda n: f"{spec}: row {n}"
    ext = os.path.splitext(spec)[1].lower()
    if ext in (".jsonl", ".json"):
        rows, lines = _json_rows(spec)
        return _from_rows(spec, rows), (lambda n: f"{spec}:{lines[n - 1]}") if lines else (lambda n: f"{spec}: row {n}")
    if ext == ".csv":
        text = decode_utf8(spec, _read_bytes(spec))
        try:
            ds = load_dataset("csv", data_files=spec, split="train")
        except Exception as e:  # pandas' parser errors carry their own line numbers
            raise ValueError(f"{spec}: not a readable CSV file ({type(e).__name__}: {e})") from None
        lines = _csv_lines(text)
        if len(lines) != len(ds):  # quoting the csv module reads differently: fall back to row numbers
            return ds, lambda n: f"{spec}: row {n}"
        return ds, lambda n: f"{spec}:{lines[n - 1]}"
    if ext == ".parquet":
        _read_bytes(spec)
        try:
            ds = load_dataset("parquet", data_files=spec, split="train")
        except Exception as e:
            raise ValueError(f"{spec}: not a readable parquet file ({type(e).__name__}: {e})") from None
        return ds, lambda n: f"{spec}: row {n}"
    if os.path.exists(spec):
        raise ValueError(f"`--data {spec}`: unknown file type {ext!r}; use .jsonl, .json, .csv or .parquet")
    return load_dataset(spec, split=split), lambda n: f"{spec}: row {n}"  # a hub id; needs network


def load_data(spec: str, split: str = "train") -> Dataset:
    """The rows of `spec`, unvalidated (use `read_data` to validate them for a recipe)."""
    return _load(spec, split)[0]


def _text(value, field: str, where: str) -> None:
    if isinstance(value, list):  # conversational: a list of {"role", "content"}
        _messages(value, field, where)
        return
    if value is None:
        raise ValueError(f"{where}: field `{field}` is missing")
    if not isinstance(value, str):
        raise ValueError(f"{where}: field `{field}` must be a string or a list of messages; got {type(value).__name__}")
    if not value.strip():
        raise ValueError(f"{where}: field `{field}` is empty")


def _messages(value, field: str, where: str) -> None:
    if not isinstance(value, list) or not value:
        raise ValueError(f"{where}: field `{field}` must be a non-empty list of messages")
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"{where}: `{field}[{i}]` must be {{'role': str, 'content': str}}; got {m!r}")


def _needed(cols: set[str], kind: str) -> list[str]:
    if kind == "preference":
        return ["prompt", "chosen", "rejected"]
    if kind == "sft":
        return ["messages"] if "messages" in cols else ["prompt", "completion"] if "prompt" in cols else ["text"]
    if kind == "prompts":
        return ["messages"] if "messages" in cols else ["prompt"]
    raise ValueError(f"kind must be preference, sft or prompts; got {kind!r}")


def _check_rows(rows: Iterable[dict], need: list[str], where: Callable[[int], str]) -> None:
    for n, row in enumerate(rows, 1):
        for field in need:
            if field == "messages":
                _messages(row.get(field), field, where(n))
            else:
                _text(row.get(field), field, where(n))


def _check_columns(cols: set[str], kind: str, n_rows: int, source: str) -> list[str]:
    need = _needed(cols, kind)
    missing = [c for c in need if c not in cols]
    prefix = f"{source}: " if source else ""
    if missing:
        raise ValueError(f"{prefix}the dataset has columns {sorted(cols)} but needs {need}; missing {missing}")
    if n_rows == 0:
        raise ValueError(f"{prefix}the dataset is empty")
    return need


def validate(ds: Dataset, kind: str, where: Callable[[int], str] | None = None, source: str = "") -> Dataset:
    """Check every row for `kind` in {"preference", "sft", "prompts"} before any training.
    `where(n)` names row n (1-based) in errors; by default `row n`."""
    need = _check_columns(set(ds.column_names), kind, len(ds), source)
    _check_rows(ds, need, where or (lambda n: f"row {n}"))
    return ds


def read_data(spec: str, kind: str, split: str = "train") -> Dataset:
    """Load `spec` and validate every row for `kind`; errors name the file and line (1-based)."""
    if os.path.splitext(spec)[1].lower() in (".jsonl", ".json") and not os.path.isdir(spec):
        # Checked as parsed, before Arrow sees them: a wrong type must be named by its line, not
        # reported by Arrow as a column that changed type.
        rows, lines = _json_rows(spec)
        columns = {c for row in rows for c in row}
        need = _check_columns(columns, kind, len(rows), spec)
        _check_rows(rows, need, (lambda n: f"{spec}:{lines[n - 1]}") if lines else (lambda n: f"{spec}: row {n}"))
        return _from_rows(spec, rows)
    ds, where = _load(spec, split)
    return validate(ds, kind, where, source=spec)


def to_messages(ds: Dataset) -> Dataset:
    """prompt (+ completion) rows as `messages`, the format GKD's collator expects. GKD treats the
    last message as the completion, so a prompt-only row gets an empty assistant turn: a
    placeholder that on-policy batches replace with the student's own completion."""
    if "messages" in ds.column_names:
        return ds

    def convert(row):
        completion = row.get("completion") or ""
        return {"messages": [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": completion}]}

    return ds.map(convert, remove_columns=ds.column_names)
