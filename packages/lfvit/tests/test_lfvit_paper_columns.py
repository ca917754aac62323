"""The paper's numbers only beside the paper's models: DeiT-S LF-ViT (g 7) rows carry Table 2 / 7's numbers, the
embedded model's rows none (its grid is also 7, its data and model are not the paper's)."""

from vitbench.testing import result_rows

from lfvit import evaluate


def test_deit_s_rows_carry_the_papers_numbers(tmp_path):
    rows = result_rows(evaluate.main, tmp_path, "--flops-only", "--model", "deit_small_patch16_224")
    assert rows[0]["paper"]["top1"] == 79.8 and rows[1]["paper"] == {"location_top1": 76.1, "focus_top1": 80.8}


def test_embedded_rows_carry_none(tmp_path):
    rows = result_rows(evaluate.main, tmp_path, "--flops-only", "--model", "vit_digits_patch8_112")
    assert all(not r["paper"] for r in rows), rows
