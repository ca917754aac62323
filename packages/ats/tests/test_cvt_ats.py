"""ATS in stage 3 of a CvT with the ``linear`` projection (ats.backbones.cvt.apply): the paper's default stages, the
dense count against FlopCounterMode, compiled equals eager, a ``dw_bn`` CvT refused. The image ViT's semantics on
CvT's token sets are tested with every backbone's in test_backbones_ats.py, on :func:`tiny_cvt`."""


import pytest
import torch
from vitbench.flops import flop_counter_gmacs
from vitbench.testing import compile_backends

import ats
from ats import patch
from ats.backbones import cvt, geometry
from ats.flops import dense_gmacs



def tiny_cvt(projection: str = "linear", seed: int = 0) -> cvt.CvT:
    """A small CvT (96 px: stage 3 on a 6 x 6 grid + CLS, 4 blocks) with random weights whose attention is peaked
    enough for ATS to drop tokens."""
    torch.manual_seed(seed)
    model = cvt.CvT(img_size=96, depths=(1, 1, 4), dims=(16, 32, 64), heads=(1, 2, 4), num_classes=10,
                    projection=projection).eval()
    with torch.no_grad():
        for blk in model.blocks if projection == "linear" else ():
            blk.attn.qkv.weight.mul_(4.0)
    return model


@pytest.fixture
def clips():
    torch.manual_seed(2)
    return torch.randn(5, 3, 96, 96)


def test_default_stages_are_the_papers_and_cvt_is_dispatched():
    model = cvt.CvT(img_size=96, depths=(1, 1, 10), dims=(16, 32, 64), heads=(1, 2, 4), num_classes=10,
                    projection="linear")
    ats.apply(model, rho=0.9)
    assert model.record.config.stages == tuple(range(9)) == cvt.STAGES
    assert isinstance(model, cvt.ATSCvT) and isinstance(model, cvt.CvT)


def test_dense_count_of_the_linear_cvt_is_flop_counters():
    model = tiny_cvt()
    assert dense_gmacs(geometry(model), layernorm=False) == pytest.approx(
        flop_counter_gmacs(model, torch.randn(1, 3, 96, 96)), rel=1e-9)


@pytest.mark.parametrize("backend", compile_backends())
def test_compiled_equals_eager(clips, backend):
    model = ats.apply(tiny_cvt(), stages=[1, 2], rho=0.72)
    with torch.no_grad():
        ref = model(clips)
        ref_kept = [model.record.kept[b].clone() for b in (1, 2)]
        patch.compile_ats(model, backend=backend)
        out = model(clips)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    assert all(torch.equal(model.record.kept[b], k) for b, k in zip((1, 2), ref_kept))


def test_a_cvt_with_convolutional_projections_is_refused_in_one_sentence():
    with pytest.raises(ValueError, match="projection='linear'"):
        ats.apply(tiny_cvt("dw_bn"))
    with pytest.raises(ValueError, match="stages"):
        ats.apply(tiny_cvt(), stages=[4])
