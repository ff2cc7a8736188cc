"""The OpenAI-compatible HTTP app: `create_app(engine, settings)`.

Routes: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (streamed as SSE ending
with `data: [DONE]`, or not), GET /health (200, or 503 when the engine is not running) and
GET /metrics (Prometheus text format). The playground page is served at / and /playground
(static/: one HTML, one JS, one CSS file), with GET /playground/config telling it the λ range;
the page, its files and its config are open, and the page calls /v1/* like any other client.

The app owns everything about text and HTTP: it validates a request (protocol.py for field
bounds; here the model name, λ against the server's range, and the context length), tokenizes
it, submits token ids to the engine, and turns the engine's token events back into text, cut at
stop strings. Responses carry the λ used as a top-level `alignment_strength` field.

Robustness (docs/reliability.md, cases 1–10): errors are OpenAI error objects (errors.py); a full
engine gives 429 with Retry-After; a client that hangs up cancels its generation, streamed or
not; an engine error after the first streamed chunk becomes an error event, then `data: [DONE]`;
API keys are compared in constant time and never logged.

Policies per API key (`--keys`, keys.py): its `KeyGate` middleware authenticates and rate-limits
/v1/* and writes the usage log; `answer` asks keys.py for the key's default λ and its 403s
before a request reaches the engine. GET /v1/policy gives the sending key's λ range (the playground's slider).

Hostile inputs (cases 26–29; every bound lives in limits.py): bodies are checked and read by
guards.py (JSON, size, time); a temperature between 0 and --min-temperature is refused; a prompt
is measured in characters before it is tokenized, and tokenized (or its chat template rendered)
in a worker thread, so /health and every other request keep being answered meanwhile.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from jinja2 import TemplateError

from aligndial.continuous import EngineOverloaded, EngineUnavailable, Generation, GenerationRequest, TokenEvent
from aligndial.generation import render_prompts
from aligndial.serve import keys, limits
from aligndial.serve.errors import APIError, install_handlers
from aligndial.serve.guards import ReadBody
from aligndial.serve.protocol import ChatCompletionRequest, CompletionRequest, _Sampling

log = logging.getLogger("aligndial.serve")

STATIC = Path(__file__).parent / "static"
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the rest of the context


@dataclass
class ServerSettings:
    """The server's flags (`aligndial serve` fills them in)."""

    model_name: str = field(metadata={"help": "the id clients send as `model`, listed by /v1/models"})
    default_lam: float | list[float] | None = field(
        default=1.0, metadata={"help": "λ when a request gives none: a list with several aligned models, None for a plain model"})
    lam_range: tuple[float, float] = field(default=(-5.0, 10.0), metadata={"help": "each λ weight must lie in [lo, hi]"})
    api_key: str | None = field(  # repr=False: printing the settings never shows the key
        default=None, repr=False, metadata={"help": "required as `Authorization: Bearer KEY` on /v1/*"})
    host: str = field(default="127.0.0.1", metadata={"help": "interface to listen on (loopback by default)"})
    port: int = 8000
    max_concurrency: int = field(default=8, metadata={"help": "sequences decoded together in one batch"})
    max_queue: int = field(default=64, metadata={"help": "sequences that may wait for a row; beyond that, 429"})
    # --- request limits: defaults, flags and checks in limits.py ---------------------------------------
    min_temperature: float = field(default=limits.MIN_TEMPERATURE, metadata={"help": limits.FLAGS["min_temperature"][3]})
    max_body_bytes: int = field(default=limits.MAX_BODY_BYTES, metadata={"help": limits.FLAGS["max_body_bytes"][3]})
    max_prompt_chars: int | None = field(default=None, metadata={"help": limits.FLAGS["max_prompt_chars"][3]})
    header_timeout: float = field(default=limits.HEADER_TIMEOUT, metadata={"help": limits.FLAGS["header_timeout"][3]})
    body_timeout: float = field(default=limits.BODY_TIMEOUT, metadata={"help": limits.FLAGS["body_timeout"][3]})
    keep_alive_timeout: float = field(default=limits.KEEP_ALIVE_TIMEOUT,
                                      metadata={"help": limits.FLAGS["keep_alive_timeout"][3]})
    max_header_bytes: int = field(default=limits.MAX_HEADER_BYTES, metadata={"help": limits.FLAGS["max_header_bytes"][3]})
    # --- policies per key (keys.py) -----------------------------------------------------------------
    keys: keys.PolicyStore | None = field(default=None, metadata={"help": "the keys file's policies (--keys)"})
    usage_log: str | None = field(default=None, metadata={"help": "append one JSON line per finished request here"})


class Metrics:
    """Counters for /metrics, rendered in the Prometheus text format."""

    def __init__(self):
        self.requests: Counter[tuple[str, int]] = Counter()  # by (endpoint, HTTP status)
        self.errors: Counter[str] = Counter()  # by OpenAI error type
        self.prompt_tokens = 0
        self.in_flight = 0  # generation requests being answered

    def render(self, engine: dict, healthy: bool) -> str:
        out = []

        def metric(name: str, kind: str, help: str, samples: list[tuple[str, float]]) -> None:
            out.extend([f"# HELP aligndial_{name} {help}", f"# TYPE aligndial_{name} {kind}"])
            out.extend(f"aligndial_{name}{labels} {value}" for labels, value in samples)

        metric("requests_total", "counter", "HTTP requests answered, by endpoint and status.",
               [(f'{{endpoint="{path}",status="{status}"}}', v) for (path, status), v in sorted(self.requests.items())])
        metric("errors_total", "counter", "Error responses and error events, by OpenAI error type.",
               [(f'{{type="{k}"}}', v) for k, v in sorted(self.errors.items())])
        metric("prompt_tokens_total", "counter", "Prompt tokens of admitted requests.", [("", self.prompt_tokens)])
        metric("generation_tokens_total", "counter", "Tokens generated by the engine.", [("", engine["generated_tokens"])])
        metric("requests_in_flight", "gauge", "Generation requests being answered.", [("", self.in_flight)])
        metric("sequences_running", "gauge", "Sequences in the running batch.", [("", engine["running"])])
        metric("queue_depth", "gauge", "Sequences admitted and waiting for a row.", [("", engine["waiting"])])
        metric("prefills_total", "counter", "Prompts prefilled.", [("", engine["prefills"])])
        metric("decode_steps_total", "counter", "Batched decode steps.", [("", engine["decode_steps"])])
        metric("decode_rows_total", "counter", "Rows over all decode steps (÷ steps = mean batch size).",
               [("", engine["decode_rows"])])
        metric("engine_up", "gauge", "1 while the engine thread runs.", [("", int(healthy))])
        metric("engine_restarts_total", "counter", "Engine-level faults after which the engine loop restarted.",
               [("", engine.get("engine_restarts", 0))])
        return "\n".join(out) + "\n"


class _CountRequests:
    """ASGI middleware: counts every HTTP request by endpoint (unknown paths as "other") and status."""

    def __init__(self, app, metrics: Metrics, endpoints: set[str]):
        self.app, self.metrics, self.endpoints = app, metrics, endpoints

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500

        async def send_and_see(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_see)
        finally:
            path = scope["path"] if scope["path"] in self.endpoints else "other"
            self.metrics.requests[(path, status)] += 1


class _RequireKey:
    """ASGI middleware: /v1/* needs `Authorization: Bearer <key>`, compared in constant time
    (`secrets.compare_digest`). /health and /metrics stay open. The key is never logged."""

    def __init__(self, app, key: str, count_error):
        self.app, self._key, self._count_error = app, key.encode(), count_error

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            value = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, token = value.partition(b" ")
            if not (scheme.lower() == b"bearer" and secrets.compare_digest(token.strip(), self._key)):
                err = APIError(401, "missing or wrong API key: send the header `Authorization: Bearer <key>`",
                               "authentication_error", code="invalid_api_key")
                self._count_error(err.type)
                await err.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


class _ChoiceText:
    """The text of one choice: token ids decoded as they come, cut before the first stop string.
    A stream holds back the last (longest stop − 1) characters, which could begin a stop string,
    until the choice finishes.

    Decoding is incremental, as vLLM's detokenizer: each token decodes only the ids since the last
    complete text (`prefix`..end, against `prefix`..`read` for the text they already gave, so a
    byte-level or SentencePiece tokenizer sees its context), and waits while they end inside a
    UTF-8 character. Stop strings are searched only in the new text and the (longest stop − 1)
    characters before it. So each token costs a bounded amount of work, not O(length)."""

    def __init__(self, tokenizer, stops: list[str]):
        self.tokenizer, self.stops = tokenizer, stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.ids: list[int] = []
        self.text, self.sent, self.sent_ids, self.stopped = "", 0, 0, False
        self._prefix = self._read = 0  # ids[_prefix:_read] decode to the end of `text`; ids[_read:] are pending

    def add(self, token_id: int) -> None:
        self.ids.append(token_id)
        if not self.stopped:
            self._decode(final=False)

    def _decode(self, final: bool) -> None:
        """Append the text of the pending ids, unless they end inside a character (and not final)."""
        if self._read == len(self.ids):
            return
        before = self.tokenizer.decode(self.ids[self._prefix : self._read], skip_special_tokens=True)
        after = self.tokenizer.decode(self.ids[self._prefix :], skip_special_tokens=True)
        if not final and (len(after) < len(before) or after.endswith("\ufffd")):
            return  # the last character is not complete yet
        new = after[len(before) :]
        self._prefix, self._read = self._read, len(self.ids)
        start = max(0, len(self.text) - self.hold)  # a stop string may begin in text already seen
        self.text += new
        cut = self._find_stop(self.text, start)
        if cut is not None:
            self.text, self.stopped = self.text[:cut], True

    def _find_stop(self, text: str, start: int) -> int | None:
        """Where the first stop string begins in text[start:], or None."""
        cuts = [i for i in (text.find(s, start) for s in self.stops) if i >= 0]
        return min(cuts) if cuts else None

    def delta(self, final: bool) -> str:
        if final and not self.stopped:
            self._decode(final=True)  # the rest, even a last incomplete character (as a whole decode shows it)
        end = len(self.text) if final else len(self.text) - self.hold
        out = self.text[self.sent : end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return out

    def new_ids(self) -> list[int]:
        """Token ids not yet sent in a chunk."""
        out, self.sent_ids = self.ids[self.sent_ids :], len(self.ids)
        return out


class _Reply:
    """Builds the response objects (whole, or as stream chunks) of one request."""

    def __init__(self, chat: bool, model: str, lam, n: int, tokenizer, stops: list[str], prompt_tokens: int,
                 token_ids: bool):
        self.chat, self.model, self.lam, self.prompt_tokens, self.token_ids = chat, model, lam, prompt_tokens, token_ids
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.texts = [_ChoiceText(tokenizer, stops) for _ in range(n)]
        self.finish: list[str | None] = [None] * n

    def add(self, event: TokenEvent, generation: Generation) -> tuple[str, str | None]:
        """Take one token; returns (new text to stream, finish reason or None)."""
        text = self.texts[event.index]
        text.add(event.token_id)
        finish = "stop" if text.stopped else event.finish_reason
        if text.stopped and event.finish_reason is None:
            generation.cancel(event.index)
        self.finish[event.index] = finish
        return text.delta(final=finish is not None), finish

    def _envelope(self, obj: str, choices: list[dict]) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices,
                "alignment_strength": self.lam}

    def usage(self) -> dict:
        completion = sum(len(t.ids) for t in self.texts)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion}

    def whole(self) -> dict:
        if self.chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": t.text}, "logprobs": None,
                        "finish_reason": f} for i, (t, f) in enumerate(zip(self.texts, self.finish))]
        else:
            choices = [{"index": i, "text": t.text, "logprobs": None, "finish_reason": f}
                       for i, (t, f) in enumerate(zip(self.texts, self.finish))]
        if self.token_ids:
            for choice, t in zip(choices, self.texts):
                choice["token_ids"] = t.ids
        return {**self._envelope("chat.completion" if self.chat else "text_completion", choices), "usage": self.usage()}

    def chunk(self, index: int, text: str | None, finish: str | None, role: bool = False) -> dict:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if role else {} if text is None else {"content": text}
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}
        if self.token_ids and not role:
            choice["token_ids"] = self.texts[index].new_ids()
        return self._envelope("chat.completion.chunk" if self.chat else "text_completion", [choice])

    def usage_chunk(self) -> dict:
        return {**self._envelope("chat.completion.chunk" if self.chat else "text_completion", []), "usage": self.usage()}


class _EventStream(StreamingResponse):
    """An SSE response whose `on_close` runs however it ends: finished, failed, or cancelled
    because the client went away (even before the first chunk, when the body generator never
    started and so could not clean up after itself)."""

    def __init__(self, content, on_close):
        super().__init__(content, media_type="text/event-stream")
        self.on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


async def _cancel_on_disconnect(request: Request, generation: Generation) -> None:
    """Cancel a non-streamed generation when its client hangs up (Starlette already does this
    for streamed responses, by cancelling the stream)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    generation.cancel()


_EVENT_ERROR_TYPES = {400: "invalid_request_error", 503: "service_unavailable"}


def _event_error(event: TokenEvent) -> APIError:
    """The APIError of an engine's error event: its status says whose fault it was (400: the
    request's own values, e.g. a λ whose mix overflows; 503: the engine has stopped)."""
    param = "alignment_strength" if event.status == 400 else None
    return APIError(event.status, f"generation failed: {event.error}", _EVENT_ERROR_TYPES.get(event.status, "server_error"),
                    param=param)


def create_app(engine, settings: ServerSettings) -> FastAPI:
    """The FastAPI app over `engine`, an engine's `continuous()` shape (the interface is stated in
    aligndial/engines.py). The app starts the engine on startup; on shutdown (SIGTERM: uvicorn first lets running requests finish
    and refuses new connections) it stops the engine."""
    metrics = Metrics()
    tokenizer = engine.tokenizer
    max_prompt_chars = settings.max_prompt_chars or engine.context_length * limits.CHARS_PER_TOKEN
    # One worker: prompts are tokenized off the event loop, one at a time (a fast tokenizer used
    # from two threads at once can fail with "Already borrowed").
    tokenize_pool = ThreadPoolExecutor(1, thread_name_prefix="aligndial-tokenize")

    async def off_loop(fn, *args):
        return await asyncio.get_running_loop().run_in_executor(tokenize_pool, fn, *args)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        await asyncio.to_thread(engine.shutdown)
        tokenize_pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="aligndial", lifespan=lifespan)
    install_handlers(app, lambda kind: metrics.errors.update([kind]))
    app.add_middleware(ReadBody, max_bytes=settings.max_body_bytes, timeout=settings.body_timeout,
                       count_error=lambda kind: metrics.errors.update([kind]))
    if settings.api_key:
        app.add_middleware(_RequireKey, key=settings.api_key, count_error=lambda kind: metrics.errors.update([kind]))
    key_metrics = keys.KeyMetrics()
    if settings.keys is not None or settings.usage_log:
        app.add_middleware(keys.KeyGate, store=settings.keys, metrics=key_metrics,
                           usage_log=keys.UsageLog(settings.usage_log) if settings.usage_log else None,
                           count_error=lambda kind: metrics.errors.update([kind]))

    def strength(body: _Sampling, default):
        """The λ for this request (default if none), checked against the server: one weight per
        aligned model, each within --lam-range. Returned as the client gave it (number or list)."""
        try:
            name, lam = body.strength()
        except ValueError as e:
            raise APIError(400, str(e), param="alignment_strength") from None
        if engine.n_aligned == 0:
            if lam is not None:
                raise APIError(400, f"`{name}` has no effect: this server runs a plain model. Start it with "
                                    "`--model M --adapter A` or `--ref R --aligned A` to mix.", param=name)
            return None
        lam = default if lam is None else lam
        weights = lam if isinstance(lam, list) else [lam]
        if len(weights) != engine.n_aligned:
            raise APIError(400, f"`{name}` needs {engine.n_aligned} weight(s), one per aligned model; got {lam!r}", param=name)
        lo, hi = settings.lam_range
        for w in weights:
            if not lo <= w <= hi:
                raise APIError(400, f"`{name}` must be within [{lo}, {hi}] (the server's --lam-range); got {w}", param=name)
        return lam

    def check_temperature(body: _Sampling) -> None:
        t = body.temperature
        if 0 < t < settings.min_temperature:
            raise APIError(400, f"`temperature` must be 0 (greedy) or at least {settings.min_temperature:g} "
                                f"(the server's --min-temperature); got {t:g}", param="temperature")

    def check_prompt_chars(field_name: str, chars: int) -> None:
        """The early bound on characters, before any tokenizing (limits.CHARS_PER_TOKEN)."""
        if chars > max_prompt_chars:
            raise APIError(400, f"`{field_name}` is {chars} characters long; this server takes at most "
                                f"{max_prompt_chars} (--max-prompt-chars); shorten it", param=field_name)

    async def answer(request: Request, body: _Sampling, prompt_ids: list[int], chat: bool, max_tokens: int | None):
        if body.model is not None and body.model != settings.model_name:
            raise APIError(404, f"model {body.model!r} does not exist; this server serves {settings.model_name!r} "
                                "(see GET /v1/models)", param="model", code="model_not_found")
        lam = strength(body, keys.default_lam(request, settings.default_lam))
        use = request.scope.get(keys.SCOPE_KEY)
        if use is not None:
            use.model, use.lam = settings.model_name, lam
        keys.check_request(use, key_metrics, settings.model_name, lam,
                           "lam" if body.lam is not None and body.alignment_strength is None else "alignment_strength",
                           max_tokens)
        check_temperature(body)
        prompt_field = "messages" if chat else "prompt"
        ctx, p = engine.context_length, len(prompt_ids)
        if p == 0:
            raise APIError(400, f"`{prompt_field}` is empty after tokenization; send at least one token", param=prompt_field)
        if p >= ctx:
            raise APIError(400, f"the prompt is {p} tokens long but the model's context is {ctx} tokens, and at least "
                                "one token must be generated; shorten the prompt", param=prompt_field)
        if max_tokens is None:
            max_tokens = ctx - p if chat else min(COMPLETION_DEFAULT_MAX_TOKENS, ctx - p)
            max_tokens = min(max_tokens, keys.max_tokens_cap(request) or max_tokens)
        if p + max_tokens > ctx:
            raise APIError(400, f"the prompt ({p} tokens) + max_tokens ({max_tokens}) = {p + max_tokens} exceeds the "
                                f"model's context of {ctx} tokens; lower max_tokens to at most {ctx - p} or shorten the "
                                "prompt", param="max_tokens")
        if body.n > engine.max_concurrency:
            raise APIError(400, f"`n` is {body.n} but this server decodes at most {engine.max_concurrency} sequences "
                                "at once (--max-concurrency); lower n", param="n")
        weights = None if lam is None else lam if isinstance(lam, list) else [lam]
        gen_request = GenerationRequest(prompt_ids, max_tokens, weights, body.n, body.temperature, body.top_p,
                                        body.top_k, body.seed)
        try:
            generation = engine.submit(gen_request)
        except EngineOverloaded as e:
            raise APIError(429, f"the server is overloaded ({e}); retry later", "overloaded_error",
                           code="server_overloaded", headers={"Retry-After": "1"}) from None
        except EngineUnavailable as e:
            raise APIError(503, f"the server cannot take requests: {e}", "service_unavailable") from None
        metrics.prompt_tokens += p
        metrics.in_flight += 1
        reply = _Reply(chat, settings.model_name, lam, body.n, tokenizer, body.stop, p, body.return_token_ids)
        if use is not None:
            use.reply = reply
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return _EventStream(stream(generation, reply, include_usage), on_close=lambda: done(generation))
        return await collect(request, generation, reply)

    async def collect(request: Request, generation: Generation, reply: _Reply) -> JSONResponse:
        watcher = asyncio.create_task(_cancel_on_disconnect(request, generation))
        try:
            async for event in generation:
                if event.error is not None:
                    raise _event_error(event)
                reply.add(event, generation)
        finally:
            watcher.cancel()
            done(generation)
        return JSONResponse(reply.whole())

    async def stream(generation: Generation, reply: _Reply, include_usage: bool):
        """SSE chunks. An error after the first chunk (the 200 is already sent) becomes an error
        event, then `data: [DONE]`."""
        if reply.chat:
            for i in range(len(reply.texts)):
                yield _sse(reply.chunk(i, None, None, role=True))
        try:
            async for event in generation:
                if event.error is not None:
                    raise _event_error(event)
                text, finish = reply.add(event, generation)
                if text or finish or reply.token_ids:  # text may wait for the rest of a UTF-8 character
                    yield _sse(reply.chunk(event.index, text, finish))
            if include_usage:
                yield _sse(reply.usage_chunk())
        except Exception as e:
            err = e if isinstance(e, APIError) else APIError(500, f"internal error: {type(e).__name__}: {e}", "server_error")
            if not isinstance(e, APIError):
                log.exception("error while streaming")
            metrics.errors[err.type] += 1
            reply.error_status = err.status  # for the usage log: this 200 stream ended in an error
            yield _sse(err.body())
        yield "data: [DONE]\n\n"

    def done(generation: Generation) -> None:
        """However a request ends (answered, failed, client gone): stop what is left of it."""
        generation.cancel()
        metrics.in_flight -= 1

    @app.get("/health")
    async def health():
        if engine.healthy():
            return {"status": "ok"}
        return APIError(503, "the engine is not running", "service_unavailable").response()

    @app.get("/metrics")
    async def prometheus():
        text = metrics.render(engine.stats(), engine.healthy())
        if settings.keys is not None or settings.usage_log:
            text += key_metrics.render(settings.keys.reloads if settings.keys is not None else None)
        return Response(text, media_type="text/plain; version=0.0.4")

    @app.get("/", include_in_schema=False)
    @app.get("/playground", include_in_schema=False)
    async def playground():
        return FileResponse(STATIC / "index.html")

    @app.get("/playground/config")
    async def playground_config():
        """What the page needs before its first API call; no model name (that stays behind the key)."""
        return {"lam_range": list(settings.lam_range), "default_lam": settings.default_lam,
                "n_aligned": engine.n_aligned, "context_length": engine.context_length,
                "api_key_required": bool(settings.api_key) or settings.keys is not None}

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/v1/policy")
    async def policy(request: Request):
        """The λ policy of the key this request sends (the playground's slider): the key's range and
        default, or the server's."""
        use = request.scope.get(keys.SCOPE_KEY)
        key = use.key.public() if use is not None and use.key is not None else {}
        return {**key, "lam_range": key.get("lam_range") or list(settings.lam_range),
                "own_default": key.get("default_lam") is not None,
                "default_lam": settings.default_lam if key.get("default_lam") is None else key["default_lam"]}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": settings.model_name, "object": "model", "created": 0, "owned_by": "aligndial"}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        check_prompt_chars("prompt", len(body.prompt))
        ids = await off_loop(lambda: tokenizer(body.prompt)["input_ids"])
        return await answer(request, body, ids, chat=False, max_tokens=body.max_tokens)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        if tokenizer.chat_template is None:
            raise APIError(400, "this model's tokenizer has no chat template; use /v1/completions with a plain prompt",
                           param="messages")
        messages = [m.as_template_input() for m in body.messages]
        check_prompt_chars("messages", sum(len(m["content"]) + len(m["role"]) for m in messages))

        def render_and_tokenize() -> list[int]:
            try:
                text = render_prompts(tokenizer, [messages], chat=True)[0]
            except TemplateError as e:  # e.g. "Conversation roles must alternate user/assistant/..."
                raise APIError(400, f"the model's chat template refused these messages: {e}", param="messages") from None
            return tokenizer(text, add_special_tokens=False)["input_ids"]

        return await answer(request, body, await off_loop(render_and_tokenize), chat=True,
                            max_tokens=body.token_budget())

    app.add_middleware(_CountRequests, metrics=metrics, endpoints={r.path for r in app.routes})
    return app
