"""A KV cache layer that appends in place, for the 2B-row dual path and the pair's members.

transformers' `DynamicLayer` grows by `torch.cat([keys, new])`: every decode step copies the
whole cache of every layer, O(length) per token. On this CPU that copy was 23% of a dual-path
step (13% of a plain one), since the dual path's shared layers hold twice the rows. `GrowingLayer`
writes new keys and values into a preallocated buffer (growing by half when full, so appending
is amortised O(1), and at most a third of it is unused) and hands attention a prefix view of it.

`keys` / `values` stay the layer's real state, as in `DynamicLayer`: beam reordering, row
selection (the serving engine), cropping or left padding may replace them with other tensors.
Before each append the layer checks that `keys` is still a prefix view of its buffer; if not,
it copies `keys` into a fresh buffer. So every stock `DynamicLayer` operation stays correct.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

MIN_GROWTH = 256  # tokens added to a buffer at least, so short generations reallocate once or twice


def _is_prefix_of(view: torch.Tensor, buffer: torch.Tensor | None) -> bool:
    return (
        buffer is not None
        and view.numel() > 0
        and view.data_ptr() == buffer.data_ptr()
        and view.stride() == buffer.stride()
        and view.shape[:2] == buffer.shape[:2]
        and view.shape[-1] == buffer.shape[-1]
    )


def _append(buffer: torch.Tensor | None, current: torch.Tensor, new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Write `new` after `current` along the sequence axis (-2); returns (buffer, view of the result)."""
    length = current.shape[-2] if current.numel() else 0
    total = length + new.shape[-2]
    if not (_is_prefix_of(current, buffer) and new.shape[:2] == buffer.shape[:2] and total <= buffer.shape[-2]):
        buffer = new.new_empty(*new.shape[:2], max(total * 3 // 2, total + MIN_GROWTH), new.shape[-1])
        if length:
            buffer[:, :, :length] = current
    buffer[:, :, length:total] = new
    return buffer, buffer[:, :, :total]


class GrowingLayer(DynamicLayer):
    """A full-attention `DynamicLayer` whose `update` appends in place (see the module docstring)."""

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.key_buffer = self.value_buffer = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.key_buffer, self.keys = _append(self.key_buffer, self.keys, key_states)
        self.value_buffer, self.values = _append(self.value_buffer, self.values, value_states)
        return self.keys, self.values


def growing(cache: DynamicCache) -> DynamicCache:
    """Replace the cache's full-attention layers by `GrowingLayer`s (sliding-window and other
    special layers are kept as they are). Call it on a fresh cache."""
    cache.layers = [GrowingLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache
