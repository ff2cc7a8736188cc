"""Property-based fuzzing of `aligndial serve` over real HTTP (docs/reliability.md, cases 1–10 and 26–30).

A real uvicorn server (the tiny llama DeRa pair) receives 300 random bodies, derandomized so CI
sees the same ones every run: random JSON of any shape; request bodies whose fields are valid or
junk (extreme numbers such as 1e308, -0.0, 2**64, 10**30, NaN and Infinity as bare JSON tokens;
random unicode; lone surrogates sent as "\\ud800" escapes, and as raw invalid UTF-8; wrong
types); both endpoints, streamed and not, and a few wrong content types.

Properties, after every request:
- no 500 and no `server_error` event: every one of these is a client mistake or a valid request;
- an error is an OpenAI error object; a stream ends with `data: [DONE]`;
- a valid request then succeeds within 5 s.
At the end: zero engine restarts, the engine up, every in-flight counter back to 0, and no
traceback in the log.
"""

import json
import logging
import time

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_serve import NAME, Server, sse_events

from aligndial.pair import RealignedPair
from aligndial.serve import HFEngine

EXAMPLES = 300

# --- values -------------------------------------------------------------------------------------------------


class Raw(str):
    """A JSON token written as is (NaN, Infinity, a 400-digit number)."""


surrogate = st.integers(0xD800, 0xDFFF).map(chr)
text = st.one_of(
    st.text(max_size=30),
    st.lists(st.one_of(st.characters(), surrogate), max_size=12).map("".join),
    st.sampled_from(["", " ", "Hello", "a\ud800b", "\udc00", "\ud83d\ude00", "\x00", "<|im_end|>", "{{ x }}"]),
)
extreme_number = st.one_of(
    st.sampled_from([0, -0.0, 1, -1, 1e308, -1e308, 5e-324, 1e-38, 1e-45, 2**63 - 1, 2**63, 2**64 - 1, 2**64,
                     10**30, -(2**63), 0.5, 2.0, 1e6, 1e7, 3e38]),
    st.sampled_from(["NaN", "Infinity", "-Infinity", "1e400", "-1e400", "1" * 400, "1" * 5000]).map(Raw),
    st.integers(), st.floats(allow_nan=False, allow_infinity=False),
)
scalar = st.one_of(st.none(), st.booleans(), extreme_number, text)
junk = st.recursive(scalar, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                    st.dictionaries(text, inner, max_size=4)), max_leaves=8)
message = st.fixed_dictionaries({
    "role": st.sampled_from(["user", "user", "assistant", "system"]) | text,
    "content": st.text(min_size=1, max_size=30) | text | st.lists(st.fixed_dictionaries({"type": st.just("text"),
                                                                                          "text": text}), max_size=2),
})



def field(valid):
    """Mostly a plausible value, else (about 1 in 4) junk."""
    return st.tuples(st.integers(0, 3), valid, junk).map(lambda t: t[2] if t[0] == 3 else t[1])


# max_tokens stays small (CI time).
FIELDS = {
    "model": field(st.just(NAME)),
    "max_tokens": field(st.integers(1, 4)),
    "max_completion_tokens": field(st.integers(1, 4)),
    "temperature": field(st.sampled_from([0, 0.0, -0.0, 0.7, 1, 2, 1e-4])),
    "top_p": field(st.floats(0.01, 1.0)),
    "top_k": field(st.integers(0, 50)),
    "n": field(st.integers(1, 3)),
    "seed": field(st.integers(0, 2**63 - 1)),
    "stop": field(st.lists(st.text(min_size=1, max_size=3), max_size=3)),
    "stream": field(st.booleans()),
    "stream_options": field(st.fixed_dictionaries({"include_usage": st.booleans()})),
    "alignment_strength": field(st.floats(-5, 10)),
    "lam": field(st.floats(-5, 10)),
    "return_token_ids": field(st.booleans()),
    "logprobs": field(st.none()),
    "echo": field(st.just(False)),
    "best_of": field(st.just(1)),
    "logit_bias": field(st.just({})),
    "tools": field(st.just([])),
}


@st.composite
def request_body(draw, chat: bool):
    body = {k: draw(FIELDS[k]) for k in sorted(draw(st.sets(st.sampled_from(sorted(FIELDS)), max_size=3)))}
    if chat:
        body["messages"] = draw(field(st.lists(message, min_size=1, max_size=3)))
        body.setdefault("max_tokens", draw(st.integers(1, 4)))  # chat's default is the rest of the context
    else:
        body["prompt"] = draw(field(st.text(min_size=1, max_size=30)))
    if draw(st.integers(0, 9)) == 9:
        body.pop("messages" if chat else "prompt")
    return body


def encode(value, raw_utf8: bool) -> bytes:
    """JSON text: NaN/Infinity and Raw tokens written bare; lone surrogates as \\ud800 escapes, or
    (raw_utf8) non-ASCII as raw bytes, where a lone surrogate becomes invalid UTF-8."""
    if isinstance(value, Raw):
        return value.encode()
    if isinstance(value, dict):
        return b"{" + b", ".join(encode(str(k), raw_utf8) + b": " + encode(v, raw_utf8) for k, v in value.items()) + b"}"
    if isinstance(value, list):
        return b"[" + b", ".join(encode(v, raw_utf8) for v in value) + b"]"
    if isinstance(value, str) and raw_utf8:
        return json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass")
    return json.dumps(value).encode()  # ensure_ascii: "\ud800" stays an escape; NaN, Infinity bare


PATHS = ["/v1/completions", "/v1/chat/completions"]
fuzz_request = st.tuples(
    st.one_of(st.tuples(st.just(PATHS[0]), request_body(chat=False)),
              st.tuples(st.just(PATHS[1]), request_body(chat=True)),
              st.tuples(st.just(PATHS[0]), request_body(chat=False)),
              st.tuples(st.just(PATHS[1]), request_body(chat=True)),
              st.tuples(st.sampled_from(PATHS), junk)),
    st.sampled_from(["application/json"] * 8 + ["text/plain", None]),
    st.booleans(),  # raw UTF-8 instead of escapes
)


# --- the test --------------------------------------------------------------------------------------------------


class Tracebacks(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.records = []

    def emit(self, record):
        if record.exc_info or record.levelno >= logging.ERROR:
            self.records.append(self.format(record))


@pytest.fixture(scope="module")
def server(model_dirs):
    ref, aligned, _ = model_dirs["llama"]
    pair = RealignedPair.from_pretrained(ref, aligned)
    with Server(HFEngine(pair, pair.tokenizer, 1, max_concurrency=8, max_queue=8)) as server:
        yield server


def test_random_bodies_never_500_never_stop_the_engine(server):
    handler = Tracebacks()
    logging.getLogger().addHandler(handler)
    sent, statuses, started = [0], {}, time.monotonic()
    check = httpx.Client(base_url=server.url, timeout=5)
    fuzz = httpx.Client(base_url=server.url, timeout=30)
    valid = {"model": NAME, "prompt": "Hello", "max_tokens": 1, "temperature": 0}

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
    @given(fuzz_request)
    def one(case):
        (path, body), content_type, raw_utf8 = case
        headers = {} if content_type is None else {"content-type": content_type}
        content = encode(body, raw_utf8)
        r = fuzz.post(path, content=content, headers=headers)
        sent[0] += 1
        statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
        assert r.status_code < 500, (r.status_code, r.text, content[:300])
        if r.status_code != 200:
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"} and err["message"], err
        elif r.headers["content-type"].startswith("text/event-stream"):
            events = sse_events(r.text.splitlines())
            assert events[-1] == "[DONE]" and not any(isinstance(e, dict) and "error" in e for e in events), r.text
        else:
            assert r.json()["choices"], r.text
        start = time.monotonic()
        ok = check.post("/v1/completions", json=valid)
        assert ok.status_code == 200 and time.monotonic() - start < 5, ok.text

    try:
        one()
    finally:
        logging.getLogger().removeHandler(handler)
        check.close()
        fuzz.close()
    elapsed = time.monotonic() - started
    print(f"\nfuzz: {sent[0]} random requests (+ as many checks) in {elapsed:.1f} s; statuses {sorted(statuses.items())}")
    assert sent[0] >= EXAMPLES
    metrics = server.metrics()
    assert metrics["aligndial_engine_restarts_total"] == 0 and metrics["aligndial_engine_up"] == 1
    assert metrics.get('aligndial_errors_total{type="server_error"}', 0) == 0
    assert metrics["aligndial_queue_depth"] == metrics["aligndial_sequences_running"] == 0
    assert metrics["aligndial_requests_in_flight"] == 0
    assert not handler.records, handler.records[:3]
    assert statuses.get(200, 0) >= EXAMPLES // 5, statuses  # valid requests are reached too
