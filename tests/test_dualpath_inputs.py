"""The dual path's 2B-row forward doubles exactly the per-row inputs (issue 26): tensors of two or
more dimensions whose first dimension is B. A 1-D tensor is per position (`cache_position`), so
it stays as it is even when its length happens to equal B, and a 0-d tensor passes through."""

import torch

from aligndial.dualpath import DualPathModel
from test_dualpath import perturbed


def test_1d_inputs_of_length_b_are_not_doubled_and_0d_inputs_pass(tok):
    model = perturbed("llama", tok)
    dual = DualPathModel(model)
    ids = torch.tensor([[5, 9], [7, 11]])  # B = 2 rows of T = 2 tokens: cache_position has length B
    lam = torch.tensor([0.0, 1.0])
    seen = []
    model.model.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs.get("cache_position")),
                                          with_kwargs=True)
    with torch.no_grad():
        alone = [dual(ids[i : i + 1], lam=lam[i : i + 1], run_all=True).logits for i in range(2)]
        both = dual(ids, lam=lam, run_all=True, cache_position=torch.arange(2)).logits
        torch.testing.assert_close(both, torch.cat(alone), rtol=1e-5, atol=1e-5)
        assert seen[-1].tolist() == [0, 1]  # one entry per position, for both paths' rows alike
        scalar = dual(ids, lam=lam, run_all=True, num_items_in_batch=torch.tensor(4)).logits  # a Trainer's 0-d tensor
        torch.testing.assert_close(scalar, both, rtol=1e-5, atol=1e-5)
