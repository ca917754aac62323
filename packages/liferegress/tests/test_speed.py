import pytest
from vitbench.syncs import count_syncs

import liferegress


@pytest.mark.parametrize("mode", ["hard", "soft", "mask"])
def test_no_host_sync(make_vit, images, mode):
    model = liferegress.apply(make_vit(), keep_rate=0.7, mode=mode)
    assert count_syncs(model, images) == {"total": 0}
