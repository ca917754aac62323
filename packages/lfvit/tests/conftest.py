import os
import pytest
import timm
import torch

import lfvit  # noqa: F401  (registers the models)


@pytest.fixture(scope="session")
def digits_model():
    torch.manual_seed(0)
    model = timm.create_model("lfvit_vit_digits_patch8_112").eval()
    with torch.no_grad():  # sharper attention than the 0.02 init, so GCA rankings are well separated
        for name, p in model.named_parameters():
            if p.dim() > 1 or "pos_embed" in name or "cls_token" in name:
                p.normal_(0, 0.1)
    return model


def compile_backends():
    """``aot_eager`` always (graph capture: fullgraph, guards, dynamic shapes); inductor (code generation, minutes on
    2 cores) with ``VITBENCH_INDUCTOR_TESTS=1``."""
    inductor = pytest.mark.skipif(os.environ.get("VITBENCH_INDUCTOR_TESTS") != "1",
                                  reason="inductor compile takes minutes here; set VITBENCH_INDUCTOR_TESTS=1")
    return ["aot_eager", pytest.param("inductor", marks=[pytest.mark.slow, inductor])]


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes over a minute on 2 CPU cores")
