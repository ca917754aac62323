import math

import pytest
import torch

from lfvit.focus import (coarse_to_fine_index, fine_to_coarse_index, focus_sequence, focus_sequence_length,
                         upsample_tokens)
from lfvit.localization import (cls_attention, global_class_attention, ngca_scores, num_focus_cells,
                                select_cells, select_window, window_cells)
from lfvit.losses import lfvit_loss


def test_cls_attention_matches_full_map():
    q, k = torch.randn(2, 3, 10, 4), torch.randn(2, 3, 10, 4)
    full = ((q * 0.5) @ k.transpose(-2, -1)).softmax(-1)
    torch.testing.assert_close(cls_attention(q, k, 0.5), full[:, :, 0].mean(1))


def test_gca_is_released_moving_average():
    rows = [torch.rand(2, 50) for _ in range(9)]
    expected = sum(0.01 * 0.99 ** (8 - i) * r for i, r in enumerate(rows))[:, 1:]
    torch.testing.assert_close(global_class_attention(rows, 0.99), expected)
    torch.testing.assert_close(global_class_attention(rows, 0.0), rows[-1][:, 1:])  # beta 0: last block only


def test_num_focus_cells_matches_released():
    assert [num_focus_cells(m, 0.88) for m in (4, 5, 6, 8)] == [15, 22, 32, 57]
    assert num_focus_cells(5, 1.0) == 25


def test_ngca_window_sums_and_argmax():
    g, m = 7, 5
    gca = torch.rand(3, g * g)
    scores = ngca_scores(gca, m)
    assert scores.shape == (3, 3, 3)
    grid = gca.reshape(3, g, g)
    for i in range(3):
        for j in range(3):
            torch.testing.assert_close(scores[:, i, j], grid[:, i:i + m, j:j + m].sum((1, 2)))
    win = select_window(gca, m)
    flat = scores.flatten(1).argmax(1)
    assert torch.equal(win, torch.stack((flat // 3, flat % 3), 1))


def test_window_follows_hot_spot():
    gca = torch.zeros(1, 49)
    gca[0, 6 * 7 + 6] = 1.0  # bottom-right corner
    assert select_window(gca, 5).tolist() == [[2, 2]]
    assert select_window(gca, 5, "max_gca").tolist() == [[2, 2]]
    assert select_window(gca, 5, "negative_ngca").tolist() == [[0, 0]]


@pytest.mark.parametrize("g", [7, 9])
@pytest.mark.parametrize("mode", ["ngca", "negative_ngca", "max_gca", "min_gca", "random"])
def test_region_inside_grid_for_all_m(g, mode):
    gca = torch.rand(16, g * g)
    for m in range(1, g + 1):
        win = select_window(gca, m, mode, torch.Generator().manual_seed(0))
        assert win.min() >= 0 and win.max() <= g - m
        cells = window_cells(win, m, g)
        assert cells.shape == (16, m * m) and cells.min() >= 0 and cells.max() < g * g
        assert all(len(set(c)) == m * m for c in cells.tolist())


def test_region_size_rejected_outside_grid():
    with pytest.raises(ValueError):
        select_window(torch.rand(1, 49), 8)
    with pytest.raises(ValueError):
        select_window(torch.rand(1, 49), 0)


def test_select_cells_top_k_and_partition():
    g, m, alpha = 7, 5, 0.88
    gca = torch.rand(4, g * g)
    win = select_window(gca, m)
    kept, reused = select_cells(gca, win, m, alpha)
    assert kept.shape == (4, 22) and reused.shape == (4, 49 - 22)
    inside = window_cells(win, m, g)
    for b in range(4):
        assert sorted(kept[b].tolist() + reused[b].tolist()) == list(range(49))
        assert set(kept[b].tolist()) <= set(inside[b].tolist())
        top = gca[b, inside[b]].topk(22).indices
        assert set(inside[b, top].tolist()) == set(kept[b].tolist())
        assert torch.all(gca[b, kept[b]][:-1] >= gca[b, kept[b]][1:])


def test_coarse_to_fine_children():
    g = 7
    cells = torch.tensor([[0, 8, 48]])
    fine = coarse_to_fine_index(cells, g)
    assert fine.tolist() == [[0, 30, 180, 1, 31, 181, 14, 44, 194, 15, 45, 195]]
    assert torch.equal(fine_to_coarse_index(fine, g), cells.repeat(1, 4))
    # matches the released formula 4*idx - 2*(idx % g)
    idx = torch.arange(49)[None]
    assert torch.equal(coarse_to_fine_index(idx, g)[:, :49], 4 * idx - 2 * (idx % g))


def test_upsample_is_nearest():
    t = torch.randn(2, 49, 3)
    ref = torch.nn.functional.interpolate(t.transpose(1, 2).reshape(2, 3, 7, 7), (14, 14), mode="nearest")
    torch.testing.assert_close(upsample_tokens(t, 7), ref.flatten(2).transpose(1, 2))


@pytest.mark.parametrize("m,expected", [(4, 95), (5, 116), (6, 146)])
def test_focus_sequence_length(m, expected):
    g, d, b = 7, 8, 2
    gca = torch.rand(b, g * g)
    kept, reused = select_cells(gca, select_window(gca, m), m, 0.88)
    seq, fine_idx = focus_sequence(torch.zeros(b, 1, d), torch.randn(b, 4 * g * g, d), torch.randn(b, g * g, d),
                                   torch.randn(1, 4 * g * g, d), torch.randn(b, g * g, d), kept, reused, g)
    k = num_focus_cells(m, 0.88)
    assert seq.shape == (b, expected, d) == (b, focus_sequence_length(g, k), d)
    assert fine_idx.shape == (b, 4 * k)


def test_focus_sequence_values():
    g, d = 7, 4
    fine, reuse, pos = torch.randn(1, 196, d), torch.randn(1, 49, d), torch.randn(1, 196, d)
    coarse = torch.randn(1, 49, d)
    kept, reused = torch.tensor([[8]]), torch.tensor([[0, 1]])
    seq, idx = focus_sequence(torch.ones(1, 1, d), fine, reuse, pos, coarse, kept, reused, g)
    assert idx.tolist() == [[30, 31, 44, 45]]
    torch.testing.assert_close(seq[0, 1], fine[0, 30] + reuse[0, 8] + pos[0, 30])
    torch.testing.assert_close(seq[0, 5:], coarse[0, :2])


def test_loss_kl_direction_and_variants():
    z_l, z_f = torch.randn(4, 10, requires_grad=True), torch.randn(4, 10, requires_grad=True)
    y = torch.randint(10, (4,))
    ce = torch.nn.functional.cross_entropy
    loss = lfvit_loss(z_l, z_f, y, ce)
    p_f = z_f.softmax(-1)
    kl = (p_f * (p_f.log() - z_l.log_softmax(-1))).sum(-1).mean()
    torch.testing.assert_close(loss, ce(z_f, y) + kl)
    loss.backward()
    # the KL term does not reach the focus logits: their gradient is the CE gradient only
    torch.testing.assert_close(z_f.grad, (p_f - torch.nn.functional.one_hot(y, 10)).detach() / 4)
    torch.testing.assert_close(lfvit_loss(z_l, z_f, y, ce, "ce_ce"), ce(z_f, y) + ce(z_l, y))
    with pytest.raises(ValueError):
        lfvit_loss(z_l, z_f, y, ce, "kl_kl")
    assert math.isfinite(loss.item())
