"""The dual-path adapter model: λ=0 is the base model, λ=1 is plain transformers on the merged
model, other λ match a float64 step-by-step reference (here on the architectures
tests/test_contract.py does not hold), and both paths share one 2B-row batch."""

import copy
import threading
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, TextIteratorStreamer

from aligndial.adapter import decoder_layers, insert_adapter, merge_adapter, save_adapter
from aligndial import dualpath, fewrows
from aligndial.dualpath import DualPathModel
from aligndial.tiny import build_model, save
from reference import float64_greedy

ARCHS = ["llama", "qwen2", "gpt2", "falcon", "gemma2", "opt"]
# The λ=0 / λ=1 oracle and the float64 reference on Llama, the Qwen3 replica and Gemma 2 are in
# tests/test_contract.py; here, the other architectures the dual path claims.
ORACLE_ARCHS = ["qwen2", "gpt2", "falcon", "opt"]


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
    return _setup(request.param, tok, tmp_path_factory)


def _setup(arch, tok, tmp_path_factory):
    model = perturbed(arch, tok)
    merged_dir = save(merge_adapter(copy.deepcopy(model)), tok, tmp_path_factory.mktemp(arch) / "merged")
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()  # plain transformers, no aligndial
    base = build_model(arch, tok, seed=0)
    return DualPathModel(model), base, merged


def new_tokens(out, enc):
    return out[:, enc["input_ids"].shape[1] :]


@pytest.fixture(scope="module", params=ORACLE_ARCHS)
def oracle_setup(request, tok, tmp_path_factory):
    return _setup(request.param, tok, tmp_path_factory)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_oracle_base_and_merged(oracle_setup, tok, prompts, num_beams):
    dual, base, merged = oracle_setup
    enc = tok(prompts, return_tensors="pt", padding=True)
    kw = dict(max_new_tokens=10, do_sample=False, num_beams=num_beams)
    assert torch.equal(dual.generate(**enc, lam=0.0, **kw), base.generate(**enc, **kw))
    assert torch.equal(dual.generate(**enc, lam=1.0, **kw), merged.generate(**enc, **kw))


@pytest.mark.parametrize("lam", [0.5, 2.0, -1.0])
def test_matches_float64_reference(oracle_setup, tok, prompts, lam):
    dual, base, merged = oracle_setup
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


def _wrapped(model) -> set[bool]:
    return {type(lin) is fewrows.FewRowsLinear for lin in model._plain_linears}


def test_few_row_linears_only_in_mixed_dual_forwards(tok, prompts, monkeypatch):
    """The few-row shortcut is installed by the first mixed-λ forward, where `few_rows_product`
    names one (forced both ways here). A model cast to bf16 after installing it (fp32) computes
    exactly what a bf16 model that never had it computes (same weights: `perturbed` is seeded)."""
    monkeypatch.setenv("ALIGNDIAL_KERNELS", "0")
    enc = tok(prompts[:1], return_tensors="pt")
    kw = dict(max_new_tokens=3, do_sample=False)
    monkeypatch.setattr(dualpath, "few_rows_product", lambda dtype, device: None)
    stock = DualPathModel(perturbed("llama", tok))
    stock.generate(**enc, lam=0.5, **kw)
    assert stock._few_rows_decided and _wrapped(stock) == {False}
    monkeypatch.setattr(dualpath, "few_rows_product", lambda dtype, device: (fewrows._fp32_product, fewrows.SMALL_ROWS))
    fp32 = DualPathModel(perturbed("llama", tok))
    fp32.generate(**enc, lam=1.0, **kw)
    assert not fp32._few_rows_decided and _wrapped(fp32) == {False}
    fp32.generate(**enc, lam=0.5, **kw)
    assert _wrapped(fp32) == {True}
    with torch.no_grad():  # the shortcut computes what stock computes, to float32 rounding
        torch.testing.assert_close(fp32(enc["input_ids"], lam=0.5).logits, stock(enc["input_ids"], lam=0.5).logits)
    monkeypatch.setattr(dualpath, "few_rows_product", lambda dtype, device: None)
    bf16 = DualPathModel(perturbed("llama", tok).to(torch.bfloat16))
    bf16.generate(**enc, lam=0.5, **kw)
    assert _wrapped(bf16) == {False}
    with torch.no_grad():
        assert torch.equal(fp32.to(torch.bfloat16)(enc["input_ids"], lam=0.5).logits, bf16(enc["input_ids"], lam=0.5).logits)


def test_few_row_choice_is_a_pure_function_of_dtype_device_and_cpu(monkeypatch):
    """Issue 17: the first mixed-λ forward used to time W @ xᵀ against F.linear and install the
    faster, and the two differ in float32 rounding, so the same greedy command could give other
    tokens at a near-tie under load. Now no clock is read: the choice is a rule on (dtype,
    device, CPU capability), and other devices and non-x86 CPUs always get stock torch."""
    monkeypatch.setattr(time, "perf_counter", lambda: pytest.fail("the few-row choice must not time anything"))
    cpu, meta = torch.device("cpu"), torch.device("meta")
    choice = lambda dtype, device=cpu: fewrows.few_rows_product(dtype, device)  # noqa: E731
    assert choice(torch.float32) == choice(torch.float32)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert choice(dtype, meta) is None  # any other device: stock
    assert choice(torch.float16) is None
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert choice(torch.float32) is None  # slower than stock on the AVX-512 CPU measured
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert choice(torch.float32) == (fewrows._fp32_product, fewrows.SMALL_ROWS)
    monkeypatch.setattr(fewrows.platform, "machine", lambda: "aarch64")
    assert choice(torch.float32) is None and choice(torch.bfloat16) is None
    monkeypatch.undo()
    monkeypatch.setenv("ALIGNDIAL_KERNELS", "0")
    assert choice(torch.float32) is None and choice(torch.bfloat16) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_greedy_tokens_are_the_same_run_to_run_and_with_either_choice(tok, prompts, dtype, monkeypatch):
    """The same command gives the same tokens on every run (fresh models, no timing race), and
    forcing each choice (stock torch, or the few-row product) gives the same greedy tokens."""
    monkeypatch.setattr(time, "perf_counter", lambda: pytest.fail("no timing in the dual path"))
    enc = tok(prompts, return_tensors="pt", padding=True)

    def run():
        return DualPathModel(perturbed("llama", tok).to(dtype)).generate(**enc, lam=0.5, max_new_tokens=12, do_sample=False)

    first = run()
    assert torch.equal(run(), first)
    native = fewrows.few_rows_product(dtype, torch.device("cpu"))
    monkeypatch.setattr(dualpath, "few_rows_product", lambda d, device: None)
    assert torch.equal(run(), first)
    if native is None:
        monkeypatch.setattr(dualpath, "few_rows_product", lambda d, device: (fewrows._fp32_product, fewrows.SMALL_ROWS) if d == torch.float32 else None)
    else:
        monkeypatch.setattr(dualpath, "few_rows_product", lambda d, device: native)
    assert torch.equal(run(), first)


def test_seeded_sampling_is_the_same_on_a_models_first_call(tok, prompts):
    """The first mixed-λ forward installs the few-row product; that must not draw from the global
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
    """Where the kernel applies (x86 with AVX2), the bf16 dual path installs it and its mixed
    logits agree with torch's GEMM to bf16 precision; elsewhere nothing is installed."""
    from aligndial.kernels import few_rows_bf16

    enc = tok(prompts[:1], return_tensors="pt")
    with_kernel = DualPathModel(perturbed("llama", tok).to(torch.bfloat16))
    monkeypatch.setenv("ALIGNDIAL_KERNELS", "0")
    stock = DualPathModel(perturbed("llama", tok).to(torch.bfloat16))
    with torch.no_grad():
        expected = stock(enc["input_ids"], lam=0.5).logits
        monkeypatch.setenv("ALIGNDIAL_KERNELS", "1")
        got = with_kernel(enc["input_ids"], lam=0.5).logits
    assert with_kernel._few_rows_decided
    assert _wrapped(with_kernel) == {few_rows_bf16() is not None}
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


# --- issue 17: batches and beams, hooks and copies, host syncs, an interrupted kernel build ---

EIGHT_PROMPTS = [
    "The quick brown fox", "Hello", "Numbers such as 12 and 345 appear", "A", "Once upon a time there was",
    "Why?", "Lists: one, two, three", "The end of the story is near, said the",
]


def _identity_adapted_and_plain(make_model, dtype):
    """A model whose adapter is exactly the identity, and the plain model it was made from."""
    plain = make_model().to(dtype).eval()
    adapted = make_model().to(dtype)
    insert_adapter(adapted, init="identity")
    return adapted, plain


def _check_batches_and_beams(adapted, plain, tokenizer):
    """Each case on a fresh dual-path model, so that each is a first mixed-λ call (where the
    few-row product is chosen and installed), as in a user's first command."""
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    cases = [(b, 1) for b in range(1, 9)] + [(1, beams) for beams in (2, 3, 4)] + [(2, 4)]
    for batch, beams in cases:
        enc = tokenizer(EIGHT_PROMPTS[:batch], return_tensors="pt", padding=True)
        expected = plain.generate(**enc, num_beams=beams, **kw)
        for lam in (0.5, torch.linspace(-1.0, 2.0, batch)):
            dual = DualPathModel(copy.deepcopy(adapted))
            got = dual.generate(**enc, lam=lam, num_beams=beams, **kw)
            assert torch.equal(got, expected), f"batch {batch}, beams {beams}, lam {lam}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_identity_dual_path_equals_plain_at_batch_1_to_8_and_beams_1_to_4(tok, dtype):
    """Issue 17: the bf16 dual path crashed from batch 3 on (`few_rows_bf16: 1 to 4 rows, got 6`:
    the dual path allowed 8 rows, the kernel takes 4). Now one constant (kernels.MAX_ROWS) bounds
    both, and every batch 1-8 and beam width 1-4 gives the plain model's greedy tokens."""
    _check_batches_and_beams(*_identity_adapted_and_plain(lambda: build_model("llama", tok, seed=0), dtype), tok)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_identity_dual_path_equals_plain_on_the_qwen3_replica(replicas, dtype):
    """The same on the Qwen3-shaped replica: tied 151936-row head, the real tokenizer, saved in bf16."""
    from transformers import AutoTokenizer

    path = replicas.qwen3("base", dtype="bfloat16")
    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
    adapted, plain = _identity_adapted_and_plain(lambda: AutoModelForCausalLM.from_pretrained(path), dtype)
    assert adapted.config.tie_word_embeddings and adapted.get_output_embeddings().weight.shape[0] == 151936
    _check_batches_and_beams(adapted, plain, tokenizer)


def _oracles(tok, enc, kw):
    """Greedy tokens of the plain base model (λ=0), the merged model (λ=1) and the dual path at λ=0.5."""
    base = build_model("llama", tok, seed=0)
    merged = merge_adapter(perturbed("llama", tok))
    return {0.0: base.generate(**enc, **kw), 1.0: merged.generate(**enc, **kw),
            0.5: DualPathModel(perturbed("llama", tok)).generate(**enc, lam=0.5, **kw)}


def _assert_lam_routed(dual, oracle, enc, kw, what):
    got = {lam: dual.generate(**enc, lam=lam, **kw) for lam in (0.0, 0.5, 1.0)}
    for lam in got:
        assert torch.equal(got[lam], oracle[lam]), f"{what}: lam={lam} is not routed"
    assert not torch.equal(got[0.5], got[1.0]) and not torch.equal(got[0.5], got[0.0])


def test_lam_is_routed_through_accelerate_dispatch_with_cpu_and_disk_offload(tok, prompts, tmp_path):
    """Issue 17: routing was skipped when a decoder layer already had a `forward` attribute, and
    accelerate's hooks set one, so every λ gave the λ=1 model. Here accelerate's own
    `dispatch_model` offloads every other layer (the adapter's too) to disk, the rest to the CPU."""
    from accelerate import dispatch_model

    enc = tok(prompts[:2], return_tensors="pt", padding=True)
    kw = dict(max_new_tokens=8, do_sample=False)
    oracle = _oracles(tok, enc, kw)
    model = perturbed("llama", tok)
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu"}
    device_map |= {f"model.layers.{i}": "disk" if i % 2 == 0 else "cpu" for i in range(len(decoder_layers(model)))}
    model = dispatch_model(model, device_map=device_map, offload_dir=str(tmp_path / "offload"))
    assert all("forward" in layer.__dict__ for layer in decoder_layers(model))  # accelerate's hooks
    assert decoder_layers(model)[0].self_attn.q_proj.weight.device.type == "meta"  # offloaded to disk
    _assert_lam_routed(DualPathModel(model), oracle, enc, kw, "dispatch_model")


def test_lam_is_routed_with_device_map_auto_and_disk_offload(tok, prompts, tmp_path):
    """`from_pretrained(device_map=...)` from `infer_auto_device_map` with a CPU budget too small
    for the model, so accelerate offloads most of it to disk, hooks on every layer."""
    from accelerate import infer_auto_device_map

    enc = tok(prompts[:2], return_tensors="pt", padding=True)
    kw = dict(max_new_tokens=8, do_sample=False)
    oracle = _oracles(tok, enc, kw)
    path = save(perturbed("llama", tok), tok, tmp_path / "adapted")  # saved with the adapter layer in it
    config_model = AutoModelForCausalLM.from_pretrained(path)
    device_map = infer_auto_device_map(config_model, max_memory={"cpu": 400_000})
    assert "disk" in device_map.values() and "cpu" in device_map.values(), device_map
    model = AutoModelForCausalLM.from_pretrained(path, device_map=device_map, offload_folder=str(tmp_path / "offload"))
    from aligndial.adapter import ATTR

    setattr(model, ATTR, getattr(perturbed("llama", tok), ATTR))  # the adapter config the saved layer belongs to
    _assert_lam_routed(DualPathModel(model), oracle, enc, kw, "device_map with offload")


def test_wrapping_the_same_model_twice_keeps_lam(tok, prompts):
    """A notebook cell run again wraps the same model twice: both wrappers still route λ."""
    enc = tok(prompts[:2], return_tensors="pt", padding=True)
    kw = dict(max_new_tokens=8, do_sample=False)
    oracle = _oracles(tok, enc, kw)
    model = perturbed("llama", tok)
    first = DualPathModel(model)
    second = DualPathModel(model)
    _assert_lam_routed(second, oracle, enc, kw, "second wrapper")
    _assert_lam_routed(first, oracle, enc, kw, "first wrapper")


def test_deepcopy_is_an_independent_dual_path_model(tok, prompts):
    """`copy.deepcopy` of a dual-path model (after its few-row product is installed) computes with
    its own weights and its own router: changing the original changes nothing in the copy."""
    enc = tok(prompts[:2], return_tensors="pt", padding=True)
    kw = dict(max_new_tokens=8, do_sample=False)
    oracle = _oracles(tok, enc, kw)
    original = DualPathModel(perturbed("llama", tok))
    original.generate(**enc, lam=0.5, **kw)
    copied = copy.deepcopy(original)
    with torch.no_grad():
        for p in original.base.parameters():
            p.zero_()
    _assert_lam_routed(copied, oracle, enc, kw, "deepcopy")
    assert copied._router is not original._router


def test_lam_is_checked_once_per_generate_call_not_per_step(tok, prompts, monkeypatch):
    """Issue 17: every decode step copied λ to the host (`.tolist()` in the forward and in
    `lam_weights`), a device sync per token on an accelerator. Counting `.tolist()` / `.item()`
    called from aligndial's code: the count does not grow with the number of new tokens."""
    import sys

    calls = []

    def counting(name):
        original = getattr(torch.Tensor, name)

        def method(self, *a, **k):
            if "/aligndial/" in sys._getframe(1).f_code.co_filename:
                calls.append(name)
            return original(self, *a, **k)

        return method

    dual = DualPathModel(perturbed("llama", tok))
    enc = tok(prompts, return_tensors="pt", padding=True)
    counts = {}
    for new in (2, 12):
        dual.generate(**enc, lam=0.5, max_new_tokens=new, min_new_tokens=new, do_sample=False)  # warm
        with monkeypatch.context() as m:
            m.setattr(torch.Tensor, "tolist", counting("tolist"))
            m.setattr(torch.Tensor, "item", counting("item"))
            calls.clear()
            for lam in (0.5, 0.0, torch.tensor([0.0, 0.5, 1.0])):
                dual.generate(**enc, lam=lam, max_new_tokens=new, min_new_tokens=new, do_sample=False)
            counts[new] = len(calls)
    assert counts[12] == counts[2], counts


def test_a_stale_kernel_build_lock_is_removed_not_waited_on(tmp_path):
    """Issue 17: Ctrl-C during the kernel build leaves torch's `lock` file behind, and the next
    run waited on it forever behind a ticking bar. Now the build holds an OS lock (released
    when its process ends, however it ends), so a torch `lock` found under it is stale: it is
    removed with a warning and the kernel loads. Runs in a fresh process with its own
    TORCH_EXTENSIONS_DIR (seeded with this machine's build, if any, so it need not recompile)."""
    import os
    import shutil
    import subprocess
    import sys

    from torch.utils.cpp_extension import _get_build_directory

    from aligndial.kernels import NAME

    built = _get_build_directory(NAME, verbose=False)
    root = tmp_path / "extensions"
    if os.path.exists(os.path.join(built, f"{NAME}.so")):
        shutil.copytree(built, root / NAME)
    (root / NAME).mkdir(parents=True, exist_ok=True)
    (root / NAME / "lock").touch()
    code = "from aligndial.kernels import _build; print('built' if _build() is not None else 'none')"
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(root)}
    try:
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=480)
    except subprocess.TimeoutExpired:
        pytest.fail("the kernel build waited on a stale lock file")
    assert done.stdout.strip().splitlines()[-1] == "built", done.stderr[-2000:]
    assert "stale torch extension lock" in done.stderr
    assert not (root / NAME / "lock").exists()
