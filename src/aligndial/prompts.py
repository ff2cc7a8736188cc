"""Prompt files for evaluation: one JSON object per line.

    {"prompt": "What is 2 + 3?", "answer": "5"}
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "user", "content": "And then?"}]}

A `messages` prompt gets one generated assistant reply after every user turn that the file does
not already answer, in order, each reply fed back before the next turn is rendered: the
multi-turn setting of CLM Table 4 / MT-Bench. `answer` is the reference for `accuracy:REGEX`.

This module knows nothing about models: it reads files and builds conversations.
"""

from __future__ import annotations

import json
from pathlib import Path


def decode_utf8(path: str | Path, data: bytes) -> str:
    """`data` (the bytes of `path`) as text; a non-UTF-8 byte is reported with its file, line and
    column, 1-based (a latin-1 or cp1252 export is the usual cause)."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise ValueError(
            f"{path}:{line}: not valid UTF-8 (byte 0x{data[e.start]:02x} at column {column}); "
            "re-save the file as UTF-8"
        ) from None


def read_jsonl_lines(path: str | Path, required: tuple[str, ...] = ()) -> list[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a JSONL file, lines counted from 1.
    Errors name the file, the line and the problem (not UTF-8, not JSON, not an object, a
    missing field); an empty file is an error."""
    with open(path, "rb") as f:
        text = decode_utf8(path, f.read())
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{n}: each line must be a JSON object; got {type(row).__name__}")
        missing = [k for k in required if k not in row]
        if missing:
            raise ValueError(f"{path}:{n}: missing field(s) {', '.join(map(repr, missing))}; got {sorted(row)}")
        rows.append((n, row))
    if not rows:
        raise ValueError(f"{path} holds no rows" + (" (the file is empty)" if not text else ""))
    return rows


def read_jsonl(path: str | Path, required: tuple[str, ...] = ()) -> list[dict]:
    """Objects of a JSONL file; errors name the file, the line and the missing field."""
    return [row for _, row in read_jsonl_lines(path, required)]


def load_prompts(path: str | Path) -> list[dict]:
    """Rows with a non-empty `prompt` (text) or `messages` (chat turns), other fields kept."""
    numbered = read_jsonl_lines(path)
    for n, row in numbered:
        value = row.get("prompt", row.get("messages"))
        if not value or not isinstance(value, (str, list)):
            raise ValueError(f"{path}:{n}: needs a non-empty `prompt` string or `messages` list; got {row!r}")
        if isinstance(value, list) and n_turns(value) == 0:
            raise ValueError(f"{path}:{n}: has `messages` but no unanswered user turn; end it with a user turn")
    return [row for _, row in numbered]


def prompt_of(row: dict) -> str | list[dict]:
    return row["prompt"] if "prompt" in row else row["messages"]


def _open_turns(messages: list[dict]) -> list[int]:
    """Indices of user messages that the file leaves unanswered (the next one is not an assistant)."""
    return [
        i for i, m in enumerate(messages)
        if m["role"] == "user" and (i + 1 == len(messages) or messages[i + 1]["role"] != "assistant")
    ]


def n_turns(prompt: str | list[dict]) -> int:
    """How many assistant replies generation produces for this prompt."""
    return 1 if isinstance(prompt, str) else len(_open_turns(prompt))


def conversation(prompt: str | list[dict], replies: list[str]) -> str | list[dict]:
    """The prompt for the next reply: the messages up to the (len(replies))-th open user turn,
    with the earlier generated replies inserted as assistant turns. A text prompt is returned as is."""
    if isinstance(prompt, str):
        if replies:
            raise ValueError("a text prompt has one turn; give `messages` for several")
        return prompt
    opens = _open_turns(prompt)
    if len(replies) >= len(opens):
        raise ValueError(f"the prompt has {len(opens)} open user turn(s); got {len(replies)} replies already")
    answered = dict(zip(opens, replies))
    out = []
    for i, m in enumerate(prompt[: opens[len(replies)] + 1]):
        out.append(m)
        if i in answered:
            out.append({"role": "assistant", "content": answered[i]})
    return out


def as_text(prompt: str | list[dict]) -> str:
    """A prompt as plain text (for a judge): messages become `role: content` lines."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{m['role']}: {m['content']}" for m in prompt)


def row_prompt(row: dict) -> str | list[dict]:
    """The prompt a sweep row's (last) reply answers: the file's prompt, or for several turns the
    conversation with the earlier generated replies."""
    return conversation(row["prompt"], [t["text"] for t in row.get("turns", [])][:-1])
