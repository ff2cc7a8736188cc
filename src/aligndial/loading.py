"""Loading real Hugging Face models and tokenizers, safely.

- Any local directory or hub id goes through `from_pretrained`.
- Weights load from safetensors only (no pickle), and remote code only runs when the caller
  passes `trust_remote_code=True` explicitly: transformers would otherwise prompt on stdin.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"`--dtype` must be one of {', '.join(DTYPES)}; got {dtype!r}")
    return DTYPES[dtype]


@contextmanager
def _explain_remote_code(name: str, trust_remote_code: bool):
    try:
        yield
    except ValueError as e:
        if "trust_remote_code" in str(e) and not trust_remote_code:
            raise ValueError(
                f"{name} needs custom code to load. Review that code, then pass `--trust-remote-code` "
                "(trust_remote_code=True) to run it."
            ) from e
        raise


def load_causal_lm(name: str, dtype=None, device: str | None = None, trust_remote_code: bool = False):
    """`AutoModelForCausalLM.from_pretrained(name)` in eval mode, safetensors only."""
    try:
        with _explain_remote_code(name, trust_remote_code):
            model = AutoModelForCausalLM.from_pretrained(
                name,
                dtype=parse_dtype(dtype) or "auto",
                use_safetensors=True,
                trust_remote_code=bool(trust_remote_code),
            )
    except OSError as e:
        if "safetensors" in str(e).lower() or ".bin" in str(e):
            raise OSError(
                f"{name}: no safetensors weights found. aligndial never unpickles weights; convert the "
                "checkpoint to safetensors (e.g. `model.save_pretrained(dir, safe_serialization=True)`)."
            ) from e
        raise
    if device is not None:
        model = model.to(device)
    return model.eval()


def load_tokenizer(name: str, trust_remote_code: bool = False):
    with _explain_remote_code(name, trust_remote_code):
        tok = AutoTokenizer.from_pretrained(name, trust_remote_code=bool(trust_remote_code))
    if tok.pad_token_id is None:
        # Batched generation needs a pad token; eos is the conventional stand-in.
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok
