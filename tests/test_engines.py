"""The `hf` engine of `aligndial.engines` (no vLLM needed): `rows` answers (text, λ) pairs in any
order, as one `generate` per λ. That the HF dual path and pair equal the plain models at λ=0 / 1 on
every architecture the vLLM classes serve (the oracle the vLLM tests compare with) is in
tests/test_contract.py.
"""

from aligndial.engines import Settings, TransformersEngine, as_engine
from aligndial.generation import generate_rows
from aligndial.pair import RealignedPair


def greedy(model, tok, prompts, **kw) -> list[list[int]]:
    return [r["token_ids"] for r in generate_rows(model, tok, prompts, max_new_tokens=10, do_sample=False, **kw)]


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
