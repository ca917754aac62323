import os

# Tests never touch the network (set before timm / huggingface_hub are imported).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from timm.models.vision_transformer import VisionTransformer  # noqa: E402


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
