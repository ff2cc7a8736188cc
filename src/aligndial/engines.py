"""The one engine interface of `generate`, `sweep` and `serve`: transformers (`hf`) or vLLM (`vllm`).

    engine = load_engine(args, default_lam)             # the verb's model flags and `--engine`, checked first
    rows = engine.rows(texts, lams, Settings(max_new_tokens=64))   # generate, sweep: one row per (text, λ)
    server = engine.continuous(max_concurrency, max_queue)          # serve: the same model, one request at a time
    engine.close()

An engine has `name`, `tokenizer` and `n_aligned` (aligned models mixed; 0: a plain model, λ must
be None) and:

- `rows(texts, lams, settings)`: one row per (texts[i], lams[i]), λ a number, a list (one weight
  per aligned model) or None. A row is {"text", "token_ids" (generated ids, up to and including
  EOS), "tokens_per_second"}, the same contract from both engines; greedy rows are equal token for
  token (tests/test_vllm_*). `batch_rows(requested)` is the rows per `rows` call in a sweep.
- `continuous(max_concurrency, max_queue)`: the serving shape of the same engine (continuous
  batching: requests join and leave a running batch), over the model and export the engine has
  already loaded. It has `tokenizer`, `n_aligned`, `context_length`, `max_concurrency`, and
  `start()`, `submit(GenerationRequest) -> Generation` (an async iterator of `TokenEvent`s; raises
  `EngineOverloaded` or `EngineUnavailable` instead of queueing without bound), `healthy()`,
  `stats()` and `shutdown()`. The types are in `aligndial.continuous`; `aligndial.serve.app` uses
  only this shape.
- `scorer()`: the transformers mixed model that scores rows (KL, pairwise accuracy need the full
  next-token distribution of both paths, which vLLM does not return): the model itself on `hf`,
  loaded on first use on `vllm`.
- `close()`: frees what the engine holds (vLLM's processes, the export directory).

The two engines, one class each:

- `hf` (`TransformersEngine`): the mixed model `aligndial.mixed.load_mixed` picks. The rows of a
  call with one λ are one `generate` (`aligndial.generation.generate_rows`); `continuous()` is
  `aligndial.continuous.HFEngine` on the same model.
- `vllm` (`aligndial.vllm.engine.VLLMBatchEngine`): the model flags exported once to a directory
  vLLM loads, and every (text, λ) of a call one request of one vLLM batch (prefix caching shares a
  prompt's KV blocks across the λ of a sweep: a path's KV does not depend on λ); `continuous()` is
  `aligndial.vllm.engine.VLLMEngine` on the same export.

The flags are checked in `aligndial.cliargs.check_engine` before a model loads. Beyond
`load_engine`, no caller looks at `--engine`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Protocol

from aligndial.cliargs import check_engine, check_settings

ENGINES = ("hf", "vllm")


@dataclass
class Settings:
    """How rows are generated (the HF names; the vLLM engine translates them)."""

    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    num_beams: int = 1
    think_lam: float | None = None
    add_special_tokens: bool = True


class Engine(Protocol):
    """The interface stated in this module's docstring."""

    name: str
    tokenizer: object
    n_aligned: int  # aligned models mixed (0: a plain model, λ must be None)

    def rows(self, texts: list[str], lams: list, settings: Settings) -> list[dict]:
        """One row per (texts[i], lams[i]); λ is a number, a list (one weight per aligned model) or None."""

    def batch_rows(self, requested: int) -> int:
        """Rows per `rows` call in a sweep, given `--batch-size` (a sweep writes rows.jsonl after each call)."""

    def continuous(self, max_concurrency: int = 8, max_queue: int = 64):
        """The serving shape of this engine (continuous batching), on what it has loaded."""

    def scorer(self):
        """The transformers mixed model for scoring rows."""

    def close(self) -> None: ...


class TransformersEngine:
    """The `hf` engine: rows from `aligndial.generation.generate_rows` on a mixed model."""

    name = "hf"

    def __init__(self, model, tokenizer, n_aligned: int):
        self.model, self.tokenizer, self.n_aligned = model, tokenizer, n_aligned

    def rows(self, texts: list[str], lams: list, settings: Settings) -> list[dict]:
        """One `generate` per distinct λ, over the rows with that λ. (One call with a per-row λ would
        also mix exactly, but a pair stops every row at the EOS of any member some row runs.)"""
        check_settings(self.name, settings, self.n_aligned)
        keys = [json.dumps(lam) for lam in lams]
        out: list = [None] * len(texts)
        for key in dict.fromkeys(keys):
            idx = [i for i, k in enumerate(keys) if k == key]
            for i, row in zip(idx, self._generate([texts[i] for i in idx], lams[idx[0]], settings)):
                out[i] = row
        return out

    def _generate(self, texts: list[str], lam, settings: Settings) -> list[dict]:
        from aligndial.generation import generate_rows, span_schedule

        gen = dict(max_new_tokens=settings.max_new_tokens, num_beams=settings.num_beams, do_sample=settings.do_sample)
        if settings.do_sample:
            gen.update(temperature=settings.temperature, top_p=settings.top_p, top_k=settings.top_k)
        if settings.think_lam is not None:
            lam = span_schedule(self.tokenizer, settings.think_lam, lam)
        return generate_rows(self.model, self.tokenizer, texts, lam=lam, seed=settings.seed,
                             add_special_tokens=settings.add_special_tokens, **gen)

    def batch_rows(self, requested: int) -> int:
        return requested

    def continuous(self, max_concurrency: int = 8, max_queue: int = 64):
        """`aligndial.continuous.HFEngine` on this engine's model (no second load)."""
        from aligndial.continuous import HFEngine

        return HFEngine(self.model, self.tokenizer, self.n_aligned, max_concurrency, max_queue)

    def scorer(self):
        return self.model

    def close(self) -> None:
        pass


def as_engine(model, tokenizer) -> Engine:
    """`model` if it is an engine already, else the `hf` engine on a mixed model with one aligned source."""
    if hasattr(model, "rows") and hasattr(model, "scorer"):
        return model
    return TransformersEngine(model, tokenizer, getattr(model, "n_aligned", 1))


def load_engine(args, default_lam=None) -> Engine:
    """The engine for a verb's model flags, every flag checked first (`aligndial.cliargs.check_engine`):
    the one loader of `generate`, `sweep` and `serve`. `default_lam` is what a vLLM export uses for
    requests without λ (needed with several aligned models; every row of `rows` gives its own λ)."""
    if check_engine(args) == "vllm":
        from aligndial.vllm.engine import VLLMBatchEngine

        return VLLMBatchEngine.from_args(args, default_lam)
    from aligndial.mixed import load_mixed

    return TransformersEngine(*load_mixed(args))
