import os

# Tests never touch the network (set before timm / huggingface_hub are imported).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from timm.models.vision_transformer import VisionTransformer  # noqa: E402


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
