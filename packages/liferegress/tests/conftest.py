import functools
import os

# Tests never touch the network (set before timm / huggingface_hub are imported).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from vitbench.testing import tiny_vit  # noqa: E402


@pytest.fixture
def make_vit():
    torch.manual_seed(0)
    return functools.partial(tiny_vit, patch_size=4, peak=None, seed=None)


@pytest.fixture
def images():
    return torch.randn(3, 3, 56, 56, generator=torch.Generator().manual_seed(1))
