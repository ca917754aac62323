import pytest
import torch
from vitbench.syncs import count_syncs

from vitbench.testing import compile_backends, tiny_vit

import liferegress


@pytest.mark.parametrize("mode", ["hard", "soft", "mask"])
def test_no_host_sync(make_vit, images, mode):
    model = liferegress.apply(make_vit(), keep_rate=0.7, mode=mode)
    assert count_syncs(model, images) == {"total": 0}


@pytest.mark.parametrize("backend", compile_backends())
def test_fullgraph_compile_equals_eager(images, backend):
    """One graph (fullgraph=True), on a 3-block model pruning before blocks 1 and 2."""
    torch.manual_seed(0)
    vit = tiny_vit(depth=3, patch_size=4, peak=None, seed=None)
    model = liferegress.apply(vit, keep_counts=(120, 60), drop_layers=(1, 2))
    with torch.no_grad():
        ref = model(images)
        kept = model.record.kept_indices[1].clone()
        out = torch.compile(model, fullgraph=True, backend=backend)(images)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    assert torch.equal(model.record.kept_indices[1], kept)


@pytest.mark.parametrize("mode", ["hard", "soft"])
def test_bf16_autocast_is_finite_and_agrees(make_vit, images, mode):
    model = liferegress.apply(make_vit(), keep_rate=0.7, mode=mode)
    with torch.no_grad():
        ref = model(images)
        lives = model.record.lives.clone()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(images)
    assert torch.isfinite(out.float()).all() and torch.isfinite(model.record.lives.float()).all()
    assert (out.float().argmax(-1) == ref.argmax(-1)).float().mean() >= 0.5
    assert (model.record.lives.float() - lives).abs().max() < 0.5  # lives are in layer units
