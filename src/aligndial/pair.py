"""A reference model and one or more aligned models, mixed at decoding time (DeRa).

Each model runs its own forward with its own KV cache; per step the pair returns

    logits = (1 − Σλ_i)·h_ref + Σ λ_i·h_i           (DeRa Eq. 9; App. B for K > 1)

computed by `aligndial.mixing`. Only models with a non-zero weight in some row are run, so
λ=0 costs one reference model and λ=1 one aligned model (the fast paths).

Vocabularies are checked at load: the tokenizers must agree token for token. Special tokens
may differ where real (base, instruct) pairs differ: EOS (`<|endoftext|>` vs `<|im_end|>`), BOS
and pad only warn, and the pair stops on the union of its running members' EOS ids. Heads may
differ in width (Qwen pads its head to 151936 or 152064 over one tokenizer); then the mix covers
the shared width and every id past the tokenizer's length is masked.

Devices: each member may live anywhere (`device_map=` per member, accelerate offload included);
each gets its inputs on its own input device, and the mix happens on ONE device, the reference's
output device (`RealignedPair.mix_device`), where the pair's logits are returned.
"""

from __future__ import annotations

import copy
import inspect

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from aligndial.generation import MixedLM
from aligndial.loading import load_causal_lm, load_tokenizer
from aligndial.mixing import LamLike, active_sources, lam_weights, mix_logits
from aligndial.peft_dirs import is_lora_dir
from aligndial.vocab import check_tokenizers


def head_width(model) -> int:
    return model.get_output_embeddings().weight.shape[0]


def eos_ids(model) -> list[int]:
    """The ids a model alone stops on in plain transformers: its generation_config's
    `eos_token_id`, an int or a list (instruct checkpoints list both EOS tokens)."""
    eos = model.generation_config.eos_token_id if model.generation_config is not None else None
    return [] if eos is None else [int(eos)] if isinstance(eos, int) else [int(e) for e in eos]


def stop_ids(member_eos: list[list[int]], lam, n_aligned: int, batch_size: int = 1) -> list[int]:
    """The EOS ids a row (or a batch given one `lam`) stops on: the union of the EOS ids of the
    members [ref, aligned_1, …] that `lam` gives a non-zero weight, reference first. λ=0 thus
    stops exactly as the reference alone, λ=1 as the aligned model alone, and a mix on either's
    EOS. With no λ or a per-token schedule (a callable, which may weight any member at some step)
    every member's EOS. The one rule for `generate`, the HF server and the vLLM engines."""
    if lam is None or callable(lam):
        runs = [True] * len(member_eos)
    else:
        runs = active_sources(lam_weights(lam, batch_size, n_aligned))
    return list(dict.fromkeys(e for member, run in zip(member_eos, runs) if run for e in member))


def output_device(model) -> torch.device:
    """Where a member's logits come out. A model dispatched by accelerate (`device_map`) returns
    its outputs on its input's device (io_same_device), so it is fed on its main device (the first
    one that is not "cpu"/"disk", as accelerate picks it); any other model, its head's device."""
    device_map = getattr(model, "hf_device_map", None)
    if device_map:
        real = [d for d in device_map.values() if d not in ("cpu", "disk")]
        return torch.device(real[0] if real else "cpu")
    return model.get_output_embeddings().weight.device


def input_device(model) -> torch.device:
    """Where a member's input ids must be: its embedding's device (accelerate's hooks move the
    inputs of a dispatched model themselves)."""
    if getattr(model, "hf_device_map", None):
        return output_device(model)
    return model.get_input_embeddings().weight.device


def _per_member(device_map, n: int) -> list:
    """`device_map` as one entry per member: a str or dict applies to every member; a list or
    tuple gives one entry (str, dict or None) per member, reference first."""
    if isinstance(device_map, (list, tuple)):
        if len(device_map) != n:
            raise ValueError(f"device_map as a list needs one entry per member (reference first): {n}; "
                             f"got {len(device_map)}")
        return list(device_map)
    return [device_map] * n


class PairCache:
    """One KV cache per member model (None for a member that is never run in this call)."""

    is_compileable = False
    is_croppable = False

    def __init__(self, caches: list):
        self.caches = caches

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return max((c.get_seq_length() for c in self.caches if c is not None), default=0)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        for c in self.caches:
            if c is not None and c.get_seq_length() > 0:
                c.reorder_cache(beam_idx)


class RealignedPair(MixedLM):
    """Reference + K aligned causal LMs whose forward returns the λ-mixed logits.

    >>> pair = RealignedPair.from_pretrained("sft-model", "dpo-model")
    >>> out = pair.generate(**pair.tokenizer(["Hi"], return_tensors="pt"), lam=0.5, max_new_tokens=20)
    """

    def __init__(self, ref, aligned: list, tokenizer=None, names: list[str] | None = None):
        aligned = list(aligned) if isinstance(aligned, (list, tuple)) else [aligned]
        if not aligned:
            raise ValueError("a pair needs at least one aligned model")
        super().__init__(ref.config)
        self.ref = ref
        self.aligned = nn.ModuleList(aligned)
        self.n_aligned = len(aligned)
        self.tokenizer = tokenizer
        self.names = names or ["ref"] + [f"aligned[{i}]" for i in range(len(aligned))]
        # The reference's generation settings, stopping on every member's EOS: a base reference
        # stops at <|endoftext|>, its instruct partner at <|im_end|>. `generate` narrows this to
        # the members a call runs (`eos_token_ids`), so λ=0 stops exactly as the reference alone.
        self.generation_config = copy.deepcopy(ref.generation_config)
        self.generation_config.eos_token_id = self.eos_token_ids() or None
        widths = [head_width(m) for m in self.members]
        self.width = min(widths)
        n_tokens = len(tokenizer) if tokenizer is not None else self.width
        if n_tokens > self.width:
            raise ValueError(
                f"the tokenizer has {n_tokens} tokens but the head of {self.names[widths.index(self.width)]} "
                f"has only {self.width} rows"
            )
        # Padded heads of different widths: mask ids the tokenizer cannot produce.
        self.pad_from = n_tokens if len(set(widths)) > 1 else None
        self._takes_positions = ["position_ids" in inspect.signature(m.forward).parameters for m in self.members]

    @property
    def members(self) -> list:
        return [self.ref, *self.aligned]

    @property
    def mix_device(self) -> torch.device:
        """The one device where the members' logits are mixed and returned: the reference's
        output device. Members elsewhere get their inputs moved to them, their logits moved here."""
        return output_device(self.ref)

    @property
    def device(self) -> torch.device:
        return self.mix_device

    def eos_token_ids(self, lam=None, batch_size: int = 1) -> list[int]:
        """The union of the EOS ids of the members a call with `lam` runs (a non-zero weight in
        some row; every member for None or a schedule), reference first. λ=0 thus stops exactly
        as the reference alone, λ=1 as the aligned model alone, and a mix on either's EOS."""
        return stop_ids([eos_ids(m) for m in self.members], lam, self.n_aligned, batch_size)

    def generate(self, inputs: torch.Tensor | None = None, lam=1.0, **kwargs):
        """`MixedLM.generate`, stopping on `eos_token_ids(lam)` unless the call sets its own."""
        if "eos_token_id" not in kwargs and "generation_config" not in kwargs:
            ids = inputs if inputs is not None else kwargs.get("input_ids")
            eos = self.eos_token_ids(lam, ids.shape[0] if ids is not None else 1)
            if eos:
                kwargs["eos_token_id"] = eos
        return super().generate(inputs, lam=lam, **kwargs)

    @classmethod
    def from_pretrained(cls, ref: str, aligned: str | list[str], dtype=None, device=None, trust_remote_code=False,
                        device_map=None) -> "RealignedPair":
        """The reference and each `aligned` full model, tokenizers checked alike. LoRA adapter
        directories as `aligned` make a `LoraPair` instead: load those with
        `aligndial.mixed.load_pair`, which picks either.

        `device_map` goes to each member's `from_pretrained` (accelerate: "auto", a device, or a
        {module: device} dict with "cpu"/"disk" offload): one str/dict for every member, or a
        list with one entry per member, reference first (e.g. ["cuda:0", "cuda:1"], one large
        model per GPU). The mix happens on the reference's output device (`mix_device`)."""
        aligned = [aligned] if isinstance(aligned, str) else list(aligned)
        if any(is_lora_dir(a) for a in aligned):
            raise ValueError("`aligned` holds a LoRA adapter directory, which makes a LoraPair, not a RealignedPair; "
                             "load it with `aligndial.mixed.load_pair(ref, aligned)`")
        ref_tok = load_tokenizer(ref, trust_remote_code)
        for name in aligned:
            check_tokenizers(ref_tok, load_tokenizer(name, trust_remote_code), ref, name)
        maps = _per_member(device_map, 1 + len(aligned))
        models = [load_causal_lm(n, dtype, device, trust_remote_code, device_map=m) for n, m in zip([ref, *aligned], maps)]
        return cls(models[0], models[1:], tokenizer=ref_tok, names=[ref, *aligned]).eval()

    def new_cache(self) -> PairCache:
        from transformers import DynamicCache

        return PairCache([DynamicCache(config=m.config) for m in self.members])

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, lam=None, lam_schedule=None, **kwargs):
        """Each active member prepares its own inputs, exactly as plain transformers would."""
        lam, run_all = self.step_lam(input_ids, lam, lam_schedule)
        runs = [True] * len(self.members) if run_all else active_sources(lam)
        member_inputs = [
            m.prepare_inputs_for_generation(
                input_ids, past_key_values=past_key_values.caches[i] if past_key_values is not None else None, **kwargs
            )
            if runs[i]
            else None
            for i, m in enumerate(self.members)
        ]
        return {"member_inputs": member_inputs, "lam": lam, "past_key_values": past_key_values}

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: PairCache | None = None,
        lam: LamLike | None = None,
        logits_to_keep: int = 0,
        use_cache: bool | None = None,
        member_inputs: list | None = None,
        run_all: bool = False,
        return_dict: bool = True,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Mixed logits, (B, T, V) float32 (or the single active member's own logits).

        Called by `generate` with `member_inputs` from `prepare_inputs_for_generation`, or
        directly with `input_ids` (e.g. to score sequences under π_λ). `run_all` runs every
        member even where its weight is 0, so each cache stays complete (a server whose rows
        change λ, or join and leave, needs that).
        """
        batch = (input_ids if input_ids is not None else next(x for x in member_inputs if x)["input_ids"]).shape[0]
        lam = self.resolve_lam(lam, batch)
        if member_inputs is None:
            active = [True] * len(self.members) if run_all else active_sources(lam)
            member_inputs = [
                dict(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    past_key_values=past_key_values.caches[i] if past_key_values is not None else None,
                    logits_to_keep=logits_to_keep,
                    use_cache=use_cache,
                    **({"position_ids": position_ids} if self._takes_positions[i] else {}),
                )
                if active[i]
                else None
                for i in range(len(self.members))
            ]
        logits, caches = [], []
        for m, inputs in zip(self.members, member_inputs):
            if inputs is None:
                logits.append(None)
                caches.append(None)
                continue
            device = input_device(m)  # one large model per GPU: each member reads its inputs where it lives
            inputs = {k: v.to(device) if isinstance(v, torch.Tensor) and v.device != device else v for k, v in inputs.items()}
            out = m(**inputs, return_dict=True)
            logits.append(out.logits[..., : self.width])
            caches.append(out.past_key_values)
        if past_key_values is None and any(c is not None for c in caches):
            past_key_values = PairCache(caches)
        if sum(x is not None for x in logits) == 1 and self.pad_from is None:
            mixed = next(x for x in logits if x is not None).to(self.mix_device)  # fast path: exactly that model's logits
        else:
            # One device for the mix (the reference's output device); padded ids of heads of
            # different widths are masked (−inf) there.
            mixed = mix_logits(logits[0], logits[1:], lam, n_tokens=self.pad_from, device=self.mix_device)
        return CausalLMOutputWithPast(logits=mixed, past_key_values=past_key_values)
