"""Scoring fixed responses under π_λ: the log-probabilities and KL that evaluation needs.

A mixed model (`RealignedPair`, `DualPathModel`) run at λ=0 returns the reference logits h_ref
exactly and at λ=1 the aligned logits h_aligned exactly (their fast paths). Two forwards
therefore give, through `mixing.mixed_logps`, log π_λ at every response position for any λ,
even one that changes from token to token (a `<think>` schedule), and for all λ of a sweep:

    log π_λ(·|x, y<t) = log_softmax((1 − λ_t)·h_ref + λ_t·h_aligned)        (DeRa Eq. 9)

Sequences are left-padded with position ids from the mask, as in generation, so the response
positions line up at the end and only those logits are kept (`logits_to_keep`).
"""

from __future__ import annotations

import torch

from aligndial.generation import span_schedule
from aligndial.mixing import mixed_kl, mixed_logps


def think_schedule(tokenizer, think_lam: float, lam: torch.Tensor):
    """A per-token schedule for `generate(lam=...)`: `think_lam` inside an open `<think>` span,
    each row's own λ (a (B,) tensor) elsewhere. The span is found by `span_schedule`."""
    inside = span_schedule(tokenizer, inside=1.0, outside=0.0)

    def schedule(input_ids: torch.Tensor) -> torch.Tensor:
        return torch.where(inside(input_ids).bool(), float(think_lam), lam.float())

    return schedule


def position_lams(tokenizer, context: list[int], response: list[int], lam: float, think_lam: float | None) -> torch.Tensor:
    """(T,) the λ generation used for each response token: `lam`, or with `think_lam` the λ the
    think schedule gives on each prefix context + response[:t] (exactly what `generate` saw)."""
    if think_lam is None:
        return torch.full((len(response),), float(lam))
    prefixes = [context + response[:t] for t in range(len(response))]
    width = max(map(len, prefixes))
    pad = tokenizer.pad_token_id or 0  # left padding, before the context: it cannot complete a tag
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prefixes])
    return think_schedule(tokenizer, think_lam, torch.full((len(response),), float(lam)))(ids)


@torch.no_grad()
def response_logits(model, contexts: list[list[int]], responses: list[list[int]], pad_id: int) -> list[tuple]:
    """For each row, (h_ref, h_aligned): float32 logits (T_i, V) at the positions that predict
    the T_i response tokens given context + the response so far."""
    for c, r in zip(contexts, responses):
        if not c or not r:
            raise ValueError(f"scoring needs a non-empty context and response; got {len(c)} and {len(r)} tokens")
    seqs = [c + r for c, r in zip(contexts, responses)]
    width, keep = max(map(len, seqs)), max(map(len, responses)) + 1
    device = model.device
    ids = torch.tensor([[pad_id] * (width - len(s)) + s for s in seqs], device=device)
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], device=device)
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    ends = [
        model(ids, attention_mask=mask, position_ids=positions, lam=lam, logits_to_keep=keep, use_cache=False).logits.float()
        for lam in (0.0, 1.0)
    ]  # (B, keep, V) each: h_ref, h_aligned
    out = []
    for i, r in enumerate(responses):
        rows = slice(keep - 1 - len(r), keep - 1)  # position p predicts token p + 1
        out.append((ends[0][i, rows].cpu(), ends[1][i, rows].cpu()))
    return out


def kl_to_ref(ref_logits: torch.Tensor, aligned_logits: torch.Tensor, lams: torch.Tensor, n_tokens: int | None = None) -> float:
    """Σ_t KL(π_λt ‖ π_ref) over the vocabulary at each position (ids < `n_tokens` when given: a
    pair's heads of different widths), float32, chunked in `mixing.mixed_kl`; exactly 0 at λ=0.
    A token π_λ can emit but π_ref masks makes it +inf, as it should."""
    p = (ref_logits, aligned_logits, lams)
    q = (ref_logits, aligned_logits, torch.zeros_like(lams))  # π_ref, computed exactly as π_λ is
    return mixed_kl(p, q, n_tokens).sum().item()


def mean_logp(ref_logits: torch.Tensor, aligned_logits: torch.Tensor, lams: torch.Tensor, response: list[int]) -> float:
    """(1/|y|)·log π_λ(y|x): the length-normalised log-likelihood of DeRa Eq. 14."""
    logp = mixed_logps(ref_logits, aligned_logits, lams)
    return logp.gather(-1, torch.tensor(response).unsqueeze(-1)).sum().item() / len(response)


def turn_lam(point, turn: int) -> float:
    """The λ a sweep point uses on assistant turn `turn` (0-based): a number on every turn, or a
    per-turn schedule (first-turn λ, later-turn λ) as in CLM Table 4."""
    if isinstance(point, (int, float)):
        return float(point)
    return float(point[0] if turn == 0 else point[1])
