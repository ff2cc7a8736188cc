"""vLLM's own server (`vllm serve`, no aligndial front end) stops each row of a pair export on the
EOS of the members its λ runs, as `aligndial generate` does (issue 26 item 4, docs/reliability.md
case 48).

The pair is built so that the rule shows: the reference's EOS is a token the aligned model emits
early on one prompt, and the aligned model's EOS a token it emits early on another. Left to its
generation config (the reference's), vLLM would stop the λ=1 row on the reference's EOS and run the
other λ=1 row past the aligned model's.
"""

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from transformers import AutoModelForCausalLM
from vllm_helpers import LAMS, NEW, PROMPTS, Subprocess, hf_grid, tiny, vllm_command

from aligndial.pair import RealignedPair
from aligndial.tiny import save
from aligndial.vllm.export import export_pair

pytestmark = pytest.mark.slow


def greedy(model, tok, prompt: str) -> list[int]:
    """The plain model's greedy tokens, ignoring every EOS (for picking the EOS tokens below)."""
    enc = tok([prompt], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=tok.pad_token_id)
    return out[0, enc["input_ids"].shape[1]:].tolist()


def pick(rows: list[list[int]]) -> tuple[int, int, int, int]:
    """(a, i, b, j): the aligned model's EOS will be rows[a][i] and the reference's rows[b][j], tokens
    new in their row (at i ≥ 2, j ≥ 1), so that at λ=1 row a stops at i + 1 tokens, and row b runs on
    past j (the aligned EOS is not in it up to j, the reference's not in row a up to i)."""
    for a, row_a in enumerate(rows):
        for i in range(2, len(row_a) - 1):
            if row_a[i] in row_a[:i]:
                continue
            for b, row_b in enumerate(rows):
                for j in range(1, len(row_b) - 1):
                    if (b != a and row_b[j] not in row_b[:j] and row_b[j] not in row_a[: i + 1]
                            and row_a[i] not in row_b[: j + 1]):
                        return a, i, b, j
    raise AssertionError("no two prompts show the rule; pick other prompts or seeds")


@pytest.fixture(scope="module")
def pair(tok, tmp_path_factory):
    root = tmp_path_factory.mktemp("stops")
    ref = AutoModelForCausalLM.from_pretrained(tiny("llama", tok, 0, root, "ref0"))
    aligned = AutoModelForCausalLM.from_pretrained(tiny("llama", tok, 1, root, "aligned0"))
    rows = [greedy(aligned, tok, p) for p in PROMPTS]
    a, i, b, j = pick(rows)
    aligned_eos, ref_eos = rows[a][i], rows[b][j]
    for model, eos in ((ref, ref_eos), (aligned, aligned_eos)):
        model.generation_config.eos_token_id = eos
        model.config.eos_token_id = eos
    ref_dir, aligned_dir = str(save(ref, tok, root / "ref")), str(save(aligned, tok, root / "aligned"))
    export = export_pair(ref, [aligned], tok, root / "pair-vllm")
    return dict(export=str(export), ref_eos=ref_eos, aligned_eos=aligned_eos, a=a, i=i, b=b, rows=rows,
                hf=RealignedPair.from_pretrained(ref_dir, aligned_dir))


@pytest.fixture(scope="module")
def server(pair, tmp_path_factory):
    s = Subprocess([*vllm_command(), "serve", pair["export"], "--served-model-name", "pair", "--dtype", "float32",
                    "--max-model-len", "128", "--max-num-seqs", "16", "--enforce-eager"],
                   tmp_path_factory.mktemp("logs") / "vllm-serve.log")
    yield s
    s.stop()


def test_bare_vllm_serve_stops_each_row_on_its_members_eos(pair, server, tok):
    expected = hf_grid(pair["hf"], tok)  # aligndial generate's rows, λ-major
    one = LAMS.index(1.0) * len(PROMPTS)
    a, b = one + pair["a"], one + pair["b"]
    # The construction shows the rule: at λ=1 the aligned model stops on its own EOS, and runs on
    # past the reference's.
    assert expected[a][-1] == pair["aligned_eos"] and len(expected[a]) == pair["i"] + 1 < NEW
    assert pair["ref_eos"] in expected[b][:-1]
    client = server.client()

    def ids(prompt, lam, **body):
        xargs = {} if lam is None else {"vllm_xargs": {"alignment_strength": lam}}
        r = client.completions.create(model="pair", prompt=prompt, max_tokens=NEW, temperature=0,
                                      extra_body={**xargs, "return_token_ids": True, **body})
        return r.choices[0].model_extra["token_ids"]

    requests = [(p, lam) for lam in LAMS for p in PROMPTS]
    with ThreadPoolExecutor(len(requests)) as pool:  # concurrent: batched together, each with its own stops
        got = list(pool.map(lambda r: ids(*r), requests))
    bad = [r for r, a, b in zip(requests, got, expected) if a != b]
    assert not bad, f"vllm serve stops differently from aligndial generate at (prompt, λ) {bad}"
    assert ids(PROMPTS[pair["a"]], None) == expected[a]  # no λ: the export's default λ (1) and its members' EOS
    # A client's own stop ids still stop the row; its ignore_eos still ignores every EOS.
    row_b = pair["rows"][pair["b"]]
    assert ids(PROMPTS[pair["b"]], 1.0, stop_token_ids=[row_b[0]]) == row_b[:1]
    assert ids(PROMPTS[pair["a"]], 1.0, ignore_eos=True) == pair["rows"][pair["a"]]
    assert server.proc.poll() is None
