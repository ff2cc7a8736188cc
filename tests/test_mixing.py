"""The mixing core: properties of softmax((1 − Σλ_i)·h_ref + Σ λ_i·h_i) (DeRa Eq. 9, App. B),
and docs/reliability.md cases 12–17."""

import math
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from aligndial.mixing import active_sources, check_lam, lam_weights, mix_hidden, mix_logits, mix_weights, mixed_logps

lams = st.floats(min_value=-5, max_value=10, allow_nan=False, allow_infinity=False)
seeds = st.integers(0, 2**16)


def logits(seed, shape=(3, 11), dtype=torch.float32, scale=4.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(dtype)


def reference_logps(ref, aligned, lam):
    """The formula in float64, with no masking subtleties: for finite inputs only."""
    mixed = (1 - lam) * ref.double() + lam * aligned.double()
    return torch.log_softmax(mixed, dim=-1)


@settings(max_examples=60, deadline=None)
@given(seeds, lams)
def test_matches_float64_formula(seed, lam):
    ref, aligned = logits(seed), logits(seed + 1)
    out = mixed_logps(ref, aligned, lam)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), reference_logps(ref, aligned, lam), rtol=1e-5, atol=1e-4)


@settings(max_examples=40, deadline=None)
@given(seeds, st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
def test_lam_zero_and_one_are_exact(seed, dtype):
    ref, aligned = logits(seed, dtype=dtype), logits(seed + 1, dtype=dtype)
    assert torch.equal(mixed_logps(ref, aligned, 0.0), torch.log_softmax(ref.float(), -1))
    assert torch.equal(mixed_logps(ref, aligned, 1.0), torch.log_softmax(aligned.float(), -1))
    # Exact even when the other source has masked tokens or huge values.
    aligned[:, 0] = float("-inf")
    assert torch.equal(mix_logits(ref, aligned, 0.0), ref.float())


@settings(max_examples=40, deadline=None)
@given(seeds, st.sampled_from([0.5, 2.0, -1.0, 0.0, 1.0]))
def test_neg_inf_in_both_sources_is_probability_zero(seed, lam):
    """Case 12: −inf in both sources → that token has probability 0, and no NaN anywhere."""
    ref, aligned = logits(seed), logits(seed + 1)
    ref[:, 3] = aligned[:, 3] = float("-inf")
    out = mixed_logps(ref, aligned, lam)
    assert not torch.isnan(out).any()
    assert torch.isneginf(out[:, 3]).all()
    assert torch.isfinite(out[:, [0, 1, 2, 4]]).all()
    assert torch.allclose(out.exp().sum(-1), torch.ones(3))


@settings(max_examples=40, deadline=None)
@given(seeds, st.floats(min_value=-5, max_value=-0.01), st.booleans())
def test_neg_inf_in_one_source_with_negative_lam(seed, lam, in_ref):
    """Case 13: −inf in one source with λ < 0 → no +inf, no NaN row; the token stays masked."""
    ref, aligned = logits(seed), logits(seed + 1)
    (ref if in_ref else aligned)[0, 5] = float("-inf")
    mixed = mix_logits(ref, aligned, lam)
    assert not torch.isposinf(mixed).any() and not torch.isnan(mixed).any()
    assert torch.isneginf(mixed[0, 5])
    assert torch.isfinite(mixed_logps(ref, aligned, lam)[0, [0, 1, 2, 3, 4, 6]]).all()


@settings(max_examples=30, deadline=None)
@given(seeds, st.sampled_from([torch.float16, torch.bfloat16]), st.sampled_from([50.0, -50.0, 1e4]))
def test_half_precision_with_large_lam_is_finite_float32(seed, dtype, lam):
    """Case 14: the mix is done in float32, so fp16 cannot overflow at λ=50."""
    ref, aligned = logits(seed, dtype=dtype, scale=1000.0), logits(seed + 1, dtype=dtype, scale=1000.0)
    out = mixed_logps(ref, aligned, lam)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("where", ["ref", "aligned"])
def test_nan_in_a_source_raises(where):
    """Case 15: NaN in a model's logits → a clear error, never a silently chosen token."""
    ref, aligned = logits(0), logits(1)
    (ref if where == "ref" else aligned)[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        mixed_logps(ref, aligned, 0.5)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_lam_raises(bad):
    with pytest.raises(ValueError, match="finite"):
        mixed_logps(logits(0), logits(1), bad)
    with pytest.raises(ValueError, match="finite"):
        mixed_logps(logits(0), logits(1), torch.tensor([0.5, bad, 1.0]))
    with pytest.raises(ValueError, match="finite"):  # already in the canonical (B, 1) float32 form
        mixed_logps(logits(0), logits(1), torch.tensor([[0.5], [bad], [1.0]]))
    with pytest.raises(ValueError, match="finite"):
        check_lam(str(bad))


def test_check_lam_names_the_value_and_bound():
    assert check_lam("0.5") == 0.5
    with pytest.raises(ValueError, match="got 'abc'"):
        check_lam("abc")
    with pytest.raises(ValueError, match=r"\[-5, 5\]"):
        check_lam(7, bound=5)
    with pytest.raises(ValueError, match="finite"):
        check_lam("1e400")


@settings(max_examples=30, deadline=None)
@given(seeds, st.lists(lams, min_size=3, max_size=3))
def test_per_row_lam_equals_each_row_alone(seed, row_lams):
    ref, aligned = logits(seed), logits(seed + 1)
    batched = mixed_logps(ref, aligned, torch.tensor(row_lams))
    for i, lam in enumerate(row_lams):
        assert torch.equal(batched[i], mixed_logps(ref[i : i + 1], aligned[i : i + 1], lam)[0])


@settings(max_examples=30, deadline=None)
@given(seeds, lams, lams)
def test_several_aligned_models_follow_appendix_b(seed, lam1, lam2):
    ref, a1, a2 = logits(seed), logits(seed + 1), logits(seed + 2)
    out = mixed_logps(ref, [a1, a2], [lam1, lam2])
    expected = torch.log_softmax((1 - lam1 - lam2) * ref.double() + lam1 * a1.double() + lam2 * a2.double(), -1)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-4)
    # One aligned weight 1 and the others 0 is exactly that model.
    assert torch.equal(mixed_logps(ref, [a1, a2], [0.0, 1.0]), torch.log_softmax(a2, -1))


def test_per_row_lam_with_several_aligned_models():
    ref, a1, a2 = logits(0, (2, 7)), logits(1, (2, 7)), logits(2, (2, 7))
    lam = torch.tensor([[0.0, 0.0], [0.3, 0.9]])
    out = mixed_logps(ref, [a1, a2], lam)
    assert torch.equal(out[0], torch.log_softmax(ref[0], -1))
    torch.testing.assert_close(out[1], mixed_logps(ref[1:], [a1[1:], a2[1:]], [0.3, 0.9])[0])


def test_extra_axes_broadcast_per_row():
    """(B, T, V) logits with per-row λ: every position of row b uses λ_b."""
    ref, aligned = logits(0, (2, 4, 9)), logits(1, (2, 4, 9))
    out = mixed_logps(ref, aligned, torch.tensor([0.0, 2.0]))
    assert torch.equal(out[0], torch.log_softmax(ref[0], -1))
    torch.testing.assert_close(out[1], mixed_logps(ref[1], aligned[1], 2.0))


def test_inputs_are_not_modified():
    ref, aligned = logits(0, dtype=torch.float16), logits(1, dtype=torch.float16)
    ref[0, 0] = float("-inf")
    before = ref.clone(), aligned.clone()
    mixed_logps(ref, aligned, torch.tensor([0.5, -1.0, 3.0]))
    assert torch.equal(ref, before[0]) and torch.equal(aligned, before[1])


def test_everything_masked_raises():
    ref, aligned = logits(0, (1, 3)), logits(1, (1, 3))
    ref[0, :2] = float("-inf")
    aligned[0, 2] = float("-inf")
    with pytest.raises(ValueError, match="every token is masked"):
        mix_logits(ref, aligned, 0.5)


@pytest.mark.parametrize(
    "lam, n_aligned, match",
    [
        (0.5, 2, "needs 2 weights"),
        ([0.5], 2, "one number per aligned model"),
        (torch.zeros(5), 1, "one row per batch element"),
        ("0.5", 1, "must be a number"),
    ],
)
def test_lam_forms_are_validated(lam, n_aligned, match):
    with pytest.raises((ValueError, TypeError), match=match):
        lam_weights(lam, 3, n_aligned)


def test_active_sources_is_the_fast_path():
    assert active_sources(lam_weights(0.0, 2)) == [True, False]
    assert active_sources(lam_weights(1.0, 2)) == [False, True]
    assert active_sources(lam_weights(torch.tensor([0.0, 1.0]), 2)) == [True, True]
    assert active_sources(lam_weights([0.0, 1.0], 1, 2)) == [False, False, True]


@settings(max_examples=30, deadline=None)
@given(seeds, lams, st.integers(1, 5), st.floats(0.05, 1.0))
def test_top_k_top_p_after_mixing_keep_a_token(seed, lam, k, p):
    """Case 16: transformers' top-k / top-p warpers on mixed scores keep ≥ 1 finite token, and
    top_k=1 keeps exactly the greedy choice."""
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    ref, aligned = logits(seed), logits(seed + 1)
    ref[:, :4] = float("-inf")
    scores = mix_logits(ref, aligned, lam)
    ids = torch.zeros(3, 1, dtype=torch.long)
    kept = TopPLogitsWarper(p)(ids, TopKLogitsWarper(k)(ids, scores))
    assert (torch.isfinite(kept).sum(-1) >= 1).all()
    top1 = TopKLogitsWarper(1)(ids, scores)
    assert torch.equal(top1.argmax(-1), scores.argmax(-1))
    assert (torch.isfinite(top1).sum(-1) == 1).all()


def test_mix_hidden_keeps_dtype_and_is_exact_at_ends():
    ref, aligned = logits(0, (2, 3, 8), torch.bfloat16), logits(1, (2, 3, 8), torch.bfloat16)
    assert mix_hidden(ref, aligned, 0.5).dtype == torch.bfloat16
    assert torch.equal(mix_hidden(ref, aligned, torch.tensor([0.0, 1.0]))[0], ref[0])
    assert torch.equal(mix_hidden(ref, aligned, torch.tensor([0.0, 1.0]))[1], aligned[1])


@settings(max_examples=20, deadline=None)
@given(seeds, lams)
def test_mix_weights(seed, lam):
    ref, aligned = logits(seed, (4, 5)), logits(seed + 1, (4, 5))
    assert torch.equal(mix_weights(ref, [aligned], [0.0]), ref)
    assert torch.equal(mix_weights(ref, [aligned], [1.0]), aligned)
    expected = ref.double() + lam * (aligned.double() - ref.double())
    assert torch.allclose(mix_weights(ref, [aligned], [lam]).double(), expected, atol=1e-4 * max(1, abs(lam)))
    assert math.isfinite(mix_weights(ref, [aligned], [lam]).sum().item())


@settings(max_examples=40, deadline=None)
@given(seeds, lams, st.sampled_from([torch.float32, torch.bfloat16]))
def test_mix_hidden_matches_float64_formula(seed, lam, dtype):
    """mix_hidden is (1 − λ)·x_ref + λ·x_aligned per row, computed in float32 and cast back."""
    ref, aligned = logits(seed, (2, 3, 8), dtype, scale=1.0), logits(seed + 1, (2, 3, 8), dtype, scale=1.0)
    expected = (1 - lam) * ref.double() + lam * aligned.double()
    got = mix_hidden(ref, aligned, lam)
    assert got.dtype == dtype
    # float32 arithmetic error, plus (bf16) one rounding of the result: 2^-9 relative
    rtol = 1e-6 if dtype == torch.float32 else 2**-8
    torch.testing.assert_close(got.double(), expected, rtol=rtol, atol=1e-5 * (1 + abs(lam)))
    # per-row λ: each row as if alone
    per_row = mix_hidden(ref, aligned, torch.tensor([lam, 0.0]))
    assert torch.equal(per_row[0], got[0]) and torch.equal(per_row[1], ref[1])


def test_mix_hidden_non_finite_raises():
    ref, aligned = logits(0, (2, 3, 8)), logits(1, (2, 3, 8))
    aligned[1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="aligned_hidden contains NaN"):
        mix_hidden(ref, aligned, 0.5)
    big = torch.full((1, 1, 4), 60000.0, dtype=torch.float16)
    with pytest.raises(ValueError, match="overflow torch.float16 at lam up to 3"):
        mix_hidden(torch.zeros_like(big), big, 3.0)


# ---- chunked mixing (issue 17: peak temporaries ≤ 1.5× one float32 (B, T, V)) ----

import aligndial.mixing as mixing_module  # noqa: E402
from aligndial.mixing import LAM_LIMIT, mixed_kl  # noqa: E402


@settings(max_examples=40, deadline=None)
@given(seeds, lams, st.integers(1, 40), st.sampled_from([torch.float32, torch.bfloat16]), st.booleans())
def test_chunking_changes_no_bit(seed, lam, chunk, dtype, with_masks):
    """Mixing, log-softmax and KL chunk by chunk over the B·T rows give bit for bit what one chunk
    gives, for any chunk size, with per-row λ, masked tokens (cases 12-13) and bf16 sources."""
    ref, aligned = logits(seed, (3, 5, 13), dtype), logits(seed + 1, (3, 5, 13), dtype)
    if with_masks:
        ref[0, 1, 3] = aligned[0, 1, 3] = float("-inf")
        aligned[2, :, 7] = float("-inf")
    lam_rows = torch.tensor([lam, 0.0, 1.0])
    old = mixing_module.CHUNK_ELEMENTS
    try:
        mixing_module.CHUNK_ELEMENTS = 1 << 30
        whole = (mix_logits(ref, aligned, lam_rows), mixed_logps(ref, aligned, lam_rows),
                 mixed_kl((ref, aligned, lam_rows), ref))
        mixing_module.CHUNK_ELEMENTS = chunk
        chunked = (mix_logits(ref, aligned, lam_rows), mixed_logps(ref, aligned, lam_rows),
                   mixed_kl((ref, aligned, lam_rows), ref))
    finally:
        mixing_module.CHUNK_ELEMENTS = old
    for a, b in zip(whole, chunked):
        assert torch.equal(a, b)
    # λ=0 and λ=1 rows are exactly the single source, in every chunking
    assert torch.equal(chunked[0][1], ref[1].float()) and torch.equal(chunked[0][2], aligned[2].float())


@settings(max_examples=30, deadline=None)
@given(seeds, lams, st.integers(1, 30))
def test_mixed_kl_matches_float64_formula(seed, lam, chunk):
    """KL(π_λ ‖ π_ref) and KL(student ‖ π_λ) against float64, per position, any chunking."""
    ref, aligned, student = logits(seed, (2, 4, 9)), logits(seed + 1, (2, 4, 9)), logits(seed + 2, (2, 4, 9))
    old = mixing_module.CHUNK_ELEMENTS
    mixing_module.CHUNK_ELEMENTS = chunk
    try:
        got = mixed_kl((ref, aligned, lam), (ref, aligned, 0.0))
        got_student = mixed_kl(student, (ref, aligned, lam))
    finally:
        mixing_module.CHUNK_ELEMENTS = old
    logp = torch.log_softmax((1 - lam) * ref.double() + lam * aligned.double(), -1)
    logq = torch.log_softmax(ref.double(), -1)
    logs = torch.log_softmax(student.double(), -1)
    assert got.shape == (2, 4)
    torch.testing.assert_close(got.double(), (logp.exp() * (logp - logq)).sum(-1), rtol=1e-4, atol=1e-4 * (1 + abs(lam)))
    torch.testing.assert_close(got_student.double(), (logs.exp() * (logs - logp)).sum(-1), rtol=1e-4,
                               atol=1e-4 * (1 + abs(lam)))
    assert torch.equal(mixed_kl((ref, aligned, 0.0), (ref, aligned, 0.0)), torch.zeros(2, 4))


def test_mixed_kl_over_heads_of_different_widths():
    """Case 17 for KL: heads padded to 12 and 15 columns over a 10-token tokenizer. Without
    n_tokens: a clear error; with it: the KL over the 10 real ids, each side renormalised, finite."""
    ref, aligned, student = logits(0, (2, 12)), logits(1, (2, 15)), logits(2, (2, 15))
    with pytest.raises(ValueError, match=r"different widths \[12, 15\]; pass n_tokens"):
        mixed_kl(student, (ref, aligned, 1.5))
    got = mixed_kl(student, (ref, aligned, 1.5), n_tokens=10)
    logs = torch.log_softmax(student[:, :10].double(), -1)
    logp = torch.log_softmax(-0.5 * ref[:, :10].double() + 1.5 * aligned[:, :10].double(), -1)
    torch.testing.assert_close(got.double(), (logs.exp() * (logs - logp)).sum(-1), rtol=1e-5, atol=1e-4)
    mixed = mix_logits(ref, aligned, 0.5, n_tokens=10)
    assert mixed.shape == (2, 12) and torch.isneginf(mixed[:, 10:]).all() and torch.isfinite(mixed[:, :10]).all()


def test_mixed_kl_keeps_the_students_gradient():
    """TrRa trains through mixed_kl: the student's logits get a gradient, the mixture's sources none."""
    ref, aligned = logits(0, (3, 9)), logits(1, (3, 9))
    student = logits(2, (3, 9)).requires_grad_()
    mixed_kl(student, (ref, aligned, 2.0)).sum().backward()
    assert student.grad is not None and student.grad.abs().sum() > 0


@pytest.mark.parametrize("lam", [1e6, -1e6])
def test_overflowing_mix_of_finite_logits_raises_one_line(lam):
    """Case 30: finite sources whose weighted sum overflows float32 (λ·logit beyond 3.4e38) raise
    one clear line instead of NaN logits that silently pick token 0.
    Before the fix: no error; mix_logits returned NaN/inf, and argmax picked token 0."""
    ref, aligned = logits(0, (2, 6)), logits(1, (2, 6)) * 1e33
    with pytest.raises(ValueError, match=r"the mix overflows float32 at lam=.*LAM_LIMIT=1e\+06") as info:
        mix_logits(ref, aligned, lam)
    assert "\n" not in str(info.value)
    assert abs(lam) <= LAM_LIMIT  # a λ the user may give: the overflow comes from the logits' scale


def test_sources_on_other_devices_are_mixed_on_one_device():
    """The mix happens on one device (`device=`, default the first source's), the others are
    copied there chunk by chunk. Before the fix: `out.add_` across devices raised."""
    ref, aligned = logits(0, (2, 3, 8)), logits(1, (2, 3, 8))
    out = mix_logits(ref, aligned.to("meta"), 0.5, device="meta")
    assert out.device.type == "meta" and out.shape == (2, 3, 8)


PEAK_SCRIPT = r'''
import json, re, sys
import torch
import aligndial.mixing as M

def status(key):
    return int(re.search(rf"{key}:\s+(\d+) kB", open("/proc/self/status").read()).group(1)) * 1024

B, T, V = 4, 256, 16384
dtype = getattr(torch, sys.argv[1])
ref = torch.empty(B, T, V, dtype=dtype).normal_(0, 4)  # filled in place: no temporaries
aligned = torch.empty(B, T, V, dtype=dtype).normal_(0, 4)
lam = torch.tensor([0.5, 2.0, -1.0, 0.25])
calls = {
    "mix_logits": lambda: M.mix_logits(ref, aligned, lam),
    "mixed_logps": lambda: M.mixed_logps(ref, aligned, lam),
    "mixed_kl": lambda: M.mixed_kl((ref, aligned, lam), (ref, aligned, 0.0)),
}
M.mixed_logps(ref[:1, :2].clone(), aligned[:1, :2].clone(), 0.5)  # load kernels before measuring
result = {}
for name, fn in calls.items():
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak RSS (VmHWM) to the current RSS
    before = status("VmRSS")
    out = fn()
    result[name] = (status("VmHWM") - before) / (B * T * V * 4)
    del out
print(json.dumps(result))
'''


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_peak_temporary_memory_is_at_most_one_and_a_half_outputs(tmp_path, dtype):
    """Mixing, log-softmax and KL over (B, T, V) = (4, 256, 16384) raise the peak resident memory by
    at most 1.5× one float32 (B, T, V) tensor, the result included. Measured in a fresh process:
    the kernel's peak-RSS mark is reset (/proc/self/clear_refs) right before each call, and glibc
    maps every allocation above 64 KiB on its own (MALLOC_MMAP_THRESHOLD_), so freed temporaries
    leave RSS at once and the peak is the allocations' peak.
    Before the fix (whole-tensor temporaries) mix_logits, mixed_logps and the sweep's KL were all
    above the bound (the numbers: docs/benchmarks.md, "Mixing memory")."""
    import json
    import subprocess
    import sys

    script = tmp_path / "peak.py"
    script.write_text(PEAK_SCRIPT)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(script), dtype], capture_output=True, text=True, env=env, check=True)
    peaks = json.loads(out.stdout.strip().splitlines()[-1])
    print(dtype, peaks)
    for name, peak in peaks.items():
        assert peak <= 1.5, f"{name}: peak {peak:.2f}× one float32 (B, T, V)"


def test_chunked_mix_keeps_gradients():
    """Scoring and training call the mix on logits that carry a graph: the chunked result has the
    gradient of the formula."""
    ref, aligned = logits(0, (2, 3, 7)).requires_grad_(), logits(1, (2, 3, 7)).requires_grad_()
    old = mixing_module.CHUNK_ELEMENTS
    mixing_module.CHUNK_ELEMENTS = 8
    try:
        mixed_logps(ref, aligned, torch.tensor([0.5, 2.0]))[..., 2].sum().backward()
    finally:
        mixing_module.CHUNK_ELEMENTS = old
    r64, a64 = ref.detach().double().requires_grad_(), aligned.detach().double().requires_grad_()
    lam = torch.tensor([0.5, 2.0], dtype=torch.float64).view(2, 1, 1)
    torch.log_softmax((1 - lam) * r64 + lam * a64, -1)[..., 2].sum().backward()
    torch.testing.assert_close(ref.grad.double(), r64.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(aligned.grad.double(), a64.grad, rtol=1e-5, atol=1e-6)
