"""The DeRa pair against plain transformers as the oracle (λ=0 → reference, λ=1 → aligned) and a
float64 step-by-step reference on the architectures tests/test_contract.py does not hold (which
holds Llama, the Qwen3 replica, Gemma 2, Cohere, …), and through the generation stack."""

import threading

import pytest
import torch
from transformers import AutoModelForCausalLM, StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from aligndial.pair import RealignedPair, check_tokenizers
from aligndial.tiny import build_model, build_tokenizer, save
from reference import float64_greedy

ARCHS = ["llama", "qwen2", "gpt2"]
# The λ=0 / λ=1 oracle and the float64 reference on Llama (and the other heads that matter) are in
# tests/test_contract.py; here, the other architectures the pair claims.
ORACLE_ARCHS = ["qwen2", "gpt2"]


def new_tokens(out, enc):
    return out[:, enc["input_ids"].shape[1] :]


def plain(path):
    return AutoModelForCausalLM.from_pretrained(path).eval()


@pytest.fixture(scope="module", params=ARCHS)
def arch_pair(request, model_dirs):
    ref, aligned, _ = model_dirs[request.param]
    return RealignedPair.from_pretrained(ref, aligned), ref, aligned


@pytest.fixture(scope="module", params=ORACLE_ARCHS)
def oracle_pair(request, model_dirs):
    ref, aligned, _ = model_dirs[request.param]
    return RealignedPair.from_pretrained(ref, aligned), ref, aligned


@pytest.mark.parametrize("num_beams", [1, 3])
def test_oracle_lam_zero_and_one(oracle_pair, tok, prompts, num_beams):
    pair, ref_dir, aligned_dir = oracle_pair
    enc = tok(prompts, return_tensors="pt", padding=True)
    kw = dict(max_new_tokens=10, do_sample=False, num_beams=num_beams)
    for lam, path in ((0.0, ref_dir), (1.0, aligned_dir)):
        expected = plain(path).generate(**enc, **kw)
        got = pair.generate(**enc, lam=lam, **kw)
        assert torch.equal(got, expected), f"λ={lam} beams={num_beams}"


@pytest.mark.parametrize("lam", [-0.5, 0.5, 2.0])
def test_matches_float64_step_by_step_reference(oracle_pair, tok, prompts, lam):
    pair, ref_dir, aligned_dir = oracle_pair
    ref, aligned = plain(ref_dir), plain(aligned_dir)
    for prompt in prompts:
        enc = tok([prompt], return_tensors="pt")
        got = new_tokens(pair.generate(**enc, lam=lam, max_new_tokens=10, do_sample=False), enc)
        assert torch.equal(got, float64_greedy(ref, aligned, enc["input_ids"], lam, 10)), prompt


def test_per_row_lam_equals_each_row_alone(arch_pair, tok, prompts):
    pair, _, _ = arch_pair
    lams = [0.0, 0.7, 2.0]
    enc = tok(prompts, return_tensors="pt", padding=True)
    batched = new_tokens(pair.generate(**enc, lam=torch.tensor(lams), max_new_tokens=10, do_sample=False), enc)
    for i, (prompt, lam) in enumerate(zip(prompts, lams)):
        one = tok([prompt], return_tensors="pt")
        alone = new_tokens(pair.generate(**one, lam=lam, max_new_tokens=10, do_sample=False), one)
        assert batched[i].tolist() == alone[0].tolist(), f"row {i} λ={lam}"


def test_several_aligned_models(model_dirs, tok, prompts):
    ref_dir, a1_dir, a2_dir = model_dirs["llama"]
    pair = RealignedPair.from_pretrained(ref_dir, [a1_dir, a2_dir])
    enc = tok(prompts, return_tensors="pt", padding=True)
    kw = dict(max_new_tokens=8, do_sample=False)
    assert torch.equal(pair.generate(**enc, lam=[0.0, 0.0], **kw), plain(ref_dir).generate(**enc, **kw))
    assert torch.equal(pair.generate(**enc, lam=[0.0, 1.0], **kw), plain(a2_dir).generate(**enc, **kw))
    # (1 − Σλ)·h_ref + Σ λ_i·h_i in float64, step by step.
    ref, a1, a2 = plain(ref_dir), plain(a1_dir), plain(a2_dir)
    one = tok([prompts[0]], return_tensors="pt")
    ids = one["input_ids"]
    for _ in range(8):
        with torch.no_grad():
            h = [m(ids).logits[:, -1].double() for m in (ref, a1, a2)]
        ids = torch.cat([ids, (0.2 * h[0] + 0.5 * h[1] + 0.3 * h[2]).argmax(-1, keepdim=True)], -1)
    got = pair.generate(**one, lam=[0.5, 0.3], **kw)
    assert torch.equal(got, ids)


def test_fast_paths_run_one_model(model_dirs, tok):
    ref_dir, aligned_dir, _ = model_dirs["llama"]
    pair = RealignedPair.from_pretrained(ref_dir, aligned_dir)
    calls = {"ref": 0, "aligned": 0}
    pair.ref.register_forward_hook(lambda *a: calls.__setitem__("ref", calls["ref"] + 1))
    pair.aligned[0].register_forward_hook(lambda *a: calls.__setitem__("aligned", calls["aligned"] + 1))
    enc = tok(["Hello"], return_tensors="pt")
    pair.generate(**enc, lam=0.0, max_new_tokens=5, do_sample=False)
    assert calls == {"ref": 5, "aligned": 0}
    pair.generate(**enc, lam=1.0, max_new_tokens=5, do_sample=False)
    assert calls == {"ref": 5, "aligned": 5}
    pair.generate(**enc, lam=0.5, max_new_tokens=5, do_sample=False)
    assert calls == {"ref": 10, "aligned": 10}  # one forward per model per step: the caches are used


def test_sampling_is_seeded_and_top_k_one_is_greedy(model_dirs, tok, prompts):
    from transformers import set_seed

    pair = RealignedPair.from_pretrained(*model_dirs["qwen2"][:2])
    enc = tok(prompts, return_tensors="pt", padding=True)
    kw = dict(max_new_tokens=10, do_sample=True, temperature=0.8, top_p=0.9, top_k=20)
    set_seed(7)
    first = pair.generate(**enc, lam=1.5, **kw)
    set_seed(7)
    assert torch.equal(first, pair.generate(**enc, lam=1.5, **kw))
    greedy = pair.generate(**enc, lam=1.5, max_new_tokens=10, do_sample=False)
    assert torch.equal(pair.generate(**enc, lam=1.5, max_new_tokens=10, do_sample=True, top_k=1), greedy)


def test_streaming_and_stopping_criteria(model_dirs, tok):
    pair = RealignedPair.from_pretrained(*model_dirs["llama"][:2])
    enc = tok(["The quick brown fox"], return_tensors="pt")
    full = pair.generate(**enc, lam=0.5, max_new_tokens=12, do_sample=False)
    streamer = TextIteratorStreamer(tok, skip_prompt=True)
    t = threading.Thread(target=pair.generate, kwargs=dict(**enc, lam=0.5, max_new_tokens=12, streamer=streamer))
    t.start()
    chunks = list(streamer)
    t.join()
    assert len([c for c in chunks if c]) >= 1
    assert "".join(chunks) == tok.decode(new_tokens(full, enc)[0], skip_special_tokens=True)

    class StopAfter(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), input_ids.shape[1] >= enc["input_ids"].shape[1] + 4)

    stopped = pair.generate(**enc, lam=0.5, max_new_tokens=12, stopping_criteria=StoppingCriteriaList([StopAfter()]))
    assert torch.equal(stopped, full[:, : enc["input_ids"].shape[1] + 4])


def test_direct_forward_scores_sequences(model_dirs, tok):
    """pair(input_ids, lam=...) gives the mixed logits of every position (for scoring / KL)."""
    ref_dir, aligned_dir, _ = model_dirs["gpt2"]
    pair = RealignedPair.from_pretrained(ref_dir, aligned_dir)
    ids = tok(["Hello there"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        mixed = pair(ids, lam=0.3).logits
        expected = 0.7 * plain(ref_dir)(ids).logits + 0.3 * plain(aligned_dir)(ids).logits
    torch.testing.assert_close(mixed, expected, rtol=1e-5, atol=1e-5)


def test_tokenizer_mismatch_is_a_clear_error(tmp_path, model_dirs):
    other_tok = build_tokenizer(["completely different text " * 20, "zebra quartz"], vocab_size=300)
    other = save(build_model("llama", other_tok, seed=3), other_tok, tmp_path / "other")
    with pytest.raises(ValueError, match="tokenizers of .* differ"):
        RealignedPair.from_pretrained(model_dirs["llama"][0], str(other))


def test_eos_mismatch_warns_and_unk_mismatch_is_a_clear_error(tok):
    """Case 36: base and instruct checkpoints differ in EOS: a warning naming the tokens. An unk
    token changes what text becomes, so it is still refused."""
    other = build_tokenizer()
    other.eos_token = "<|user|>"
    with pytest.warns(UserWarning, match=r"eos_token: '</s>' vs '<\|user\|>'"):
        check_tokenizers(tok, other)
    other = build_tokenizer()
    other.unk_token = "<|user|>"
    with pytest.raises(ValueError, match="unk_token"):
        check_tokenizers(tok, other)


def test_padded_head_is_accepted_and_masked(tmp_path, tok, model_dirs):
    """Case 17: same tokenizer, a head padded to a larger width (as Qwen's 151936 vs 152064)."""
    padded = build_model("llama", tok, seed=5, vocab_size=len(tok) + 10)
    with torch.no_grad():  # make the padded rows attractive, so masking is what keeps them out
        padded.lm_head.weight[len(tok) :] *= 50
    path = save(padded, tok, tmp_path / "padded")
    pair = RealignedPair.from_pretrained(model_dirs["llama"][0], str(path))
    enc = tok(["Hello"], return_tensors="pt")
    logits = pair(enc["input_ids"], lam=0.5).logits
    assert logits.shape[-1] == len(tok)
    out = new_tokens(pair.generate(**enc, lam=1.5, max_new_tokens=10, do_sample=False), enc)
    assert (out < len(tok)).all()


def test_nan_weights_raise_a_clear_error(tmp_path, tok, model_dirs):
    broken = build_model("llama", tok, seed=6)
    with torch.no_grad():
        broken.lm_head.weight[3, 0] = float("nan")
    pair = RealignedPair(AutoModelForCausalLM.from_pretrained(model_dirs["llama"][0]), [broken], tok)
    with pytest.raises(ValueError, match="NaN"):
        pair.generate(**tok(["Hello"], return_tensors="pt"), lam=0.5, max_new_tokens=3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models_with_large_lam(model_dirs, tok, dtype):
    """Case 14: bf16/fp16 models at λ=50 give finite float32 logits and valid tokens."""
    pair = RealignedPair.from_pretrained(*model_dirs["llama"][:2], dtype=dtype)
    enc = tok(["Hello"], return_tensors="pt")
    logits = pair(enc["input_ids"], lam=50.0).logits
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    out = pair.generate(**enc, lam=50.0, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == enc["input_ids"].shape[1] + 4


def test_per_token_schedule_switches_lam_mid_response(arch_pair, tok):
    """λ = 0 for the first 3 generated tokens, then 2: a schedule sees the sequence so far."""
    pair, ref_dir, aligned_dir = arch_pair
    enc = tok(["The quick brown fox"], return_tensors="pt")
    start = enc["input_ids"].shape[1]
    got = new_tokens(pair.generate(**enc, lam=lambda ids: 0.0 if ids.shape[1] < start + 3 else 2.0,
                                   max_new_tokens=10, do_sample=False), enc)
    expected = float64_greedy(plain(ref_dir), plain(aligned_dir), enc["input_ids"], lambda t: 0.0 if t < 3 else 2.0, 10)
    assert torch.equal(got, expected)
