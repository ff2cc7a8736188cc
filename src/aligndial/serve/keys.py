"""λ policy per API key: `aligndial serve --keys keys.toml` (docs/serving.md, "Policies per key").

One server, many applications: each key has a name and its own allowed λ range, default λ,
rates (requests and tokens per sliding minute), cap on `max_tokens` and models. The file holds
only a key's SHA-256, never the key:

    [keys.alice]
    sha256 = "<hex sha256 of the key>"
    lam_range = [0.0, 1.0]        # optional; default: the server's --lam-range
    default_lam = 0.5             # optional; used when a request gives no λ
    requests_per_minute = 60      # optional
    tokens_per_minute = 20000     # optional; prompt + completion, counted when a request ends
    max_tokens = 512              # optional cap per request
    models = ["dpo-model"]        # optional; default: every served id

Pieces: `parse_policy` (the file → a `Policy`, or one line saying what is wrong), `to_toml` (the
small TOML subset `aligndial keys add` writes), `SlidingWindow` (the rates), `PolicyStore` (the
current policy; reloaded on SIGHUP or when the file changes, keeping the old one when the new
file does not parse), `KeyGate` (ASGI middleware: authentication, rates, usage log, counters)
and `check_request` (the 403s, called by the app once it knows the model, λ and max_tokens).

A key itself is never stored, logged, counted or shown: keys are looked up by their SHA-256,
compared with `secrets.compare_digest`; `KeyPolicy`'s repr leaves out even the hash.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import secrets
import signal
import time
import tomllib
from collections import Counter, deque
from dataclasses import asdict, dataclass, field

from aligndial.mixing import check_lam

log = logging.getLogger("aligndial.serve")

WINDOW_SECONDS = 60.0  # the rates are per sliding minute
NAME_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")  # a TOML bare key, and safe as a Prometheus label value
_HEX64 = re.compile(r"[0-9a-fA-F]{64}")
SCOPE_KEY = "aligndial.key_use"  # where KeyGate leaves a request's `KeyUse` in the ASGI scope


class PolicyError(ValueError):
    """A keys file that cannot be used; the message is one line naming the file, key and field."""


@dataclass(frozen=True)
class KeyPolicy:
    """One key's policy. `None` means "no limit of its own" (the server's range, all models, ...)."""

    name: str
    sha256: str = field(repr=False)
    lam_range: tuple[float, float] | None = None
    default_lam: float | list[float] | None = None
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    max_tokens: int | None = None
    models: tuple[str, ...] | None = None

    def public(self) -> dict:
        """The policy without the hash (`keys list`, the playground)."""
        out = asdict(self)
        del out["sha256"]
        out["lam_range"] = None if self.lam_range is None else list(self.lam_range)
        out["models"] = None if self.models is None else list(self.models)
        return out


@dataclass(frozen=True)
class Policy:
    """Every key of one keys file."""

    keys: tuple[KeyPolicy, ...]

    def lookup(self, token: bytes) -> KeyPolicy | None:
        """The policy of a presented key, by its SHA-256. Every hash is compared (in constant time),
        so the time taken does not depend on which key matched."""
        digest = hashlib.sha256(token).hexdigest().encode()
        found = None
        for key in self.keys:
            if secrets.compare_digest(digest, key.sha256.encode()):
                found = key
        return found

    def names(self) -> list[str]:
        return [k.name for k in self.keys]


def new_key() -> str:
    """A fresh key: 256 random bits."""
    return "ad-" + secrets.token_urlsafe(32)


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


# --- parsing ------------------------------------------------------------------------------------------

_FIELDS = ("sha256", "lam_range", "default_lam", "requests_per_minute", "tokens_per_minute", "max_tokens", "models")


def _positive_int(value, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise PolicyError(f"{where} must be a whole number ≥ 1; got {value!r}")
    return value


def _number(value, at: str, name: str) -> float:
    """A λ from the file: a TOML number, checked by `check_lam` (finite, within ±LAM_LIMIT)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PolicyError(f"{at}: `{name}` must be a number; got {value!r}")
    try:
        return check_lam(value, name)
    except ValueError as e:
        raise PolicyError(f"{at}: {e}") from None


def parse_key(name: str, table, where: str, lam_range: tuple[float, float] | None = None,
              n_aligned: int | None = None) -> KeyPolicy:
    """One `[keys.NAME]` table, checked: types, λ bounds (each λ within ±LAM_LIMIT via
    `check_lam`, and within the server's `lam_range` when given), `default_lam` within the key's
    range with one weight per aligned model (`n_aligned`, when known). `models` may name ids other
    servers serve (one keys file can serve several servers); a key gets 403 for the rest."""
    at = f"{where}: [keys.{name}]"
    if not NAME_PATTERN.fullmatch(name):
        raise PolicyError(f"{at}: a key name must be 1–64 letters, digits, '_' or '-'; rename it")
    if not isinstance(table, dict):
        raise PolicyError(f"{at} must be a table ([keys.{name}] followed by its fields); got {table!r}")
    unknown = sorted(set(table) - set(_FIELDS))
    if unknown:
        raise PolicyError(f"{at}: unknown field {unknown[0]!r}; the fields are {', '.join(_FIELDS)}")
    if "sha256" not in table:
        raise PolicyError(f"{at}: missing `sha256` (the hex SHA-256 of the key; `aligndial keys add` writes it)")
    digest = table["sha256"]
    if not isinstance(digest, str) or not _HEX64.fullmatch(digest):
        raise PolicyError(f"{at}: `sha256` must be 64 hex digits (the SHA-256 of the key, not the key)")
    rng = None
    if "lam_range" in table:
        value = table["lam_range"]
        if not isinstance(value, list) or len(value) != 2:
            raise PolicyError(f"{at}: `lam_range` must be [LO, HI]; got {value!r}")
        lo, hi = (_number(x, at, "lam_range") for x in value)
        if lo > hi:
            raise PolicyError(f"{at}: `lam_range` must be [LO, HI] with LO ≤ HI; got {value!r}")
        if lam_range is not None and not (lam_range[0] <= lo and hi <= lam_range[1]):
            raise PolicyError(f"{at}: `lam_range` {value!r} goes beyond the server's --lam-range "
                              f"[{lam_range[0]:g}, {lam_range[1]:g}]; narrow it or widen --lam-range")
        rng = (lo, hi)
    default = None
    if "default_lam" in table:
        if n_aligned == 0:
            raise PolicyError(f"{at}: `default_lam` has no effect on a plain model (no mix is served); remove it")
        value = table["default_lam"]
        weights = [_number(x, at, "default_lam") for x in (value if isinstance(value, list) else [value])]
        if not weights:
            raise PolicyError(f"{at}: `default_lam` must be a number, or a list with one number per aligned model")
        if n_aligned is not None and len(weights) != n_aligned:
            raise PolicyError(f"{at}: `default_lam` has {len(weights)} weight(s) but the server has {n_aligned} aligned "
                              "model(s)")
        bounds = rng or lam_range
        if bounds is not None and not all(bounds[0] <= w <= bounds[1] for w in weights):
            raise PolicyError(f"{at}: `default_lam` {value!r} is outside the key's λ range [{bounds[0]:g}, {bounds[1]:g}]")
        default = weights if isinstance(value, list) else weights[0]
    models = None
    if "models" in table:
        value = table["models"]
        if not isinstance(value, list) or not value or not all(isinstance(m, str) and m for m in value):
            raise PolicyError(f"{at}: `models` must be a non-empty list of model ids; got {value!r}")
        models = tuple(value)
    ints = {f: _positive_int(table[f], f"{at}: `{f}`") for f in ("requests_per_minute", "tokens_per_minute",
                                                                  "max_tokens") if f in table}
    return KeyPolicy(name, digest.lower(), rng, default, models=models, **ints)


def parse_policy(text: str, where: str, lam_range: tuple[float, float] | None = None,
                 n_aligned: int | None = None) -> Policy:
    """A whole keys file (see `parse_key` for the checks); raises `PolicyError` with one line."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:  # also a duplicate name: "Cannot declare ('keys', 'alice') twice"
        raise PolicyError(f"{where}: not valid TOML: {e}") from None
    extra = sorted(set(data) - {"keys"})
    if extra:
        raise PolicyError(f"{where}: unknown top-level entry {extra[0]!r}; the file holds only [keys.NAME] tables")
    tables = data.get("keys", {})
    if not isinstance(tables, dict):
        raise PolicyError(f"{where}: `keys` must be tables, [keys.NAME]; got {tables!r}")
    keys = tuple(parse_key(name, table, where, lam_range, n_aligned) for name, table in tables.items())
    seen: dict[str, str] = {}
    for key in keys:
        if key.sha256 in seen:
            raise PolicyError(f"{where}: [keys.{key.name}] has the same `sha256` as [keys.{seen[key.sha256]}]; "
                              "each key must be different (make a new one with `aligndial keys add`)")
        seen[key.sha256] = key.name
    return Policy(keys)


def read_policy(path: str, **context) -> Policy:
    """`parse_policy` on a file; a missing, unreadable or non-UTF-8 file is a `PolicyError` too."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise PolicyError(f"{path}: cannot read the keys file: {e.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise PolicyError(f"{path}: line {line}: not UTF-8 (byte 0x{raw[e.start]:02x}); save the file as UTF-8") from None
    if not text.strip():
        raise PolicyError(f"{path}: the keys file is empty; add a key with `aligndial keys add {path} --name NAME`")
    return parse_policy(text, path, **context)


# --- writing (the subset `aligndial keys add` needs) ------------------------------------------------------


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"cannot write the non-finite number {value!r}")
        return repr(value)  # Python's shortest repr reads back as the same float in TOML
    if isinstance(value, str):  # a basic string: escape `"`, `\\` and the control characters TOML forbids (DEL too)
        return '"' + "".join(c if c not in '"\\' and c >= " " and c != "\x7f" else
                             "\\" + c if c in '"\\' else f"\\u{ord(c):04x}" for c in value) + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def to_toml(name: str, fields: dict) -> str:
    """One `[keys.NAME]` table; `fields` with value None are left out."""
    if not NAME_PATTERN.fullmatch(name):
        raise ValueError(f"a key name must be 1–64 letters, digits, '_' or '-'; got {name!r}")
    lines = [f"[keys.{name}]"] + [f"{k} = {_toml_value(v)}" for k, v in fields.items() if v is not None]
    return "\n".join(lines) + "\n"


def add_key(path: str, name: str, fields: dict) -> tuple[str, KeyPolicy]:
    """Append a new key named `name` to the keys file at `path` (created if missing, mode 0600);
    returns (the key, its policy). The file is replaced whole (temporary file, then `os.replace`),
    so a server watching it never reads half a file."""
    text = ""
    if os.path.exists(path):
        policy = read_policy(path) if open(path, "rb").read().strip() else Policy(())
        if name in policy.names():
            raise PolicyError(f"{path}: a key named {name!r} is already there; choose another --name")
        text = open(path, encoding="utf-8").read()
    key = new_key()
    if not text.strip():
        text = ""
    elif not text.endswith("\n"):
        text += "\n\n"
    elif not text.endswith("\n\n"):
        text += "\n"
    text += to_toml(name, {"sha256": key_hash(key), **fields})
    policy = parse_policy(text, path)  # the same checks the server makes
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)
    return key, next(k for k in policy.keys if k.name == name)


# --- rates ---------------------------------------------------------------------------------------------


class SlidingWindow:
    """Amounts (requests, tokens) over the last `window` seconds."""

    def __init__(self, window: float = WINDOW_SECONDS):
        self.window = window
        self.events: deque[tuple[float, int]] = deque()
        self.total = 0

    def _prune(self, now: float) -> None:
        while self.events and self.events[0][0] <= now - self.window:
            self.total -= self.events.popleft()[1]

    def used(self, now: float) -> int:
        self._prune(now)
        return self.total

    def add(self, now: float, amount: int = 1) -> None:
        if amount > 0:
            self.events.append((now, amount))
            self.total += amount

    def wait(self, now: float, limit: int) -> float:
        """Seconds until the amount in the window falls below `limit` (0 if it already is)."""
        self._prune(now)
        over = self.total - limit + 1
        for t, amount in self.events:
            if over <= amount:
                # Rounding can give 60.000000000000014, or 0.0 for an event 1e-45 s after another.
                return min(self.window, max(t + self.window - now, 1e-9))
            over -= amount
        return 0.0


class RateLimiter:
    """Per-key request and token windows, by key name (so they survive a reload)."""

    def __init__(self, window: float = WINDOW_SECONDS):
        self.window = window
        self.requests: dict[str, SlidingWindow] = {}
        self.tokens: dict[str, SlidingWindow] = {}

    def _of(self, table: dict, name: str) -> SlidingWindow:
        return table.setdefault(name, SlidingWindow(self.window))

    def admit(self, key: KeyPolicy, now: float) -> tuple[str, float] | None:
        """None if the request may go on (it is counted), else (the rate it is over, seconds to wait)."""
        requests = self._of(self.requests, key.name)
        if key.requests_per_minute is not None and requests.used(now) >= key.requests_per_minute:
            return "requests_per_minute", requests.wait(now, key.requests_per_minute)
        tokens = self._of(self.tokens, key.name)
        if key.tokens_per_minute is not None and tokens.used(now) >= key.tokens_per_minute:
            return "tokens_per_minute", tokens.wait(now, key.tokens_per_minute)
        requests.add(now)
        return None

    def spent(self, name: str, tokens: int, now: float) -> None:
        """A request has ended having used `tokens` (prompt + completion)."""
        self._of(self.tokens, name).add(now, tokens)


# --- the current policy ------------------------------------------------------------------------------------


class PolicyStore:
    """The policy in force, read from `path`, and re-read on SIGHUP or when the file changes
    (checked at each request). A file that does not parse leaves the old policy in force, with one
    log line; requests already admitted keep the `KeyPolicy` they started with."""

    def __init__(self, path: str, lam_range: tuple[float, float] | None = None, n_aligned: int | None = None):
        self.path = path
        self.context = {"lam_range": lam_range, "n_aligned": n_aligned}
        self.reloads: Counter[str] = Counter()  # by result: ok / error
        self._signature = self._stat()
        self.policy = read_policy(path, **self.context)  # at start, a bad file stops the server (one line)

    def __repr__(self) -> str:
        return f"PolicyStore({self.path!r}, keys={self.policy.names()})"

    def set_served(self, served: list[str]) -> None:
        """The model ids are known: one line for each key that may use none of them (a typo, or a
        keys file shared with other servers)."""
        for key in self.policy.keys:
            if key.models is not None and not set(key.models) & set(served):
                log.warning("keys file %s: key %r may use none of the models served here (%s); its requests get 403",
                            self.path, key.name, ", ".join(served))

    def _stat(self):
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size, st.st_ino

    def reload(self, why: str = "SIGHUP") -> bool:
        self._signature = self._stat()
        try:
            policy = read_policy(self.path, **self.context)
        except PolicyError as e:
            self.reloads["error"] += 1
            log.error("keys file not reloaded (%s), the previous policy stays: %s", why, e)
            return False
        self.reloads["ok"] += 1
        self.policy = policy
        log.info("keys file %s reloaded (%s): %d key(s): %s", self.path, why, len(policy.keys),
                 ", ".join(policy.names()))
        return True

    def check_for_change(self) -> None:
        if self._stat() != self._signature:
            self.reload("file changed")


# --- per request --------------------------------------------------------------------------------------------


@dataclass
class KeyUse:
    """What one request used: filled in by the app (model, λ, reply), read by `KeyGate` at its end."""

    key: KeyPolicy | None
    started: float = field(default_factory=time.monotonic)
    model: str | None = None
    lam: object = None
    reply: object = None  # has .usage() -> {"prompt_tokens", ...}; .error_status after an error event in a stream

    def tokens(self) -> tuple[int, int]:
        if self.reply is None:
            return 0, 0
        usage = self.reply.usage()
        return usage["prompt_tokens"], usage["completion_tokens"]


class KeyMetrics:
    """/metrics counters by key name (never by key)."""

    def __init__(self):
        self.requests: Counter[str] = Counter()
        self.prompt_tokens: Counter[str] = Counter()
        self.completion_tokens: Counter[str] = Counter()
        self.rejections: Counter[tuple[str, str]] = Counter()  # (key name or "-", reason)

    def render(self, reloads: Counter | None) -> str:
        out = []

        def metric(name: str, help: str, samples) -> None:
            out.extend([f"# HELP aligndial_{name} {help}", f"# TYPE aligndial_{name} counter"])
            out.extend(f"aligndial_{name}{labels} {value}" for labels, value in samples)

        metric("key_requests_total", "Generation requests answered, by key name.",
               [(f'{{key="{k}"}}', v) for k, v in sorted(self.requests.items())])
        metric("key_prompt_tokens_total", "Prompt tokens of finished requests, by key name.",
               [(f'{{key="{k}"}}', v) for k, v in sorted(self.prompt_tokens.items())])
        metric("key_completion_tokens_total", "Completion tokens of finished requests, by key name.",
               [(f'{{key="{k}"}}', v) for k, v in sorted(self.completion_tokens.items())])
        metric("key_rejections_total", "Requests refused by the key policy, by key name and reason.",
               [(f'{{key="{k}",reason="{r}"}}', v) for (k, r), v in sorted(self.rejections.items())])
        if reloads is not None:
            metric("keys_reloads_total", "Reloads of the keys file, by result.",
                   [(f'{{result="{r}"}}', reloads[r]) for r in ("ok", "error")])
        return "\n".join(out) + "\n"


class UsageLog:
    """`--usage-log FILE.jsonl`: one JSON line per finished request, appended and flushed at once,
    so a killed server loses at most the line being written."""

    def __init__(self, path: str):
        self.path = path
        self.file = open(path, "a", encoding="utf-8")

    def write(self, row: dict) -> None:
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()


def _error(status: int, message: str, type: str, code: str, param: str | None = None, headers: dict | None = None):
    from aligndial.serve.errors import APIError  # FastAPI; keys.py itself loads for `aligndial keys` without it

    return APIError(status, message, type, param=param, code=code, headers=headers)


def _weights(lam) -> list[float]:
    """Every number in a λ, a multi-aligned list or a schedule (nested lists), element by element."""
    if isinstance(lam, (list, tuple)):
        return [w for x in lam for w in _weights(x)]
    return [] if lam is None else [lam]


def check_request(use: KeyUse | None, metrics: KeyMetrics, model: str, lam, lam_field: str,
                  max_tokens: int | None) -> None:
    """The key's 403s: a model it may not use, a λ outside its range (every weight of a list or
    schedule), a `max_tokens` over its cap. Called by the app before anything reaches the engine."""
    if use is None or use.key is None:
        return
    key = use.key

    def forbid(reason: str, message: str, param: str):
        metrics.rejections[(key.name, reason)] += 1
        return _error(403, message, "permission_error", reason, param)

    if key.models is not None and model not in key.models:
        raise forbid("model", f"key {key.name!r} may not use model {model!r}; it may use "
                              f"{', '.join(map(repr, key.models))} (ask for `models` to include it)", "model")
    if key.lam_range is not None:
        lo, hi = key.lam_range
        for w in _weights(lam):
            if not lo <= w <= hi:
                raise forbid("lam_range", f"key {key.name!r} allows `{lam_field}` within [{lo:g}, {hi:g}] (each "
                                          f"weight); got {w:g}. Send λ in that range, or ask for a key with a wider "
                                          "`lam_range`", lam_field)
    if key.max_tokens is not None and max_tokens is not None and max_tokens > key.max_tokens:
        raise forbid("max_tokens", f"key {key.name!r} allows at most {key.max_tokens} tokens per request; got "
                                   f"`max_tokens` {max_tokens}. Lower max_tokens, or ask for a higher cap", "max_tokens")


def default_lam(request, fallback):
    """The λ a request without one gets: its key's `default_lam`, else the server's."""
    use = request.scope.get(SCOPE_KEY)
    return fallback if use is None or use.key is None or use.key.default_lam is None else use.key.default_lam


def max_tokens_cap(request) -> int | None:
    use = request.scope.get(SCOPE_KEY)
    return None if use is None or use.key is None else use.key.max_tokens


class KeyGate:
    """ASGI middleware for POST/GET /v1/*: with a `PolicyStore`, a request needs a key of the
    policy (401 otherwise) and within its rates (429 with Retry-After); without one (only
    `--usage-log`) it lets requests through. Every generation request (POST /v1/*) is counted
    by key name and, with a `UsageLog`, written as one line when it ends; a request's tokens
    count toward its key's rate when it ends. /health, /metrics and the playground stay open."""

    def __init__(self, app, store: PolicyStore | None, usage_log: UsageLog | None, metrics: KeyMetrics,
                 count_error, clock=time.monotonic):
        self.app, self.store, self.usage_log, self.metrics = app, store, usage_log, metrics
        self.count_error, self.clock = count_error, clock
        self.limiter = RateLimiter()

    def _install_sighup(self) -> None:
        import asyncio

        try:
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self.store.reload)
        except (ValueError, RuntimeError, NotImplementedError):  # not the main thread (tests), or no SIGHUP
            log.info("keys file: no SIGHUP handler in this thread; changes to the file are still picked up")

    async def _refuse(self, err, key: KeyPolicy | None, reason: str, scope, receive, send) -> None:
        self.metrics.rejections[(key.name if key is not None else "-", reason)] += 1
        self.count_error(err.type)
        await err.response()(scope, receive, send)
        if scope["method"] == "POST" and self.usage_log is not None:
            self._finish(KeyUse(key), err.status, count=False)

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan" and self.store is not None:
            self._install_sighup()
        if scope["type"] != "http" or not scope["path"].startswith("/v1"):
            return await self.app(scope, receive, send)
        key = None
        if self.store is not None:
            self.store.check_for_change()
            value = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, token = value.partition(b" ")
            token = token.strip() if scheme.lower() == b"bearer" else b""
            key = self.store.policy.lookup(token) if token else None  # this request's policy from now on
            if key is None:
                why = "missing API key" if not token else "unknown API key (not in the server's keys file)"
                err = _error(401, f"{why}: send `Authorization: Bearer <key>` with a key the server's operator gave "
                                  "you (`aligndial keys add`)", "authentication_error", "invalid_api_key")
                return await self._refuse(err, None, "missing_key" if not token else "unknown_key",
                                          scope, receive, send)
            over = self.limiter.admit(key, self.clock()) if scope["method"] == "POST" else None
            if over is not None:
                rate, wait = over
                seconds = max(1, math.ceil(wait))
                limit = getattr(key, rate)
                what = "requests" if rate == "requests_per_minute" else "tokens (prompt + completion)"
                err = _error(429, f"key {key.name!r} is over its rate of {limit} {what} per minute; retry after "
                                  f"{seconds} s (Retry-After), or ask for a higher `{rate}`", "rate_limit_error",
                             "rate_limit_exceeded", headers={"Retry-After": str(seconds)})
                return await self._refuse(err, key, rate, scope, receive, send)
        use = KeyUse(key)
        scope[SCOPE_KEY] = use
        if scope["method"] != "POST":
            return await self.app(scope, receive, send)
        status, finished = None, False

        async def send_and_see(message):
            # The line is written before the response's last message is sent, so a client that has
            # its whole answer finds the line on disk.
            nonlocal status, finished
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body", False) and not finished:
                finished = True
                self._finish(use, getattr(use.reply, "error_status", None) or status)
            await send(message)

        try:
            await self.app(scope, receive, send_and_see)
        finally:
            if not finished:  # the client went away before its answer was complete
                self._finish(use, 499)

    def _finish(self, use: KeyUse, status: int, count: bool = True) -> None:
        prompt, completion = use.tokens()
        name = use.key.name if use.key is not None else None
        if name is not None and count:
            self.metrics.requests[name] += 1
            self.metrics.prompt_tokens[name] += prompt
            self.metrics.completion_tokens[name] += completion
            self.limiter.spent(name, prompt + completion, self.clock())
        if self.usage_log is not None:
            self.usage_log.write({"time": time.time(), "key": name, "model": use.model, "lam": use.lam,
                                  "prompt_tokens": prompt, "completion_tokens": completion, "status": status,
                                  "latency_s": round(time.monotonic() - use.started, 6)})
