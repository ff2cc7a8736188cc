"""Every bound the server puts on a request, in one place: its default, its flag, and its check.

Imports only the standard library, so the command line can declare these flags without loading
the server (docs/reliability.md, cases 26–29). `ServerSettings` (app.py) takes its defaults from here,
`add_flags` declares them on `aligndial serve`, and `from_args` checks the values before any
model loads.

Bounds that are part of the API's shape stay in protocol.py (top_p in (0, 1], n ≥ 1, ...);
bounds that depend on the loaded model (context length, number of aligned models, λ range) are
checked in app.py.
"""

from __future__ import annotations

import math

# torch.Generator seeds are 64-bit and sequence i of a request samples with seed + i, so a seed
# below 2**63 leaves room for any n; 2**64 raises "Overflow when unpacking long long" inside the
# engine. This is the generator's range, not a policy, so it has no flag.
SEED_LIMIT = 2**63

# Below this (and above 0), a temperature is refused with a 400. Sampling itself is stable at any
# temperature > 0 (engine.sample shifts logits by their max before dividing), but a temperature
# of 1e-38 is a mistake for "greedy": say so rather than silently sample almost-greedily.
MIN_TEMPERATURE = 1e-4

# Request bodies above this get a 413 before they are read (Content-Length) or as soon as the
# streamed body passes it. 1 MiB holds a prompt of ~250k tokens of English, far above any context
# served here; without a limit, refusing a huge prompt cost time and memory in proportion to it.
MAX_BODY_BYTES = 2**20

# The prompt-length limit on characters, checked before tokenizing (tokenizing costs time and
# memory in proportion to the text, only to find it too long). By default it is the context
# length times this factor. Tokens of real tokenizers average 3–5 characters of English, so a
# prompt refused here could fit the context only if its tokens averaged more than 16 characters
# (long runs of spaces or symbols); --max-prompt-chars raises it. The exact check on tokens follows.
CHARS_PER_TOKEN = 16

# At most this many stop strings (OpenAI allows 4): each is searched in every decoded token's
# text, on the event loop.
MAX_STOP_STRINGS = 16

# A connection must deliver a whole request head (request line and headers) within this many
# seconds of opening, or of the previous response; otherwise it is closed (slowloris).
HEADER_TIMEOUT = 10.0

# A request body must arrive whole within this many seconds of its head; otherwise 408.
BODY_TIMEOUT = 30.0

# An idle keep-alive connection is closed after this many seconds (uvicorn's default).
KEEP_ALIVE_TIMEOUT = 5.0

# The largest request head h11 buffers (h11's own default); beyond it the request is refused.
MAX_HEADER_BYTES = 16 * 1024

FLAGS = {  # dest: (flag, type, default, help)
    "min_temperature": ("--min-temperature", float, MIN_TEMPERATURE,
                        "smallest temperature above 0 a request may ask for; below it, 400 (0 stays greedy)"),
    "max_body_bytes": ("--max-body-bytes", int, MAX_BODY_BYTES, "largest request body; beyond it, 413"),
    "max_prompt_chars": ("--max-prompt-chars", int, None,
                         f"longest prompt in characters, checked before tokenizing (default: context length × "
                         f"{CHARS_PER_TOKEN})"),
    "header_timeout": ("--header-timeout", float, HEADER_TIMEOUT,
                       "seconds a connection has to send a whole request head; then it is closed"),
    "body_timeout": ("--body-timeout", float, BODY_TIMEOUT, "seconds a request body has to arrive; then 408"),
    "keep_alive_timeout": ("--keep-alive-timeout", float, KEEP_ALIVE_TIMEOUT,
                           "seconds an idle keep-alive connection stays open"),
    "max_header_bytes": ("--max-header-bytes", int, MAX_HEADER_BYTES, "largest request head (request line + headers)"),
}


def add_flags(parser) -> None:
    """Declare the limit flags on an argparse (sub)parser."""
    for dest, (flag, kind, default, help) in FLAGS.items():
        shown = "" if default is None else f" (default {default:g})" if kind is float else f" (default {default})"
        parser.add_argument(flag, dest=dest, type=kind, default=default, help=help + shown)


def check(name: str, value: float | int | None) -> float | int | None:
    """One limit's value: finite and > 0 (None keeps the derived default where there is one)."""
    flag = FLAGS[name][0]
    if value is None:
        if FLAGS[name][2] is None:
            return None
        raise ValueError(f"`{flag}` needs a value")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"`{flag}` must be a finite number > 0; got {value!r}")
    if name == "min_temperature" and value > 2:
        raise ValueError(f"`{flag}` must be at most 2 (the largest temperature a request may ask for); got {value!r}")
    return value


def from_args(args) -> dict:
    """The checked limit values from parsed flags, by ServerSettings field name."""
    return {name: check(name, getattr(args, name, FLAGS[name][2])) for name in FLAGS}
