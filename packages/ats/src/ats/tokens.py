"""Variable-length token sets of a batch: packed rows for the linear layers, padded views for attention.

Every shape here follows the per-image counts, which the host knows (``sizes``, read once per ATS stage), so no
layout operation needs another host read: packed-row maps come from ``repeat_interleave`` with a known output
size instead of ``nonzero`` or boolean-mask indexing.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def ragged_index(lengths: Tensor, total: int) -> tuple[Tensor, Tensor]:
    """``(image, slot)`` of every packed row, ``[total]`` each: the rows of image ``b`` are ``0..lengths[b]-1``."""
    image = torch.repeat_interleave(torch.arange(lengths.shape[0], device=lengths.device), lengths,
                                    output_size=total)
    start = (lengths.cumsum(0) - lengths).index_select(0, image)
    return image, torch.arange(total, device=lengths.device) - start


class TokenSets:
    """The tokens of ``B`` images, image ``b`` holding ``lengths[b]`` tokens (CLS first).

    ``x`` is ``[B, N, C]`` when every image has the same count (no padding anywhere) and the packed
    ``[sum(lengths), C]`` otherwise. ``origin`` ``[B, Nmax]`` holds each token's original index
    (0 = CLS, ``1 + row * W + col``), -1 on padding. ``sizes`` is ``lengths`` as Python ints.
    """

    def __init__(self, x: Tensor, lengths: Tensor, origin: Tensor, sizes: Sequence[int]):
        self.x = x
        self.lengths = lengths
        self.origin = origin
        self.sizes = tuple(sizes)
        self.batch = len(self.sizes)
        self.width = int(origin.shape[1])
        self.uniform = x.dim() == 3
        if not self.uniform:
            self.valid = torch.arange(self.width, device=x.device) < lengths[:, None]
            image, slot = ragged_index(lengths, sum(self.sizes))
            self.rows = image * self.width + slot  # packed row -> flat padded slot
            self.offsets = lengths.cumsum(0) - lengths

    @classmethod
    def full(cls, x: Tensor) -> TokenSets:
        B, N, _ = x.shape
        lengths = torch.full((B,), N, dtype=torch.long, device=x.device)
        origin = torch.arange(N, device=x.device).expand(B, N)
        return cls(x, lengths, origin, (N,) * B)

    def key_mask(self) -> Tensor | None:
        """``[B, 1, 1, Nmax]`` boolean key mask for ``scaled_dot_product_attention`` (None if uniform)."""
        return None if self.uniform else self.valid[:, None, None, :]

    def pad(self, t: Tensor) -> Tensor:
        """Rows in this set's layout (``[B, N, D]`` or packed ``[T, D]``) -> ``[B, Nmax, D]``, zero padding."""
        if self.uniform:
            return t
        out = t.new_zeros(self.batch * self.width, t.shape[-1]).index_copy(0, self.rows, t)
        return out.view(self.batch, self.width, -1)

    def pack(self, p: Tensor) -> Tensor:
        """``[B, Nmax, D]`` -> rows in this set's layout (drops padding)."""
        if self.uniform:
            return p
        return p.reshape(self.batch * self.width, -1).index_select(0, self.rows)

    def padded(self) -> Tensor:
        return self.pad(self.x)

    def rows_of(self, positions: Tensor, count: Tensor, sizes: Sequence[int]) -> Tensor:
        """Flat row indices (into ``x.flatten(0, -2)``) of ``positions[b, :count[b]]`` for every image
        (``sizes``: ``count`` as Python ints)."""
        start = torch.arange(self.batch, device=positions.device) * self.width if self.uniform else self.offsets
        if all(s == positions.shape[1] for s in sizes):  # equal counts (always at batch 1): no ragged map
            return (start[:, None] + positions).flatten()
        image, slot = ragged_index(count, sum(sizes))
        return start.index_select(0, image) + positions[image, slot]

    def select(self, x_rows: Tensor, positions: Tensor, count: Tensor, sizes: Sequence[int]) -> TokenSets:
        """The new token sets made of ``positions[b, :count[b]]`` of every image, rows given packed."""
        width = max(sizes)
        origin = self.origin.gather(1, positions[:, :width].clamp(min=0)).masked_fill(positions[:, :width] < 0, -1)
        if all(s == width for s in sizes):
            return TokenSets(x_rows.view(self.batch, width, -1), count, origin, sizes)
        return TokenSets(x_rows, count, origin, sizes)

    def drop_path(self, x: Tensor, module: torch.nn.Module) -> Tensor:
        """timm ``DropPath`` per image on this set's layout (packed rows share their image's draw)."""
        p = float(getattr(module, "drop_prob", 0.0))
        if not self.training_drop(module) or p == 0.0:
            return x
        keep = x.new_empty(self.batch).bernoulli_(1 - p)
        if getattr(module, "scale_by_keep", True):
            keep = keep / (1 - p)
        if self.uniform:
            return x * keep[:, None, None]
        return x * keep.repeat_interleave(self.lengths, output_size=x.shape[0])[:, None]

    @staticmethod
    def training_drop(module: torch.nn.Module) -> bool:
        return module.training and hasattr(module, "drop_prob")
