import math
import statistics

import pytest
import torch

from liferegress.life import (
    global_importance,
    keep_order,
    keep_schedule,
    kept_indices,
    life_statistics,
    lives_from_scores,
    log_soft_weights,
    soft_weights,
    step_weights,
    tokens_per_block,
)

EXACT = {0.9: (179, 163, 148), 0.8: (159, 129, 105), 0.7: (140, 100, 72)}


@pytest.mark.parametrize("rho", sorted(EXACT))
def test_keep_schedule_matches_released_counts(rho):
    assert keep_schedule(rho, 197) == EXACT[rho]


def test_keep_schedule_general():
    assert keep_schedule(1.0, 197) == (197, 197, 197)
    counts = keep_schedule(0.5, 50, 4)
    assert list(counts) == sorted(counts, reverse=True) and counts[0] <= 50 and counts[-1] >= 2
    for bad in (0.0, 1.2, -0.1):
        with pytest.raises(ValueError, match="keep rate"):
            keep_schedule(bad)


def test_tokens_per_block_and_bad_schedules():
    assert tokens_per_block(EXACT[0.7], (4, 7, 10), 12, 197) == (197,) * 4 + (140,) * 3 + (100,) * 3 + (72,) * 2
    assert tokens_per_block((100,), (6,), 12, 197) == (197,) * 6 + (100,) * 6
    with pytest.raises(ValueError, match="non-increasing"):
        tokens_per_block((140, 150, 72), (4, 7, 10), 12, 197)
    with pytest.raises(ValueError, match="increase strictly"):
        tokens_per_block((140, 100, 72), (4, 4, 10), 12, 197)
    with pytest.raises(ValueError, match="one keep count"):
        tokens_per_block((140, 100), (4, 7, 10), 12, 197)


@pytest.mark.parametrize(("rho", "mu", "sigma"), [(0.9, 10.711, 2.560), (0.8, 9.452, 3.193), (0.7, 8.386, 3.340)])
def test_life_statistics_equal_eqs_9_10(rho, mu, sigma):
    mu_n, sigma_n = life_statistics(EXACT[rho], (4, 7, 10), 12, 197)
    assert 4 + 8 * mu_n == pytest.approx(mu, abs=1e-3)
    assert 8 * sigma_n == pytest.approx(sigma, abs=1e-3)
    # Eq. 9 / Eq. 10 (with the square), 1-indexed layers t, n_t = tokens used by layer t, n_13 = 0
    n = [197] + list(tokens_per_block(EXACT[rho], (4, 7, 10), 12, 197)) + [0]
    N = 197
    mu9 = sum(t * (n[t] - n[t + 1]) for t in range(1, 13)) / N
    var10 = sum((t - mu9) ** 2 * (n[t] - n[t + 1]) for t in range(1, 13)) / N
    assert 4 + 8 * mu_n == pytest.approx(mu9, abs=1e-9)
    assert 8 * sigma_n == pytest.approx(math.sqrt(var10) * math.sqrt(N / (N - 1)), rel=1e-9)


def test_global_importance_is_bilinear_form():
    x = torch.randn(2, 5, 4, dtype=torch.float64)
    W = torch.randn(4, 4, dtype=torch.float64)
    expected = torch.einsum("bnd,de,be->bn", x[:, 1:], W, x[:, 0])
    torch.testing.assert_close(global_importance(x, W), expected)


def test_lives_follow_target_statistics():
    s = torch.randn(4, 196, dtype=torch.float64) * 7 + 3
    mu_n, sigma_n = life_statistics(EXACT[0.7], (4, 7, 10), 12, 197)
    tau = lives_from_scores(s, mu_n, sigma_n, 4, 12)
    assert tau.shape == (4, 197)
    assert torch.all(tau[:, 0] == 12)
    life_n = (tau[:, 1:] - 4) / 8
    torch.testing.assert_close(life_n.mean(1), torch.full((4,), mu_n, dtype=torch.float64))
    torch.testing.assert_close(life_n.std(1), torch.full((4,), sigma_n, dtype=torch.float64), rtol=1e-6, atol=0)
    # invariant to a positive affine change of the scores, monotone in them
    torch.testing.assert_close(lives_from_scores(2 * s + 5, mu_n, sigma_n, 4, 12), tau)
    assert torch.equal(tau[:, 1:].argsort(1), s.argsort(1))


def test_soft_weights_in_unit_interval_and_decreasing():
    tau = torch.tensor([[12.0, 3.0, 6.5, 9.0, 14.0]])
    ages = torch.arange(4, 12, dtype=torch.float32)
    beta = torch.stack([soft_weights(tau, a, 1.5) for a in ages])
    assert torch.all(beta > 0) and torch.all(beta < 1)
    assert torch.all(beta[1:] < beta[:-1])
    assert soft_weights(torch.tensor(5.0), 5.0, 1.5).item() == 0.5
    assert soft_weights(tau, 11, 1.5)[0, 0].item() == pytest.approx(0.8176, abs=1e-4)  # [CLS] at the last block
    torch.testing.assert_close(log_soft_weights(tau, 7, 1.5), soft_weights(tau, 7, 1.5).log())
    assert torch.isfinite(log_soft_weights(torch.tensor([-500.0]), 11, 3.0)).all()
    assert step_weights(tau, 7).tolist() == [[1.0, 0.0, 0.0, 1.0, 1.0]]


def test_log_beta_bias_equals_weighted_softmax_eq6():
    h = torch.randn(2, 3, 6, 6, dtype=torch.float64) * 5
    tau = torch.rand(2, 6, dtype=torch.float64) * 12
    beta = soft_weights(tau, 6, 1.5)[:, None, None, :]
    e = beta * (h - h.amax(-1, keepdim=True)).exp()  # Eq. 6 as the released code computes it
    expected = e / e.sum(-1, keepdim=True)
    got = torch.softmax(h + log_soft_weights(tau, 6, 1.5)[:, None, None, :], dim=-1)
    torch.testing.assert_close(got, expected)


def test_property_1_ranking_by_life_equals_ranking_by_weight():
    g = torch.Generator().manual_seed(0)
    tau = torch.rand(8, 197, generator=g, dtype=torch.float64) * 10 + 3
    tau[:, 0] = 12
    order = keep_order(tau)
    for t in torch.linspace(4, 11, 15, dtype=torch.float64):
        beta = soft_weights(tau, t, 1.5)
        beta[:, 0] = 2.0  # [CLS] is kept first by construction
        assert torch.equal(torch.argsort(beta, dim=1, descending=True, stable=True), order)


def test_keep_order_and_kept_indices():
    tau = torch.tensor([[1.0, 9.0, 5.0, 9.0, 12.5], [12.0, 4.0, 11.0, 3.0, 2.0]])
    order = keep_order(tau)
    assert order.tolist() == [[0, 4, 1, 3, 2], [0, 2, 1, 3, 4]]  # CLS first even with the shortest life; stable ties
    k = kept_indices(order, (4, 3, 1))
    assert [t.shape[1] for t in k] == [4, 3, 1]
    assert all(torch.equal(k[i + 1], k[i][:, : k[i + 1].shape[1]]) for i in range(2))


def test_stdev_is_sample_std():
    mu_n, sigma_n = life_statistics((2,), (1,), 2, 3)
    assert sigma_n == pytest.approx(statistics.stdev([0.0, 1.0, 1.0]))
