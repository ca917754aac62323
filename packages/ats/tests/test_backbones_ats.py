"""The image ViT's ATS semantics on every other backbone family (CvT's stage 3, PS-ViT's transformer module), one
test per property for each family: no stage equals the dense model, top-K at K = N keeps every token and the logits,
each image alone equals its batch, CLS first and K' <= K, per-image FLOPs against FlopCounterMode, one host sync per
ATS stage, resuming from dense hidden states. Each family's own checks stay in its file."""

import copy
from dataclasses import dataclass
from collections.abc import Callable

import pytest
import torch
from test_ats_patch import assert_each_alone_equals_batch, run
from test_cvt_ats import tiny_cvt
from test_psvit_ats import tiny_psvit
from vitbench.flops import flop_counter_gmacs
from vitbench.syncs import count_syncs

import ats
from ats import patch, sampling
from ats.backbones import geometry
from ats.flops import dense_gmacs, per_image_gmacs, upper_bound_gmacs

TOKENS = 37  # both tiny models: a 6 x 6 grid + CLS


@dataclass(frozen=True)
class Tiny:
    """A tiny random-weight model of one family, the blocks ATS runs in by default and its input batch."""

    build: Callable[[], torch.nn.Module]
    stages: tuple[int, ...]
    img_size: int
    batch: int

    def ats(self, **cfg) -> torch.nn.Module:
        return ats.apply(self.build(), **{"stages": self.stages, **cfg})

    def images(self) -> torch.Tensor:
        torch.manual_seed(2)
        return torch.randn(self.batch, 3, self.img_size, self.img_size)

    def single(self) -> dict:
        """One stage (the middle default one) at an absolute K."""
        return dict(stages=[self.stages[1]], k=12)

    def configs(self) -> list[dict]:
        """Defaults, rho, the paper's mode, one stage at an absolute K, top-K."""
        return [dict(), dict(rho=0.72), dict(mode="paper", rho=0.87), self.single(), dict(variant="topk", rho=0.8)]


FAMILIES = {"cvt": Tiny(tiny_cvt, (0, 1, 2), 96, 5), "psvit": Tiny(tiny_psvit, (1, 2, 3), 64, 4)}
CASES = [(f, i) for f in FAMILIES for i in range(5)]


@pytest.fixture(params=list(FAMILIES))
def family(request) -> Tiny:
    return FAMILIES[request.param]


def test_no_stage_equals_the_dense_model(family):
    images, model = family.images(), family.build()
    ref = run(model, images)
    keys = list(model.state_dict())
    ats.apply(model, stages=[])
    torch.testing.assert_close(run(model, images), ref)
    assert list(model.state_dict()) == keys
    assert model.record.token_counts()[1].eq(TOKENS).all() and model.record.grid == (6, 6)


def test_topk_at_k_equal_n_keeps_every_token_and_the_logits(family):
    """K = N with top-K selection keeps every patch: the same model up to the token order (float error)."""
    images, model = family.images(), family.build()
    ref = run(model, images)
    ats.apply(model, stages=range(len(model.blocks)), rho=1.0, variant="topk")
    torch.testing.assert_close(run(model, images), ref, atol=1e-5, rtol=1e-5)
    assert model.record.token_counts()[1].eq(TOKENS).all()


@pytest.mark.parametrize("name, i", CASES, ids=str)
def test_batch_invariance(name, i):
    tiny = FAMILIES[name]
    assert_each_alone_equals_batch(tiny.ats(**tiny.configs()[i]), tiny.images())


@pytest.mark.parametrize("name, i", [(f, i) for f, i in CASES if i < 3], ids=str)
def test_cls_first_kept_counts_bounded_and_adaptive(name, i):
    tiny = FAMILIES[name]
    model = tiny.ats(**tiny.configs()[i])
    run(model, tiny.images())
    info = model.record
    n_in, n_out = info.token_counts()
    for j, b in enumerate(info.config.stages):
        for i, kept in enumerate(info.kept_indices(b)):
            assert kept[0] == 0 and kept.unique().numel() == kept.numel() and kept.max() < TOKENS
            assert n_out[i, b] <= sampling.stage_k(int(n_in[i, b]), info.config.k[j])
    assert n_out[:, -1].min() < TOKENS


@pytest.mark.parametrize("name, single", [(f, s) for f in FAMILIES for s in (False, True)], ids=str)
def test_per_image_gmacs_equal_flop_counter(name, single):
    tiny = FAMILIES[name]
    model, images = tiny.ats(**(tiny.single() if single else dict(rho=0.8))), tiny.images()
    geom = geometry(model)
    for n in range(2):
        measured = flop_counter_gmacs(model, images[n : n + 1])
        analytic = float(per_image_gmacs(geom, model.record, layernorm=False)[0])
        assert analytic == pytest.approx(measured, rel=1e-9)
    run(model, images)
    g = per_image_gmacs(geom, model.record)
    assert (g < dense_gmacs(geom)).all() and (g <= upper_bound_gmacs(geom, model.record.config) + 1e-12).all()


def test_one_host_sync_per_ats_stage(family):
    assert count_syncs(family.ats(rho=0.8), family.images()) == {"total": 3, "tolist": 3}


def test_resuming_from_dense_hidden_states_equals_the_full_forward(family):
    images, dense = family.images(), family.build()
    model = ats.apply(copy.deepcopy(dense), stages=[2, 3], rho=0.8)
    full = run(model, images)
    with torch.inference_mode():
        out = model.forward_head(model.forward_features(images, hidden=patch.dense_hidden(dense, images, 2), start=2))
    torch.testing.assert_close(out, full)
