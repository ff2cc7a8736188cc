"""A reference model and one or more aligned models, mixed at decoding time (DeRa).

Each model runs its own forward with its own KV cache; per step the pair returns

    logits = (1 − Σλ_i)·h_ref + Σ λ_i·h_i           (DeRa Eq. 9; App. B for K > 1)

computed by `aligndial.mixing`. Only models with a non-zero weight in some row are run, so
λ=0 costs one reference model and λ=1 one aligned model (the fast paths).

Vocabularies are checked at load: the tokenizers must agree token for token. Heads may differ
in width (Qwen pads its head to 151936 or 152064 over one tokenizer); then the mix covers the
shared width and every id past the tokenizer's length is masked.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from aligndial.generation import MixedLM
from aligndial.loading import load_causal_lm, load_tokenizer
from aligndial.mixing import LamLike, active_sources, mix_logits

_SPECIAL = ("bos_token", "eos_token", "unk_token", "pad_token")


def check_tokenizers(ref_tok, other_tok, ref_name: str = "ref", other_name: str = "aligned") -> None:
    """Raise ValueError unless the two tokenizers map the same strings to the same ids, with the
    same special tokens. A pad token set on only one side is allowed: it never changes logits."""
    ref_vocab, other_vocab = ref_tok.get_vocab(), other_tok.get_vocab()
    if ref_vocab != other_vocab:
        only_ref = sorted(set(ref_vocab.items()) - set(other_vocab.items()), key=lambda kv: kv[1])
        only_other = sorted(set(other_vocab.items()) - set(ref_vocab.items()), key=lambda kv: kv[1])
        raise ValueError(
            f"tokenizers of {ref_name} and {other_name} differ: {len(ref_vocab)} vs {len(other_vocab)} tokens; "
            f"{len(only_ref)} (token, id) pairs only in {ref_name}, e.g. {only_ref[:3]}; "
            f"{len(only_other)} only in {other_name}, e.g. {only_other[:3]}. "
            "DeRa mixes logits id by id, so both models must share one tokenizer."
        )
    diffs = []
    for attr in _SPECIAL:
        a, b = getattr(ref_tok, attr), getattr(other_tok, attr)
        if a != b and not (attr == "pad_token" and (a is None or b is None)):
            diffs.append(f"{attr}: {a!r} vs {b!r}")
    if diffs:
        raise ValueError(f"special tokens of {ref_name} and {other_name} differ: {'; '.join(diffs)}")


def head_width(model) -> int:
    return model.get_output_embeddings().weight.shape[0]


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
        self.generation_config = ref.generation_config
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

    @classmethod
    def from_pretrained(cls, ref: str, aligned: str | list[str], dtype=None, device=None, trust_remote_code=False):
        aligned = [aligned] if isinstance(aligned, str) else list(aligned)
        ref_tok = load_tokenizer(ref, trust_remote_code)
        for name in aligned:
            check_tokenizers(ref_tok, load_tokenizer(name, trust_remote_code), ref, name)
        models = [load_causal_lm(n, dtype, device, trust_remote_code) for n in [ref, *aligned]]
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
            out = m(**inputs, return_dict=True)
            logits.append(out.logits[..., : self.width])
            caches.append(out.past_key_values)
        if past_key_values is None and any(c is not None for c in caches):
            past_key_values = PairCache(caches)
        if self.pad_from is not None:
            padded = torch.arange(self.pad_from, self.width, device=out.logits.device)
            logits = [None if x is None else x.float().index_fill(-1, padded, float("-inf")) for x in logits]
        if sum(x is not None for x in logits) == 1 and self.pad_from is None:
            mixed = next(x for x in logits if x is not None)  # fast path: exactly that model's logits
        else:
            mixed = mix_logits(logits[0], logits[1:], lam.to(next(x for x in logits if x is not None).device))
        return CausalLMOutputWithPast(logits=mixed, past_key_values=past_key_values)
