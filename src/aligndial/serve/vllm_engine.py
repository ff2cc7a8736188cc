"""`VLLMEngine`: the serving engine interface of engine.py, on vLLM's `AsyncLLM`.

`create_app(engine, settings)` takes it in place of `HFEngine`, so the HTTP side (validation,
`alignment_strength`, streaming, stop strings, errors, the playground) is the same code. Here a
request's n sequences become n vLLM requests (sequence i samples with seed + i, as on the HF
engine), each with its λ in `SamplingParams.extra_args`; vLLM batches them continuously and
the aligndial plugin mixes each row with its own λ (aligndial/vllm/strength.py).

The engine starts in `start()` (the app's startup), where vLLM spawns its engine process
(seconds on CPU; docs/benchmarks.md, "vLLM"); `shutdown()` stops it. A cancelled sequence (client gone, stop string
found) cancels its task, and vLLM aborts the request.
"""

from __future__ import annotations

import asyncio
import logging
import uuid

from aligndial.serve.engine import EngineOverloaded, EngineUnavailable, Generation, GenerationRequest, TokenEvent

log = logging.getLogger("aligndial.serve")


class _VLLMGeneration(Generation):
    """A Generation whose cancel() also stops the vLLM requests behind it."""

    def __init__(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop):
        super().__init__(request, loop)
        self.tasks: dict[int, asyncio.Task] = {}

    def cancel(self, index: int | None = None) -> None:
        super().cancel(index)
        for i in range(self.request.n) if index is None else [index]:
            if i in self.tasks:
                self.tasks[i].cancel()


class VLLMEngine:
    """Serve an aligndial vLLM export (or a plain model, `n_aligned` 0) through vLLM.

    `engine_kwargs` go to `AsyncEngineArgs` (see aligndial.vllm.run.engine_kwargs). At most
    `max_concurrency` sequences decode together (vLLM's max_num_seqs) and `max_queue` more may
    wait; `submit` refuses the rest (HTTP 429)."""

    def __init__(self, engine_kwargs: dict, tokenizer, n_aligned: int, context_length: int,
                 max_concurrency: int = 8, max_queue: int = 64):
        if max_concurrency < 1 or max_queue < 0:
            raise ValueError(f"`--max-concurrency` must be ≥ 1 and `--max-queue` ≥ 0; got {max_concurrency} and {max_queue}")
        self.engine_kwargs = {**engine_kwargs, "max_num_seqs": max_concurrency, "max_model_len": context_length}
        self.tokenizer, self.n_aligned, self.context_length = tokenizer, n_aligned, context_length
        from aligndial.vllm.run import export_default_lam, member_eos

        # A pair whose members stop on different EOS ids: each row stops on its active members' (stop_kwargs).
        self.member_eos, self.default_lam = member_eos(engine_kwargs["model"]), export_default_lam(engine_kwargs["model"])
        self.max_concurrency, self.max_queue = max_concurrency, max_queue
        self.counters = {"prefills": 0, "decode_steps": 0, "decode_rows": 0, "generated_tokens": 0}
        self.llm = None
        self._in_flight = 0  # sequences submitted and not yet finished
        self._stopping = False

    # --- the interface the app uses -------------------------------------------------------------------

    def start(self) -> None:
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        from aligndial.vllm.run import cpu_tensor_parallel

        cpu_tensor_parallel(self.engine_kwargs.get("tensor_parallel_size", 1))
        self.llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**self.engine_kwargs, disable_log_stats=True))

    def healthy(self) -> bool:
        return self.llm is not None and not self.llm.errored and not self._stopping

    def stats(self) -> dict:
        # vLLM schedules the steps itself: every sequence in flight counts as running here.
        return {"running": self._in_flight, "waiting": 0, **self.counters}

    def submit(self, request: GenerationRequest) -> Generation:
        if not self.healthy():
            raise EngineUnavailable("the engine is shutting down" if self._stopping else "the vLLM engine is not running")
        if self._in_flight + request.n > self.max_concurrency + self.max_queue:
            raise EngineOverloaded(f"{self._in_flight} sequences are in flight and the server takes at most "
                                   f"{self.max_concurrency} running + {self.max_queue} waiting")
        generation = _VLLMGeneration(request, asyncio.get_running_loop())
        self._in_flight += request.n
        for i in range(request.n):
            task = generation.tasks[i] = asyncio.create_task(self._sequence(generation, i))
            # Counted down when the task ends however it ends: a task cancelled before its first step
            # never runs its body (nor a `finally` in it), and its sequence would stay "in flight".
            task.add_done_callback(self._sequence_done)
        return generation

    def _sequence_done(self, task: asyncio.Task) -> None:
        self._in_flight -= 1

    def shutdown(self, timeout: float | None = None) -> None:
        self._stopping = True
        if self.llm is not None:
            self.llm.shutdown()

    # --- one sequence -----------------------------------------------------------------------------------

    async def _sequence(self, generation: Generation, index: int) -> None:
        from vllm.sampling_params import RequestOutputKind

        from aligndial.vllm.run import sampling_params, stop_kwargs

        request = generation.request
        lam = None if request.lam is None else request.lam[0] if self.n_aligned == 1 else list(request.lam)
        params = sampling_params(
            request.max_tokens, lam, temperature=request.temperature, top_p=request.top_p, top_k=request.top_k,
            seed=None if request.seed is None else request.seed + index,
            output_kind=RequestOutputKind.DELTA, detokenize=False,
            **stop_kwargs(self.member_eos, lam if lam is not None else self.default_lam, self.n_aligned),
        )
        self.counters["prefills"] += 1
        finished = False
        try:
            async for out in self.llm.generate({"prompt_token_ids": request.prompt_ids}, params, uuid.uuid4().hex):
                completion = out.outputs[0]
                tokens = list(completion.token_ids)
                for j, token in enumerate(tokens):
                    finished = out.finished and j == len(tokens) - 1
                    self.counters["generated_tokens"] += 1
                    generation.emit(TokenEvent(index, token, _finish_reason(completion.finish_reason) if finished else None))
            if not finished:
                generation.emit(TokenEvent(index, None, "error", "vLLM ended the request without a final token"))
        except asyncio.CancelledError:
            pass  # the client went away or a stop string ended it: vLLM aborts the request
        except Exception as e:
            log.exception("vLLM generation failed")
            generation.emit(TokenEvent(index, None, "error", f"{type(e).__name__}: {e}"))


def _finish_reason(reason: str | None) -> str:
    return "length" if reason == "length" else "stop"
