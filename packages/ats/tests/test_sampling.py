from functools import partial

import pytest
import torch

from ats import sampling


def released_semantics(scores: torch.Tensor, points: int) -> torch.Tensor:
    """The released sampler for one image, brute force (sort, min-max normalised CDF, nearest-value picks, dedup):
    kept candidates in ascending-score order."""
    s, order = torch.sort(scores)
    cdf = torch.cumsum(s, 0)
    ncdf = (cdf - cdf.min()) / ((cdf.max() - cdf.min()) / 1.0)
    ys_start = (ncdf + (ncdf == 0).float() * 1e8).min()
    n = points + 1
    lin = torch.linspace(0, 1.0, steps=points)
    ys = ys_start + ((lin * (n - 2)) - ys_start * torch.arange(points).float()) / (n - 2)
    picks = [int(torch.argmin((y - ncdf).abs())) for y in ys]  # first index on ties
    uniq = sorted(set(picks))
    if uniq and uniq[-1] == 1:  # the released dedup's pad value 1
        uniq = uniq[:-1]
    return order[torch.tensor(uniq, dtype=torch.long)]


def random_scores(B, M, peak, seed):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(B, M, generator=g) * peak).exp()
    return s / s.sum(-1, keepdim=True)


@pytest.mark.parametrize("n,k,expected", [(197, 1.0, 197), (197, 0.87, 171), (197, 0.72, 142), (197, 108, 108),
                                          (20, 0.3, 8), (5, 0.5, 5), (197, 300, 197), (130, 0.5, 65)])
def test_stage_k(n, k, expected):
    assert sampling.stage_k(n, k) == expected


@pytest.mark.parametrize("peak", [0.5, 2.0, 4.0])
def test_official_select_matches_released_semantics_per_image(peak):
    B, M = 5, 196
    scores = random_scores(B, M, peak, seed=int(peak * 10))
    n = torch.tensor([196, 150, 90, 196, 12])
    s = scores.clone()
    for b in range(B):  # each image's own normalised scores, padding after them
        s[b, n[b]:] = 0
        s[b] /= s[b].sum()
    points = torch.tensor([196, 196, 60, 107, 7])
    kept, count = sampling.official_select(s, n, points, sampling.linspace_rows(196))
    for b in range(B):
        ref = released_semantics(s[b, : n[b]], int(points[b]))
        assert torch.equal(kept[b, : count[b]], ref)
        assert (kept[b, count[b]:] == -1).all()


def test_official_select_properties():
    scores = random_scores(4, 196, 3.0, seed=3)
    n = torch.full((4,), 196)
    kept, count = sampling.official_select(scores, n, torch.full((4,), 196), sampling.linspace_rows(196))
    order = scores.argsort(-1)
    for b in range(4):
        k = kept[b, : count[b]]
        assert k.unique().numel() == count[b]  # dedup
        assert k[-1] == order[b, -1]  # the top token is always kept
        assert order[b, 0] not in k  # the lowest token is never kept (unpadded image)
        assert order[b, 1] in k  # ys_start hits the 2nd-lowest
        assert (scores[b, k].diff() >= 0).all()  # ascending-score order
    assert (count < 196).all() and count.min() < count.max()  # adaptive K'


def test_official_select_three_token_quirk():
    """The released dedup drops a largest pick equal to 1: with two candidates only the CLS survives."""
    kept, count = sampling.official_select(torch.tensor([[0.3, 0.7]]), torch.tensor([2]), torch.tensor([196]),
                                           sampling.linspace_rows(196))
    assert count.item() == 0


def test_nearest_index_equals_brute_force_with_ties():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        vals = torch.randint(0, 30, (3, 40), generator=g).float().sort(-1).values / 30  # many duplicates
        q = torch.randint(0, 61, (3, 25), generator=g).float() / 60  # exact midpoints included
        n = torch.tensor([40, 17, 1])
        got = sampling.nearest_index(vals, q, n)
        for b in range(3):
            ref = torch.stack([torch.argmin((y - vals[b, : n[b]]).abs()) for y in q[b]])
            assert torch.equal(got[b], ref)


def test_paper_select_is_inverse_cdf():
    scores = random_scores(3, 49, 2.0, seed=5)
    n = torch.full((3,), 49)
    points = torch.tensor([48, 20, 8])
    kept, count = sampling.paper_select(scores, n, points)
    cdf = scores.cumsum(-1)
    for b in range(3):
        G = int(points[b])
        ks = [(2 * i - 1) / (2 * G) for i in range(1, G + 1)]
        ref = sorted({min(int((cdf[b] < k).sum()), 48) for k in ks})  # Psi(k) = min{i : CDF_i >= k}
        assert kept[b, : count[b]].tolist() == ref
        assert count[b] <= G


def test_paper_select_balanced_scores_keep_k():
    """Uniform scores: every one of the G samples hits a different token (K' = K)."""
    scores = torch.full((1, 100), 0.01)
    kept, count = sampling.paper_select(scores, torch.tensor([100]), torch.tensor([50]))
    assert count.item() == 50 and kept[0, :50].unique().numel() == 50 and (kept[0, 50:] == -1).all()


def test_topk_select_equals_plain_topk():
    scores = random_scores(3, 60, 1.0, seed=7)
    n = torch.tensor([60, 60, 30])
    kept, count = sampling.topk_select(scores, n, torch.tensor([10, 59, 40]))
    assert torch.equal(kept[0, :10], scores[0].topk(10).indices)
    assert torch.equal(kept[1, :59], scores[1].topk(59).indices)
    assert torch.equal(kept[2, :30], scores[2, :30].topk(30).indices) and count.tolist() == [10, 59, 30]


def test_scores_normalised_and_heads_summed():
    g = torch.Generator().manual_seed(2)
    attn = torch.rand(2, 3, 10, generator=g)
    vn = torch.rand(2, 10, generator=g) + 0.5
    n = torch.tensor([10, 6])
    s = sampling.significance_scores(attn, vn, n)
    assert torch.allclose(s.sum(-1), torch.ones(2))
    assert (s[1, 6:] == 0).all()
    ref = attn[0].sum(0) * vn[0]
    assert torch.allclose(s[0], ref / ref.sum())
    vh = torch.rand(2, 3, 10, generator=g) + 0.5
    sp = sampling.significance_scores_per_head(attn, vh, n)
    per = attn[0] * vh[0]
    assert torch.allclose(sp[0], (per / per.sum(-1, keepdim=True)).sum(0) / 3)


def test_cls_attention_eps_softmax():
    g = torch.Generator().manual_seed(4)
    q, k = torch.randn(1, 2, 1, 8, generator=g), torch.randn(1, 2, 5, 8, generator=g)
    n = torch.tensor([5])
    plain = sampling.cls_attention(q, k, 8 ** -0.5, n)
    assert torch.allclose(plain, ((q @ k.transpose(-2, -1)).squeeze(2) * 8 ** -0.5).softmax(-1))
    e = ((q @ k.transpose(-2, -1)).squeeze(2) * 8 ** -0.5)
    e = (e - e.amax(-1, keepdim=True)).exp()
    ref = (e + 1e-6 / 5) / (e.sum(-1, keepdim=True) + 1e-6)
    assert torch.allclose(sampling.cls_attention(q, k, 8 ** -0.5, n, eps=1e-6), ref)
    masked = sampling.cls_attention(q, k, 8 ** -0.5, torch.tensor([3]))
    assert (masked[..., 3:] == 0).all() and torch.allclose(masked.sum(-1), torch.ones(1, 2))


def test_official_grid_endpoints_and_per_image_sizes():
    start, points = torch.tensor([0.01, 0.2, 0.05]), torch.tensor([196, 196, 60])
    ys = sampling.official_grid(start, points, sampling.linspace_rows(196))
    assert torch.allclose(ys[:2, 0], start[:2]) and torch.allclose(ys[:2, -1], torch.ones(2))
    assert (ys[:2].diff(dim=-1) > 0).all()
    for b, g in enumerate(points.tolist()):  # the released create_ys of each image's own size, bitwise
        n = g + 1
        ref = start[b] + ((torch.linspace(0, 1.0, steps=g) * (n - 2)) - start[b] * torch.arange(g).float()) / (n - 2)
        assert torch.equal(ys[b, :g], ref)


def test_linspace_rows_equal_linspace():
    rows = sampling.linspace_rows(30)
    assert rows.shape == (31, 30) and (rows[0] == 0).all()
    for g in (1, 2, 7, 30):
        assert torch.equal(rows[g, :g], torch.linspace(0, 1.0, steps=g)) and (rows[g, g:] == 0).all()


def test_selection_is_deterministic():
    scores = random_scores(4, 196, 2.0, seed=9)
    n, points = torch.full((4,), 196), torch.full((4,), 150)
    lin = sampling.linspace_rows(196)
    for fn in (partial(sampling.official_select, lin=lin), sampling.paper_select, sampling.topk_select):
        a, b = fn(scores, n, points), fn(scores.clone(), n, points)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("packed", [False, True])
def test_rows_of_equal_and_ragged_counts(packed):
    """Flat rows of the kept positions, for equal counts (shortcut) and ragged counts, uniform and packed input."""
    from ats.tokens import TokenSets

    lengths = [5, 3, 4] if packed else [5, 5, 5]
    x = torch.arange(sum(lengths)).float()[:, None] if packed else torch.arange(15).float().view(3, 5, 1)
    ragged = torch.tensor([[0, 1, 2, 3, 4], [0, 1, 2, -1, -1], [0, 1, 2, 3, -1]])
    origin = ragged if packed else torch.arange(5).expand(3, 5)
    tokens = TokenSets(x, torch.tensor(lengths), origin, lengths)
    starts = [0, 5, 8] if packed else [0, 5, 10]
    for positions, sizes in ((torch.tensor([[0, 2], [0, 1], [0, 3]]), [2, 2, 2]),
                             (torch.tensor([[0, 4, 2], [0, -1, -1], [0, 3, -1]]), [3, 1, 2])):
        rows = tokens.rows_of(positions, torch.tensor(sizes), sizes)
        ref = [starts[b] + int(p) for b in range(3) for p in positions[b, : sizes[b]]]
        assert rows.tolist() == ref


def test_value_norms_of_the_concatenation_and_per_head():
    v = torch.randn(2, 3, 5, 4)
    per_head = sampling.value_norms(v, per_head=True)
    concat = torch.cat(list(v.unbind(1)), -1)  # [B, N, H*d], head-major as the released code concatenates
    torch.testing.assert_close(sampling.value_norms(v), concat.norm(dim=-1))
    torch.testing.assert_close(per_head.pow(2).sum(1), sampling.value_norms(v).pow(2))
    assert per_head.shape == (2, 3, 5)
