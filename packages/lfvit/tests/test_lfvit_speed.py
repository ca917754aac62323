import torch
import pytest
from vitbench.syncs import count_syncs

from vitbench.testing import compile_backends
from lfvit.model import LFVisionTransformer, eta_for_share


def test_early_exit_has_one_host_sync(digits_model):
    x = torch.randn(6, 3, 112, 112, generator=torch.Generator().manual_seed(0))
    eta = eta_for_share(digits_model, x, 0.5)  # half the images go on to the focus stage
    assert count_syncs(lambda t: digits_model.forward_early_exit(t, eta), x) == {"total": 1, "nonzero": 1}
    assert digits_model.record.exit_stage.sum() == 3
    assert count_syncs(digits_model, x) == {"total": 0}


def test_eta_for_share_sends_that_share_to_focus(digits_model):
    x = torch.randn(9, 3, 112, 112, generator=torch.Generator().manual_seed(3))
    for share, reached in ((0.0, 0), (0.22, 2), (1.0, 9)):
        with torch.no_grad():
            digits_model.forward_early_exit(x, eta_for_share(digits_model, x, share))
        assert digits_model.record.exit_stage.sum() == reached
    with pytest.raises(ValueError):
        eta_for_share(digits_model, x, 1.5)


def tiny_lfvit():
    torch.manual_seed(0)
    return LFVisionTransformer(img_size=32, patch_size=4, embed_dim=16, depth=2, num_heads=2, num_classes=10,
                               gca_start=1, region_size=2).eval()


@pytest.mark.parametrize("backend", compile_backends())
def test_compiled_stages_equal_eager(backend):
    model = tiny_lfvit()
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        conf = model(x).location.softmax(-1).amax(-1).sort().values
        eta = float((conf[1] + conf[2]) / 2)
        ref = model.forward_early_exit(x, eta)
        window = model.record.window.clone()
        model.compile_stages(backend=backend)
        out = model.forward_early_exit(x, eta)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    assert torch.equal(model.record.window, window)


def test_bf16_autocast_is_finite_and_agrees(digits_model):
    x = torch.randn(6, 3, 112, 112, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = digits_model(x)
        window = digits_model.record.window.clone()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = digits_model(x)
    assert torch.isfinite(out.focus.float()).all() and torch.isfinite(out.location.float()).all()
    assert (out.focus.float().argmax(-1) == ref.focus.argmax(-1)).float().mean() >= 0.5
    assert (digits_model.record.window == window).all(-1).float().mean() >= 0.5
