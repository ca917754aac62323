"""The paper's Life-Regression configurations as timm names: ``timm.create_model(name)`` after
``import liferegress`` is ``liferegress.apply`` on the dense model with the same weights (same logits, same kept
tokens)."""

import timm
import torch

import liferegress
from liferegress.evaluate import EMBEDDED_CHECKPOINT
from liferegress.registry import METHOD_MODELS


def _same(a, b, x):
    with torch.inference_mode():
        ya, yb = a(x), b(x)
    assert torch.equal(ya, yb)
    assert all(torch.equal(p, q) for p, q in zip(a.record.kept_indices, b.record.kept_indices))


def test_names_cover_tables_i_to_iii():
    assert {"deit_small_patch16_224_liferegress_rho07", "deit_small_patch16_224_liferegress_rho09",
            "deit_base_patch16_224_liferegress_rho07", "vit_base_patch16_224_liferegress_rho07"} <= set(
        timm.list_models("*_liferegress_*"))
    assert all(cfg["temperature"] == 1.5 for _, cfg in METHOD_MODELS.values())


def test_embedded_name_with_the_shipped_weights_equals_apply_and_load_checkpoint():
    named = timm.create_model("vit_digits_patch8_112_liferegress_rho07", checkpoint_path=str(EMBEDDED_CHECKPOINT))
    applied = liferegress.apply(timm.create_model("vit_digits_patch8_112"), keep_rate=0.7, temperature=1.5)
    liferegress.load_checkpoint(applied, EMBEDDED_CHECKPOINT)
    assert named.life_cfg == applied.life_cfg
    torch.manual_seed(0)
    _same(named.eval(), applied.eval(), torch.randn(4, 3, 112, 112))


def test_pretrained_loads_the_dense_weights():
    named = timm.create_model("vit_digits_patch8_112_liferegress_rho09", pretrained=True)
    dense = timm.create_model("vit_digits_patch8_112", pretrained=True)
    state = named.state_dict()
    assert all(torch.equal(state[k], v) for k, v in dense.state_dict().items())
    assert named.life_cfg.keep_rate == 0.9


def test_deit_s_name_equals_apply_on_deit_s():
    torch.manual_seed(0)
    named = timm.create_model("deit_small_patch16_224_liferegress_rho07").eval()
    torch.manual_seed(0)
    applied = liferegress.apply(timm.create_model("deit_small_patch16_224"), keep_rate=0.7).eval()
    assert named.state_dict().keys() == applied.state_dict().keys()
    applied.load_state_dict(named.state_dict())  # the predictor W is drawn after the backbone
    torch.manual_seed(1)
    _same(named, applied, torch.randn(2, 3, 224, 224))
