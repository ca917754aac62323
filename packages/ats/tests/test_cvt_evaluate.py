"""``ats-eval`` and ``ats-train`` on CvT (Table 1): data-free rows with Table 1's numbers, an end-to-end run on a
random CvT (HF-layout dense checkpoint, an ``ats-train`` output as the fine-tuned weights) and one-line errors."""

import pytest
import timm
import torch
from safetensors.torch import save_file
from vitbench.evaluation import EvalConfig
from vitbench.models import save_weights
from vitbench.testing import one_line_error, result_rows

import ats  # noqa: F401  (registers the CvT models with timm)
from ats import evaluate, options, train
from ats.backbones import cvt, linear_variant, load_weights
from ats.options import SHIPPED_ATS, ATSEvalConfig
from ats.paper import DENSE, FINETUNED

DEIT_NUMBERS = {*DENSE.values(), *FINETUNED[1.0].values(), 79.2, 3.0}


def test_flops_only_cvt_13_rows_and_table1_numbers(tmp_path):
    rows = result_rows(evaluate.main, tmp_path, "--flops-only", "--model", "cvt_13_224")
    assert [r["label"] for r in rows] == [
        "dense", "dense linear stage 3", "ATS off-the-shelf rho 1 @ 0-8", "ATS off-the-shelf rho 0.87 @ 0-8",
        "ATS off-the-shelf rho 0.72 @ 0-8", "ATS fine-tuned rho 1 @ 0-8"]
    dense, linear, *ats_rows = rows
    assert dense["gflops"] == pytest.approx(4.585, abs=1e-3) and linear["gflops"] == pytest.approx(5.228, abs=1e-3)
    assert dense["paper"] == {"top1": 81.6, "gflops": 4.5}
    assert ats_rows[-1]["paper"] == {"top1": 81.4, "gflops": 3.2}
    assert all(not r["paper"] for r in [linear, *ats_rows[:-1]])
    assert all(r["setting"]["stages"] == list(range(9)) for r in ats_rows)
    assert ats_rows[0]["gflops"] == ats_rows[-1]["gflops"] > ats_rows[1]["gflops"] > ats_rows[2]["gflops"]
    assert all(r["extra"]["gflops_upper_bound"] == r["gflops"] for r in ats_rows)
    assert not DEIT_NUMBERS & {v for r in rows for v in r["paper"].values()}


def test_flops_only_cvt_stages_and_k_are_stage_local(tmp_path):
    rows = result_rows(evaluate.main, tmp_path, "--flops-only", "--model", "cvt_21_384", "--stages", "2", "--k", "100")
    assert [r["label"] for r in rows] == ["dense", "dense linear stage 3", "ATS rho 1 @ 2", "ATS K 100 @ 2"]
    assert rows[0]["paper"] == {"top1": 83.3, "gflops": 24.9} and not rows[2]["paper"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A dense random cvt_digits_112 in the HF layout and a 2-step ``ats-train`` output (linear stage 3, ATS)."""
    root = tmp_path_factory.mktemp("cvt")
    torch.manual_seed(0)
    dense = timm.create_model("cvt_digits_112", img_size=56)
    hf = root / "dense_hf.safetensors"
    save_file({cvt.official_to_hf(k): v.contiguous() for k, v in dense.state_dict().items()}, str(hf))
    out = root / "train"
    assert train.main(["--model", "cvt_digits_112", "--img-size", "56", "--cpu", "--max-steps", "2", "--batch-size",
                       "4", "--limit-train", "8", "--limit-val", "4", "--num-workers", "0", "--checkpoint", str(hf),
                       "--output-dir", str(out)]) == 0
    return hf, out / "model.safetensors"


def test_ats_train_output_is_a_linear_cvt_with_ats_in_stage_3(trained):
    _, ft = trained
    model = load_weights(timm.create_model("cvt_digits_112", projection="linear"), ft)
    assert model.projection == "linear"
    cfg = train.TrainConfig(model="cvt_digits_112")
    assert train.build_model(cfg, train.ATSTrainConfig(stages=None)).projection == "dw_bn"
    assert train.ats_config_from_args(train.build_parser().parse_args(["--model", "cvt_13_224"])).stages == cvt.STAGES


def test_end_to_end_with_an_hf_checkpoint_and_finetuned_weights(tmp_path, trained):
    hf, ft = trained
    rows = result_rows(evaluate.main, tmp_path, "--model", "cvt_digits_112", "--img-size", "56", "--checkpoint",
                       str(hf), "--finetuned", str(ft), "--rho", "0.8", "--limit", "6", "--batch-size", "6",
                       "--num-workers", "0", "--no-throughput", "--visualize", "0")
    assert [r["label"] for r in rows] == [
        "dense", "dense linear stage 3", "ATS off-the-shelf rho 1 @ 0-8", "ATS off-the-shelf rho 0.8 @ 0-8",
        "ATS fine-tuned rho 1 @ 0-8", "ATS fine-tuned rho 0.8 @ 0-8"]
    assert all(r["images"] == 6 and r["top1"] is not None for r in rows)
    assert all(not r["paper"] for r in rows)  # no paper numbers for the embedded CvT, DeiT-S's least of all
    assert rows[3]["gflops"] < rows[1]["gflops"] and rows[4]["setting"]["weights_file"] == "model.safetensors"
    assert set(rows[3]["figures"]) == {"histogram", "tokens"}
    assert rows[3]["extra"]["tokens_out_max"][-1] <= 50  # stage 3 at 56 px: 7 x 7 + CLS


def test_linear_variant_folds_the_given_weights():
    torch.manual_seed(0)
    dense = timm.create_model("cvt_digits_112", img_size=56).eval()
    ref = cvt.load_cvt_state(timm.create_model("cvt_digits_112", img_size=56, projection="linear"), dense.state_dict())
    linear = linear_variant(dense)
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        torch.testing.assert_close(linear(x), ref.eval()(x))
    assert linear_variant(linear) is linear


def test_shipped_cvt_weights_or_one_status_line(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(options, "WEIGHTS", tmp_path)
    cfg, opts = EvalConfig(model="cvt_digits_112"), ATSEvalConfig()
    runs = (evaluate.Run(cvt.STAGES, 1.0),)
    assert evaluate.finetuned_plans(cfg, opts, runs) == []
    assert "cvt_digits_112_ats.safetensors" in capsys.readouterr().err
    (tmp_path / SHIPPED_ATS["cvt_digits_112"].file).write_bytes(b"")
    assert [p.name for p, _ in evaluate.finetuned_plans(cfg, opts, runs)] == ["cvt_digits_112_ats.safetensors"]
    assert evaluate.finetuned_plans(cfg, opts, (evaluate.Run((2,), 1.0),)) == []
    one_line_error(evaluate.main, ["--model", "cvt_digits_112", "--output-dir", str(tmp_path / "o")], capsys,
                   "not shipped yet")


@pytest.mark.parametrize("argv,match", [
    (["--flops-only", "--stages", "12"], "stage-3 blocks 0..9"),
    (["--flops-only", "--k", "500"], "exceeds the 197 tokens"),
    (["--flops-only", "--preset", "table1"], "DeiT-S configuration"),
    ([], "give --checkpoint PATH"),
    (["--pretrained"], "give --checkpoint PATH"),
])
def test_bad_cvt_input_is_one_line(argv, match, capsys, tmp_path):
    one_line_error(evaluate.main, ["--model", "cvt_13_224", *argv, "--output-dir", str(tmp_path / "o")], capsys,
                   match)


def test_a_linear_checkpoint_is_refused_as_the_dense_cvt(capsys, tmp_path):
    path = save_weights(timm.create_model("cvt_digits_112", projection="linear"), tmp_path / "lin.safetensors")
    one_line_error(evaluate.main, ["--model", "cvt_digits_112", "--checkpoint", str(path), "--output-dir",
                                   str(tmp_path / "o")], capsys, "linear stage 3")
