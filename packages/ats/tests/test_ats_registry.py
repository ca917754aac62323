"""The paper's ATS configurations as timm names: ``timm.create_model(name)`` after ``import ats`` is ``ats.apply`` on
the dense model with the same weights (same logits, same kept tokens)."""

import pytest
import timm
import torch
from vitbench.models import load_checkpoint

import ats
from ats.options import SHIPPED
from ats.paper import MULTI
from ats.registry import METHOD_MODELS


def _same(a, b, x):
    with torch.inference_mode():
        ya, yb = a(x), b(x)
    assert torch.equal(ya, yb)
    assert all(torch.equal(p, q) for p, q in zip(a.record.kept_indices(11), b.record.kept_indices(11)))


def test_names_are_listed_and_cover_the_paper_levels():
    assert set(timm.list_models("deit_small_patch16_224_ats_*")) == {
        "deit_small_patch16_224_ats_rho1", "deit_small_patch16_224_ats_rho087", "deit_small_patch16_224_ats_rho072"}
    assert {cfg["rho"] for _, cfg in METHOD_MODELS.values()} == {1.0, 0.87, 0.72}
    assert all(cfg["stages"] == MULTI for _, cfg in METHOD_MODELS.values())


@pytest.mark.parametrize("rho_tag,rho", [("rho1", 1.0), ("rho072", 0.72)])
def test_embedded_name_equals_apply_on_the_pretrained_backbone(rho_tag, rho):
    named = timm.create_model(f"vit_digits_patch8_112_ats_{rho_tag}", pretrained=True).eval()
    applied = ats.apply(timm.create_model("vit_digits_patch8_112", pretrained=True), stages=MULTI, rho=rho).eval()
    assert named.record.config == applied.record.config
    torch.manual_seed(0)
    _same(named, applied, torch.randn(4, 3, 112, 112))


def test_embedded_name_loads_fine_tuned_weights_with_checkpoint_path():
    path = SHIPPED[0].path
    named = timm.create_model("vit_digits_patch8_112_ats_rho1", checkpoint_path=str(path)).eval()
    applied = ats.apply(load_checkpoint(timm.create_model("vit_digits_patch8_112"), path), rho=1.0).eval()
    torch.manual_seed(1)
    _same(named, applied, torch.randn(3, 3, 112, 112))


def test_deit_s_name_equals_apply_on_deit_s():
    torch.manual_seed(0)
    named = timm.create_model("deit_small_patch16_224_ats_rho087").eval()
    torch.manual_seed(0)
    applied = ats.apply(timm.create_model("deit_small_patch16_224"), stages=range(3, 12), rho=0.87).eval()
    assert named.state_dict().keys() == applied.state_dict().keys()
    assert named.pretrained_cfg["architecture"] == "deit_small_patch16_224"  # timm's data config is DeiT-S's
    torch.manual_seed(2)
    _same(named, applied, torch.randn(2, 3, 224, 224))


def test_every_backbone_name_builds_a_model_of_its_family():
    """``for_name`` (before building) and ``for_model`` (after) agree for every name a family lists, and timm's ViT
    is the family of everything else."""
    from ats import backbones

    for family in backbones.BACKBONES:
        for name in family.model_names:
            model = timm.create_model(name)
            assert backbones.for_model(model) is family is backbones.for_name(name), name
    assert backbones.for_name("vit_digits_patch8_112") is backbones.VIT
    assert backbones.for_model(timm.create_model("vit_digits_patch8_112")) is backbones.VIT
