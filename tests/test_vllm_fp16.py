"""vLLM's dual path in float16: a row whose λ makes the hidden-state mix overflow (issue 26 item 6,
docs/reliability.md case 39). Nothing may raise inside the model (that stops the engine for every
request); the documented behaviour is that such a row is mixed as float32 logits instead, the
same distribution, and only that row: the others keep the hidden-state mix they get alone.

The engine runs in this process (vllm_helpers.in_process_llm), so the real `mix_logits` that
`compute_logits` calls is watched as it runs.
"""

import pytest
import torch
from vllm_helpers import NEW, PROMPTS, adapted, in_process_llm, perturbed_adapter, tiny

from aligndial.vllm import models
from aligndial.vllm.export import export_dual_path

pytestmark = pytest.mark.slow

BIG = 1e5  # within LAM_LIMIT: accepted at the API; λ·(h_aligned − h_base) is far past float16's 65504


def run(llm, tok, requests) -> list[list[int]]:
    from vllm import SamplingParams

    params = [SamplingParams(max_tokens=NEW, min_tokens=NEW, temperature=0, extra_args={"alignment_strength": lam})
              for _, lam in requests]
    outs = llm.generate([{"prompt_token_ids": tok(p)["input_ids"]} for p, _ in requests], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def test_a_row_whose_float16_hidden_mix_overflows_is_mixed_as_float32_logits_alone(tok, tmp_path, monkeypatch):
    ref = tiny("llama", tok, 0, tmp_path, "ref")
    model = adapted(ref, perturbed_adapter(ref, tmp_path)).to(torch.float16)
    export = export_dual_path(model, tok, tmp_path / "dual-fp16")
    calls = []
    mix_logits = models.mix_logits

    def watched(ref_logits, aligned_logits, lam, *a, **k):
        out = mix_logits(ref_logits, aligned_logits, lam, *a, **k)
        calls.append((ref_logits.clone(), aligned_logits[0].clone(), lam.clone(), out.clone()))
        return out

    normal, big = (PROMPTS[0], 0.5), (PROMPTS[1], BIG)
    with in_process_llm(str(export), dtype="float16") as llm:
        assert llm.llm_engine.vllm_config.model_config.dtype == torch.float16
        alone = run(llm, tok, [normal]) + run(llm, tok, [big])
        monkeypatch.setattr(models, "mix_logits", watched)
        together = run(llm, tok, [normal, big])
    # The bad row ran to the end (no error, not masked), and each row equals its run alone.
    assert together == alone and all(len(row) == NEW for row in together)
    assert len(calls) == NEW, "the overflowing row is mixed as logits at every step"
    for ref_logits, aligned_logits, lam, out in calls:
        # Only that row: the λ=0.5 row kept the hidden-state mix it gets alone.
        assert lam.tolist() == [[BIG]], f"rows mixed as logits: λ {lam.tolist()}"
        assert ref_logits.dtype == torch.float16 and out.dtype == torch.float32 and torch.isfinite(out).all()
        # The same distribution: (1 − λ)·h_base + λ·h_aligned of the head's own logits, to float32
        # rounding (of the two weighted terms and their sum, each ~1e5 times a logit).
        terms = ((1 - BIG) * ref_logits.double(), BIG * aligned_logits.double())
        bound = 2 * torch.finfo(torch.float32).eps * (terms[0].abs() + terms[1].abs())
        assert ((out.double() - (terms[0] + terms[1])).abs() <= bound).all()
    # Greedy: the row's tokens are the float32 mix's argmax at each step.
    assert [int(out[0].argmax()) for *_, out in calls] == together[1]
