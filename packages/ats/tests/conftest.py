import os
import pytest
import torch
from timm.models.vision_transformer import VisionTransformer


def tiny_vit(img_size: int = 56, peak: float = 4.0, seed: int = 0, **kw) -> VisionTransformer:
    """A depth-12 ViT with a CLS token (patch 8: 56 px -> 7x7 grid, 112 px -> 14x14), peaked attention."""
    torch.manual_seed(seed)
    cfg = dict(img_size=img_size, patch_size=8, embed_dim=32, depth=12, num_heads=2, num_classes=10)
    cfg.update(kw)
    model = VisionTransformer(**cfg).eval()
    with torch.no_grad():
        for p in model.parameters():  # timm's init leaves biases/norms trivial; give every parameter some spread
            p.add_(torch.randn_like(p) * 0.02)
        for blk in model.blocks:
            blk.attn.qkv.weight[: 2 * blk.attn.attn_dim] *= peak
    return model


@pytest.fixture
def images():
    torch.manual_seed(1)
    return torch.randn(6, 3, 56, 56)


def compile_backends():
    """``aot_eager`` always (graph capture: fullgraph, guards, dynamic shapes); inductor (code generation, minutes on
    2 cores) with ``VITBENCH_INDUCTOR_TESTS=1``."""
    inductor = pytest.mark.skipif(os.environ.get("VITBENCH_INDUCTOR_TESTS") != "1",
                                  reason="inductor compile takes minutes here; set VITBENCH_INDUCTOR_TESTS=1")
    return ["aot_eager", pytest.param("inductor", marks=[pytest.mark.slow, inductor])]


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes over a minute on 2 CPU cores")
