import pytest
import torch
import torch.nn.functional as F

import liferegress
from liferegress.attention import LifeRegressionAttention, key_bias_attention


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_key_bias_attention_matches_sdpa_and_its_gradients(dtype):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 11, 8, generator=g, dtype=dtype, requires_grad=True) for _ in range(3))
    bias = torch.randn(2, 1, 1, 11, generator=g, dtype=dtype, requires_grad=True)
    out = key_bias_attention(q, k, v, bias)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    grad = torch.randn(out.shape, generator=g, dtype=dtype)
    tol = dict(atol=1e-12, rtol=1e-10) if dtype == torch.float64 else dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, ref, **tol)
    for a, b in zip(torch.autograd.grad(out, (q, k, v, bias), grad), torch.autograd.grad(ref, (q, k, v, bias), grad)):
        torch.testing.assert_close(a, b, **tol)
    with pytest.raises(ValueError, match="key bias"):
        key_bias_attention(q, k, v, bias[:, 0])


def test_patched_soft_training_gradients_equal_unfused_reference(make_vit, images):
    model = liferegress.apply(make_vit(), keep_rate=0.7, mode="soft").train()
    torch.nn.init.normal_(model.life_predictor.W)
    assert all(type(blk.attn) is LifeRegressionAttention for blk in model.blocks)
    targets = torch.tensor([0, 1, 2])
    F.cross_entropy(model(images), targets).backward()
    fused = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    for blk in model.blocks:
        blk.attn.fused_attn = False  # timm's explicit softmax path
    F.cross_entropy(model(images), targets).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, fused[n], atol=1e-5, rtol=1e-4, msg=n)
    assert fused["life_predictor.W"].abs().sum() > 0
