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


def looks_local(name: str) -> bool:
    """Whether a model name can only mean a local directory (a hub id is `name` or `org/name`)."""
    return name.startswith((".", "/", "~")) or name.endswith(("/", os.sep)) or name.count("/") > 1


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
        if flag == "--aligned" and peft_type(path) is not None:
            return  # a PEFT adapter as the aligned model: the pair loads it on `--ref`
        if not (path / "config.json").is_file():
            hint = " (it is a layer adapter: pass it as `--adapter`)" if (path / "adapter_config.json").is_file() else ""
            raise ValueError(f"`{flag} {name}`: the directory holds no config.json, so it is not a model{hint}")
        return
    if path.exists():
        raise ValueError(f"`{flag} {name}`: not a directory; give a model directory, a .gguf file or a hub id")
    if looks_local(name):
        raise FileNotFoundError(f"`{flag} {name}`: no such directory")


def peft_type(path: str | Path) -> str | None:
    """The `peft_type` of a PEFT adapter directory (LORA, ...), None for anything else."""
    config = Path(path) / "adapter_config.json"
    try:
        return json.loads(config.read_text()).get("peft_type")
    except (OSError, ValueError, AttributeError):
        return None


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
    kind = peft_type(path)
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


def check_prompts(prompts: list, chat: bool, where: str) -> None:
    """Prompts given as `messages` need `--chat` (they are rendered by the chat template)."""
    if chat:
        return
    for n, p in enumerate(prompts, 1):
        if not isinstance(p, str):
            raise ValueError(f"{where}: prompt {n} is a list of messages, which needs `--chat` (the chat template "
                             "renders it); add `--chat` or give `prompt` strings")


def n_aligned(args) -> int:
    """Aligned sources of the model flags, read from the flags alone: K for `--ref R --aligned A…`,
    1 for `--model M --adapter A`, 0 for a plain `--model M`."""
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
    return 1 if getattr(args, "adapter", None) else 0


def check_models(args) -> None:
    """The model flags of `generate`, `serve` and `sweep`: their combination, then each path."""
    n_aligned(args)
    check_model("--ref", getattr(args, "ref", None))
    for name in getattr(args, "aligned", None) or []:
        check_model("--aligned", name)
    check_model("--model", getattr(args, "model", None))
    check_adapter(getattr(args, "adapter", None), getattr(args, "model", None))
