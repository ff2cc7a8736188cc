"""All λ maths lives here, and nowhere else.

DeRa (Liu et al., 2024, Prop. 1 / Eq. 9) samples each token from

    softmax(λ·h_aligned + (1 − λ)·h_ref)

and with K aligned models (App. B) from

    softmax((1 − Σλ_i)·h_ref + Σ λ_i·h_i).

The same linear combination, applied to final hidden states instead of logits, is what the
dual-path adapter model uses when both paths share one linear head: the weights sum to one,
so W(Σ w_i·x_i) + b = Σ w_i·(W x_i + b).

Numerics (see RELIABILITY.md, cases 12–15):
- everything is mixed in float32, whatever the models' dtype, so fp16 cannot overflow at λ=50;
- a source with weight exactly 0 is ignored entirely, which makes λ=0 and λ=1 bit-exact;
- a token masked (−inf) in any source with a non-zero weight stays masked (the union of the
  masks), instead of becoming NaN (−inf·0, −inf + inf) or +inf (−inf·negative weight);
- NaN or +inf in a source raises, so no silently chosen token.

This module knows nothing about models or tokenizers: tensors in, tensors out.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

LamLike = float | int | Sequence[float] | torch.Tensor


def lam_weights(lam: LamLike, batch_size: int, n_aligned: int = 1) -> torch.Tensor:
    """Turn any accepted form of λ into a float32 tensor of shape (B, K).

    - a number: the same λ for every row (only with one aligned model, K = 1);
    - a list or tuple: one λ_i per aligned model (length K), the same for every row;
    - a tensor: one row per batch element, shape (B,) for K = 1 or (B, K). A 0-d tensor is a number.
    """
    if (
        isinstance(lam, torch.Tensor) and lam.dtype == torch.float32 and lam.device.type == "cpu"
        and tuple(lam.shape) == (batch_size, n_aligned) and all(map(math.isfinite, lam.reshape(-1).tolist()))
    ):
        return lam.detach().contiguous()  # already canonical: generate() hands it back every step
    if isinstance(lam, torch.Tensor):
        t = lam.detach().to("cpu", torch.float64)
        if t.ndim == 0:
            if n_aligned != 1:
                _bad_number(n_aligned)
            t = t.reshape(1, 1).expand(batch_size, 1)
        elif t.ndim == 1 and n_aligned == 1:
            t = t.reshape(-1, 1)
        if t.ndim != 2 or t.shape != (batch_size, n_aligned):
            raise ValueError(
                f"lam tensor must have one row per batch element, shape ({batch_size},) or "
                f"({batch_size}, {n_aligned}); got shape {tuple(lam.shape)}"
            )
    elif isinstance(lam, (int, float)) and not isinstance(lam, bool):
        if n_aligned != 1:
            _bad_number(n_aligned)
        t = torch.full((batch_size, 1), float(lam), dtype=torch.float64)
    elif isinstance(lam, (list, tuple)):
        if len(lam) != n_aligned or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in lam):
            raise ValueError(
                f"lam as a list needs one number per aligned model ({n_aligned}); got {list(lam)!r}"
            )
        t = torch.tensor([float(x) for x in lam], dtype=torch.float64).expand(batch_size, n_aligned)
    else:
        raise TypeError(f"lam must be a number, a list of numbers or a tensor; got {type(lam).__name__}: {lam!r}")
    if not torch.isfinite(t).all():
        bad = t[~torch.isfinite(t)][0].item()
        raise ValueError(f"lam must be finite; got {bad}. Pass a real number such as 0.5 or 2.")
    return t.to(torch.float32).contiguous()


def _bad_number(n_aligned: int):
    raise ValueError(
        f"there are {n_aligned} aligned models, so lam needs {n_aligned} weights "
        f"(a list such as {[0.5] * n_aligned}); got a single number"
    )


# The largest |λ| accepted anywhere λ comes from a user (CLI flags, HTTP fields, configs).
# Eq. 9 scales logits by λ and 1 − λ: real logits stay far below 1e4 in magnitude, so
# |λ| ≤ 1e6 keeps every λ·logit within float32 (~3.4e38) with room to spare, while a "finite"
# λ such as 3e38 would overflow the mix to inf − inf = NaN and silently pick token 0.
LAM_LIMIT = 1e6


def check_lam(value: float, name: str = "lam", bound: float | None = None) -> float:
    """Validate one scalar λ from user input (CLI flag, HTTP field) and return it as a float:
    finite, and within ±`bound` (default ±LAM_LIMIT)."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"`{name}` must be a number; got {value!r}") from None
    except OverflowError:  # float(10**400): an int too large for a float
        x = math.inf
    if not math.isfinite(x):
        raise ValueError(f"`{name}` must be a finite number; got {value!r}")
    bound = LAM_LIMIT if bound is None else min(bound, LAM_LIMIT)
    if abs(x) > bound:
        raise ValueError(f"`{name}` must be within [{-bound:g}, {bound:g}]; got {value!r}")
    return x


def source_weights(lam: torch.Tensor) -> torch.Tensor:
    """(B, K) λ → (B, 1 + K) weights [1 − Σλ_i, λ_1, …, λ_K] (DeRa App. B), computed in float64."""
    lam64 = lam.to(torch.float64)
    return torch.cat([1.0 - lam64.sum(-1, keepdim=True), lam64], dim=-1).to(torch.float32)


def active_sources(lam: torch.Tensor) -> list[bool]:
    """Which of [ref, aligned_1, …] carry a non-zero weight in at least one row.

    A source that is inactive in every row need not be run at all: this is the λ=0 / λ=1
    fast path, generalised to K aligned models.
    """
    return (source_weights(lam) != 0).any(dim=0).tolist()


def _as_list(aligned) -> list:
    return [aligned] if aligned is None or isinstance(aligned, torch.Tensor) else list(aligned)


def _row_view(w: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) weights → (B, 1, …, 1) so they broadcast over every non-batch axis of `like`."""
    return w.to(like.device).reshape(w.shape[0], *([1] * (like.ndim - 1)))


def mix_logits(
    ref_logits: torch.Tensor | None,
    aligned_logits: torch.Tensor | None | Sequence[torch.Tensor | None],
    lam: LamLike,
) -> torch.Tensor:
    """Mixed, unnormalised float32 logits (1 − Σλ_i)·h_ref + Σ λ_i·h_i (DeRa Eq. 9, App. B).

    Shapes: every source is (B, …, V); `lam` is anything `lam_weights` accepts. A source may
    be None when its weight is zero in every row (the caller skipped running that model).
    Rows whose weights select a single source return that source's values exactly.
    """
    sources = [ref_logits, *_as_list(aligned_logits)]
    present = next(s for s in sources if s is not None)
    w = source_weights(lam_weights(lam, present.shape[0], len(sources) - 1))  # (B, 1+K)
    out, masked = None, None
    for i, src in enumerate(sources):
        wi = w[:, i]
        if src is None:
            if (wi != 0).any():
                raise ValueError(f"source {i} was not computed but has a non-zero weight; weights {w.tolist()}")
            continue
        if src.shape != present.shape:
            raise ValueError(f"all sources must have the same shape; got {tuple(src.shape)} and {tuple(present.shape)}")
        src, wv = src.float(), _row_view(wi, src)
        # Decoding calls this once per token, so the all-finite case costs one check; the
        # rest (the −inf union, NaN/+inf errors) runs only when some value is not finite.
        if not torch.isfinite(src).all():
            name = "ref_logits" if i == 0 else f"aligned_logits[{i - 1}]"
            if torch.isnan(src).any() or torch.isposinf(src).any():
                bad = "NaN" if torch.isnan(src).any() else "+inf"
                raise ValueError(f"{name} contains {bad}; the model's output is broken (check its dtype and weights)")
            neg = torch.isneginf(src)
            src = src.masked_fill(neg, 0.0)
            masked = neg & (wv != 0) if masked is None else masked | (neg & (wv != 0))
        term = src * wv
        out = term if out is None else out.add_(term)
    if masked is not None:
        out.masked_fill_(masked, float("-inf"))
        if masked.all(dim=-1).any():
            raise ValueError("every token is masked (−inf) in some source for at least one position; nothing can be sampled")
    return out


def mixed_logps(
    ref_logits: torch.Tensor,
    aligned_logits: torch.Tensor | Sequence[torch.Tensor],
    lam: LamLike,
) -> torch.Tensor:
    """float32 log-probabilities of softmax((1 − Σλ_i)·h_ref + Σ λ_i·h_i) over the last axis."""
    return torch.log_softmax(mix_logits(ref_logits, aligned_logits, lam), dim=-1)


def mix_hidden(ref_hidden: torch.Tensor, aligned_hidden: torch.Tensor, lam: LamLike) -> torch.Tensor:
    """The same combination on final hidden states (B, …, H), mixed in float32, cast back:
    (1 − λ)·x_ref + λ·x_aligned, one λ per row (one aligned source).

    Used before a shared linear head (the dual-path model, its vLLM form), once per decoded
    token, so it is a single `lerp` rather than `mix_logits`' general loop, whose dozen small
    ops measured ~0.3 ms inside a 58M model's bf16 decode step (0.06-0.08 ms standalone;
    this `lerp` form 0.03 ms). `lerp` is
    exact at both ends (λ=0 gives x_ref, λ=1 gives x_aligned, bit for bit). Hidden states have
    no masked positions, so any non-finite value means a broken model and raises.
    """
    w = lam_weights(lam, ref_hidden.shape[0], 1).to(ref_hidden.device)  # (B, 1)
    w = w.view(-1, *([1] * (ref_hidden.ndim - 1)))
    out = torch.lerp(ref_hidden.float(), aligned_hidden.float(), w).to(ref_hidden.dtype)
    if not torch.isfinite(out).all():  # one check in the common case; the diagnosis only on failure
        for name, src in (("ref_hidden", ref_hidden), ("aligned_hidden", aligned_hidden)):
            if not torch.isfinite(src).all():
                raise ValueError(f"{name} contains NaN or inf; the model's output is broken (check its dtype and weights)")
        raise ValueError(
            f"the mixed hidden states overflow {ref_hidden.dtype} at lam up to {w.abs().max().item():g}; "
            "load the model in bfloat16 or float32, or use a smaller |lam|"
        )
    return out


def mix_weights(ref_param: torch.Tensor, aligned_params: Sequence[torch.Tensor], lam: Sequence[float]) -> torch.Tensor:
    """θ = (1 − Σλ_i)·θ_ref + Σ λ_i·θ_i for one parameter tensor: the weight-space baseline of
    DeRa App. D.5 (as in rewarded soups). Mixed in float32, cast back; exact at λ=0 and λ=1."""
    w = source_weights(lam_weights(list(lam), 1, len(aligned_params)))[0]
    out = torch.zeros(ref_param.shape, dtype=torch.float32, device=ref_param.device)
    for wi, p in zip(w.tolist(), [ref_param, *aligned_params]):
        if wi != 0:
            out += wi * p.float()
    return out.to(ref_param.dtype)
