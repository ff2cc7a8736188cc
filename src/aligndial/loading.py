"""Loading real Hugging Face models and tokenizers, safely.

- Any local directory or hub id goes through `from_pretrained`; a `.gguf` file goes through
  `aligndial.gguf` (dequantized on load, `dtype` applies).
- Weights load from safetensors only (no pickle), and remote code only runs when the caller
  passes `trust_remote_code=True` explicitly: transformers would otherwise prompt on stdin.
- A truncated or corrupt weights file is one error naming the file and what to do.
- `device_map` goes to `from_pretrained` (accelerate): "auto", a device, or a {module: device}
  dict; modules mapped to "disk" are offloaded to `offload_folder` (a fresh temporary directory
  per model unless given, so two models never share one).
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from aligndial.gguf import is_gguf, load_gguf_model, load_gguf_tokenizer

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


def parse_device_map(text: str | None):
    """A `--device-map` value: "auto"/"balanced"/"sequential"/a device such as "cuda:1", or a
    JSON object {module: device} (devices: an int GPU index, "cpu", "disk")."""
    if text is None:
        return None
    text = text.strip()
    if text.startswith("{"):
        import json

        try:
            value = json.loads(text)
        except ValueError as e:
            raise ValueError(f"`--device-map {text}` is not valid JSON ({e}); e.g. '{{\"\": \"cpu\"}}'") from None
        return value
    if not text:
        raise ValueError("`--device-map` is empty; give auto, a device such as cuda:1, or a JSON {module: device}")
    return text


def device_maps_from_flags(values: list[str] | None, n_members: int):
    """The repeatable `--device-map` flag: None, one map for every member, or one per member
    (reference first), as `RealignedPair.from_pretrained(device_map=...)` takes it."""
    if not values:
        return None
    maps = [parse_device_map(v) for v in values]
    if len(maps) == 1:
        return maps[0]
    if len(maps) != n_members:
        raise ValueError(
            f"`--device-map` was given {len(maps)} times for {n_members} model(s); give it once (every model) "
            "or once per model, reference first"
        )
    return maps


def _corrupt_weights(name: str, error: Exception) -> OSError | None:
    """One line for a weights file that cannot be read, naming it; None if `error` is not that."""
    if type(error).__name__ != "SafetensorError" and "deserializ" not in str(error):
        return None
    files = sorted(Path(name).expanduser().glob("*.safetensors")) if os.path.isdir(os.path.expanduser(name)) else []
    bad = []
    for f in files:
        try:
            from safetensors import safe_open

            with safe_open(str(f), "pt"):
                pass
        except Exception as e:  # noqa: BLE001 - any failure to open is what we report
            bad.append(f"{f} ({str(e).splitlines()[0]})")
    where = ", ".join(bad) if bad else f"a safetensors file of {name} ({str(error).splitlines()[0]})"
    return OSError(
        f"cannot read the weights in {where}: the file is truncated or corrupt (an interrupted download or copy); "
        "download or save the model again"
    )


def load_causal_lm(name: str, dtype=None, device: str | None = None, trust_remote_code: bool = False,
                   device_map=None, offload_folder: str | None = None):
    """`AutoModelForCausalLM.from_pretrained(name)` in eval mode, safetensors only.

    `device` moves the whole model; `device_map` places it with accelerate instead (see the module
    docstring). Give one or neither."""
    if device is not None and device_map is not None:
        raise ValueError(f"give `device` ({device!r}) or `device_map` ({device_map!r}), not both")
    placement = {}
    if device_map is not None:
        placement = dict(device_map=device_map,
                         offload_folder=offload_folder or tempfile.mkdtemp(prefix="aligndial-offload-"))
    if is_gguf(name):
        model = load_gguf_model(name, parse_dtype(dtype), **placement)
        return (model.to(device) if device is not None else model).eval()
    try:
        with _explain_remote_code(name, trust_remote_code):
            model = AutoModelForCausalLM.from_pretrained(
                name,
                dtype=parse_dtype(dtype) or "auto",
                use_safetensors=True,
                trust_remote_code=bool(trust_remote_code),
                **placement,
            )
    except Exception as e:  # noqa: BLE001 - a SafetensorError is neither OSError nor ValueError
        corrupt = _corrupt_weights(name, e)
        if corrupt is not None:
            raise corrupt from None
        if not isinstance(e, OSError):
            raise
        if "safetensors" in str(e).lower() or ".bin" in str(e):
            raise OSError(
                f"{name}: no safetensors weights found. aligndial never unpickles weights; convert the "
                "checkpoint to safetensors (e.g. `model.save_pretrained(dir, safe_serialization=True)`)."
            ) from e
        raise
    if device is not None:
        model = model.to(device)
    return model.eval()


def context_length(positions: list[int | None], tokenizer, where: str = "the model") -> int:
    """The longest sequence (prompt + generated tokens) that the configs' `max_position_embeddings`
    (one per member model) and the tokenizer allow; the one home of this limit for both engines."""
    limits = [*positions, tokenizer.model_max_length if tokenizer.model_max_length < 10**9 else None]  # HF's "unset" is 1e30
    known = [x for x in limits if x]
    if not known:
        raise ValueError(f"cannot tell the context length of {where}: the config has no max_position_embeddings and "
                         "the tokenizer no model_max_length; set `tokenizer.model_max_length`")
    return min(known)


def load_tokenizer(name: str, trust_remote_code: bool = False):
    if is_gguf(name):
        tok = load_gguf_tokenizer(name)
    else:
        with _explain_remote_code(name, trust_remote_code):
            tok = AutoTokenizer.from_pretrained(name, trust_remote_code=bool(trust_remote_code))
    if tok.pad_token_id is None:
        # Batched generation needs a pad token; eos is the conventional stand-in.
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok
