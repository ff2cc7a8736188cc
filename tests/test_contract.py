"""The contract every mixed model keeps, against an oracle built from the plain models (issue 26).

Mixed models: the pair (`RealignedPair`, full models run one after the other), the dual path
(`DualPathModel`, base + layer adapter in one 2B-row forward), the LoRA pair (`LoraPair`, base +
LoRA adapter in one forward) and vLLM (the pair and dual-path exports on Llama, the pair export
of the Qwen3 replica; slow). Heads that matter:
Llama's untied head, the Qwen3 replica's tied head padded past its tokenizer (tests/replicas.py),
Gemma 2's final soft-cap, Cohere's logit scale (and Granite's `logits_scaling` for the LoRA
pair). The other architectures each model claims keep the same oracle in test_pair.py,
test_dualpath.py and test_engines.py. For each (model, head):

- λ=0 is the plain reference's `generate` and λ=1 the plain aligned model's (for the dual path the
  merged model, for the LoRA pair PEFT's merge_and_unload): whole sequences, token for token,
  greedy and with 3 beams, on a left-padded batch, each stopping on its own EOS;
- at λ ∈ {−0.5, 0, 0.5, 1, 2}, and with one λ per row, the mixed log-probabilities of a padded
  batch equal log softmax((1 − λ)·h_ref + λ·h_aligned) mixed in float64 from the plain models'
  logits (reference.float64_logps);
- at λ ∈ {−0.5, 0.5, 2} the greedy tokens equal the float64 step-by-step oracle
  (reference.float64_greedy), which recomputes both plain models without a cache.

Where a model does not take a head, the refusal is tested instead: the dual path's adapter
surgery and the vLLM export refuse Cohere, naming the architectures they support. vLLM's own
plain Gemma 2 differs from transformers' (docs/vllm.md), so vLLM's Gemma 2 is held to vLLM's own
plain Gemma 2 instead (tests/test_vllm_archs.py::test_gemma2_equals_vllms_own_plain_gemma2).
"""

import copy
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM

from aligndial.adapter import decoder_layers, insert_adapter, merge_adapter
from aligndial.dualpath import DualPathModel
from aligndial.loading import load_tokenizer
from aligndial.lora_pair import LoraPair
from aligndial.mixed import load_pair
from aligndial.pair import RealignedPair, eos_ids
from aligndial.tiny import build_model, save
from reference import float64_greedy, float64_logps, head_side_config
from test_lora_pair import make_lora, merged

MIXED_LAMS = (-0.5, 0.5, 2.0)
NEW = 8
HEADS = {  # the heads that matter (the dual path's adapter surgery does not take Cohere: refused below)
    "pair": ["llama", "qwen3", "gemma2", "cohere"],
    "dual": ["llama", "qwen3", "gemma2"],
    "lora": ["llama", "qwen3", "gemma2", "cohere", "granite"],
}
CASES = [f"{kind}-{head}" for kind, heads in HEADS.items() for head in heads]


def plain(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def plain_dir(head: str, tok, seed: int, root, replicas) -> str:
    """A saved plain model with this head; seed 0 is the reference."""
    if head == "qwen3":  # base and instruct: their EOS differ, as real pairs' do
        return replicas.qwen3("base" if seed == 0 else "instruct", dtype="float32")
    torch.manual_seed(seed)
    if head in ("cohere", "granite"):
        model = AutoModelForCausalLM.from_config(head_side_config(head, len(tok))).eval()
    else:
        model = build_model(head, tok, seed=seed)
    return str(save(model, tok, root / f"{head}-{seed}"))


def build_case(kind: str, head: str, tok, root, replicas) -> SimpleNamespace:
    """The mixed model and the two plain models its oracle is built from."""
    ref_dir = plain_dir(head, tok, 0, root, replicas)
    if head == "qwen3":
        tok = load_tokenizer(ref_dir)  # the real Qwen3 tokenizer, left padding
    if kind == "pair":
        aligned_dir = plain_dir(head, tok, 1, root, replicas)
        mixed = RealignedPair.from_pretrained(ref_dir, aligned_dir)
        aligned = plain(aligned_dir)
    elif kind == "dual":
        adapted = plain(ref_dir)
        insert_adapter(adapted)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():  # a non-identity adapter, as training leaves it
            for p in decoder_layers(adapted)[0].parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
        aligned = plain(save(merge_adapter(copy.deepcopy(adapted)), tok, root / "merged"))
        mixed = DualPathModel(adapted)
    else:
        lora_dir = make_lora(ref_dir, root / "lora", seed=5)
        mixed = load_pair(ref_dir, lora_dir)
        assert isinstance(mixed, LoraPair)
        aligned = merged(ref_dir, lora_dir)
    return SimpleNamespace(mixed=mixed.eval(), ref=plain(ref_dir), aligned=aligned, tok=tok, what=f"{kind}-{head}")


@pytest.fixture(scope="module", params=CASES)
def case(request, tok, tmp_path_factory, replicas):
    kind, head = request.param.split("-", 1)
    return build_case(kind, head, tok, tmp_path_factory.mktemp(request.param), replicas)


def stop_ids(case, lam) -> set[int]:
    """The EOS ids a row at `lam` stops on: the pair's members with weight (aligndial.pair); the
    dual path and the LoRA pair keep the base model's generation_config."""
    if hasattr(case.mixed, "eos_token_ids"):
        return set(case.mixed.eos_token_ids(lam))
    return set(eos_ids(case.mixed))


def batch(case, prompts):
    return case.tok(prompts, return_tensors="pt", padding=True)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_lam_0_and_1_are_the_plain_models(case, prompts, num_beams):
    enc = batch(case, prompts)
    assert enc["attention_mask"].min() == 0  # rows are left-padded
    kw = dict(max_new_tokens=NEW, do_sample=False, num_beams=num_beams, pad_token_id=case.tok.pad_token_id)
    for lam, model in ((0.0, case.ref), (1.0, case.aligned)):
        with torch.no_grad():
            got, expected = case.mixed.generate(**enc, lam=lam, **kw), model.generate(**enc, **kw)
        assert torch.equal(got, expected), f"{case.what} λ={lam} beams={num_beams}"


def test_mixed_logps_equal_the_float64_oracle(case, prompts):
    enc = batch(case, prompts)
    mask = enc["attention_mask"].bool()
    oracle = {lam: float64_logps(case.ref, case.aligned, enc, lam) for lam in (*MIXED_LAMS, 0.0, 1.0)}
    # Not vacuous: the aligned model moves the log-probs far beyond the tolerance below (Cohere's
    # logit scale and Granite's logits_scaling flatten them, so not by much more).
    assert (oracle[0.5] - oracle[0.0])[mask].abs().max() > 1e-3, f"{case.what}: the aligned model barely differs"
    per_row = torch.tensor([-0.5, 0.5, 2.0])  # one λ per row, in one call
    oracle["rows"] = torch.stack([oracle[lam][i] for i, lam in enumerate(per_row.tolist())])
    for lam, expected in oracle.items():
        with torch.no_grad():
            logits = case.mixed(**enc, lam=per_row if lam == "rows" else lam).logits
        got = torch.log_softmax(logits.double(), -1)
        width = min(got.shape[-1], expected.shape[-1])
        got, expected = got[..., :width][mask], expected[..., :width][mask]
        err = ((got - expected).abs() / expected.abs().clamp(min=1.0)).max().item()
        assert err < 1e-4, f"{case.what} λ={lam}: log-probs differ from float64 by {err:.3g} (relative)"


@pytest.mark.parametrize("lam", MIXED_LAMS)
def test_greedy_equals_the_float64_oracle(case, prompts, lam):
    for prompt in prompts:
        one = case.tok([prompt], return_tensors="pt")
        with torch.no_grad():
            out = case.mixed.generate(**one, lam=lam, max_new_tokens=NEW, do_sample=False, pad_token_id=case.tok.pad_token_id)
        got = out[0, one["input_ids"].shape[1]:].tolist()
        expected = float64_greedy(case.ref, case.aligned, one["input_ids"], lam, NEW, eos=stop_ids(case, lam))[0].tolist()
        assert got and got == expected, f"{case.what} λ={lam} {prompt!r}"


def test_dual_path_and_vllm_refuse_cohere_naming_what_they_support(tok, tmp_path):
    """Cohere's head is in the contract for the pair and the LoRA pair; the dual path's adapter
    surgery and the vLLM export do not take Cohere, and say so before anything runs."""
    from aligndial.vllm.export import export_pair

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(head_side_config("cohere", len(tok))).eval()
    with pytest.raises(ValueError, match="layer adapters do not support model_type 'cohere'; supported: llama"):
        insert_adapter(copy.deepcopy(model))
    with pytest.raises(ValueError, match="the vLLM integration supports llama.*got model_type 'cohere'"):
        export_pair(model, [copy.deepcopy(model)], tok, tmp_path / "cohere-vllm")
    assert not (tmp_path / "cohere-vllm").exists()


# --- vLLM: the exports against the same float64 oracle ----------------------------------------------------


def vllm_oracle(ref, aligned, tok, lams, prompts, new, eos_of) -> list[list[int]]:
    """float64_greedy for every (λ, prompt), λ-major, as vllm_helpers.vllm_grid orders its rows."""
    return [float64_greedy(ref, aligned, tok([p], return_tensors="pt")["input_ids"], lam, new, eos=eos_of(lam))[0].tolist()
            for lam in lams for p in prompts]


VLLM_CASES = ["llama-pair", "llama-dual", "qwen3-pair", "qwen3-dual"]


def vllm_case(kind: str, head: str, tok, root):
    """(export, plain ref, plain aligned, tokenizer) for the vLLM column: tiny models with head_dim 32
    (vLLM's CPU attention), the Qwen3 replica behind its real tokenizer (base + instruct: their EOS
    differ); for the dual path the aligned model is the merged one."""
    from vllm_helpers import adapted, perturbed_adapter, qwen3_replica, tiny

    from aligndial.vllm.export import export_dual_path, export_pair

    if head == "qwen3":
        ref_dir = qwen3_replica(root, 0, "ref")
        tok = load_tokenizer(ref_dir)
    else:
        ref_dir = tiny(head, tok, 0, root, "ref")
    if kind == "pair":
        aligned_dir = qwen3_replica(root, 1, "aligned", "instruct") if head == "qwen3" else tiny(head, tok, 1, root, "aligned")
        export = export_pair(plain(ref_dir), [plain(aligned_dir)], tok, root / "pair-vllm")
    else:
        adapter = perturbed_adapter(ref_dir, root)
        export = export_dual_path(adapted(ref_dir, adapter), tok, root / "dual-vllm")
        aligned_dir = save(merge_adapter(adapted(ref_dir, adapter)), tok, root / "merged")
    return str(export), plain(ref_dir), plain(aligned_dir), tok


@pytest.mark.slow
@pytest.mark.parametrize("what", VLLM_CASES)
def test_vllm_export_equals_the_float64_oracle(what, tok, tmp_path):
    """One engine per (kind, head): the pair and the dual path on Llama and on the Qwen3 replica (tied
    head padded past its tokenizer, base + instruct EOS). Every λ of vllm_helpers.LAMS (−0.5 … 2) ×
    three prompts in one batch, each request with its own λ, each row stopping on the EOS of the
    members its λ runs. (The other architectures are held to the HF engine, which this module holds
    to the oracle: tests/test_vllm.py and tests/test_vllm_archs.py; vLLM's Gemma 2 to vLLM's own plain
    Gemma 2 there. Each engine start is slow on 2 cores.)"""
    from vllm_helpers import LAMS, NEW as VLLM_NEW, PROMPTS, in_process_llm, vllm_grid

    head, kind = what.split("-")
    export, ref, aligned, tok = vllm_case(kind, head, tok, tmp_path)

    def eos_of(lam):
        return {*(eos_ids(ref) if lam != 1 else []), *(eos_ids(aligned) if lam != 0 else [])}

    expected = vllm_oracle(ref, aligned, tok, LAMS, PROMPTS, VLLM_NEW, eos_of)
    with in_process_llm(export) as llm:
        got = vllm_grid(llm, tok)
    bad = [(lam, p) for (lam, p), a, b in zip([(lam, p) for lam in LAMS for p in PROMPTS], got, expected) if a != b]
    assert not bad, f"{what} on vLLM differs from the float64 oracle at (λ, prompt) {bad}"
    assert all(got) and len({tuple(x) for x in expected}) >= 2 * len(PROMPTS)  # λ changes the tokens
