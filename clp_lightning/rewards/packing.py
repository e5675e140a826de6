"""Packed (unpadded) encoder batches: several short texts share a row, and no position is spent on padding.

A padded batch of ``b`` texts costs ``b * T_max`` positions in every layer; responses of very different lengths (a
policy's samples, cut at their first EOS) and short texts next to a long one waste a large part of that. Packing
puts texts side by side in rows (first-fit decreasing), restarts the position ids at each text and gives every text
a block-diagonal attention mask, so each text sees only itself: the encoder's output per text equals the padded one
up to float rounding, from fewer positions.

Notation: ``b`` texts, ``R`` packed rows, ``C`` positions per row, ``d`` hidden size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Group text indices into rows of at most ``capacity`` tokens, longest texts placed first.

    Args:
        lengths: ``b`` token counts, each ``<= capacity``.
        capacity: positions per row.

    Returns:
        Rows of text indices, in placement order; every index appears exactly once.
    """
    if any(n > capacity for n in lengths):
        raise ValueError(f"every length must be <= capacity={capacity}, got {max(lengths)}")
    rows: list[list[int]] = []
    used: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda j: (-lengths[j], j)):
        row = next((r for r, u in enumerate(used) if u + lengths[i] <= capacity), None)
        if row is None:
            rows.append([i])
            used.append(lengths[i])
        else:
            rows[row].append(i)
            used[row] += lengths[i]
    return rows


@dataclass
class PackedBatch:
    """Model inputs of a packed batch and where each text went.

    Attributes:
        input_ids: ``(R, C)``, 0 on unused positions.
        position_ids: ``(R, C)``, counting from 0 within each text.
        segment: ``(R, C)`` index of the text at each position, -1 on unused positions.
        lengths: ``(b,)`` tokens per text.
    """

    input_ids: Tensor
    position_ids: Tensor
    segment: Tensor
    lengths: Tensor

    def attention_mask(self, dtype: torch.dtype) -> Tensor:
        """Additive ``(R, 1, C, C)`` mask: 0 where query and key belong to the same text, the dtype's minimum
        elsewhere. An unused position attends to itself only (a row of all-masked keys would give NaN)."""
        same = (self.segment[:, :, None] == self.segment[:, None, :]) & (self.segment[:, None, :] >= 0)
        same |= torch.eye(self.segment.shape[1], dtype=torch.bool, device=self.segment.device)
        return torch.zeros(same.shape, dtype=dtype, device=same.device).masked_fill(~same, torch.finfo(dtype).min)[
            :, None
        ]

    def mean(self, hidden: Tensor) -> Tensor:
        """Per-text mean of ``hidden`` ``(R, C, d)`` over the text's positions: ``(b, d)``; zero for an empty text."""
        flat, seg = hidden.reshape(-1, hidden.shape[-1]), self.segment.reshape(-1)
        keep = seg >= 0
        sums = torch.zeros(self.lengths.shape[0], hidden.shape[-1], dtype=hidden.dtype, device=hidden.device)
        sums.index_add_(0, seg[keep], flat[keep])
        return sums / self.lengths.clamp(min=1).to(hidden.dtype)[:, None]


def pack(input_ids: Tensor, attention_mask: Tensor, row_tokens: int = 128) -> PackedBatch:
    """Pack a padded tokenizer batch ``(b, T)`` (either side) into ``R`` rows of ``C`` positions.

    Rows hold whole texts, in order, never split. The number of rows is the fewest that hold ``row_tokens``
    positions each (or the longest text, if longer), and the texts are spread evenly over them, so no row is left
    half empty. Attention costs ``C`` per position, so ``row_tokens`` bounds it for short texts while the linear
    layers, the bulk of an encoder's work, see no padding.

    Args:
        input_ids, attention_mask: ``(b, T)``.
        row_tokens: target positions per row.
    """
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"input_ids and attention_mask must have the same shape, got {tuple(input_ids.shape)} and "
            f"{tuple(attention_mask.shape)}"
        )
    if row_tokens < 1:
        raise ValueError(f"row_tokens must be >= 1, got {row_tokens}")
    lengths = attention_mask.sum(1)
    sizes = lengths.tolist()
    longest, total = max(sizes, default=0), sum(sizes)
    rows_wanted = max(1, math.ceil(total / max(row_tokens, longest, 1)))
    capacity = max(longest, math.ceil(total / rows_wanted))
    rows = first_fit_decreasing(sizes, capacity)
    while len(rows) > rows_wanted:  # fragmentation: widen the rows a little until the texts fit (ends at one row)
        capacity += max(1, longest // 4)
        rows = first_fit_decreasing(sizes, capacity)
    width = max((sum(sizes[i] for i in members) for members in rows), default=0)
    ids = input_ids.new_zeros(len(rows), max(width, 1))
    positions = torch.zeros_like(ids)
    segment = torch.full_like(ids, -1)
    for r, members in enumerate(rows):
        start = 0
        for i in members:
            n = sizes[i]
            ids[r, start : start + n] = input_ids[i][attention_mask[i].bool()]
            positions[r, start : start + n] = torch.arange(n, device=ids.device)
            segment[r, start : start + n] = i
            start += n
    return PackedBatch(input_ids=ids, position_ids=positions, segment=segment, lengths=lengths)
