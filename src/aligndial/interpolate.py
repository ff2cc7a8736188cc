"""Weight interpolation, the cheap baseline of DeRa App. D.5: one model with
θ_ref + λ·(θ_aligned − θ_ref), saved as a standard HF directory that plain transformers loads.

It costs one model at inference instead of two, but it is not the same distribution as DeRa's
logit mix; the paper reports a performance penalty, which the sweep tools let you measure.
"""

from __future__ import annotations

from pathlib import Path

import torch

from aligndial.loading import load_causal_lm, load_tokenizer
from aligndial.mixing import check_lam, mix_weights
from aligndial.vocab import check_tokenizers


def interpolate(ref: str, aligned: str, lam: float, out: str | Path, dtype=None, trust_remote_code=False) -> Path:
    lam = check_lam(lam, "--lam")
    check_tokenizers(load_tokenizer(ref, trust_remote_code), load_tokenizer(aligned, trust_remote_code), ref, aligned)
    ref_model = load_causal_lm(ref, dtype, trust_remote_code=trust_remote_code)
    aligned_model = load_causal_lm(aligned, dtype, trust_remote_code=trust_remote_code)
    ref_state, aligned_state = ref_model.state_dict(), aligned_model.state_dict()
    if ref_state.keys() != aligned_state.keys():
        diff = sorted(ref_state.keys() ^ aligned_state.keys())
        raise ValueError(f"{ref} and {aligned} have different parameters, e.g. {diff[:5]}; weights can only be mixed for one architecture")
    bad = [k for k in ref_state if ref_state[k].shape != aligned_state[k].shape]
    if bad:
        raise ValueError(f"parameter shapes differ between {ref} and {aligned}: {bad[:5]}")
    with torch.no_grad():
        mixed = {k: mix_weights(ref_state[k], [aligned_state[k]], [lam]) for k in ref_state}
        ref_model.load_state_dict(mixed)
    out = Path(out)
    ref_model.save_pretrained(out)
    load_tokenizer(ref, trust_remote_code).save_pretrained(out)
    return out
