"""Shared pieces for the benchmarks: a ~58M-parameter Llama built from a config (vocab 32k,
as in ENVIRONMENT.md's speed facts) and a decode-speed timer. Ratios are measured side by
side in one run, so machine noise affects both sides alike."""

from __future__ import annotations

import statistics
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


def decode_tokens_per_second(generate, ids: torch.Tensor, repeats: int = 3, **kwargs) -> float:
    """Median tokens/s of `generate(ids, ...)` producing exactly NEW_TOKENS per row."""
    kw = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0, **kwargs)
    with torch.no_grad():
        generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            out = generate(ids, **kw)
            times.append(time.perf_counter() - start)
    assert out.shape[1] - ids.shape[1] == NEW_TOKENS
    return ids.shape[0] * NEW_TOKENS / statistics.median(times)


def table(rows: list[tuple], header: tuple) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*header), *(fmt.format(*map(str, r)) for r in rows)])
