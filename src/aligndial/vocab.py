"""Tokenizer checks: DeRa mixes logits id by id, so every member of a mix needs one vocabulary.

Used by every loader that puts two checkpoints in one mix (the pair, the LoRA pair, the vLLM
export, `interpolate`, distillation) and by the CLI before it loads any weights.
"""

from __future__ import annotations

import warnings

_SPECIAL = ("bos_token", "eos_token", "unk_token", "pad_token")
# Base and instruct checkpoints of one family differ here (Qwen: EOS <|endoftext|> vs <|im_end|>;
# Llama 3: <|end_of_text|> vs <|eot_id|>, and the pad token stands in for EOS). These never change
# what an id means, so they warn; the pair stops on every member's EOS (`eos_token_ids`).
_WARN_ONLY = ("bos_token", "eos_token", "pad_token")


def check_tokenizers(ref_tok, other_tok, ref_name: str = "ref", other_name: str = "aligned") -> None:
    """Raise ValueError unless the two tokenizers map the same strings to the same ids (token → id
    over the whole vocabulary, added tokens included), naming the differing tokens. Where only
    EOS, BOS or pad differ, warn (naming them) instead: prompts are tokenized with the reference's
    tokenizer, and each row stops on the EOS ids of the members its λ runs."""
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
    diffs = {}
    for attr in _SPECIAL:
        a, b = getattr(ref_tok, attr), getattr(other_tok, attr)
        if a != b and not (attr == "pad_token" and (a is None or b is None)):
            diffs[attr] = f"{attr}: {a!r} vs {b!r}"
    refused = [d for attr, d in diffs.items() if attr not in _WARN_ONLY]
    if refused:
        raise ValueError(f"special tokens of {ref_name} and {other_name} differ: {'; '.join(refused)}")
    if diffs:
        warnings.warn(
            f"special tokens of {ref_name} and {other_name} differ: {'; '.join(diffs.values())}. Same vocabulary, so "
            f"the pair mixes them; prompts use {ref_name}'s tokenizer and each row stops on the EOS of the members its λ runs.",
            stacklevel=2,
        )
