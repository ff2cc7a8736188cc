"""The mixed model for given paths: the one place that picks RealignedPair, LoraPair or DualPathModel.

    pair = load_pair("sft-model", "dpo-model")      # RealignedPair: full models
    pair = load_pair("sft-model", "dpo-lora/")      # LoraPair: LoRA adapters on one base model
    model, tokenizer, n_aligned = load_mixed(args)  # a verb's model flags (`--ref/--aligned`, `--model/--adapter`)

Each mixed model's own `from_pretrained` returns its own class; the choice between them lives
here, so `pair`, `lora_pair` and `dualpath` never import each other.
"""

from __future__ import annotations

from aligndial.cliargs import n_aligned
from aligndial.lora_pair import LoraPair
from aligndial.pair import RealignedPair
from aligndial.peft_dirs import is_lora_dir


def load_pair(ref: str, aligned: str | list[str], dtype=None, device=None, trust_remote_code=False,
              device_map=None) -> RealignedPair | LoraPair:
    """A `RealignedPair` when each `aligned` is a full model; a `LoraPair` (one base model, one
    forward) when every one is a PEFT LoRA directory on `ref`. Both are `MixedLM`s with the same
    `generate(lam=...)` and `members`. `device_map`: see `RealignedPair.from_pretrained`."""
    aligned = [aligned] if isinstance(aligned, str) else list(aligned)
    lora = [is_lora_dir(a) for a in aligned]
    if not any(lora):
        return RealignedPair.from_pretrained(ref, aligned, dtype, device, trust_remote_code, device_map=device_map)
    if not all(lora):
        raise ValueError("`--aligned` mixes LoRA adapter directories and full models; give all adapters (one "
                         "base model, one forward) or all full models (merge the adapters with PEFT's merge_and_unload)")
    if device_map is not None:
        raise ValueError("`device_map` applies to full models; LoRA adapters share their base model's devices")
    return LoraPair.from_pretrained(ref, aligned, dtype, device, trust_remote_code)


def load_mixed(args):
    """(model, tokenizer, n_aligned) on transformers for a verb's model flags; n_aligned 0 is a
    plain model. The flags' combination is checked by `cliargs.n_aligned`, its one home."""
    from aligndial.loading import device_maps_from_flags, load_causal_lm, load_tokenizer

    n = n_aligned(args)
    device_map = getattr(args, "device_map", None)
    if args.ref:
        pair = load_pair(args.ref, args.aligned, args.dtype, getattr(args, "device", None), args.trust_remote_code,
                         device_map=device_maps_from_flags(device_map, 1 + n))
        return pair, pair.tokenizer, n
    tok = load_tokenizer(args.model, args.trust_remote_code)
    model = load_causal_lm(args.model, args.dtype, getattr(args, "device", None), args.trust_remote_code,
                           device_map=device_maps_from_flags(device_map, 1))
    if getattr(args, "adapter", None):
        from aligndial.dualpath import DualPathModel

        return DualPathModel.from_adapter(model, args.adapter), tok, 1
    return model, tok, 0
