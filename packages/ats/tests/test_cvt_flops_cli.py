"""``vitbench-flops --model cvt_*``: the CvT models reach vitbench through the ``vitbench.models`` entry point of
``ats`` and count themselves (``CvT.gmacs``), cross-checked against FlopCounterMode."""

import json
from importlib.metadata import entry_points

import pytest
from ats.backbones.cvt import cvt_13_224
from vitbench.flops import main

# FlopCounterMode on HF's CvtForImageClassification (no norms), and the paper's Table 1 (GFLOPs).
REFERENCE = {"cvt_13_224": (4.566, 4.5), "cvt_21_224": (7.178, 7.1), "cvt_13_384": (16.269, 16.3),
             "cvt_21_384": (24.849, 24.9)}


def test_ats_declares_its_models_to_vitbench():
    assert "ats.backbones" in [ep.value for ep in entry_points(group="vitbench.models")]


@pytest.mark.parametrize("name", REFERENCE)
def test_vitbench_flops_counts_cvt(name, tmp_path):
    dense, paper = REFERENCE[name]
    out = tmp_path / "f.json"
    assert main(["--model", name, "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["img_size"] == int(name[-3:]) and result["counted_by"] == "CvT.gmacs"
    assert result["flop_counter_gmacs"] == pytest.approx(dense, abs=6e-4)
    assert result["analytic_without_layernorm"] == pytest.approx(result["flop_counter_gmacs"], rel=1e-6)
    assert abs(result["gmacs"] / paper - 1) < 0.03


def test_vitbench_flops_takes_any_cvt_size(tmp_path, capsys):
    out = tmp_path / "f.json"
    assert main(["--model", "cvt_13_224", "--img-size", "100", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["img_size"] == 100 and abs(result["cross_check_difference"]) < 1e-9
    assert main(["--model", "cvt_13_224", "--img-size", "2", "--no-cross-check"]) == 2
    assert "--img-size must be in [8, 4096], got 2" in capsys.readouterr().err  # the flag's range, before any model
    with pytest.raises(ValueError, match="CvT cannot take 2 px"):  # the model's own check, for API callers
        cvt_13_224().gmacs(2)
