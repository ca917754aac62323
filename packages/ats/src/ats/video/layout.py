"""Where the alive tokens of a batch of clips sit once ATS has dropped some: packed rows for the linear layers, padded
per-frame (spatial) and per-position (temporal) views for attention.

A :class:`FrameLayout` describes ``B`` clips of ``T`` frames of ``S`` patches with an alive mask ``[B, T, S]``. Rows
are packed frame by frame (clip-major, ``(b, t)`` order), a frame's alive patches in grid order, X-ViT's per-frame
CLS token first (``cls_rows``; TimeSformer keeps its one CLS token beside the rows). Attention runs on padded views
built with one ``index_copy`` and read back with one ``index_select``: the spatial view ``[B * T, W, D]`` holds a
frame's CLS (or its copy of TimeSformer's CLS) in slot 0 and its alive patches after it, ``W`` = 1 + the batch's
largest alive count per frame; TimeSformer's temporal view ``[P, T, D]`` holds the frames of every patch position
with at least one alive frame. Padded slots are masked keys, so a clip's results do not depend on its batch.

Every shape is a host integer read once per layout (:meth:`FrameLayout.of`: one ``tolist``, the ATS stage's only
host sync); the index maps come from cumulative sums and scatters, never from ``nonzero`` or boolean indexing.
"""

from __future__ import annotations

import torch
from torch import Tensor


def compact_index(keep: Tensor, total: int) -> Tensor:
    """Flat positions of the ``total`` true entries of the 1-D ``keep``, in order (``nonzero`` with a known size)."""
    slot = torch.where(keep, keep.long().cumsum(0) - 1, total)
    out = torch.zeros(total + 1, dtype=torch.long, device=keep.device)
    return out.scatter_(0, slot, torch.arange(keep.numel(), device=keep.device))[:total]


class FrameLayout:
    """Packed rows and padded attention views of the alive tokens of ``B`` clips (see the module docstring).

    ``alive`` ``[B, T, S]`` (all true for :meth:`full`), ``width`` the padded frame length, ``rows`` the packed row
    count, ``positions`` the patch positions with an alive frame (``temporal`` layouts only); ``uniform`` when
    nothing was dropped (the views are then plain reshapes)."""

    def __init__(self, alive: Tensor, cls_rows: bool, width: int, rows: int, positions: int | None = None,
                 uniform: bool = False):
        B, T, S = alive.shape
        self.alive, self.cls_rows, self.uniform = alive, cls_rows, uniform
        self.B, self.T, self.S, self.width, self.rows = B, T, S, width, rows
        dev = alive.device
        ones = alive.new_ones(B, T, 1)
        grid = torch.cat([ones if cls_rows else ~ones, alive], -1).flatten()  # packed rows on the [B, T, 1 + S] grid
        self.grid_index = compact_index(grid, rows)  # [rows]: flat grid position of every row
        self.row_of = torch.where(grid, grid.long().cumsum(0) - 1, -1)  # grid position -> row (-1: none)
        slot = torch.cat([ones, alive], -1).reshape(B * T, 1 + S).long().cumsum(-1) - 1  # rank in the frame
        frames = torch.arange(B * T, device=dev)[:, None]
        self.slot_of = (frames * width + slot).flatten()  # grid position -> flat slot of the spatial view
        self.frame_slot = self.slot_of.index_select(0, self.grid_index)
        self.cls_slot = frames.flatten() * width
        counts = alive.sum(-1).reshape(B * T, 1)
        self.key_mask = None if uniform else (torch.arange(width, device=dev) <= counts)[:, None, None, :]
        self.positions, self.time_mask = positions, None
        if positions is not None and not uniform:
            self._temporal(positions)

    @classmethod
    def full(cls, B: int, T: int, S: int, cls_rows: bool, device: torch.device, temporal: bool = False):
        """Every token alive (no host read)."""
        alive = torch.ones(B, T, S, dtype=torch.bool, device=device)
        return cls(alive, cls_rows, 1 + S, B * T * (S + int(cls_rows)), B * S if temporal else None, uniform=True)

    @classmethod
    def of(cls, alive: Tensor, cls_rows: bool, temporal: bool = False) -> FrameLayout:
        """The layout of ``alive``; its sizes are read to the host in one ``tolist``."""
        n = alive.sum(-1)
        stats = [n.amax(), n.sum()] + ([alive.any(1).sum()] if temporal else [])
        sizes = torch.stack(stats).tolist()
        B, T, _ = alive.shape
        return cls(alive, cls_rows, 1 + sizes[0], sizes[1] + (B * T if cls_rows else 0),
                   sizes[2] if temporal else None)

    # ------------------------------------------------------------------------------------------- spatial view
    def pad(self, t: Tensor, first: Tensor | None = None) -> Tensor:
        """Packed rows ``[rows, D]`` -> the spatial view ``[B * T, W, D]`` (zeros in padding); ``first`` ``[B * T, D]``
        fills slot 0 of every frame when the rows hold no CLS (TimeSformer's per-frame copy)."""
        BT, D = self.B * self.T, t.shape[-1]
        if self.uniform:
            t = t.view(BT, -1, D)
            return t if first is None else torch.cat([first[:, None], t], 1)
        if first is not None:
            t, index = torch.cat([first, t]), torch.cat([self.cls_slot, self.frame_slot])
        else:
            index = self.frame_slot
        return t.new_zeros(BT * self.width, D).index_copy(0, index, t).view(BT, self.width, D)

    def pack(self, p: Tensor, slots: Tensor | None = None) -> Tensor:
        """Spatial view ``[B * T, W, D]`` -> packed rows (``slots``: the flat slots to read, default every row's)."""
        flat = p.reshape(-1, p.shape[-1])
        if slots is None:
            if self.uniform:
                return flat.view(self.B * self.T, self.width, -1)[:, 0 if self.cls_rows else 1 :].reshape(self.rows, -1)
            slots = self.frame_slot
        return flat.index_select(0, slots)

    def grid(self, t: Tensor, first: Tensor | None = None) -> Tensor:
        """Packed rows -> ``[B, T, 1 + S, D]`` on the full grid, zeros where a token is dropped (what the sampling
        step reads); ``first`` as in :meth:`pad`."""
        if self.uniform:
            return self.pad(t, first).view(self.B, self.T, 1 + self.S, -1)
        N1, D = 1 + self.S, t.shape[-1]
        index = self.grid_index
        if first is not None:
            t = torch.cat([first, t])
            index = torch.cat([torch.arange(self.B * self.T, device=t.device) * N1, index])
        return t.new_zeros(self.B * self.T * N1, D).index_copy(0, index, t).view(self.B, self.T, N1, D)

    def cls(self, rows: Tensor) -> Tensor:
        """X-ViT's per-frame CLS rows ``[B, T, D]``."""
        index = torch.arange(self.B * self.T, device=rows.device) * (1 + self.S)
        return rows.index_select(0, self.row_of.index_select(0, index)).view(self.B, self.T, -1)

    def moved(self, new: FrameLayout) -> tuple[Tensor, Tensor]:
        """For every row of the smaller layout ``new`` (a subset of this one's tokens): its row here and its flat
        slot in this layout's spatial view."""
        return self.row_of.index_select(0, new.grid_index), self.slot_of.index_select(0, new.grid_index)

    # -------------------------------------------------------------------------------------- X-ViT's mixing
    def neighbours(self, segment: int) -> tuple[Tensor, Tensor]:
        """Spatial-view slots of every row's token in frame t+1 and t-1 of the same ``segment`` (``B * T * W``, a
        zero row past the view, where that token is dropped or past the segment's ends)."""
        if getattr(self, "_neighbours", None) is None:
            B, T, N1 = self.B, self.T, 1 + self.S
            end = B * T * self.width
            slot = torch.where(self.row_of < 0, end, self.slot_of).view(B * T // segment, segment, N1)
            edge = slot.new_full((slot.shape[0], 1, N1), end)
            nxt = torch.cat([slot[:, 1:], edge], 1).flatten().index_select(0, self.grid_index)
            prv = torch.cat([edge, slot[:, :-1]], 1).flatten().index_select(0, self.grid_index)
            self._neighbours = (nxt, prv)
        return self._neighbours

    def pad_mixed(self, qkv: Tensor, segment: int, fold: int) -> Tensor:
        """X-ViT's space-time mixing (Eq. 6) while padding packed q|k|v rows ``[rows, 3C]`` into the spatial view:
        channels ``[0, fold)`` of a token's k and v come from the same token in frame t+1, ``[fold, 2 fold)`` from
        frame t-1, zero where that token is dropped or past the segment's ends (the masked blocks' shift of zeroed
        keys and values)."""
        BT, W, C3 = self.B * self.T, self.width, qkv.shape[-1]
        C = C3 // 3
        if self.uniform:  # plain shifts along the frames
            src = qkv.view(BT // segment, segment, W, 3, C)
            out = src.clone()
            out[:, :-1, :, 1:, :fold] = src[:, 1:, :, 1:, :fold]
            out[:, -1, :, 1:, :fold] = 0
            out[:, 1:, :, 1:, fold : 2 * fold] = src[:, :-1, :, 1:, fold : 2 * fold]
            out[:, 0, :, 1:, fold : 2 * fold] = 0
            return out.view(BT, W, C3)
        nxt, prv = self.neighbours(segment)
        buf = qkv.new_zeros(BT * W + 1, C3).index_copy_(0, self.frame_slot, qkv)
        kv = buf.view(-1, 3, C)[:, 1:]
        taken = kv[:, :, :fold].index_select(0, nxt), kv[:, :, fold : 2 * fold].index_select(0, prv)
        kv[:, :, :fold].index_copy_(0, self.frame_slot, taken[0])
        kv[:, :, fold : 2 * fold].index_copy_(0, self.frame_slot, taken[1])
        return buf[:-1].view(BT, W, C3)

    @property
    def patch_slots(self) -> Tensor:
        """Spatial-view slot of every patch of the grid, ``[B * T * S]`` (that of a neighbour where it is dropped)."""
        return self.slot_of.view(self.B * self.T, 1 + self.S)[:, 1:].flatten()

    # ------------------------------------------------------------------------------ TimeSformer's time axis
    def _temporal(self, positions: int) -> None:
        B, T, S = self.B, self.T, self.S
        live = self.alive.any(1).flatten()  # [B * S]
        rank = live.long().cumsum(0) - 1
        self.live_positions = compact_index(live, positions)
        g = self.grid_index  # patch rows only (TimeSformer layouts have no CLS rows)
        frame, s = g // (1 + S), g % (1 + S) - 1
        b, t = frame // T, frame % T
        self.time_slot = rank.index_select(0, b * S + s) * T + t
        self.time_mask = self.alive.transpose(1, 2).reshape(B * S, T).index_select(0, self.live_positions)[
            :, None, None, :]

    def pad_time(self, t: Tensor) -> Tensor:
        """Packed patch rows -> the temporal view ``[P, T, D]`` (every live patch position's frames)."""
        B, T, S, D = self.B, self.T, self.S, t.shape[-1]
        if self.uniform:
            return t.view(B, T, S, D).transpose(1, 2).reshape(B * S, T, D)
        return t.new_zeros(self.positions * T, D).index_copy(0, self.time_slot, t).view(self.positions, T, D)

    def pack_time(self, p: Tensor) -> Tensor:
        """Temporal view ``[P, T, D]`` -> packed patch rows."""
        B, T, S, D = self.B, self.T, self.S, p.shape[-1]
        if self.uniform:
            return p.reshape(B, S, T, D).transpose(1, 2).reshape(self.rows, D)
        return p.reshape(-1, D).index_select(0, self.time_slot)
