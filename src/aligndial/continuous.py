"""Continuous batching on transformers: `HFEngine`, what `aligndial.engines.TransformersEngine.continuous()`
gives `aligndial serve`, and the types of that serving shape (`GenerationRequest`, `TokenEvent`,
`Generation`; the interface is stated in `aligndial.engines`). `aligndial.vllm.engine.VLLMEngine`
is the same shape on vLLM. One background thread runs the decode steps of every admitted sequence.

It knows nothing about HTTP or text: a request comes in as prompt token ids with its own λ and
sampling settings, and tokens go out as events on an async iterator. `aligndial.serve.app`
tokenizes, validates and detokenizes.

Each turn of the loop (continuous batching):

1. admit waiting requests while rows are free: prefill each prompt alone in its own cache,
   sample its first token(s), and append its rows to the running batch (`aligndial.batch_cache.BatchCache`);
2. one decode step for all rows: the model's own forward with a (B, K) λ tensor, one row per
   sequence, and `run_all=True`, so every cache stays complete whatever λ a row has. The mixing
   happens inside the model (`aligndial.mixing`), never here;
3. sample each row with its own settings and `torch.Generator`, emit its token, and drop the
   rows that finished (on the EOS ids of the members its own λ runs, as `generate` stops:
   `aligndial.pair.stop_ids`) or whose client went away.

So a short request joins and leaves while a long one runs. Padding is masked and positions are
per row, so a row's logits inside any batch are its logits alone, up to the rounding of batched
kernels: greedy rows decode the same tokens (tested against requests alone and `generate`).

Isolation (docs/reliability.md, case 27): an exception while serving one request fails that request
only, with an error event per sequence, and its rows leave the batch:

- anything in its prefill (its generators, its forward, its first samples);
- its sampling at any step (NaN logits, a temperature the sampler cannot use, ...);
- its λ-mix overflowing the model's dtype (float16 at a large |λ|), at prefill or in a decode
  step: a model that takes `nan_rows` hands that row back as NaN instead of raising for the
  step, and the request fails with status 400 naming λ and the dtype (case 38);
- a decode step's shared forward fails the rows of that step (they share it), then the loop goes on.

Anything else (the batch bookkeeping itself) is an engine-level fault: the rows in the batch get
an error event, the loop restarts with an empty batch, and `stats()["engine_restarts"]` counts it.
Waiting requests are kept. After `RESTART_LIMIT` faults within `RESTART_WINDOW` seconds the
thread gives up and stops, `healthy()` turns false, and /health answers 503; from the moment it
gives up, `submit` refuses (503) and every queued request ends with status 503 (case 41). In
every case the counts of admitted sequences return to what is really in flight.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from aligndial.batch_cache import BatchCache
from aligndial.dualpath import DualPathModel
from aligndial.loading import context_length
from aligndial.pair import RealignedPair

log = logging.getLogger("aligndial.serve")

# An engine that faults this many times within RESTART_WINDOW seconds stops instead of restarting
# again (health turns 503), so a fault that recurs on every step does not loop forever.
RESTART_LIMIT = 5
RESTART_WINDOW = 60.0
STOPPED = "the engine has stopped"


@dataclass(frozen=True)
class GenerationRequest:
    """Continue `prompt_ids` `n` times. `lam` holds one weight per aligned model (None for a plain
    model). temperature 0 is greedy; top_k 0 is off; sequence i samples with `seed + i`."""

    prompt_ids: list[int]
    max_tokens: int
    lam: list[float] | None = None
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None


@dataclass(frozen=True)
class TokenEvent:
    """One generated token of sequence `index`; the last event of a sequence has a finish_reason:
    "stop" (an end-of-sequence token, included as `token_id`), "length" (max_tokens) or "error"
    (then `token_id` is None, `error` says what happened and `status` whose fault it was)."""

    index: int
    token_id: int | None
    finish_reason: str | None = None
    error: str | None = None
    status: int = 500  # the HTTP status of an error: 400 when the request's own values caused it, 503 when the engine stopped


class EngineOverloaded(Exception):
    """More sequences than `max_concurrency + max_queue` would be in flight."""


class EngineUnavailable(Exception):
    """The engine is shutting down, or its thread has died."""


class Generation:
    """What `submit` returns: an async iterator of `TokenEvent`s for the request's n sequences,
    which ends when each has finished. `cancel()` stops them (the client went away), and
    `cancel(i)` stops sequence i (a stop string was found)."""

    def __init__(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop):
        self.request = request
        self._loop = loop
        self._events: asyncio.Queue[TokenEvent | None] = asyncio.Queue()
        self._done: set[int] = set()  # finished or cancelled, seen from the event loop
        self.cancelled: set[int] = set()  # read by the engine thread between steps

    def cancel(self, index: int | None = None) -> None:
        indices = range(self.request.n) if index is None else [index]
        self.cancelled.update(indices)
        self._done.update(indices)
        self._events.put_nowait(None)  # wake a reader waiting for an event that will not come

    def __aiter__(self):
        return self

    async def __anext__(self) -> TokenEvent:
        while len(self._done) < self.request.n:
            event = await self._events.get()
            if event is None or event.index in self._done:
                continue
            if event.finish_reason is not None:
                self._done.add(event.index)
            return event
        raise StopAsyncIteration

    def emit(self, event: TokenEvent) -> None:
        """Called from the engine thread."""
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, event)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            self.cancelled.update(range(self.request.n))


@dataclass
class _Row:
    """One sequence in the running batch."""

    generation: Generation
    index: int
    generator: torch.Generator
    stop_ids: frozenset[int]  # the EOS ids of the members this row's λ runs (HFEngine._stop_ids)
    position: int  # position id of the next token fed (= tokens so far)
    token: int = -1  # the last sampled token, fed at the next step
    produced: int = 0
    finished: bool = False

    @property
    def request(self) -> GenerationRequest:
        return self.generation.request

    @property
    def gone(self) -> bool:
        return self.finished or self.index in self.generation.cancelled


def _members(model) -> list:
    if isinstance(model, RealignedPair):
        return model.members
    return [model.base if isinstance(model, DualPathModel) else model]


def sample(logits: torch.Tensor, request: GenerationRequest, generator: torch.Generator) -> int:
    """One token id from (V,) float32 logits: greedy at temperature 0, else temperature, top-k and
    top-p (the most likely token always survives), then a draw from the row's own generator.
    Raises ValueError instead of picking a token from NaN (argmax returns a NaN's index)."""
    if torch.isnan(logits).any():
        raise ValueError("the model's logits contain NaN; check its weights and dtype")
    if request.temperature == 0:
        return int(logits.argmax())
    # Shift by the max before dividing: softmax is shift-invariant, and (x − max)/T ≤ 0 cannot
    # overflow for any T > 0, where x/T can (40/1e-38 = inf, and softmax of inf is NaN).
    logits = (logits - logits.max()) / request.temperature
    if 0 < request.top_k < logits.shape[-1]:
        kth = torch.topk(logits, request.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if request.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        drop = probs.cumsum(-1) - probs > request.top_p  # tokens entirely past the nucleus
        logits = logits.index_fill(-1, order[drop], float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if not torch.isfinite(probs).all():
        raise ValueError(f"sampling at temperature {request.temperature} gave non-finite probabilities")
    return int(torch.multinomial(probs, 1, generator=generator))


class HFEngine:
    """Continuous batching over a Hugging Face model (`TransformersEngine.continuous()` wraps its own,
    loaded once): a `RealignedPair`, a `LoraPair`, a `DualPathModel`, or a plain causal LM
    (`n_aligned` 0, no λ). At most `max_concurrency` sequences decode together and
    `max_queue` more may wait; `submit` refuses the rest (HTTP 429)."""

    def __init__(self, model, tokenizer, n_aligned: int, max_concurrency: int = 8, max_queue: int = 64):
        if max_concurrency < 1 or max_queue < 0:
            raise ValueError(f"`--max-concurrency` must be ≥ 1 and `--max-queue` ≥ 0; got {max_concurrency} and {max_queue}")
        for m in _members(model):
            if "position_ids" not in inspect.signature(m.forward).parameters:
                raise ValueError(f"{type(m).__name__} takes no position_ids, so padded rows cannot keep their positions; "
                                 "the batching engine cannot serve it")
        self.model, self.tokenizer, self.n_aligned = model, tokenizer, n_aligned
        self.max_concurrency, self.max_queue = max_concurrency, max_queue
        self.context_length = context_length([getattr(m.config, "max_position_embeddings", None)
                                              for m in _members(model)], tokenizer)
        eos = model.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])  # a plain model's
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        # A model that can hand back a row whose λ-mix overflowed as NaN (instead of raising for the
        # whole step) gets asked to: then that row fails alone (docs/reliability.md, case 38).
        self._nan_rows = "nan_rows" in inspect.signature(model.forward).parameters
        self.counters = {"prefills": 0, "decode_steps": 0, "decode_rows": 0, "generated_tokens": 0,
                         "engine_restarts": 0}
        self._lock = threading.Condition()
        self._waiting: deque[Generation] = deque()
        self._admitting: deque[Generation] = deque()  # taken from _waiting, not yet prefilled
        self._faults: deque[float] = deque()  # times of recent engine-level faults
        self._running = 0  # len(self._rows), as last published to the event loop
        self._stopping = False
        self._stopped = False  # the thread gave up or drained: set before it empties its queues
        self._rows: list[_Row] = []
        self._batch: BatchCache | None = None
        self._thread = threading.Thread(target=self._run, name="aligndial-engine", daemon=True)
        self._check_layout()

    # --- the serving shape (aligndial.engines), event-loop side ----------------------------------------

    def start(self) -> None:
        self._thread.start()

    def healthy(self) -> bool:
        return self._thread.is_alive() and not self._stopping and not self._stopped

    def submit(self, request: GenerationRequest) -> Generation:
        """Queue a request; raises `EngineOverloaded` or `EngineUnavailable` instead of queueing
        without bound. Call from the event loop that will read the events."""
        generation = Generation(request, asyncio.get_running_loop())
        with self._lock:
            if self._stopping or self._stopped or not self._thread.is_alive():
                raise EngineUnavailable("the engine is shutting down" if self._stopping else "the engine has stopped")
            in_flight = self._queued() + self._running
            if in_flight + request.n > self.max_concurrency + self.max_queue:
                raise EngineOverloaded(f"{in_flight} sequences are in flight and the server takes at most "
                                       f"{self.max_concurrency} running + {self.max_queue} waiting")
            self._waiting.append(generation)
            self._lock.notify()
        return generation

    def stats(self) -> dict:
        with self._lock:
            return {"running": self._running, "waiting": self._queued(), **self.counters}

    def _queued(self) -> int:
        """Sequences waiting for a row whose client is still there (lock held). Counted from the
        queues themselves rather than kept as a running total, so no failure path can leave a
        stale count behind (a leaked total once refused requests with nothing running)."""
        return sum(g.request.n - len(g.cancelled) for q in (self._waiting, self._admitting) for g in q)

    def shutdown(self, timeout: float | None = None) -> None:
        """Refuse new requests, let the admitted ones finish, then stop the thread."""
        with self._lock:
            self._stopping = True
            self._lock.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # --- the engine thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            with torch.inference_mode():
                while not self._serve():
                    pass
        except BaseException:
            log.exception("the engine thread died")
            raise
        finally:  # after a crash, nobody may wait forever (after a drain, nothing is left)
            with self._lock:  # from here `submit` refuses (503), so nothing joins a queue nobody reads
                self._stopped = True
                waiting, self._waiting = list(self._admitting) + list(self._waiting), deque()
                self._admitting = deque()
            rows, self._rows, self._batch = self._rows, [], None
            self._fail(rows, STOPPED, status=503)
            self._fail_waiting(waiting, STOPPED, status=503)

    def _serve(self) -> bool:
        """Run the loop; True when it stopped cleanly, False after a fault it recovered from."""
        try:
            self._loop()
            return True
        except Exception as e:
            now = time.monotonic()
            self._faults.append(now)
            while self._faults and self._faults[0] < now - RESTART_WINDOW:
                self._faults.popleft()
            if len(self._faults) > RESTART_LIMIT:
                log.error("the engine faulted %d times within %g s; stopping it", len(self._faults), RESTART_WINDOW)
                raise
            log.exception("engine fault: failing the %d sequence(s) in the batch and restarting the engine loop",
                          len(self._rows))
            rows, self._rows, self._batch = self._rows, [], None
            self._fail(rows, f"engine fault: {type(e).__name__}: {e}")
            self.counters["engine_restarts"] += 1
            return False

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._waiting and not self._admitting and not self._rows and not self._stopping:
                    self._lock.wait()
                if not self._waiting and not self._admitting and not self._rows:
                    return  # stopping, and everything admitted has finished
                self._admitting.extend(self._take_waiting())
            while self._admitting:  # each _prefill moves the head out of _admitting, into the batch or failed
                self._prefill(self._admitting[0])
            self._prune()
            if self._rows:
                self._decode_step()
                self._prune()

    def _fail_waiting(self, generations: list[Generation], message: str, status: int = 500) -> None:
        """End requests that have no rows and are in no queue, with an error event per sequence."""
        for generation in generations:
            for i in range(generation.request.n):
                if i not in generation.cancelled:
                    generation.emit(TokenEvent(i, None, "error", message, status))
        self._account()

    def _take_waiting(self) -> list[Generation]:
        """Pop waiting requests, in order, while their sequences fit in the free rows (lock held)."""
        taken, free = [], self.max_concurrency - len(self._rows) - sum(g.request.n for g in self._admitting)
        while self._waiting:
            head = self._waiting[0]
            if len(head.cancelled) == head.request.n:  # the client left while it waited
                self._waiting.popleft()
            elif head.request.n <= free:
                taken.append(self._waiting.popleft())
                free -= head.request.n
            else:
                break
        return taken

    def _new_cache(self):
        return self.model.new_cache() if self.n_aligned else DynamicCache(config=self.model.config)

    def _forward(self, input_ids, mask, positions, cache, lam) -> torch.Tensor:
        """(B, V) float32 next-token logits, λ-mixed by the model itself."""
        kwargs = dict(attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True, logits_to_keep=1)
        if self.n_aligned:
            kwargs.update(lam=lam, run_all=True)
        if self._nan_rows:
            kwargs["nan_rows"] = True
        # A mixed model raises on NaN itself; for a plain one, sample() refuses a NaN row (that
        # request fails, not the whole step).
        return self.model(input_ids, **kwargs).logits[:, -1].float()

    def _lam(self, rows: list[_Row]) -> torch.Tensor | None:
        return torch.tensor([r.request.lam for r in rows], dtype=torch.float32) if self.n_aligned else None

    def _check_layout(self) -> None:
        """A one-token forward at startup: the model runs, and its cache can be batched."""
        with torch.inference_mode():
            cache = self._new_cache()
            ids = torch.tensor([[self.tokenizer.bos_token_id or 0]], device=self.device)
            lam = torch.ones(1, self.n_aligned) if self.n_aligned else None
            self._forward(ids, torch.ones_like(ids), torch.zeros_like(ids), cache, lam)
            BatchCache(cache, torch.ones_like(ids))

    def _prefill(self, generation: Generation) -> None:
        """Run the prompt alone, sample the first token of each of its n sequences, and append
        their rows (copies of the prompt's cache) to the running batch. Any error before the rows
        join the batch fails this request only."""
        request = generation.request
        try:
            ids = torch.tensor([request.prompt_ids], device=self.device)  # (1, T)
            mask, positions = torch.ones_like(ids), torch.arange(ids.shape[1], device=self.device)[None]
            stop = self._stop_ids(request.lam)
            rows = [_Row(generation, i, self._generator(request, i), stop, position=ids.shape[1]) for i in range(request.n)]
            cache = self._new_cache()
            logits = self._forward(ids, mask, positions, cache, self._lam(rows[:1]))
            self.counters["prefills"] += 1
            new = BatchCache(cache, mask)
            if request.n > 1:
                new.select([0] * request.n)
        except Exception as e:
            log.exception("prefill failed")
            with self._lock:
                self._admitting.popleft()
            self._fail_waiting([generation], f"prefill failed: {type(e).__name__}: {e}")
            return
        with self._lock:  # from queued to running in one step, so `submit` never sees it in neither
            self._admitting.popleft()
            self._rows += rows
            self._running = len(self._rows)
        # The rows are in the batch now: a fault while merging caches is an engine fault (the batch
        # may be half-merged), and fails them with the rest of the batch.
        if self._batch is None:
            self._batch = new
        else:
            self._batch.append(new)
        self._advance(rows, logits.expand(request.n, -1))

    def _decode_step(self) -> None:
        rows = self._rows
        try:
            mask = self._batch.grow()
            ids = torch.tensor([[r.token] for r in rows], device=self.device)
            positions = torch.tensor([[r.position] for r in rows], device=self.device)
            logits = self._forward(ids, mask, positions, self._batch.cache, self._lam(rows))
        except Exception as e:
            log.exception("decode step failed")
            self._rows, self._batch = [], None
            self._fail(rows, f"decode step failed: {type(e).__name__}: {e}")
            return
        self.counters["decode_steps"] += 1
        self.counters["decode_rows"] += len(rows)
        for r in rows:
            r.position += 1
        self._advance(rows, logits)

    def _advance(self, rows: list[_Row], logits: torch.Tensor) -> None:
        """Sample one token per live row from its (V,) logits and emit it. A row that cannot be
        sampled fails its whole request (every row of it), and only that request."""
        for row, row_logits in zip(rows, logits):
            if row.gone:
                continue
            try:
                token = sample(row_logits, row.request, row.generator)  # refuses NaN logits
            except Exception as e:
                overflow = self._overflow(row, row_logits)  # the request's own λ, or something else?
                log.warning("sampling failed for one request (%s); failing that request", overflow or f"{type(e).__name__}: {e}")
                self._fail_request(row.generation, overflow or f"sampling failed: {type(e).__name__}: {e}",
                                   status=400 if overflow else 500)
                continue
            row.token, row.produced = token, row.produced + 1
            finish = "stop" if token in row.stop_ids else "length" if row.produced >= row.request.max_tokens else None
            row.finished = finish is not None
            self.counters["generated_tokens"] += 1
            row.generation.emit(TokenEvent(row.index, token, finish))

    def _stop_ids(self, lam: list[float] | None) -> frozenset[int]:
        """The EOS ids of a row with this λ: those of the members its λ runs, as `generate` stops
        (`RealignedPair.eos_token_ids`, one rule for every engine), never those of the batch."""
        by_lam = getattr(self.model, "eos_token_ids", None)
        return frozenset(self.eos_ids if by_lam is None or lam is None else by_lam(list(lam)))

    def _prune(self) -> None:
        """Drop finished and cancelled rows from the batch."""
        keep = [i for i, r in enumerate(self._rows) if not r.gone]
        if len(keep) == len(self._rows):
            return
        self._rows = [self._rows[i] for i in keep]
        if keep:
            self._batch.select(keep)
        else:
            self._batch = None
        self._account()

    def _overflow(self, row: _Row, logits: torch.Tensor) -> str | None:
        """Why this row's logits are NaN when the cause is the request's own λ, else None. A mix
        whose weights [1 − Σλ, λ_1, …] all lie in [0, 1] is an interpolation and cannot overflow,
        so NaN there means a broken model (sample() says so); a weight outside [0, 1] scales the
        hidden states up, and the model's dtype (float16: 65504) can overflow."""
        lam = row.request.lam
        if lam is None or not bool(torch.isnan(logits).any()):
            return None
        weights = [1.0 - sum(lam), *lam]
        if all(0.0 <= w <= 1.0 for w in weights):
            return None
        dtype = str(self.dtype).removeprefix("torch.")
        shown = f"{lam[0]:g}" if len(lam) == 1 else str(lam)
        return (f"`alignment_strength` {shown} makes the λ-mix of this {dtype} model overflow {dtype}; use a smaller "
                "|λ|, or serve the model with `--dtype bfloat16` or `--dtype float32`")

    def _fail_request(self, generation: Generation, message: str, status: int = 500) -> None:
        """End every live row of `generation` in the batch with an error event; `_prune` then
        removes them (and counts them)."""
        for r in self._rows:
            if r.generation is generation and not r.gone:
                r.generation.emit(TokenEvent(r.index, None, "error", message, status))
                r.finished = True

    def _fail(self, rows: list[_Row], message: str, status: int = 500) -> None:
        """End `rows`, which are no longer in the batch, with an error event each."""
        for r in rows:
            if not r.gone:
                r.generation.emit(TokenEvent(r.index, None, "error", message, status))
            r.finished = True
        self._account()

    def _account(self) -> None:
        """Publish the number of running rows, which `submit` and `stats` read on the event loop."""
        with self._lock:
            self._running = len(self._rows)

    @staticmethod
    def _generator(request: GenerationRequest, index: int) -> torch.Generator:
        generator = torch.Generator()
        if request.seed is None:
            generator.seed()
        else:
            generator.manual_seed(request.seed + index)
        return generator
