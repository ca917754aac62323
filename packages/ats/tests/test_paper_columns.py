"""The paper's numbers appear only beside the model and setting the paper reports them for: DeiT-S's ATS settings
on DeiT-S at 224 px, Table 1's dense rows on their own model (DeiT-S, DeiT-B, CvT), nothing on DeiT-T, ViT-S or the
embedded backbone."""

import pytest
from vitbench.testing import read_valid_result, result_rows

from ats import evaluate
from ats.paper import DENSE_MODELS, dense_paper, reports_deit_s

DEIT_S_NUMBERS = {79.8, 4.6, 79.2, 3.0, 79.7, 2.9}


def _rows(tmp_path, capsys, *argv):
    return result_rows(evaluate.main, tmp_path, "--flops-only", *argv), capsys.readouterr().out


def test_deit_s_rows_carry_the_papers_numbers(tmp_path, capsys):
    rows, out = _rows(tmp_path, capsys, "--model", "deit_small_patch16_224")
    assert rows[0]["paper"] == {"top1": 79.8, "gflops": 4.6}
    assert rows[1]["setting"]["rho"] == 1 and rows[1]["paper"] == {"top1": 79.2, "gflops": 3.0}
    assert "paper top1" in out and "79.2" in out


@pytest.mark.parametrize("model", ["deit_base_patch16_224", "deit_tiny_patch16_224", "vit_small_patch16_224"])
def test_other_models_never_show_deit_s_numbers(tmp_path, capsys, model):
    rows, out = _rows(tmp_path, capsys, "--model", model, "--rho", "1")
    assert all(not r["paper"] for r in rows[1:]), rows
    assert not DEIT_S_NUMBERS & {v for r in rows for v in r["paper"].values()}
    if model == "deit_base_patch16_224":  # Table 1's DeiT-Base/16 row, dense only
        assert rows[0]["paper"] == {"top1": 81.8, "gflops": 17.6}
    else:
        assert not rows[0]["paper"] and "paper" not in out


def test_deit_s_table1_preset_keeps_its_numbers_but_not_at_another_size(tmp_path, capsys):
    rows, _ = _rows(tmp_path, capsys, "--model", "deit_small_patch16_224", "--preset", "table1")
    assert rows[-1]["paper"] == {"top1": 79.7, "gflops": 2.9}
    rows, _ = _rows(tmp_path, capsys, "--model", "deit_small_patch16_224", "--img-size", "112", "--rho", "1")
    assert all(not r["paper"] for r in rows)


def test_the_lookup_is_by_architecture_not_by_name_prefix():
    assert dense_paper("deit_small_patch16_224.fb_in1k") == {"top1": 79.8, "gflops": 4.6}
    assert dense_paper("cvt_13_384") == {"top1": 83.0, "gflops": 16.3}
    assert dense_paper("cvt_13_384", img_size=224) == {}
    assert dense_paper("cvt_digits_112") == {} and dense_paper("deit_tiny_patch16_224") == {}
    assert reports_deit_s("deit_small_patch16_224") and not reports_deit_s("deit_base_patch16_224")
    assert not reports_deit_s("vit_digits_patch8_112") and set(DENSE_MODELS) >= {"deit_small_patch16_224"}


def test_the_embedded_default_rows_carry_no_paper_numbers(tmp_path, capsys):
    out = tmp_path / "r.json"  # the no-argument configuration (the embedded backbone and its shipped weights), bounded
    assert evaluate.main(["--limit", "8", "--no-throughput", "--num-workers", "0", "--visualize", "--json", str(out),
                          "--output-dir", str(tmp_path / "o")]) == 0
    rows = read_valid_result(out)["rows"]
    assert any(r["setting"].get("weights") == "fine-tuned" for r in rows)
    assert all(not r["paper"] for r in rows), [(r["label"], r["paper"]) for r in rows]
    assert "paper" not in capsys.readouterr().out
