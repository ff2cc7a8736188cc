"""Rows of a running batch: a KV cache plus its (B, S) attention mask, where rows join and leave
between decode steps (continuous batching).

A new sequence is prefilled alone into its own cache, then `append`ed: the shorter of the two
caches is left-padded along the sequence axis (keys and values of every layer), and the mask
marks the padding 0, so attention never sees it. Positions are not stored here: the engine
passes explicit per-row `position_ids`, so a padded row keeps the positions it had alone.
Finished rows leave with `select`, and sequence columns that are padding in every remaining
row are trimmed, so one long-gone long prompt does not cost every later step.

Layouts, one per supported model kind (`row_blocks` names them):

- a plain causal LM: a DynamicCache, B rows in every layer;
- a DeRa pair: a `PairCache` of one DynamicCache per member, B rows each;
- a LoRA pair: a `LoraPairCache`, [ref rows; adapter-1 rows; …] in every layer;
- a dual-path model: a `DualPathCache` whose n adapter layers hold the B aligned rows and whose
  shared layers hold 2B rows, [base rows; aligned rows]. Each half is merged and selected on
  its own, so row i stays at i and B + i. (The engine always runs with `run_all=True`, so the
  adapter layers are never empty.)

Only full-attention layers (`DynamicLayer`) can be padded this way: a sliding-window layer
keeps the last W tokens, and left padding would shift its window.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from aligndial.dualpath import DualPathCache
from aligndial.pair import PairCache


def row_blocks(cache) -> list[tuple[DynamicLayer, int]]:
    """Every cache layer with the number of row blocks it holds (2 for dual-path shared layers)."""
    if isinstance(cache, DualPathCache):
        layers = [(layer, 1 if i < cache.n_adapter else 2) for i, layer in enumerate(cache.layers)]
    elif isinstance(cache, PairCache):
        layers = [(layer, 1) for member in cache.caches for layer in member.layers]
    elif isinstance(cache, DynamicCache):  # a LoraPairCache holds n row blocks in every layer
        layers = [(layer, getattr(cache, "row_blocks", 1)) for layer in cache.layers]
    else:
        raise TypeError(f"the batching engine supports DynamicCache, PairCache and DualPathCache; got {type(cache).__name__}")
    for i, (layer, _) in enumerate(layers):
        if type(layer) is not DynamicLayer:
            raise ValueError(
                f"cache layer {i} is a {type(layer).__name__}; the batching engine can only left-pad full-attention "
                "layers (DynamicLayer), so models with sliding-window or other special layers are not supported"
            )
    return layers


def _left_pad(x: torch.Tensor, length: int) -> torch.Tensor:
    """(R, H, S, D) → (R, H, length, D), zeros on the left (masked out by the attention mask)."""
    return F.pad(x, (0, 0, length - x.shape[-2], 0)) if x.shape[-2] < length else x


def _cat_rows(x: torch.Tensor, y: torch.Tensor, blocks: int) -> torch.Tensor:
    """Rows of y after rows of x, inside each block: [x_0; y_0; x_1; y_1]."""
    length = max(x.shape[-2], y.shape[-2])
    x, y = _left_pad(x, length), _left_pad(y, length)
    return torch.cat([t for pair in zip(x.chunk(blocks), y.chunk(blocks)) for t in pair])


def _take_rows(x: torch.Tensor, rows: torch.Tensor, blocks: int, start: int) -> torch.Tensor:
    """The given rows of every block, and sequence columns from `start` on."""
    per_block = x.shape[0] // blocks
    index = torch.cat([rows + b * per_block for b in range(blocks)]).to(x.device)
    return x.index_select(0, index)[..., start:, :]


class BatchCache:
    """A model cache and its (B, S) attention mask (1 = real token, 0 = left padding)."""

    def __init__(self, cache, mask: torch.Tensor):
        self.cache = cache
        self.mask = mask
        row_blocks(cache)  # fail on an unsupported layout now, not in the middle of a merge

    @property
    def rows(self) -> int:
        return self.mask.shape[0]

    def append(self, other: BatchCache) -> None:
        """Add the rows of `other` after ours, left-padding the shorter one."""
        for (mine, blocks), (theirs, _) in zip(row_blocks(self.cache), row_blocks(other.cache), strict=True):
            mine.keys = _cat_rows(mine.keys, theirs.keys, blocks)
            mine.values = _cat_rows(mine.values, theirs.values, blocks)
        length = max(self.mask.shape[1], other.mask.shape[1])
        self.mask = torch.cat([F.pad(m, (length - m.shape[1], 0)) for m in (self.mask, other.mask)])

    def select(self, rows: list[int]) -> None:
        """Keep only `rows` (in that order; repeats allowed, at least one row), then drop the
        columns that are padding in every kept row."""
        index = torch.tensor(rows, dtype=torch.long)
        mask = self.mask.index_select(0, index.to(self.mask.device))
        start = int(mask.any(dim=0).int().argmax())  # the first column holding a real token of some row
        for layer, blocks in row_blocks(self.cache):
            layer.keys = _take_rows(layer.keys, index, blocks, start)
            layer.values = _take_rows(layer.values, index, blocks, start)
        self.mask = mask[:, start:]

    def grow(self) -> torch.Tensor:
        """Extend the mask by one real column for the token about to be fed, and return it."""
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.rows, 1)], dim=1)
        return self.mask
