"""Layer-adapter surgery (CLM §2.1/§4.1, FR §3.2): new decoder layers inserted before layer 0.

The adapter is a copy of the bottom decoder layer with its two output projections (attention's
W_out and the MLP's W_down) zeroed, weights and biases. Every block adds its output to the residual
stream, so a zeroed layer passes the hidden states through unchanged: the expanded model starts
exactly at the base model's distribution, and training only the adapter (base frozen) moves it
away from there. FR §3.2 notes the same layer can be trained in LoRA form (`lora_rank`): zero B
keeps the identity exact. FR Table 4 compares identity copy with a kaiming re-initialisation of the
two projections (`init="kaiming"`) and with an unzeroed copy (`init="copy"`).

Everything happens in place on a Hugging Face causal LM. Supported architectures are the ones in
`ARCHITECTURES`; anything else is refused by name rather than guessed at.

On disk an adapter is two files: `adapter_config.json` and `adapter_model.safetensors`, holding only
the adapter layers (never the base weights). `merge_adapter` turns an adapted model back into a
plain transformers model with L+n layers that loads without aligndial.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.pytorch_utils import Conv1D

FORMAT = "aligndial-layer-adapter"
FORMAT_VERSION = 1
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAMES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
INITS = ("identity", "kaiming", "copy")
ATTR = "aligndial_adapter"  # where the AdapterConfig of an adapted model lives


@dataclass(frozen=True)
class ArchSpec:
    """Dotted paths, checked against transformers 5.x modeling code.

    `layers` goes from the CausalLM to the decoder-layer ModuleList; `attn_out` and `mlp_out` go from
    one decoder layer to the projection that writes the block's output into the residual stream.
    """

    layers: str
    attn_out: str
    mlp_out: str


_LLAMA_LIKE = ArchSpec("model.layers", "self_attn.o_proj", "mlp.down_proj")
ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "gemma3_text": _LLAMA_LIKE,
    "phi3": _LLAMA_LIKE,
    "olmo2": _LLAMA_LIKE,
    "phi": ArchSpec("model.layers", "self_attn.dense", "mlp.fc2"),
    "gpt2": ArchSpec("transformer.h", "attn.c_proj", "mlp.c_proj"),  # Conv1D, with bias
    "gpt_neox": ArchSpec("gpt_neox.layers", "attention.dense", "mlp.dense_4h_to_h"),
    "opt": ArchSpec("model.decoder.layers", "self_attn.out_proj", "fc2"),
    "falcon": ArchSpec("transformer.h", "self_attention.dense", "mlp.dense_4h_to_h"),  # FalconLinear
}


def _spec(model) -> ArchSpec:
    model_type = model.config.model_type
    if model_type not in ARCHITECTURES:
        raise ValueError(
            f"layer adapters do not support model_type {model_type!r}; supported: {', '.join(ARCHITECTURES)}"
        )
    return ARCHITECTURES[model_type]


def decoder_layers(model) -> nn.ModuleList:
    """The decoder-layer ModuleList of a supported causal LM (adapter layers included, first)."""
    return model.get_submodule(_spec(model).layers)


def fingerprint(model) -> str:
    """sha256 over the sorted (name, shape) of the parameters: which base an adapter fits.

    Shapes, not values: it tells a Qwen-0.5B from a Llama-8B without hashing gigabytes, and without
    refusing a base that was merely re-saved. Not dtypes: an adapter trained in fp32 serves on a
    bf16 base (its weights are cast on load).
    """
    rows = sorted((name, list(p.shape)) for name, p in model.named_parameters())
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()


@dataclass
class AdapterConfig:
    """What `adapter_config.json` records, enough to rebuild the adapter layers on the same base.

    Identity of the base: `base_model`, `architecture`, `base_fingerprint`.
    Shape of the adapter: `num_layers`, `init`, `lora_rank`, `lora_alpha`.
    """

    base_model: str = field(metadata={"help": "Name or path of the base model the adapter was built on."})
    architecture: str = field(metadata={"help": "The base's `config.model_type`, a key of ARCHITECTURES."})
    base_fingerprint: str = field(metadata={"help": "`fingerprint()` of the base before insertion."})
    num_layers: int = field(default=1, metadata={"help": "Adapter layers inserted before decoder layer 0."})
    init: str = field(default="identity", metadata={"help": "identity | kaiming | copy (FR Table 4)."})
    lora_rank: int | None = field(default=None, metadata={"help": "LoRA rank r (FR §3.2); None trains full layers."})
    lora_alpha: float | None = field(default=None, metadata={"help": "LoRA scale is alpha/r; defaults to r."})
    format: str = field(default=FORMAT, metadata={"help": "Always 'aligndial-layer-adapter'."})
    format_version: int = field(default=FORMAT_VERSION, metadata={"help": "Bumped on incompatible changes."})

    def __post_init__(self):
        if self.format != FORMAT or self.format_version != FORMAT_VERSION:
            raise ValueError(
                f"not an aligndial layer adapter of a version this code reads: got format={self.format!r} "
                f"format_version={self.format_version!r}; expected {FORMAT!r} version {FORMAT_VERSION}"
            )
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"architecture must be one of {', '.join(ARCHITECTURES)}; got {self.architecture!r}")
        if not (isinstance(self.num_layers, int) and self.num_layers >= 1):
            raise ValueError(f"num_layers must be an integer >= 1; got {self.num_layers!r}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {', '.join(INITS)}; got {self.init!r}")
        if self.lora_rank is None:
            if self.lora_alpha is not None:
                raise ValueError(f"lora_alpha={self.lora_alpha!r} needs lora_rank; set lora_rank or drop lora_alpha")
        else:
            if not (isinstance(self.lora_rank, int) and self.lora_rank >= 1):
                raise ValueError(f"lora_rank must be an integer >= 1 or None; got {self.lora_rank!r}")
            self.lora_alpha = float(self.lora_rank if self.lora_alpha is None else self.lora_alpha)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> AdapterConfig:
        data = json.loads(text)
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown fields in adapter config: {', '.join(unknown)}")
        return cls(**data)


class LoRALinear(nn.Module):
    """`base(x) + (alpha/r) · x Aᵀ Bᵀ`: LoRA (Hu et al. 2021) on one projection of an adapter layer.

    FR §3.2: LoRA is orthogonal to the layer adapter; with B = 0 the layer stays an identity copy.
    `base` is the frozen copied projection (nn.Linear, FalconLinear or GPT-2's transposed Conv1D),
    kept as a module so that merging puts the exact original class back.
    """

    def __init__(self, base: nn.Module, rank: int, alpha: float, generator: torch.Generator):
        super().__init__()
        in_features, out_features = _features(base)
        weight = base.weight
        self.base = base.requires_grad_(False)
        self.scale = alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, dtype=weight.dtype, device=weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5), generator=generator)  # as nn.Linear / PEFT
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, dtype=weight.dtype, device=weight.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_A.T @ self.lora_B.T) * self.scale  # (..., out)

    @torch.no_grad()
    def merged(self) -> nn.Module:
        """The base projection with the low-rank delta folded into its weight."""
        delta = (self.lora_B @ self.lora_A) * self.scale  # (out, in)
        self.base.weight += delta.T if isinstance(self.base, Conv1D) else delta
        return self.base


def _features(linear: nn.Module) -> tuple[int, int]:
    """(in, out) of an nn.Linear (weight is out×in) or a Conv1D (weight is in×out)."""
    rows, cols = linear.weight.shape
    return (rows, cols) if isinstance(linear, Conv1D) else (cols, rows)


def _check_insertable(model, init: str) -> None:
    """Refuse the configurations where inserting a layer cannot give the promised model."""
    config = model.config
    if getattr(model, ATTR, None) is not None:
        raise ValueError(
            f"model already has an aligndial adapter ({getattr(model, ATTR).num_layers} layer(s)); "
            "call merge_adapter(model) first or start from a fresh base"
        )
    if config.model_type == "gpt2" and config.scale_attn_by_inverse_layer_idx:
        # GPT-2 fixes each attention's scale to 1/(layer_idx+1) at construction time: after shifting
        # the layers, a reloaded model would rescale every base layer and no longer be the base.
        raise ValueError(
            "gpt2 with scale_attn_by_inverse_layer_idx=True cannot take inserted layers; "
            "use a checkpoint with scale_attn_by_inverse_layer_idx=False (the GPT-2 default)"
        )
    if init == "identity" and config.model_type == "opt" and not config.do_layer_norm_before:
        # Post-LayerNorm OPT (350m) normalises the residual after each block: a zeroed layer is not an identity.
        raise ValueError(
            "init='identity' needs a pre-LayerNorm model; this OPT has do_layer_norm_before=False. "
            "Use init='copy' or a pre-LN OPT checkpoint"
        )


def _build_layers(model, cfg: AdapterConfig, seed: int) -> nn.ModuleList:
    """New adapter layers, copies of decoder layer 0 initialised per `cfg`; the model is not touched."""
    spec = _spec(model)
    generator = torch.Generator(device=model.device).manual_seed(seed)
    bottom = decoder_layers(model)[0]
    layers = nn.ModuleList()
    for _ in range(cfg.num_layers):
        # Share, don't copy, the model config that attention modules keep a reference to.
        layer = copy.deepcopy(bottom, memo={id(model.config): model.config})
        for path in (spec.attn_out, spec.mlp_out):
            _init_projection(layer.get_submodule(path), cfg.init, generator)
        if cfg.lora_rank is not None:
            targets = [(n, m) for n, m in layer.named_modules() if isinstance(m, (nn.Linear, Conv1D))]
            for name, linear in targets:
                layer.set_submodule(name, LoRALinear(linear, cfg.lora_rank, cfg.lora_alpha, generator))
        layers.append(layer)
    return layers


@torch.no_grad()
def _init_projection(proj: nn.Module, init: str, generator: torch.Generator) -> None:
    """identity: zero weight and bias (CLM §2.1). kaiming: kaiming-uniform weight, zero bias (FR Table 4)."""
    if init == "copy":
        return
    if init == "identity":
        proj.weight.zero_()
    else:
        # nn.Linear's own default init; fan_in is dim 1 of a Linear weight but dim 0 of a Conv1D's.
        mode = "fan_out" if isinstance(proj, Conv1D) else "fan_in"
        nn.init.kaiming_uniform_(proj.weight, a=math.sqrt(5), mode=mode, generator=generator)
    if proj.bias is not None:
        proj.bias.zero_()


def _install(model, layers: nn.ModuleList, cfg: AdapterConfig) -> None:
    """Put the adapter layers in front and update everything indexed by layer."""
    config = model.config
    stack = decoder_layers(model)
    for layer in reversed(layers):
        stack.insert(0, layer)
    # The KV cache is indexed by each attention's `layer_idx`. Stale indices make two layers write
    # to one cache slot: uncached forward passes still look right, cached generation does not.
    for i, layer in enumerate(stack):
        for module in layer.modules():
            if "layer_idx" in vars(module):
                module.layer_idx = i
    config.num_hidden_layers += cfg.num_layers  # gpt2 maps this name to n_layer
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [config.layer_types[0]] * cfg.num_layers + list(config.layer_types)
    setattr(model, ATTR, cfg)


def insert_adapter(
    model,
    num_layers: int = 1,
    init: str = "identity",
    lora_rank: int | None = None,
    lora_alpha: float | None = None,
    seed: int = 0,
    base_model: str | None = None,
) -> AdapterConfig:
    """Insert `num_layers` copies of decoder layer 0 before it, in place (CLM §4.1, FR §3.2).

    Returns the AdapterConfig, also stored as `model.aligndial_adapter`. `seed` drives the kaiming
    and LoRA-A initialisations. `base_model` defaults to the model's `name_or_path`.
    """
    _spec(model)
    _check_insertable(model, init)
    cfg = AdapterConfig(
        base_model=base_model if base_model is not None else model.name_or_path,
        architecture=model.config.model_type,
        base_fingerprint=fingerprint(model),
        num_layers=num_layers,
        init=init,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
    )
    _install(model, _build_layers(model, cfg, seed), cfg)
    return cfg


def _adapter(model) -> AdapterConfig:
    cfg = getattr(model, ATTR, None)
    if cfg is None:
        raise ValueError("model has no aligndial adapter; call insert_adapter(model) or load_adapter(model, dir)")
    return cfg


def _adapter_layers(model) -> list[nn.Module]:
    return list(decoder_layers(model)[: _adapter(model).num_layers])


def adapter_parameters(model) -> list[tuple[str, nn.Parameter]]:
    """The trainable adapter parameters with their model-level names (LoRA form: only A and B)."""
    cfg, prefix = _adapter(model), _spec(model).layers
    params = []
    for i, layer in enumerate(_adapter_layers(model)):
        for name, p in layer.named_parameters(prefix=f"{prefix}.{i}"):
            if cfg.lora_rank is None or name.endswith((".lora_A", ".lora_B")):
                params.append((name, p))
    return params


def freeze_base(model) -> None:
    """requires_grad=False on everything but `adapter_parameters` (CLM Fig. 4b: only the adapter trains)."""
    model.requires_grad_(False)
    for _, p in adapter_parameters(model):
        p.requires_grad_(True)


def save_adapter(model, out_dir: str | Path) -> Path:
    """Write `adapter_config.json` + `adapter_model.safetensors` (adapter layers only) to `out_dir`.

    Keys are relative to the adapter stack ("layers.0.self_attn.q_proj.weight"). The frozen copied
    weights are saved too: a kaiming init cannot be re-derived from the base. Atomic: a crash leaves
    either the previous adapter, no loadable adapter, or the new one, never a torn mix.
    """
    cfg = _adapter(model)
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tensors = {
        f"layers.{i}.{k}": v.detach().contiguous()
        for i, layer in enumerate(_adapter_layers(model))
        for k, v in layer.state_dict().items()
    }
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        # One metadata key only: safetensors writes its metadata map in no fixed order, so with
        # two keys the same tensors could give files that hash differently.
        save_file(tensors, tmp / WEIGHTS_NAME, metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(cfg.to_json())
        if not out_dir.exists():
            os.replace(tmp, out_dir)  # one rename: the adapter appears whole or not at all
            return out_dir
        # Existing directory: unmark it as an adapter first, so no crash point leaves new weights
        # next to an old config (same shapes, different alpha would load silently wrong).
        (out_dir / CONFIG_NAME).unlink(missing_ok=True)
        os.replace(tmp / WEIGHTS_NAME, out_dir / WEIGHTS_NAME)
        os.replace(tmp / CONFIG_NAME, out_dir / CONFIG_NAME)
        return out_dir
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _read_weights(adapter_dir: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    path = adapter_dir / WEIGHTS_NAME
    if path.exists():
        try:
            return load_file(path)
        except (SafetensorError, OSError) as e:
            raise ValueError(f"cannot read {path}: {e} (truncated or not a safetensors file?)") from e
    pickles = [adapter_dir / n for n in PICKLE_NAMES if (adapter_dir / n).exists()]
    if not pickles:
        raise ValueError(f"{adapter_dir} has no {WEIGHTS_NAME}")
    if not allow_pickle:
        # The fix must work from the CLI, which has no allow_pickle flag: a shell one-liner that
        # loads tensors only (weights_only=True runs no pickled code) and writes safetensors.
        convert = (
            f"python -c \"import torch, safetensors.torch as st; st.save_file(torch.load({str(pickles[0])!r}, "
            f"weights_only=True), {str(path)!r})\""
        )
        raise ValueError(
            f"{adapter_dir} has only the pickle file {pickles[0].name}, and aligndial requires {WEIGHTS_NAME}: "
            f"unpickling can run arbitrary code. If you trust the file, convert it once with: {convert} "
            "(in Python, load_adapter(..., allow_pickle=True) does the same load)"
        )
    try:
        return torch.load(pickles[0], map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refuses anything but tensors and plain containers
        raise ValueError(f"cannot read {pickles[0]} as a tensor dict with weights_only=True: {e}") from e


def _check_keys(found: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], path: Path) -> None:
    def few(items) -> str:
        items = sorted(items)
        return ", ".join(items[:5]) + (f" (+{len(items) - 5} more)" if len(items) > 5 else "")

    missing, extra = expected.keys() - found.keys(), found.keys() - expected.keys()
    mismatched = [
        f"{k} {tuple(found[k].shape)} != {tuple(expected[k].shape)}"
        for k in expected.keys() & found.keys()
        if found[k].shape != expected[k].shape
    ]
    problems = [
        f"{label}: {few(keys)}"
        for label, keys in (("missing keys", missing), ("unexpected keys", extra), ("shape mismatches", mismatched))
        if keys
    ]
    if problems:
        raise ValueError(f"{path} does not match its adapter_config.json: " + "; ".join(problems))


def load_adapter(model, adapter_dir: str | Path, allow_pickle: bool = False) -> AdapterConfig:
    """Insert a saved adapter into a base model, in place. All checks run before the model changes.

    Refuses: a missing config, pickle-only weights (unless `allow_pickle`), a different architecture
    or base (fingerprint), an unreadable file, and any missing, extra or mis-shaped tensor.
    """
    adapter_dir = Path(adapter_dir)
    config_path = adapter_dir / CONFIG_NAME
    if not config_path.is_file():
        raise ValueError(f"{adapter_dir} has no {CONFIG_NAME}; is it a directory written by save_adapter?")
    cfg = AdapterConfig.from_json(config_path.read_text())
    _spec(model)
    _check_insertable(model, cfg.init)
    if model.config.model_type != cfg.architecture:
        raise ValueError(
            f"adapter in {adapter_dir} is for architecture {cfg.architecture!r} but the model is "
            f"{model.config.model_type!r}; load the base {cfg.base_model!r}"
        )
    if (found := fingerprint(model)) != cfg.base_fingerprint:
        raise ValueError(
            f"adapter in {adapter_dir} was built on base fingerprint {cfg.base_fingerprint[:16]}… "
            f"({cfg.base_model!r}) but this model's is {found[:16]}…: parameter names or shapes "
            f"differ. Load the same base checkpoint that the adapter was trained on"
        )
    tensors = _read_weights(adapter_dir, allow_pickle)
    layers = _build_layers(model, cfg, seed=0)
    expected = {f"layers.{k}": v for k, v in layers.state_dict().items()}
    _check_keys(tensors, expected, adapter_dir / WEIGHTS_NAME)
    layers.load_state_dict({k.removeprefix("layers."): v for k, v in tensors.items()}, strict=True)
    _install(model, layers, cfg)
    return cfg


def merge_adapter(model):
    """Fold LoRA deltas into plain projections and drop the adapter marker; returns the model.

    The result is an ordinary transformers model with L+n layers (num_hidden_layers and layer_types
    already updated), so its `save_pretrained` output loads with `from_pretrained` alone.
    """
    _adapter(model)
    for layer in _adapter_layers(model):
        for name, module in list(layer.named_modules()):
            if isinstance(module, LoRALinear):
                layer.set_submodule(name, module.merged())
    delattr(model, ATTR)
    return model
