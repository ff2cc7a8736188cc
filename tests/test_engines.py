"""The `hf` engine of `aligndial.engines` (no vLLM needed): plain transformers is the oracle.

On the architectures the vLLM classes serve beyond tests/test_contract.py's (which holds Llama, the
Qwen3 replica and Gemma 2 to a float64 oracle), the HF dual path and pair must give the reference's
greedy tokens at λ=0 and the aligned model's (the merged model's, for an adapter) at λ=1; the
vLLM tests then compare vLLM with these. And `rows` answers (text, λ) pairs in any order, as
one `generate` per λ.
"""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from aligndial.adapter import decoder_layers, insert_adapter, merge_adapter
from aligndial.dualpath import DualPathModel
from aligndial.engines import Settings, TransformersEngine, as_engine
from aligndial.generation import generate_rows
from aligndial.pair import RealignedPair
from aligndial.tiny import build_model, save

ARCH_KW = {  # as tests/vllm_helpers.py builds them for vLLM (head_dim 32, Gemma tied)
    "mistral": {}, "phi3": {}, "gemma3_text": {"head_dim": 32, "query_pre_attn_scalar": 32, "tie_word_embeddings": True},
}


def greedy(model, tok, prompts, **kw) -> list[list[int]]:
    return [r["token_ids"] for r in generate_rows(model, tok, prompts, max_new_tokens=10, do_sample=False, **kw)]


@pytest.mark.parametrize("arch", ["mistral", "phi3", "gemma3_text"])
def test_hf_dual_path_and_pair_are_the_plain_models_at_lam_0_and_1(arch, tok, prompts, tmp_path):
    ref = build_model(arch, tok, seed=0, heads=2, **ARCH_KW[arch])
    aligned = build_model(arch, tok, seed=1, heads=2, **ARCH_KW[arch])
    ref_dir, aligned_dir = save(ref, tok, tmp_path / "ref"), save(aligned, tok, tmp_path / "aligned")
    pair = RealignedPair.from_pretrained(str(ref_dir), str(aligned_dir))
    assert greedy(pair, tok, prompts, lam=0.0) == greedy(AutoModelForCausalLM.from_pretrained(ref_dir), tok, prompts)
    assert greedy(pair, tok, prompts, lam=1.0) == greedy(AutoModelForCausalLM.from_pretrained(aligned_dir), tok, prompts)

    adapted = AutoModelForCausalLM.from_pretrained(ref_dir)
    insert_adapter(adapted)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in decoder_layers(adapted)[0].parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    dual = DualPathModel(copy.deepcopy(adapted))
    assert greedy(dual, tok, prompts, lam=0.0) == greedy(AutoModelForCausalLM.from_pretrained(ref_dir), tok, prompts)
    assert greedy(dual, tok, prompts, lam=1.0) == greedy(merge_adapter(adapted), tok, prompts)
    assert greedy(dual, tok, prompts, lam=0.5) != greedy(dual, tok, prompts, lam=1.0)  # the adapter changes tokens


def test_rows_answer_text_lam_pairs_in_any_order(model_dirs, tok, prompts):
    ref, aligned, _ = model_dirs["llama"]
    pair = RealignedPair.from_pretrained(ref, aligned)
    engine = as_engine(pair, tok)
    assert isinstance(engine, TransformersEngine) and as_engine(engine, tok) is engine
    lams = [0.0, 2.0, 0.5]
    pairs = [(p, lam) for lam in lams for p in prompts][::-1]  # interleaved λ, reversed order
    rows = engine.rows([p for p, _ in pairs], [lam for _, lam in pairs], Settings(max_new_tokens=10))
    by_lam = {lam: greedy(pair, tok, prompts, lam=lam) for lam in lams}
    assert [r["token_ids"] for r in rows] == [by_lam[lam][prompts.index(p)] for p, lam in pairs]
    assert all({"text", "token_ids", "tokens_per_second"} == set(r) for r in rows)
    assert engine.scorer() is pair and engine.batch_rows(8) == 8
