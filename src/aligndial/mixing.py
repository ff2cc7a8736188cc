"""All λ maths lives here, and nowhere else.

DeRa (Liu et al., 2024, Prop. 1 / Eq. 9) samples each token from

    softmax(λ·h_aligned + (1 − λ)·h_ref)

and with K aligned models (App. B) from

    softmax((1 − Σλ_i)·h_ref + Σ λ_i·h_i).

The same linear combination, applied to final hidden states instead of logits, is what the
dual-path adapter model uses when both paths share one linear head: the weights sum to one,
so W(Σ w_i·x_i) + b = Σ w_i·(W x_i + b).

Numerics (see docs/reliability.md, cases 12–15):
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


# Long inputs are mixed in chunks of rows of the flattened (B·T, V) logits, so the float32
# temporaries of a chunk (a converted source, one weighted term, a finiteness mask) stay small
# next to the (B, T, V) result: with a 152k vocabulary, B=8 and T=2048 each full-size temporary
# would be 10 GB. 2^20 elements is 4 MiB of float32 per temporary, at least one row per chunk.
CHUNK_ELEMENTS = 1 << 20

# float32 overflows beyond this: λ·logit past it becomes ±inf, and inf − inf is NaN.
_FLOAT32_MAX = torch.finfo(torch.float32).max


def _source_name(i: int) -> str:
    return "ref_logits" if i == 0 else f"aligned_logits[{i - 1}]"


class _Rows:
    """The sources of one mixture, flattened to (N, width) row views (no copy for the usual
    (B, T, V) logits, even sliced to a shared width), with their (N, 1 + K) float32 weights."""

    def __init__(self, sources: list, w: torch.Tensor, width: int, device: torch.device):
        present = next(s for s in sources if s is not None)
        self.lead = tuple(present.shape[:-1])
        per_batch = math.prod(self.lead[1:]) if len(self.lead) > 1 else 1
        self.n = math.prod(self.lead)
        self.sources = [None if s is None else s[..., :width].reshape(self.n, width) for s in sources]
        self.w_host = w.repeat_interleave(per_batch, dim=0)  # (N, 1 + K): which sources run, decided on the host
        self.w = self.w_host.to(device)
        self.width, self.device = width, device

    def chunk(self, sl: slice, out: torch.Tensor | None = None) -> torch.Tensor:
        """Float32 mixed logits of rows `sl` (into `out` if given), with the rules of the
        module docstring; fast when every value is finite, diagnosed only when one is not."""
        w = self.w[sl]
        active = [i for i, s in enumerate(self.sources) if s is not None and bool((self.w_host[sl, i] != 0).any())]
        out = torch.empty((w.shape[0], self.width), dtype=torch.float32, device=self.device) if out is None else out
        grad = torch.is_grad_enabled() and any(self.sources[i].requires_grad for i in active)
        for j, i in enumerate(active):  # the weights of a row sum to 1, so some source is active
            src = self.sources[i][sl].to(self.device, torch.float32)
            if j == 0 and grad:  # autograd records the copy into the result, not an `out=` product
                out.copy_(src * w[:, i : i + 1])
            elif j == 0:
                torch.mul(src, w[:, i : i + 1], out=out)
            else:
                out.add_(src * w[:, i : i + 1])
        # The common case costs this one check; the rest runs only when some value is not finite.
        # (Meta tensors carry shapes only, as in accelerate's init_empty_weights: nothing to check.)
        if out.device.type != "meta" and not bool(torch.isfinite(out).all()):
            self._diagnose(sl, active, out)
        return out

    def _diagnose(self, sl: slice, active: list[int], out: torch.Tensor) -> None:
        """Recompute rows `sl` with the −inf union (cases 12–13); raise on NaN / +inf in a
        source (case 15) and on a mix of finite values that overflows float32 (case 30)."""
        w = self.w[sl]
        masked = torch.zeros(out.shape, dtype=torch.bool, device=self.device)
        out.zero_()
        for i in active:
            src = self.sources[i][sl].to(self.device, torch.float32)
            if bool(torch.isnan(src).any()) or bool(torch.isposinf(src).any()):
                bad = "NaN" if bool(torch.isnan(src).any()) else "+inf"
                raise ValueError(
                    f"{_source_name(i)} contains {bad}; the model's output is broken (check its dtype and weights)"
                )
            neg = torch.isneginf(src)
            wv = w[:, i : i + 1]
            masked |= neg & (wv != 0)
            out.add_(src.masked_fill(neg, 0.0) * wv)
        out.masked_fill_(masked, float("-inf"))
        if bool(masked.all(dim=-1).any()):
            raise ValueError("every token is masked (−inf) in some source for at least one position; nothing can be sampled")
        overflow = ~torch.isfinite(out) & ~masked
        if bool(overflow.any()):
            row = int(overflow.any(dim=-1).nonzero()[0, 0])
            lams = [round(x, 6) for x in w[row, 1:].tolist()]
            raise ValueError(
                f"the mix overflows float32 at lam={lams[0] if len(lams) == 1 else lams}: a weighted logit exceeds "
                f"{_FLOAT32_MAX:.3g}; use a smaller |lam| (at most LAM_LIMIT={LAM_LIMIT:g}) or check the logits' scale"
            )

    def chunks(self):
        step = max(1, CHUNK_ELEMENTS // max(self.width, 1))
        for start in range(0, self.n, step):
            yield slice(start, min(start + step, self.n))


def _prepare(sources: list, lam: LamLike, n_tokens: int | None, device=None, widths_from: list | None = None):
    """(_Rows, width, n_tokens) for a mixture: checks shapes and weights, picks the shared width."""
    present = next((s for s in sources if s is not None), None)
    if present is None:
        raise ValueError("no logits given: every source is None")
    w = source_weights(lam_weights(lam, present.shape[0], len(sources) - 1))  # (B, 1+K)
    for i, src in enumerate(sources):
        if src is None:
            if bool((w[:, i] != 0).any()):
                raise ValueError(f"source {i} was not computed but has a non-zero weight; weights {w.tolist()}")
        elif src.shape[:-1] != present.shape[:-1]:
            raise ValueError(f"all sources must have the same shape; got {tuple(src.shape)} and {tuple(present.shape)}")
    width = _shared_width([s for s in (widths_from or sources) if s is not None], n_tokens)
    device = present.device if device is None else torch.device(device)
    return _Rows(sources, w, n_tokens or width, device), width


def _shared_width(tensors: list, n_tokens: int | None) -> int:
    """The last-axis width every tensor has. Heads padded to different widths over one tokenizer
    (Qwen: 151936 vs 152064) share their first `n_tokens` ids; the ids past that are padding."""
    widths = sorted({t.shape[-1] for t in tensors})
    if len(widths) > 1 and n_tokens is None:
        raise ValueError(
            f"the logits have different widths {widths}; pass n_tokens (the tokenizer's length) so the "
            "padded ids past it are masked and the mix covers the shared width"
        )
    if n_tokens is not None and not 0 < n_tokens <= widths[0]:
        raise ValueError(f"n_tokens must be in [1, {widths[0]}] (the narrowest head); got {n_tokens}")
    return widths[0]


def mix_logits(
    ref_logits: torch.Tensor | None,
    aligned_logits: torch.Tensor | None | Sequence[torch.Tensor | None],
    lam: LamLike,
    n_tokens: int | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Mixed, unnormalised float32 logits (1 − Σλ_i)·h_ref + Σ λ_i·h_i (DeRa Eq. 9, App. B).

    Shapes: every source is (B, …, V_i); `lam` is anything `lam_weights` accepts. A source may
    be None when its weight is zero in every row (the caller skipped running that model).
    Rows whose weights select a single source return that source's values exactly.

    `n_tokens`: ids from `n_tokens` on are padding of the head (no token has them): they are −inf
    in the result, which keeps the shared width min(V_i). Needed when the widths differ.
    `device`: where the mix happens and the result lives (default: the first given source's,
    i.e. the reference's when it ran); the other sources are copied there chunk by chunk.

    Works in chunks of rows (`CHUNK_ELEMENTS`): besides the result, the temporaries stay a few
    chunks in size whatever B·T is.
    """
    sources = [ref_logits, *_as_list(aligned_logits)]
    rows, width = _prepare(sources, lam, n_tokens, device)
    out = torch.empty((rows.n, width), dtype=torch.float32, device=rows.device)
    real = rows.width
    for sl in rows.chunks():
        rows.chunk(sl, out=out[sl, :real] if real < width else out[sl])
    if real < width:
        out[:, real:] = float("-inf")
    return out.reshape(*rows.lead, width)


def mixed_logps(
    ref_logits: torch.Tensor,
    aligned_logits: torch.Tensor | Sequence[torch.Tensor],
    lam: LamLike,
    n_tokens: int | None = None,
) -> torch.Tensor:
    """float32 log-probabilities of softmax((1 − Σλ_i)·h_ref + Σ λ_i·h_i) over the last axis,
    computed chunk by chunk (rows are independent) in the buffer of the mixed logits."""
    out = mix_logits(ref_logits, aligned_logits, lam, n_tokens)
    flat = out.view(-1, out.shape[-1])
    step = max(1, CHUNK_ELEMENTS // max(flat.shape[-1], 1))
    for start in range(0, flat.shape[0], step):
        flat[start : start + step] = torch.log_softmax(flat[start : start + step], dim=-1)
    return out


Mixture = tuple  # (ref_logits, aligned_logits, lam): a distribution π_λ given by its sources


def mixed_kl(p, q, n_tokens: int | None = None) -> torch.Tensor:
    """KL(P ‖ Q) = Σ_v P(v)·(log P(v) − log Q(v)) at every position, float32, shape (B, …).

    P and Q are each either logits (B, …, V) or a mixture `(ref_logits, aligned_logits, lam)`,
    the distribution softmax((1 − Σλ_i)·h_ref + Σ λ_i·h_i) (DeRa Eq. 9), so that

    - the sweep's KL(π_λ ‖ π_ref) is `mixed_kl((h_ref, h_aligned, lam), (h_ref, h_aligned, 0.0))`;
    - TrRa's loss KL(π_student ‖ π_λ) (FR Eq. 6) is `mixed_kl(student_logits, (h_ref, h_aligned, lam))`.

    Heads of different widths (Qwen's 151936 vs 152064 over one 151669-token tokenizer): pass
    `n_tokens`; the KL is taken over ids < n_tokens, every distribution renormalised over them
    (the padded ids are masked, as the pair does when it generates). Computed chunk by chunk over
    the B·T positions: no (B, T, V) temporary is made. Logits given as a tensor keep their
    autograd graph (a student being trained); a mixture's sources are treated as constants.
    A token Q masks (−inf) that P can emit gives +inf, as it should.
    """
    def parts(d):
        if isinstance(d, torch.Tensor):
            return [d], None, True
        ref, aligned, lam = d
        return [ref, *_as_list(aligned)], lam, False

    (p_src, p_lam, p_plain), (q_src, q_lam, q_plain) = parts(p), parts(q)
    every = [s for s in (*p_src, *q_src) if s is not None]
    width = _shared_width(every, n_tokens)
    real = n_tokens or width
    first = every[0]
    device = first.device
    lead = tuple(first.shape[:-1])
    for s in every:
        if tuple(s.shape[:-1]) != lead:
            raise ValueError(f"P and Q must cover the same positions; got shapes {tuple(first.shape)} and {tuple(s.shape)}")
    p_rows = None if p_plain else _prepare(p_src, p_lam, real, device, widths_from=every)[0]
    q_rows = None if q_plain else _prepare(q_src, q_lam, real, device, widths_from=every)[0]
    n = math.prod(lead)
    step = max(1, CHUNK_ELEMENTS // max(real, 1))
    flat_p = p_src[0][..., :real].reshape(n, real) if p_plain else None
    flat_q = q_src[0][..., :real].reshape(n, real) if q_plain else None
    out = []
    for start in range(0, n, step):
        sl = slice(start, min(start + step, n))
        logp = torch.log_softmax(flat_p[sl].float() if p_plain else p_rows.chunk(sl), dim=-1)
        logq = torch.log_softmax(flat_q[sl].to(device).float() if q_plain else q_rows.chunk(sl), dim=-1)
        # 0·log 0 = 0: a token P cannot emit adds nothing, even where Q masks it too.
        out.append(torch.where(logp > float("-inf"), logp.exp() * (logp - logq), 0.0).sum(-1))
    return torch.cat(out).reshape(lead)


def mix_hidden(ref_hidden: torch.Tensor, aligned_hidden: torch.Tensor, lam: LamLike, checked: bool = False,
               nan_rows: bool = False) -> torch.Tensor:
    """The same combination on final hidden states (B, …, H), mixed in float32, cast back:
    (1 − λ)·x_ref + λ·x_aligned, one λ per row (one aligned source).

    Used before a shared linear head (the dual-path model, its vLLM form), once per decoded
    token, so it is a single `lerp` rather than `mix_logits`' general loop, whose dozen small
    ops cost a visible share of a small model's bf16 decode step (docs/benchmarks.md). `lerp` is
    exact at both ends (λ=0 gives x_ref, λ=1 gives x_aligned, bit for bit). Hidden states have
    no masked positions, so any non-finite value means a broken model and raises.

    `nan_rows`: instead of raising, a row (batch element) with a non-finite value comes back all
    NaN and the other rows are untouched, so a serving engine can fail that one request (a row's
    λ whose mix overflows a float16 model must not fail the rows beside it; case 38).
    """
    # `checked`: `lam` is already lam_weights' (B, 1) tensor (a generate() call checks λ once), so
    # it is not checked again at every step, which would copy it to the host on an accelerator.
    w = (lam if checked else lam_weights(lam, ref_hidden.shape[0], 1)).to(ref_hidden.device)  # (B, 1)
    w = w.view(-1, *([1] * (ref_hidden.ndim - 1)))
    out = torch.lerp(ref_hidden.float(), aligned_hidden.float(), w).to(ref_hidden.dtype)
    if not torch.isfinite(out).all():  # one check in the common case; the diagnosis only on failure
        if nan_rows:
            bad = ~torch.isfinite(out).flatten(1).all(dim=1)
            return out.masked_fill(bad.view(-1, *([1] * (out.ndim - 1))), float("nan"))
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
