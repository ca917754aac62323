"""Variable-length token sets of a batch: packed rows for the linear layers, padded views for attention."""

from __future__ import annotations

import torch
from torch import Tensor


class TokenSets:
    """The tokens of ``B`` images, image ``b`` holding ``lengths[b]`` tokens (CLS first).

    ``x`` is ``[B, N, C]`` when every image has the same count (no padding anywhere) and the packed
    ``[sum(lengths), C]`` otherwise. ``origin`` ``[B, Nmax]`` holds each token's original index
    (0 = CLS, ``1 + row * W + col``), -1 on padding.
    """

    def __init__(self, x: Tensor, lengths: Tensor, origin: Tensor):
        self.x = x
        self.lengths = lengths
        self.origin = origin
        self.batch = int(lengths.shape[0])
        self.width = int(origin.shape[1])
        self.uniform = x.dim() == 3
        if not self.uniform:
            self.valid = torch.arange(self.width, device=x.device) < lengths[:, None]
            self.rows = self.valid.flatten().nonzero().squeeze(1)  # packed row -> flat padded slot
            self.offsets = lengths.cumsum(0) - lengths

    @classmethod
    def full(cls, x: Tensor) -> TokenSets:
        B, N, _ = x.shape
        lengths = torch.full((B,), N, dtype=torch.long, device=x.device)
        origin = torch.arange(N, device=x.device).expand(B, N)
        return cls(x, lengths, origin)

    def key_mask(self) -> Tensor | None:
        """``[B, 1, 1, Nmax]`` boolean key mask for ``scaled_dot_product_attention`` (None if uniform)."""
        return None if self.uniform else self.valid[:, None, None, :]

    def pad(self, t: Tensor) -> Tensor:
        """Rows in this set's layout (``[B, N, D]`` or packed ``[T, D]``) -> ``[B, Nmax, D]``, zero padding."""
        if self.uniform:
            return t
        out = t.new_zeros(self.batch * self.width, t.shape[-1]).index_copy(0, self.rows, t)
        return out.view(self.batch, self.width, -1)

    def padded(self) -> Tensor:
        return self.pad(self.x)

    def rows_of(self, positions: Tensor, count: Tensor) -> Tensor:
        """Flat row indices (into ``x.flatten(0, -2)``) of ``positions[b, :count[b]]`` for every image."""
        keep = torch.arange(positions.shape[1], device=positions.device) < count[:, None]
        start = torch.arange(self.batch, device=positions.device) * self.width if self.uniform else self.offsets
        return (start[:, None] + positions)[keep]

    def select(self, x_rows: Tensor, positions: Tensor, count: Tensor) -> TokenSets:
        """The new token sets made of ``positions[b, :count[b]]`` of every image, rows given packed."""
        origin = self.origin.gather(1, positions.clamp(min=0)).masked_fill(positions < 0, -1)
        if bool((count == count[0]).all()):
            return TokenSets(x_rows.view(self.batch, int(count[0]), -1), count, origin[:, : int(count[0])])
        return TokenSets(x_rows, count, origin[:, : int(count.max())])

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
        return x * keep.repeat_interleave(self.lengths)[:, None]

    @staticmethod
    def training_drop(module: torch.nn.Module) -> bool:
        return module.training and hasattr(module, "drop_prob")
