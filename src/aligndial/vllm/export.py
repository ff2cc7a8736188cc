"""Directories that `vllm serve DIR` loads as an aligndial model (and nothing else loads).

An export is an ordinary HF-style directory (config.json, safetensors, tokenizer files) with:

- `architectures: ["AligndialDualPathForCausalLM"]` or `["AligndialPairForCausalLM"]`, which only
  the aligndial vLLM plugin registers: stock vLLM refuses the directory ("architecture not
  supported") instead of serving it as the plain model;
- `model_type: "aligndial_<base>"` (e.g. `aligndial_qwen3`), which stock transformers does not know,
  so `AutoModelForCausalLM.from_pretrained(DIR)` fails instead of silently loading λ=1 (the merged
  dual path) or a model with missing weights (the pair);
- an `aligndial` entry: {"kind", "base_model_type", "adapter_layers" or "members", "default_lam"};
  a pair also lists each member's EOS ids (`member_eos`), so a row stops on the EOS of the members
  its λ runs, as `RealignedPair` does: aligndial's engines ask for it, and on vLLM's own server the
  plugin's request check does (`strength.stop_on_members`; vLLM alone stops on the reference's).

Weights:
- dual path: the merged model (`merge_adapter`), L+n layers with the adapter at 0..n−1, under
  the plain model's own key names; the vLLM model runs the base path over layers n..L+n−1;
- pair: one safetensors file per member, keys prefixed with the member name (`ref.`,
  `aligned_a.`, `aligned_b.`, …). The members must share one config (same architecture and
  sizes); vLLM names each KV cache after its attention's prefix, and the prefix may hold only
  one integer (the layer index), hence letters for the members.

This module does not import vLLM: exporting works in any environment with aligndial.
"""

from __future__ import annotations

import json
import os
import shutil
import string
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import CONFIG_MAPPING, PretrainedConfig

DUAL_PATH = "AligndialDualPathForCausalLM"
PAIR = "AligndialPairForCausalLM"

# model_type of the plain model -> the vLLM architecture that serves it. These are the
# architectures both aligndial's adapter surgery (adapter.ARCHITECTURES) and a native vLLM model
# class cover; the model classes (models.py) are generic over them: the pair runs one vLLM
# `*ForCausalLM` per member, the dual path runs that class's own decoder layers.
NATIVE = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "mistral": "MistralForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
    "phi3": "Phi3ForCausalLM",
}
# vLLM's class has no separate output head: it always reads the input embeddings.
TIED_HEAD_ONLY = {"gemma2"}
# Refused with a reason: vLLM serves these through its Transformers backend, which builds the model
# from transformers' own classes (it cannot load our renamed model_type, and its attention is not a
# vLLM `Attention` per layer that the dual path could split).
TRANSFORMERS_BACKEND = {"phi", "olmo2", "gpt_neox"}


# The number of aligned weights (K) of every aligndial export whose config this process has loaded.
# vLLM checks a request's λ in its front end (`strength.AlignmentStrength.validate_params`, a
# classmethod that sees only the request); a server process loads one model's config there, so
# one K here is that model's, and a λ list of another length gets its 400 before it is scheduled.
LOADED_N_ALIGNED: set[int] = set()
# Likewise each loaded export's (member_eos or None, default_lam), so that vLLM's own server stops a
# pair's row on the EOS of the members its λ runs (`strength.stop_on_members`), as aligndial's
# engines do: only where this process has loaded one export, so the entry is the served model's.
LOADED_MEMBER_EOS: set[tuple[tuple[tuple[int, ...], ...] | None, tuple[float, ...]]] = set()


def _config_class(base_type: str) -> type[PretrainedConfig]:
    """`Aligndial<Base>Config`: the base's config class under model_type `aligndial_<base>`."""
    base = CONFIG_MAPPING[base_type]
    name = f"Aligndial{base.__name__}"

    def __post_init__(self, **kwargs):
        base.__post_init__(self, **kwargs)
        spec = getattr(self, "aligndial", None)
        if isinstance(spec, dict) and isinstance(spec.get("default_lam"), list):
            LOADED_N_ALIGNED.add(len(spec["default_lam"]))
            eos = spec.get("member_eos")
            LOADED_MEMBER_EOS.add((tuple(tuple(e) for e in eos) if isinstance(eos, list) else None,
                                   tuple(spec["default_lam"])))

    cls = type(name, (base,), {"model_type": f"aligndial_{base_type}", "__module__": __name__, "__qualname__": name,
                               "__post_init__": __post_init__})
    globals()[name] = cls  # importable by name: vLLM pickles the config into its engine processes
    return cls


CONFIGS = {base_type: _config_class(base_type) for base_type in NATIVE}
# Config keys that may differ between pair members without changing the computation.
# Keys that never change a member's computation. Base and instruct checkpoints of one family
# differ in their special-token ids (Qwen3: EOS 151643 vs 151645); each member's EOS ids travel in
# `member_eos` instead, so a row stops on the EOS of the members its λ runs.
_IGNORED_KEYS = {"_name_or_path", "name_or_path", "architectures", "transformers_version", "dtype", "torch_dtype",
                 "eos_token_id", "bos_token_id", "pad_token_id"}


def member_names(n_aligned: int) -> list[str]:
    """Prefixes of the pair's members: "ref", then "aligned_a", "aligned_b", … (no digits, see above)."""
    if not 1 <= n_aligned <= 26:
        raise ValueError(f"a vLLM pair export takes 1 to 26 aligned models; got {n_aligned}")
    return ["ref"] + [f"aligned_{c}" for c in string.ascii_lowercase[:n_aligned]]


def check_architecture(config) -> str:
    """The base model_type, if aligndial's vLLM models serve it; else one line with the reason and the fix."""
    model_type = check_model_type(config.model_type)
    if model_type in TIED_HEAD_ONLY and not getattr(config, "tie_word_embeddings", True):
        raise ValueError(f"vLLM's {NATIVE[model_type]} ties the output head to the input embeddings (as every released "
                         f"{model_type} checkpoint does); this model has its own lm_head, which vLLM would not load. "
                         "Serve it with `aligndial serve --engine hf` instead")
    return model_type


def check_model_type(model_type: str) -> str:
    if model_type in TRANSFORMERS_BACKEND:
        raise ValueError(
            f"model_type {model_type!r} runs on vLLM's Transformers backend, which aligndial's vLLM models cannot "
            "extend (no vLLM attention module per layer to give the base path its own KV cache). "
            "Serve this model with `aligndial serve --engine hf` instead"
        )
    if model_type not in NATIVE:
        raise ValueError(
            f"the vLLM integration supports {', '.join(NATIVE)} models; got model_type {model_type!r}. "
            "Serve this model with `aligndial serve --engine hf` instead"
        )
    return model_type


def _default_lam(default_lam, n_aligned: int) -> list[float]:
    if default_lam is None:
        if n_aligned > 1:
            raise ValueError(f"with {n_aligned} aligned models, give `--default-lam` as {n_aligned} comma-separated weights")
        return [1.0]
    weights = [float(x) for x in (default_lam if isinstance(default_lam, (list, tuple)) else [default_lam])]
    if len(weights) != n_aligned:
        raise ValueError(f"`--default-lam` needs {n_aligned} weight(s), one per aligned model; got {default_lam!r}")
    return weights


def _write_config(out: Path, base_config, architecture: str, aligndial: dict) -> None:
    data = base_config.to_dict()
    data.update(model_type=CONFIGS[base_config.model_type].model_type, architectures=[architecture], aligndial=aligndial)
    (out / "config.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _tensors(model, prefix: str = "") -> dict[str, torch.Tensor]:
    """The state dict to write. A tied output head is left out, as `save_pretrained` leaves it out:
    vLLM ties it again from the config, and some vLLM classes (Gemma 2) have no head to load it into."""
    tied = set()
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    if head is not None and embed is not None and head.weight is embed.weight:
        tied = {f"{name}.weight" for name, m in model.named_modules() if m is head}
    # Clone: other shared tensors would share storage, which safetensors refuses to write twice.
    return {prefix + k: v.detach().clone().contiguous() for k, v in model.state_dict().items() if k not in tied}


def _publish(tmp: Path, out: Path) -> Path:
    """Move a finished export into place; a crash leaves no half-written directory at `out`."""
    if out.exists():
        if not (out / "config.json").is_file() or "aligndial" not in json.loads((out / "config.json").read_text()):
            raise ValueError(f"{out} exists and is not an aligndial vLLM export; choose a new `--out`")
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def export_dual_path(model, tokenizer, out: str | Path, default_lam: float | None = None) -> Path:
    """Write `model` (a base model with a loaded adapter, see `load_adapter`) for vLLM.

    The adapter is merged into the model in place (`merge_adapter`), so pass a model you no longer need.
    """
    from aligndial.adapter import merge_adapter

    adapter = getattr(model, "aligndial_adapter", None)
    if adapter is None:
        raise ValueError("the model has no layer adapter; load one with `load_adapter(model, dir)` first")
    arch = check_architecture(model.config)
    merge_adapter(model)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        save_file(_tensors(model), tmp / "model.safetensors", metadata={"format": "pt"})
        _write_config(tmp, model.config, DUAL_PATH, {
            "kind": "dual_path", "base_model_type": arch, "adapter_layers": adapter.num_layers,
            "base_model": adapter.base_model, "default_lam": _default_lam(default_lam, 1)})
        model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        return _publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def export_pair(ref, aligned: list, tokenizer, out: str | Path, default_lam=None, names: list[str] | None = None) -> Path:
    """Write a reference and K aligned models (already loaded, same config) as one vLLM model."""
    arch = check_architecture(ref.config)
    prefixes = member_names(len(aligned))
    names = names or prefixes
    ref_dict = {k: v for k, v in ref.config.to_dict().items() if k not in _IGNORED_KEYS}
    for name, model in zip(names[1:], aligned):
        other = {k: v for k, v in model.config.to_dict().items() if k not in _IGNORED_KEYS}
        diff = sorted(k for k in ref_dict.keys() | other.keys() if ref_dict.get(k) != other.get(k))
        if diff:
            raise ValueError(
                f"the vLLM pair needs members with one config; {names[0]} and {name} differ in {', '.join(diff[:8])}. "
                "Serve them with `aligndial serve --engine hf` instead"
            )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for prefix, model in zip(prefixes, [ref, *aligned]):
            save_file(_tensors(model, prefix + "."), tmp / f"model-{prefix}.safetensors", metadata={"format": "pt"})
        from aligndial.pair import eos_ids

        _write_config(tmp, ref.config, PAIR, {
            "kind": "pair", "base_model_type": arch, "members": prefixes, "sources": names,
            "member_eos": [eos_ids(m) for m in [ref, *aligned]],
            "default_lam": _default_lam(default_lam, len(aligned))})
        ref.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        return _publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
