import os
import pytest
import torch
from timm.models.vision_transformer import VisionTransformer


def tiny_vit(**kwargs) -> VisionTransformer:
    """Depth-12 ViT with the papers' 14 x 14 grid (197 tokens) that runs in milliseconds."""
    args = dict(img_size=56, patch_size=4, embed_dim=32, depth=12, num_heads=2, num_classes=10)
    return VisionTransformer(**{**args, **kwargs}).eval()


@pytest.fixture
def make_vit():
    torch.manual_seed(0)
    return tiny_vit


@pytest.fixture
def images():
    return torch.randn(3, 3, 56, 56, generator=torch.Generator().manual_seed(1))


def compile_backends():
    """``aot_eager`` always (graph capture: fullgraph, guards, dynamic shapes); inductor (code generation, minutes on
    2 cores) with ``VITBENCH_INDUCTOR_TESTS=1``."""
    inductor = pytest.mark.skipif(os.environ.get("VITBENCH_INDUCTOR_TESTS") != "1",
                                  reason="inductor compile takes minutes here; set VITBENCH_INDUCTOR_TESTS=1")
    return ["aot_eager", pytest.param("inductor", marks=[pytest.mark.slow, inductor])]


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes over a minute on 2 CPU cores")
