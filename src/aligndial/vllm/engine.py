"""The `vllm` engine of `aligndial.engines` (the interface is stated there): `VLLMBatchEngine`
answers `rows` with one vLLM batch, and its `continuous()` gives `VLLMEngine`, the same engine
taking requests one at a time for `aligndial serve`.

Both run the directory `aligndial.vllm.run.model_dir` exported from the model flags (made once,
in `VLLMBatchEngine.from_args`, and removed by its `close()`), with each row's λ in
`SamplingParams.extra_args`; the aligndial plugin mixes each row with its own λ
(aligndial/vllm/strength.py).

`VLLMEngine` starts in `start()` (the app's startup), where vLLM spawns its engine process
(seconds on CPU; docs/benchmarks.md, "vLLM"); `shutdown()` stops it. A request's n sequences
become n vLLM requests (sequence i samples with seed + i, as on the HF engine); vLLM batches them
continuously. A cancelled sequence (client gone, stop string found) cancels its task, and vLLM
aborts the request.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

from aligndial.cliargs import check_lams_need_a_mix, check_settings
from aligndial.continuous import EngineOverloaded, EngineUnavailable, Generation, GenerationRequest, TokenEvent
from aligndial.loading import context_length
from aligndial.vllm.run import (
    CPU_LAYOUT_VARS,
    MAX_NUM_SEQS,
    cpu_tensor_parallel,
    engine_kwargs,
    export_default_lam,
    member_eos,
    model_dir,
    offline_on_cpu,
    restored_env,
    sampling_params,
    stop_kwargs,
)

log = logging.getLogger("aligndial.serve")


class VLLMBatchEngine:
    """The `vllm` engine of `aligndial.engines`: every (text, λ) of a `rows` call is one request of one
    vLLM batch, each with its own λ (and, when sampling, its own seed: `seed` + the text's index, so a
    prompt draws the same way at every λ, as on the HF engine). The engine starts at the first call
    and stays up until `close()`; prefix caching shares each prompt's KV blocks across its λ."""

    name = "vllm"

    def __init__(self, path: str, tokenizer, n_aligned: int, args, workdir=None):
        self.path, self.tokenizer, self.n_aligned, self.args = path, tokenizer, n_aligned, args
        self.tensor_parallel_size = getattr(args, "tensor_parallel_size", None) or 1
        self._workdir, self.llm, self._scorer = workdir, None, None
        self.member_eos = member_eos(path)

    @classmethod
    def from_args(cls, args, default_lam=None) -> VLLMBatchEngine:
        from aligndial.loading import load_tokenizer

        workdir = tempfile.TemporaryDirectory(prefix="aligndial-vllm-")
        try:
            path, n_aligned = model_dir(args, workdir.name, default_lam)
            return cls(path, load_tokenizer(path, args.trust_remote_code), n_aligned, args, workdir)
        except BaseException:
            workdir.cleanup()
            raise

    def _start(self, max_num_seqs: int) -> None:
        os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")  # stdout carries only the rows (`--json`)
        from vllm import LLM

        kw = engine_kwargs(self.path, self.args.dtype, max_num_seqs, tensor_parallel_size=self.tensor_parallel_size,
                           enforce_eager=getattr(self.args, "enforce_eager", False))
        with restored_env(*CPU_LAYOUT_VARS):  # vLLM reads them while it starts; later engines choose their own
            if self.tensor_parallel_size == 1:
                offline_on_cpu()
            else:
                cpu_tensor_parallel(self.tensor_parallel_size)
            self.llm = LLM(**kw, seed=getattr(self.args, "seed", None) or 0)

    def rows(self, texts: list[str], lams: list, settings) -> list[dict]:
        check_lams_need_a_mix(self.n_aligned, lams)
        check_settings(self.name, settings, self.n_aligned)
        ids = [self.tokenizer(t, add_special_tokens=settings.add_special_tokens)["input_ids"] for t in texts]
        index = {t: i for i, t in enumerate(dict.fromkeys(texts))}
        sampling = dict(temperature=settings.temperature, top_p=settings.top_p, top_k=settings.top_k) \
            if settings.do_sample else {}
        params = [
            sampling_params(settings.max_new_tokens, lam, detokenize=False,  # decoded below, as the HF engine does
                            seed=None if settings.seed is None else settings.seed + index[t], **sampling,
                            **stop_kwargs(self.member_eos, lam, self.n_aligned))
            for t, lam in zip(texts, lams)
        ]
        if self.llm is None:  # room for a whole sweep batch, whatever size this first call has
            self._start(max_num_seqs=MAX_NUM_SEQS)
        start = time.perf_counter()
        outs = self.llm.generate([{"prompt_token_ids": p} for p in ids], params, use_tqdm=sys.stderr.isatty())
        elapsed = time.perf_counter() - start
        rows = []
        for out in outs:
            token_ids = list(out.outputs[0].token_ids)
            rows.append({"text": self.tokenizer.decode(token_ids, skip_special_tokens=True), "token_ids": token_ids,
                         "tokens_per_second": round(len(token_ids) / elapsed, 2) if elapsed > 0 else None})
        return rows

    def continuous(self, max_concurrency: int = 8, max_queue: int = 64) -> VLLMEngine:
        """This engine's export (the same directory, removed by `close()`) and engine arguments,
        served one request at a time: `VLLMEngine`."""
        kw = engine_kwargs(self.path, self.args.dtype, max_concurrency, tensor_parallel_size=self.tensor_parallel_size,
                           enforce_eager=getattr(self.args, "enforce_eager", False))
        config = json.loads((Path(self.path) / "config.json").read_text())
        longest = context_length([config.get("max_position_embeddings")], self.tokenizer, self.path)
        return VLLMEngine(kw, self.tokenizer, self.n_aligned, longest, max_concurrency, max_queue)

    def batch_rows(self, requested: int) -> int:
        return max(requested, MAX_NUM_SEQS)  # one vLLM batch decodes them all; rows.jsonl is written per call

    def scorer(self):
        """The transformers mixed model of the same flags (loaded once), for KL and pairwise accuracy."""
        if self._scorer is None:
            if not (self.args.ref or getattr(self.args, "adapter", None)):
                raise ValueError("scoring (kl, pairwise-accuracy) with `--engine vllm` loads the mix on transformers: "
                                 "give `--ref R --aligned A` or `--model M --adapter A` rather than an export directory")
            from aligndial.mixed import load_mixed

            self._scorer = load_mixed(self.args)[0]
        return self._scorer

    def close(self) -> None:
        if self.llm is not None:
            self.llm.llm_engine.engine_core.shutdown()  # the engine processes, now rather than at exit
            self.llm = None
        if self._workdir is not None:
            self._workdir.cleanup()
            self._workdir = None


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
    """`VLLMBatchEngine.continuous()`: an aligndial vLLM export (or a plain model, `n_aligned` 0)
    served through vLLM's `AsyncLLM`, with the serving shape stated in `aligndial.engines`.

    `engine_kwargs` go to `AsyncEngineArgs` (see aligndial.vllm.run.engine_kwargs). At most
    `max_concurrency` sequences decode together (vLLM's max_num_seqs) and `max_queue` more may
    wait; `submit` refuses the rest (HTTP 429)."""

    def __init__(self, engine_kwargs: dict, tokenizer, n_aligned: int, context_length: int,
                 max_concurrency: int = 8, max_queue: int = 64):
        if max_concurrency < 1 or max_queue < 0:
            raise ValueError(f"`--max-concurrency` must be ≥ 1 and `--max-queue` ≥ 0; got {max_concurrency} and {max_queue}")
        self.engine_kwargs = {**engine_kwargs, "max_num_seqs": max_concurrency, "max_model_len": context_length}
        self.tokenizer, self.n_aligned, self.context_length = tokenizer, n_aligned, context_length
        # A pair whose members stop on different EOS ids: each row stops on its active members' (stop_kwargs).
        self.member_eos, self.default_lam = member_eos(engine_kwargs["model"]), export_default_lam(engine_kwargs["model"])
        self.max_concurrency, self.max_queue = max_concurrency, max_queue
        self.counters = {"prefills": 0, "decode_steps": 0, "decode_rows": 0, "generated_tokens": 0}
        self.llm = None
        self._in_flight = 0  # sequences submitted and not yet finished
        self._stopping = False

    # --- the serving shape (aligndial.engines) -------------------------------------------------------

    def start(self) -> None:
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

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
