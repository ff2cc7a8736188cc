"""The dual-path adapter model: λ=0 is the base model, λ=1 is plain transformers on the merged
model, other λ match a float64 step-by-step reference, and both paths share one 2B-row batch."""

import copy
import threading
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, TextIteratorStreamer

from aligndial.adapter import decoder_layers, insert_adapter, merge_adapter, save_adapter
from aligndial import dualpath
from aligndial.dualpath import DualPathModel
from aligndial.tiny import build_model, save
from reference import float64_greedy

ARCHS = ["llama", "qwen2", "gpt2", "falcon", "gemma2", "opt"]


def perturbed(arch, tok, num_layers=1):
    """A base model with a non-zero adapter (what training would produce)."""
    model = build_model(arch, tok, seed=0)
    insert_adapter(model, num_layers=num_layers, init="identity")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in list(decoder_layers(model))[:num_layers]:
            for p in layer.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return model


@pytest.fixture(scope="module", params=ARCHS)
def setup(request, tok, tmp_path_factory):
    arch = request.param
    model = perturbed(arch, tok)
    merged_dir = save(merge_adapter(copy.deepcopy(model)), tok, tmp_path_factory.mktemp(arch) / "merged")
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()  # plain transformers, no aligndial
    base = build_model(arch, tok, seed=0)
    return DualPathModel(model), base, merged


def new_tokens(out, enc):
    return out[:, enc["input_ids"].shape[1] :]


@pytest.mark.parametrize("num_beams", [1, 3])
def test_oracle_base_and_merged(setup, tok, prompts, num_beams):
    dual, base, merged = setup
    enc = tok(prompts, return_tensors="pt", padding=True)
    kw = dict(max_new_tokens=10, do_sample=False, num_beams=num_beams)
    assert torch.equal(dual.generate(**enc, lam=0.0, **kw), base.generate(**enc, **kw))
    assert torch.equal(dual.generate(**enc, lam=1.0, **kw), merged.generate(**enc, **kw))


@pytest.mark.parametrize("lam", [0.5, 2.0, -1.0])
def test_matches_float64_reference(setup, tok, prompts, lam):
    dual, base, merged = setup
    for prompt in prompts:
        enc = tok([prompt], return_tensors="pt")
        got = new_tokens(dual.generate(**enc, lam=lam, max_new_tokens=10, do_sample=False), enc)
        assert torch.equal(got, float64_greedy(base, merged, enc["input_ids"], lam, 10)), prompt


def test_per_row_lam_equals_each_row_alone(setup, tok, prompts):
    dual, _, _ = setup
    lams = [0.0, 0.5, 2.0]
    enc = tok(prompts, return_tensors="pt", padding=True)
    batched = new_tokens(dual.generate(**enc, lam=torch.tensor(lams), max_new_tokens=10, do_sample=False), enc)
    for i, (prompt, lam) in enumerate(zip(prompts, lams)):
        one = tok([prompt], return_tensors="pt")
        alone = new_tokens(dual.generate(**one, lam=lam, max_new_tokens=10, do_sample=False), one)
        assert batched[i].tolist() == alone[0].tolist(), f"row {i} λ={lam}"


def test_one_forward_of_2b_rows_and_fast_paths(tok):
    """Mixed λ: every shared layer sees 2B rows once per step and the adapter B rows.
    λ=0: the adapter never runs. λ=1: everything runs on B rows."""
    dual = DualPathModel(perturbed("llama", tok))
    layers = list(decoder_layers(dual.base))
    seen = {"adapter": [], "shared": []}
    layers[0].self_attn.register_forward_pre_hook(lambda m, a, kw: seen["adapter"].append(kw["hidden_states"].shape[0]), with_kwargs=True)
    layers[1].register_forward_pre_hook(lambda m, a: seen["shared"].append(a[0].shape[0]))
    enc = tok(["Hello", "The quick brown fox"], return_tensors="pt", padding=True)
    for lam, adapter_rows, shared_rows in ((0.5, [2] * 5, [4] * 5), (0.0, [], [2] * 5), (1.0, [2] * 5, [2] * 5)):
        seen["adapter"].clear(), seen["shared"].clear()
        dual.generate(**enc, lam=lam, max_new_tokens=5, min_new_tokens=5, do_sample=False)
        assert seen == {"adapter": adapter_rows, "shared": shared_rows}, lam


def test_few_row_linears_only_in_mixed_dual_forwards(tok, prompts, monkeypatch):
    """The few-row shortcut is decided by the first mixed-λ forward and installed only where
    `_beats_stock` says it wins on this CPU (forced both ways here; in bf16 only where our kernel
    applies). A model cast to bf16 after installing it (fp32) computes exactly what a bf16 model
    that never had it computes (same weights: `perturbed` is seeded)."""
    monkeypatch.setenv("ALIGNDIAL_KERNELS", "0")
    enc = tok(prompts[:1], return_tensors="pt")
    kw = dict(max_new_tokens=3, do_sample=False)
    wrapped = lambda m: {"forward" in lin.__dict__ for lin in m._plain_linears}  # noqa: E731
    monkeypatch.setattr(dualpath, "_beats_stock", lambda *a, **k: False)
    loses = DualPathModel(perturbed("llama", tok))
    loses.generate(**enc, lam=0.5, **kw)
    assert loses._few_rows_decided and wrapped(loses) == {False}
    monkeypatch.setattr(dualpath, "_beats_stock", lambda *a, **k: True)
    fp32 = DualPathModel(perturbed("llama", tok))
    fp32.generate(**enc, lam=1.0, **kw)
    assert not fp32._few_rows_decided and wrapped(fp32) == {False}
    fp32.generate(**enc, lam=0.5, **kw)
    assert wrapped(fp32) == {True}
    with torch.no_grad():  # the shortcut computes what stock computes, to float32 rounding
        torch.testing.assert_close(fp32(enc["input_ids"], lam=0.5).logits, loses(enc["input_ids"], lam=0.5).logits)
    bf16 = DualPathModel(perturbed("llama", tok).to(torch.bfloat16))
    bf16.generate(**enc, lam=0.5, **kw)
    assert wrapped(bf16) == {False}
    with torch.no_grad():
        assert torch.equal(fp32.to(torch.bfloat16)(enc["input_ids"], lam=0.5).logits, bf16(enc["input_ids"], lam=0.5).logits)


def test_beats_stock_times_the_candidate_against_f_linear():
    """The decision is a measurement: a product far slower than F.linear loses, one that does
    no work wins, and only about `budget_bytes` of the weights are timed."""
    weights = [torch.randn(64, 32) for _ in range(4)]

    def slow(x, w):
        time.sleep(0.002)
        return x @ w.T

    assert dualpath._beats_stock(slow, weights, rows=2) is False
    assert dualpath._beats_stock(lambda x, w: x, weights, rows=2) is True
    seen = []
    dualpath._beats_stock(lambda x, w: seen.append(w) or x, weights, rows=2, budget_bytes=1)
    assert len(seen) == 3  # one weight, three passes


def test_seeded_sampling_is_the_same_on_a_models_first_call(tok, prompts):
    """The first mixed-λ forward times the few-row product; that must not draw from the global
    RNG, or the same seed would sample differently on a model's first call and its second."""
    from transformers import set_seed

    enc = tok(prompts[:2], return_tensors="pt", padding=True)
    model = DualPathModel(perturbed("llama", tok)).eval()
    calls = []
    for _ in range(2):
        set_seed(7)
        calls.append(model.generate(**enc, lam=0.5, do_sample=True, max_new_tokens=12, min_new_tokens=12))
    assert model._few_rows_decided and torch.equal(calls[0], calls[1])


def test_bf16_few_row_kernel_matches_float64():
    """Our bf16 kernel (built here on any x86 CPU with AVX2, even where the dual path would not
    use it) is x·Wᵀ accumulated in float32 and rounded once: within one bf16 rounding of the
    float64 product, for 1-4 rows and widths that are not a multiple of the vector width. Both
    loops: the AVX2 one always, and the AVX512-BF16 one where this CPU has it."""
    from aligndial.kernels import _build

    module = _build()
    assert module is not None
    loops = [module.few_rows_bf16_avx2] + ([module.few_rows_bf16] if module.has_avx512_bf16() else [])
    g = torch.Generator().manual_seed(0)
    for kernel in loops:
        for rows, out, inp in [(1, 64, 32), (2, 130, 77), (3, 7, 200), (4, 33, 8), (2, 1100, 1376)]:
            x = torch.randn(rows, inp, generator=g).to(torch.bfloat16)
            w = torch.randn(out, inp, generator=g).to(torch.bfloat16)
            got = kernel(x, w)
            exact = x.double() @ w.double().T
            assert got.dtype == torch.bfloat16 and got.shape == (rows, out)
            # float32 accumulation error is far below bf16's half-ulp (2^-9 relative) rounding.
            torch.testing.assert_close(got.double(), exact, rtol=2**-8, atol=1e-3)
            torch.testing.assert_close(got, exact.to(torch.bfloat16), rtol=2**-7, atol=2e-3)
        with pytest.raises(RuntimeError, match="1 to 4 rows"):
            kernel(torch.zeros(5, 8, dtype=torch.bfloat16), torch.zeros(3, 8, dtype=torch.bfloat16))


def test_bf16_dual_path_with_kernel_matches_stock(tok, prompts, monkeypatch):
    """Where the kernel applies (x86 with AVX2) and wins, the bf16 dual path installs it and its
    mixed logits agree with torch's GEMM to bf16 precision; elsewhere nothing is installed."""
    from aligndial.kernels import few_rows_bf16

    enc = tok(prompts[:1], return_tensors="pt")
    monkeypatch.setattr(dualpath, "_beats_stock", lambda *a, **k: True)  # the kernel's numbers, whatever its speed here
    with_kernel = DualPathModel(perturbed("llama", tok).to(torch.bfloat16))
    monkeypatch.setenv("ALIGNDIAL_KERNELS", "0")
    stock = DualPathModel(perturbed("llama", tok).to(torch.bfloat16))
    with torch.no_grad():
        expected = stock(enc["input_ids"], lam=0.5).logits
        monkeypatch.setenv("ALIGNDIAL_KERNELS", "1")
        got = with_kernel(enc["input_ids"], lam=0.5).logits
    assert with_kernel._few_rows_decided
    assert {"forward" in lin.__dict__ for lin in with_kernel._plain_linears} == {few_rows_bf16() is not None}
    torch.testing.assert_close(got, expected, rtol=0.05, atol=0.05)


def test_hidden_mix_for_linear_heads_and_logit_mix_for_softcapping(tok):
    assert DualPathModel(perturbed("llama", tok)).mix_before_head
    gemma2 = perturbed("gemma2", tok)
    assert gemma2.config.final_logit_softcapping is not None
    assert not DualPathModel(gemma2).mix_before_head


def test_direct_forward_equals_logit_mix(setup, tok):
    dual, base, merged = setup
    ids = tok(["Hello there friend"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        got = dual(ids, lam=0.3).logits
        expected = 0.7 * base(ids).logits.double() + 0.3 * merged(ids).logits.double()
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-4)


def test_two_adapter_layers_and_streaming(tok):
    dual = DualPathModel(perturbed("qwen2", tok, num_layers=2))
    enc = tok(["The quick brown fox"], return_tensors="pt")
    full = dual.generate(**enc, lam=0.5, max_new_tokens=8, do_sample=False)
    streamer = TextIteratorStreamer(tok, skip_prompt=True)
    t = threading.Thread(target=dual.generate, kwargs=dict(**enc, lam=0.5, max_new_tokens=8, streamer=streamer))
    t.start()
    text = "".join(streamer)
    t.join()
    assert text == tok.decode(new_tokens(full, enc)[0], skip_special_tokens=True)


def test_identity_adapter_is_the_base_model_at_every_lam(tok, prompts):
    model = build_model("llama", tok, seed=0)
    insert_adapter(model)
    dual, base = DualPathModel(model), build_model("llama", tok, seed=0)
    enc = tok(prompts, return_tensors="pt", padding=True)
    expected = base.generate(**enc, max_new_tokens=8, do_sample=False)
    for lam in (0.0, 0.5, 3.0, torch.tensor([0.0, -1.0, 2.0])):
        assert torch.equal(dual.generate(**enc, lam=lam, max_new_tokens=8, do_sample=False), expected)


def test_from_adapter_directory(tmp_path, tok):
    model = perturbed("llama", tok)
    save_adapter(model, tmp_path / "adapter")
    dual = DualPathModel.from_adapter(build_model("llama", tok, seed=0), str(tmp_path / "adapter"))
    enc = tok(["Hello"], return_tensors="pt")
    expected = DualPathModel(model).generate(**enc, lam=0.5, max_new_tokens=6, do_sample=False)
    assert torch.equal(dual.generate(**enc, lam=0.5, max_new_tokens=6, do_sample=False), expected)


def test_per_token_schedule_switches_lam_mid_response(setup, tok):
    dual, base, merged = setup
    enc = tok(["The quick brown fox"], return_tensors="pt")
    start = enc["input_ids"].shape[1]
    got = new_tokens(dual.generate(**enc, lam=lambda ids: 1.0 if ids.shape[1] < start + 3 else -1.0,
                                   max_new_tokens=10, do_sample=False), enc)
    assert torch.equal(got, float64_greedy(base, merged, enc["input_ids"], lambda t: 1.0 if t < 3 else -1.0, 10))


def test_span_schedule_reads_the_think_span(tok):
    from aligndial.generation import span_schedule

    schedule = span_schedule(tok, inside=1.0, outside=0.25)
    ids = tok(["a <think> b", "a <think> b </think> c", "plain"], return_tensors="pt", padding=True)["input_ids"]
    assert schedule(ids).tolist() == [1.0, 0.25, 0.25]
