"""The in-place KV cache layer equals transformers' DynamicLayer under every operation generation
and the serving engine apply: appends of any size, crop, beam reorder, row selection, and a
`keys` tensor replaced from outside (left padding in serve/batch.py)."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from aligndial.cache import GrowingLayer, growing
from aligndial.tiny import tiny_config


def _kv(rows, length, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, 2, length, 4, generator=g), torch.randn(rows, 2, length, 4, generator=g)


def _assert_same(a, b):
    assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    assert a.get_seq_length() == b.get_seq_length()


OPS = st.lists(
    st.one_of(
        st.tuples(st.just("append"), st.integers(1, 300)),
        st.tuples(st.just("crop"), st.integers(1, 3)),
        st.tuples(st.just("reorder"), st.just(0)),
        st.tuples(st.just("replace"), st.integers(0, 2)),
    ),
    min_size=1,
    max_size=12,
)


@settings(max_examples=60, deadline=None)
@given(first=st.integers(1, 40), ops=OPS)
def test_growing_layer_equals_dynamic_layer(first, ops):
    plain, grown = DynamicLayer(), GrowingLayer()
    for layer in (plain, grown):
        layer.update(*_kv(3, first, 0))
    for step, (op, n) in enumerate(ops, start=1):
        if op == "append":
            outs = [layer.update(*_kv(3, n, step)) for layer in (plain, grown)]
            assert all(torch.equal(x, y) for x, y in zip(*outs))
        elif op == "crop" and plain.get_seq_length() > n:
            for layer in (plain, grown):
                layer.crop(-n)
        elif op == "reorder":
            for layer in (plain, grown):
                layer.reorder_cache(torch.tensor([2, 0, 0]))
        elif op == "replace":  # what serve/batch.py does: left-pad and assign new tensors
            for layer in (plain, grown):
                layer.keys = torch.nn.functional.pad(layer.keys, (0, 0, n, 0))
                layer.values = torch.nn.functional.pad(layer.values, (0, 0, n, 0))
        _assert_same(plain, grown)


def test_appends_reuse_one_buffer():
    layer = GrowingLayer()
    layer.update(*_kv(1, 16, 0))
    buffer = layer.key_buffer
    for step in range(100):
        layer.update(*_kv(1, 1, step))
    assert layer.key_buffer is buffer and layer.keys.data_ptr() == buffer.data_ptr()
    assert layer.get_seq_length() == 116


def test_growing_keeps_special_layers():
    config = tiny_config("gemma2", vocab_size=64)
    cache = growing(DynamicCache(config=config))
    kinds = {type(layer).__name__ for layer in cache.layers}
    assert "GrowingLayer" in kinds and "DynamicSlidingWindowLayer" in kinds
