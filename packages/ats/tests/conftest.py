import os

# Tests never touch the network (set before timm / huggingface_hub are imported).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture
def images():
    torch.manual_seed(1)
    return torch.randn(6, 3, 56, 56)
