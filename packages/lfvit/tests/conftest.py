import os

# Tests never touch the network (set before timm / huggingface_hub are imported).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402

import lfvit  # noqa: E402, F401  (registers the models)


@pytest.fixture(scope="session")
def digits_model():
    torch.manual_seed(0)
    model = timm.create_model("lfvit_vit_digits_patch8_112").eval()
    with torch.no_grad():  # sharper attention than the 0.02 init, so GCA rankings are well separated
        for name, p in model.named_parameters():
            if p.dim() > 1 or "pos_embed" in name or "cls_token" in name:
                p.normal_(0, 0.1)
    return model
