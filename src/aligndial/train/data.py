"""Training data: local JSONL / JSON / CSV / parquet, a `save_to_disk` directory, or a hub id
(when online), in TRL's column conventions. Rows are validated before training starts, and a
bad row is named by its number and field."""

from __future__ import annotations

import os

from datasets import Dataset, load_dataset, load_from_disk

_LOCAL = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def load_data(spec: str, split: str = "train") -> Dataset:
    if os.path.isdir(spec):
        ds = load_from_disk(spec)
        return ds[split] if hasattr(ds, "keys") else ds
    ext = os.path.splitext(spec)[1].lower()
    if ext in _LOCAL:
        if not os.path.exists(spec):
            raise FileNotFoundError(f"`--data {spec}`: no such file")
        return load_dataset(_LOCAL[ext], data_files=spec, split="train")
    if os.path.exists(spec):
        raise ValueError(f"`--data {spec}`: unknown file type {ext!r}; use .jsonl, .json, .csv or .parquet")
    return load_dataset(spec, split=split)  # a hub id; needs network


def _text(row: dict, field: str, n: int) -> None:
    value = row.get(field)
    if isinstance(value, list):  # conversational: a list of {"role", "content"}
        _messages(value, f"{field}", n)
        return
    if not isinstance(value, str):
        raise ValueError(f"row {n}: field `{field}` must be a string or a list of messages; got {type(value).__name__}")
    if not value.strip():
        raise ValueError(f"row {n}: field `{field}` is empty")


def _messages(value, field: str, n: int) -> None:
    if not isinstance(value, list) or not value:
        raise ValueError(f"row {n}: field `{field}` must be a non-empty list of messages")
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"row {n}: `{field}[{i}]` must be {{'role': str, 'content': str}}; got {m!r}")


def validate(ds: Dataset, kind: str) -> Dataset:
    """Check every row for `kind` in {"preference", "sft", "prompts"} before any training."""
    cols = set(ds.column_names)
    if kind == "preference":
        need = ["prompt", "chosen", "rejected"]
    elif kind == "sft":
        need = ["messages"] if "messages" in cols else ["prompt", "completion"] if "prompt" in cols else ["text"]
    else:
        need = ["messages"] if "messages" in cols else ["prompt"]
    missing = [c for c in need if c not in cols]
    if missing:
        raise ValueError(f"the dataset has columns {sorted(cols)} but needs {need}; missing {missing}")
    if len(ds) == 0:
        raise ValueError("the dataset is empty")
    for n, row in enumerate(ds):
        for field in need:
            if field == "messages":
                _messages(row[field], field, n)
            else:
                _text(row, field, n)
    return ds


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
