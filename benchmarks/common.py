"""Shared pieces for the benchmarks: a ~58M-parameter Llama built from a config (vocab 32k,
as in ENVIRONMENT.md's speed facts) and a decode-speed comparison. Ratios are measured side by
side in one run, alternating the two sides, so machine noise affects both alike."""

from __future__ import annotations

import statistics
import sys
import time

import torch

from aligndial.tiny import tiny_config

NEW_TOKENS = 128


def llama_50m(seed: int, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    config = tiny_config(
        "llama", vocab_size=32000, hidden=512, layers=8, heads=8, intermediate_size=1376,
        num_key_value_heads=8, max_position_embeddings=1024, initializer_range=0.02,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()


def prompt_ids(batch: int = 1, length: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, 32000, (batch, length), generator=g)


def _timed(generate, ids, **kw) -> float:
    start = time.perf_counter()
    out = generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0, **kw)
    elapsed = time.perf_counter() - start
    assert out.shape[1] - ids.shape[1] == NEW_TOKENS
    return ids.shape[0] * NEW_TOKENS / elapsed


def compare_speed(baseline, candidate, ids: torch.Tensor, repeats: int = 5) -> tuple[float, float, float]:
    """Decode tokens/s of `baseline` and `candidate` (generate-like callables), run alternately
    so that load on the machine hits both alike. Returns (median baseline tok/s, median
    candidate tok/s, median of the per-round ratios candidate ÷ baseline)."""
    with torch.no_grad():
        for fn in (baseline, candidate):  # warm-up
            fn(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
        pairs = [(_timed(baseline, ids), _timed(candidate, ids)) for _ in range(repeats)]
    base, cand = zip(*pairs)
    return statistics.median(base), statistics.median(cand), statistics.median(c / b for b, c in pairs)


def speed_row(label, baseline, candidate, ids: torch.Tensor, dtype, repeats: int = 5) -> dict:
    """One table row: `candidate` tokens/s against `baseline` (generate-like callables), side by side."""
    base, tps, ratio = compare_speed(baseline, candidate, ids, repeats)
    row = {"dtype": str(dtype).removeprefix("torch."), "lam": label, "plain_tok_s": round(base, 1),
           "mixed_tok_s": round(tps, 1), "ratio": round(ratio, 3)}
    print("measured", row, file=sys.stderr, flush=True)  # partial results survive an interrupted run
    return row


def lam_speed_rows(plain, mixed, ids: torch.Tensor, dtype, lams=(0.5, 0.0, 1.0), repeats: int = 5) -> list[dict]:
    """One row per λ: `mixed.generate(lam=λ)` tokens/s against `plain.generate`, side by side."""
    return [
        speed_row(lam, plain.generate, lambda x, lam=lam, **kw: mixed.generate(x, lam=lam, **kw), ids, dtype, repeats)
        for lam in lams
    ]


def table(rows: list[tuple], header: tuple) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*header), *(fmt.format(*map(str, r)) for r in rows)])


class Decoder:
    """One side of `interleaved_steps`: a model decoding `rows` copies of the prompt one forward
    at a time with its own cache (greedy). `kw` goes to every forward (e.g. `lam`)."""

    def __init__(self, model, rows: int = 1, **kw):
        self.model, self.rows, self.kw = model, rows, kw

    def reset(self, ids: torch.Tensor):
        from transformers import DynamicCache

        x = ids.repeat(self.rows, 1)
        self.cache = self.model.new_cache() if hasattr(self.model, "new_cache") else DynamicCache(config=self.model.config)
        out = self.model(input_ids=x, past_key_values=self.cache, use_cache=True, **self.kw)
        self.next, self.length = out.logits[:, -1:].argmax(-1), x.shape[1]

    def step(self) -> float:
        """Seconds for one decode forward, with the attention mask and positions generate() passes."""
        mask = torch.ones(self.rows, self.length + 1, dtype=torch.long)
        positions = torch.full((self.rows, 1), self.length)
        start = time.perf_counter()
        out = self.model(input_ids=self.next, attention_mask=mask, position_ids=positions, past_key_values=self.cache,
                         use_cache=True, logits_to_keep=1, **self.kw)
        elapsed = time.perf_counter() - start
        self.next, self.length = out.logits[:, -1:].argmax(-1), self.length + 1
        return elapsed


def interleaved_steps(sides: dict[str, list[Decoder]], ids: torch.Tensor, rounds: int = 5, seed: int = 0) -> dict[str, float]:
    """Median seconds per decode step of each side, NEW_TOKENS steps per round, every instance
    of every side taking its turn at every step in a fresh random order (and resetting in a
    random order), so that machine noise hits every side alike. Each side has several model
    instances built alike, because identical instances ran up to 5% apart here (which one
    was built or set up first; we did not pin down why); the median is over all of them.
    Whole-generation alternation (`compare_speed`) moved ±5% between rounds here."""
    import random

    rng, times = random.Random(seed), {name: [] for name in sides}
    decoders = [(name, d) for name, instances in sides.items() for d in instances]
    with torch.no_grad():
        for r in range(rounds + 1):  # round 0 warms up
            rng.shuffle(decoders)
            for _, d in decoders:
                d.reset(ids)
            for _ in range(NEW_TOKENS):
                rng.shuffle(decoders)
                for name, d in decoders:
                    elapsed = d.step()
                    if r:
                        times[name].append(elapsed)
    return {name: statistics.median(t) for name, t in times.items()}
