"""ATS in PS-ViT's transformer module (ats.backbones.psvit.apply): the paper's default layers, the data-free bounds
and ``ats-eval``. The image ViT's semantics on PS-ViT's sampled tokens (batch invariance, per-image FLOPs against
FlopCounterMode, ...) are tested with every backbone's in test_backbones_ats.py, on :func:`tiny_psvit`."""


import pytest
import torch
from vitbench.testing import one_line_error, result_rows

import ats
from ats import evaluate
from ats.backbones import psvit
from ats.flops import dense_gmacs, upper_bound_gmacs



def tiny_psvit(seed: int = 0) -> psvit.PSViT:
    """A small PS-ViT (64 px, 6 x 6 points + CLS, 4 sampling iterations, 5 transformer layers, width 32) with random
    weights, offsets on and attention peaked enough for ATS to drop tokens."""
    torch.manual_seed(seed)
    model = psvit.PSViT(img_size=64, num_points=6, num_classes=10, depth=9, embed_dim=32, num_heads=2,
                        stem_widths=(8, 16), stem_inner=8).eval()
    with torch.no_grad():
        for blk in model.blocks:
            blk.attn.qkv.weight.mul_(4.0)
        for layer in model.ps_layers[:-1]:
            torch.nn.init.normal_(layer.offset_layer.weight, std=0.2)
    return model


def test_default_layers_are_the_papers_and_psvit_is_dispatched():
    model = ats.apply(psvit.PSViT(img_size=64, num_points=4, depth=14, embed_dim=32, num_heads=2,
                                  stem_widths=(8, 16), stem_inner=8), rho=0.9)
    assert model.record.config.stages == tuple(range(1, 10)) == psvit.STAGES
    assert isinstance(model, psvit.ATSPSViT) and isinstance(model, psvit.PSViT)
    with pytest.raises(ValueError, match="stages"):
        ats.apply(tiny_psvit(), stages=[5])


# ------------------------------------------------------------------------------------------------- data-free, ats-eval
def test_data_free_bounds_of_the_full_models():
    """Dense and ATS upper bounds in layers 1..9 (every ATS layer keeps K_n), LayerNorm and BatchNorm counted."""
    expected = {"psvit_b14_224": (5.402, 5.403, 4.063, 3.347), "psvit_b18_224": (8.770, 8.771, 6.385, 5.141)}
    for name, (dense, *bounds) in expected.items():
        geom = psvit.PSViTGeometry(num_points=psvit.PSVIT_MODELS[name][0]["num_points"])
        assert dense_gmacs(geom) == pytest.approx(dense, abs=1e-3)
        for rho, bound in zip((1.0, 0.87, 0.72), bounds):
            config = ats.ATSConfig(psvit.STAGES, (rho,) * 9)
            assert upper_bound_gmacs(geom, config) == pytest.approx(bound, abs=1e-3)


def test_flops_only_psvit_rows_and_table1_numbers(tmp_path):
    rows = result_rows(evaluate.main, tmp_path, "--flops-only", "--model", "psvit_b14_224")
    assert [r["label"] for r in rows] == [
        "dense", *(f"ATS off-the-shelf rho {r} @ 1-9" for r in ("1", "0.87", "0.72")), "ATS fine-tuned rho 1 @ 1-9"]
    dense, *ats_rows = rows
    assert dense["gflops"] == pytest.approx(5.402, abs=1e-3) and dense["paper"] == {"top1": 81.7, "gflops": 5.4}
    assert ats_rows[-1]["paper"] == {"top1": 81.5, "gflops": 3.7}
    assert all(not r["paper"] for r in ats_rows[:-1])
    assert [round(r["gflops"], 3) for r in ats_rows] == [5.403, 4.063, 3.347, 5.403]
    assert all(r["setting"]["stages"] == list(range(1, 10)) for r in ats_rows)


@pytest.mark.parametrize("argv,match", [
    (["--flops-only", "--stages", "10"], "transformer-module layers 0..9"),
    ([], "give --checkpoint PATH"),
])
def test_bad_psvit_input_is_one_line(argv, match, capsys, tmp_path):
    one_line_error(evaluate.main, ["--model", "psvit_b18_224", *argv, "--output-dir", str(tmp_path / "o")], capsys,
                   match)


def test_a_foreign_checkpoint_is_refused_by_key_name(capsys, tmp_path):
    from safetensors.torch import save_file  # test-only dependency of the file format

    path = tmp_path / "deit.safetensors"
    save_file({"blocks.0.attn.qkv.weight": torch.zeros(3, 3)}, str(path))
    one_line_error(evaluate.main, ["--model", "psvit_b14_224", "--checkpoint", str(path), "--output-dir",
                                   str(tmp_path / "o")], capsys, "unknown keys ['blocks.0.attn.qkv.weight']")
    save_file({"point_coord": torch.zeros(1, 324, 2)}, str(path))  # B/18's points
    line = one_line_error(evaluate.main, ["--model", "psvit_b14_224", "--checkpoint", str(path), "--output-dir",
                                          str(tmp_path / "o")], capsys, "does not fit PSViT")
    assert "shapes ['point_coord: checkpoint (1, 324, 2) vs model (1, 196, 2)']" in line
