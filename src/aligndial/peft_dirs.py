"""PEFT adapter directories: what kind a directory holds, its base model, whether we can load it.

Standard library only, so the CLI's argument checks (`aligndial.cliargs`) read adapter
directories before any model code loads; the LoRA pair (`aligndial.lora_pair`) loads them.
"""

from __future__ import annotations

import json
from pathlib import Path

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"

VLLM_REFUSAL = (
    "a LoRA adapter as `--aligned` runs only on the transformers engine: vLLM applies one LoRA to all of a "
    "request's tokens, and DeRa needs the same request's reference rows (adapter off) and aligned rows (adapter "
    "on) in one step. {instead}, or merge the adapter into a full model (PEFT's merge_and_unload) and "
    "pass that as `--aligned`."
)


def adapter_kind(path: str | Path) -> str | None:
    """The `peft_type` of a PEFT adapter directory ("LORA", ...), None if `path` is not one."""
    config = Path(path).expanduser() / ADAPTER_CONFIG
    try:
        return json.loads(config.read_text()).get("peft_type")
    except (OSError, ValueError, AttributeError):
        return None


def is_lora_dir(path) -> bool:
    return isinstance(path, (str, Path)) and adapter_kind(path) == "LORA"


def lora_base(path: str | Path) -> str | None:
    """`base_model_name_or_path` recorded in a PEFT adapter directory."""
    return json.loads((Path(path).expanduser() / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")


def check_lora_dir(path: str) -> None:
    """A LoRA adapter directory we can load: peft_type LORA, safetensors weights (never pickle)."""
    kind = adapter_kind(path)
    if kind != "LORA":
        raise ValueError(f"`--aligned {path}` is a PEFT {kind} adapter; only LoRA adapters can be mixed in one model. "
                         "Merge it into a full model and pass that as `--aligned`.")
    if not (Path(path).expanduser() / ADAPTER_WEIGHTS).is_file():
        raise OSError(f"{path}: no {ADAPTER_WEIGHTS}. aligndial never unpickles weights; re-save the adapter with "
                      "`model.save_pretrained(dir)` (PEFT writes safetensors by default).")


def refuse_vllm(aligned, instead: str = "Drop `--engine vllm`") -> None:
    """vLLM cannot serve a LoRA-aligned pair (see VLLM_REFUSAL and docs/lora.md); `instead` is what
    the refused command's user can do (the default fits the verbs with an `--engine` flag)."""
    if any(is_lora_dir(a) for a in aligned or []):
        raise ValueError(VLLM_REFUSAL.format(instead=instead))
