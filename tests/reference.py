"""The float64 oracle shared by the pair and dual-path tests."""

import torch

from aligndial.tiny import EOS_ID


def float64_greedy(ref, aligned, input_ids, lam, steps):
    """Greedy tokens of softmax((1 − λ)·h_ref + λ·h_aligned), recomputing both models' full
    logits every step (no cache) and mixing in float64. `lam` may be a function of the step."""
    ids = input_ids
    for step in range(steps):
        lam_t = lam(step) if callable(lam) else lam
        with torch.no_grad():
            h_ref, h_aligned = ref(ids).logits[:, -1].double(), aligned(ids).logits[:, -1].double()
        ids = torch.cat([ids, ((1 - lam_t) * h_ref + lam_t * h_aligned).argmax(-1, keepdim=True)], dim=-1)
        if ids[0, -1] == EOS_ID:  # generate stops at EOS too
            break
    return ids[:, input_ids.shape[1] :]
