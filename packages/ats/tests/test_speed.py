import pytest
from vitbench.syncs import count_syncs

import ats
from conftest import tiny_vit


@pytest.mark.parametrize("cfg", [dict(), dict(rho=0.72), dict(mode="paper", rho=0.87), dict(variant="topk", rho=0.8)],
                         ids=str)
def test_one_host_sync_per_ats_stage(images, cfg):
    """The per-image counts of a stage are read once; everything else stays on the device."""
    model = ats.apply(tiny_vit(), **cfg)
    syncs = count_syncs(model, images)
    assert syncs == {"total": 9, "tolist": 9}


def test_single_stage_has_one_host_sync(images):
    assert count_syncs(ats.apply(tiny_vit(), stages=[3], k=20), images)["total"] == 1
