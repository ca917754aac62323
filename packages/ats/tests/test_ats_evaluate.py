
import pytest
import torch
import vitbench
from vitbench.evaluation import EvalConfig
from vitbench.models import save_weights
from vitbench.testing import common_eval_options, image_folder, one_line_error, read_valid_result

from ats import evaluate, options
from ats.options import SHIPPED, ATSEvalConfig
from ats.paper import LATE, MULTI


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    model = vitbench.create_model("vit_digits_patch8_112", img_size=56)
    return str(save_weights(model, tmp_path_factory.mktemp("w") / "w.safetensors"))


def _small(tmp_path, *extra):
    return ["--img-size", "56", "--limit", "12", "--batch-size", "6", "--num-workers", "0", "--repeats", "1",
            "--warmup", "0", "--throughput-batch", "4", "--output-dir", str(tmp_path / "eval"), *extra]


def test_common_options_are_vitbench_s():
    import argparse

    from vitbench.evaluation import add_eval_args

    assert common_eval_options(evaluate.build_parser()) == common_eval_options(add_eval_args(argparse.ArgumentParser()))
    assert "{'option_strings'" not in evaluate.build_parser().format_help()  # no argparse formatting garbage


def test_flops_only_json_has_the_schema(tmp_path):
    out = tmp_path / "f.json"
    assert evaluate.main(["--flops-only", "--model", "deit_small_patch16_224", "--stages", "3", "--k", "48",
                          "--json", str(out), "--output-dir", str(tmp_path / "o")]) == 0
    rows = read_valid_result(out)["rows"]
    assert [r["method"] for r in rows] == ["dense", "ats"] and rows[1]["setting"]["k"] == 48
    assert rows[0]["gflops"] == pytest.approx(4.608, abs=1e-3) and rows[1]["gflops"] == pytest.approx(2.05, abs=0.01)
    assert rows[1]["top1"] is None and rows[1]["img_s"] is None and rows[1]["ideal_speedup"] > 2


def test_sweep_with_finetuned_weights_in_one_run(tmp_path, ckpt):
    """Off-the-shelf and "fine-tuned" rows (here a copy of the weights) in one invocation and one timing run."""
    argv = _small(tmp_path, "--checkpoint", ckpt, "--finetuned", ckpt, "--rho", "1", "0.7", "--visualize", "0",
                  "--json", str(tmp_path / "r.json"))
    assert evaluate.main(argv) == 0
    res = read_valid_result(tmp_path / "r.json")
    dense, *ats = res["rows"]
    assert [r["series"] for r in ats] == ["ATS off-the-shelf"] * 2 + ["ATS fine-tuned"] * 2
    assert dense["images"] == 12 and ats[1]["gflops"] < ats[0]["gflops"] < dense["gflops"]
    assert ats[0]["top1"] == ats[2]["top1"] and ats[0]["gflops"] == ats[2]["gflops"]  # same weights, same numbers
    assert all(r["img_s"] > 0 and r["speedup_spread"][0] <= r["speedup"] <= r["speedup_spread"][1] for r in ats)
    assert dense["speedup"] == 1.0 and ats[1]["ideal_speedup"] == pytest.approx(dense["gflops"] / ats[1]["gflops"])
    assert 0 <= ats[1]["extra"]["on_object"] <= 100 and 0 < ats[1]["extra"]["on_object_random"] < 100
    for row in ats:
        assert set(row["figures"]) == {"histogram", "tokens"}
        assert all((tmp_path / "eval" / f.split("/")[-1]).is_file() for f in row["figures"].values())
    assert (tmp_path / "eval" / "accuracy_vs_gflops.png").is_file()
    # a second run into the same folder removes the first run's figures
    assert evaluate.main(_small(tmp_path, "--checkpoint", ckpt, "--rho", "0.5", "--visualize", "--no-throughput")) == 0
    assert sorted(p.name for p in (tmp_path / "eval").glob("hist_*")) == ["hist_ATS_rho_0.5.png"]


def test_shared_blocks_run_each_dense_block_once_per_batch_and_weights():
    from ats.patch import dense_hidden
    from vitbench.testing import tiny_vit

    model, other = tiny_vit(), tiny_vit()
    calls = []
    for name, m in (("model", model), ("other", other)):
        for i, blk in enumerate(m.blocks):
            blk.register_forward_hook(lambda *_, key=(name, i): calls.append(key))
    x, index = torch.randn(2, 3, 56, 56), torch.tensor([0, 1])
    shared = evaluate.SharedBlocks({"": {3, 7}, "ft": {3}})
    with torch.inference_mode():
        full = shared.hidden("", model, x, index, 12)  # the dense row: keeps the states after blocks 3 and 7
        assert torch.equal(shared.hidden("", model, x, index, 3), dense_hidden(model, x, 3))
        assert torch.equal(shared.hidden("", model, x, index, 7), dense_hidden(model, x, 7))
        assert torch.equal(full, dense_hidden(model, x, 12))
        shared.hidden("ft", other, x, index, 3)
        shared.hidden("ft", other, x, index, 3)
        shared.hidden("", model, x, torch.tensor([2, 3]), 3)  # a new batch starts afresh
    assert calls[:12] == [("model", i) for i in range(12)]
    assert calls[12:34] == [("model", i) for i in range(3)] + [("model", i) for i in range(7)] + [
        ("model", i) for i in range(12)]  # the direct dense_hidden calls above
    assert calls[34:] == [("other", i) for i in range(3)] + [("model", i) for i in range(3)]


def test_no_finetuned_weights_says_so(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(options, "WEIGHTS", tmp_path)
    assert evaluate.finetuned_plans(EvalConfig(), ATSEvalConfig()) == []
    err = capsys.readouterr().err
    assert all(f"({w.file}); its fine-tuned rows skipped" in err for w in SHIPPED)


def test_shipped_weights_run_at_their_own_placement(monkeypatch, tmp_path):
    """No arguments: each shipped file at the runs it was trained for; with --stages/--rho only the files trained
    at those stages, at the requested rhos; with --checkpoint (another model's weights) none."""
    monkeypatch.setattr(options, "WEIGHTS", tmp_path)
    for w in SHIPPED:
        (tmp_path / w.file).write_bytes(b"")
    plans = evaluate.finetuned_plans(EvalConfig(), ATSEvalConfig())
    assert [(p.name, [(r.stages, r.k) for r in runs]) for p, runs in plans] == [
        ("vit_digits_patch8_112_ats.safetensors", [(MULTI, 1.0)]),
        ("vit_digits_patch8_112_ats_7-11.safetensors", [(LATE, k) for k in (1.0, 0.87, 0.72)])]
    late = evaluate.finetuned_plans(EvalConfig(), ATSEvalConfig(stages=LATE, rho=(0.5,)))
    assert [(p.name, [(r.stages, r.k) for r in runs]) for p, runs in late] == [
        ("vit_digits_patch8_112_ats_7-11.safetensors", [(LATE, 0.5)])]
    assert evaluate.finetuned_plans(EvalConfig(checkpoint="w.safetensors"), ATSEvalConfig()) == []
    runs = ATSEvalConfig().runs(embedded=True)
    assert [r.point for r in runs] == ["rho 1", "rho 0.87", "rho 0.72", "rho 1"]
    assert [r.series_for("fine-tuned") for r in runs[-1:]] == ["ATS fine-tuned @ 7-11"]


def test_three_classes_image_folder(tmp_path):
    torch.manual_seed(0)
    ckpt = save_weights(vitbench.create_model("vit_digits_patch8_112", img_size=56, num_classes=3),
                        tmp_path / "c3.safetensors")
    data = image_folder(tmp_path / "folder")
    argv = _small(tmp_path, "--data", f"imagefolder:{data}", "--num-classes", "3", "--checkpoint", str(ckpt),
                  "--json", str(tmp_path / "r.json"))
    assert evaluate.main(argv) == 0
    res = read_valid_result(tmp_path / "r.json")
    assert res["data"]["images"] == 6 and all(r["images"] == 6 for r in res["rows"])


@pytest.mark.parametrize("argv,match", [
    (["--rho", "1.5"], "--rho must be in (0, 1], got 1.5"),
    (["--rho", "0.5", "--k", "10"], "not both"),
    (["--stages", "3-x"], "cannot parse stages"),
    (["--stages", "12"], "blocks 0..11"),
    (["--stages", "3,3"], "distinct"),
    (["--k", "nan"], "--k must be >= 2, got nan"),
    (["--k", "10000"], "exceeds the 197 tokens"),
    (["--data", "foo:/x"], "cannot parse data spec"),
    (["--img-size", "113"], "not a multiple of the patch size 8"),
    (["--limit", "0"], "--limit must be >= 1"),
    (["--device", "tpu"], "--device"),
    (["--model", "no_such_model"], "unknown model"),
    (["--model", "deit_tiny_patch16_224", "--pretrained"], "--checkpoint PATH"),
    (["--checkpoint", "/nonexistent/w.safetensors"], "not found"),
])
def test_bad_input_is_one_line(argv, match, capsys, tmp_path):
    one_line_error(evaluate.main, [*argv, "--output-dir", str(tmp_path / "o")], capsys, match)


def test_bad_checkpoint_files_and_outputs(capsys, tmp_path):
    (tmp_path / "zero.safetensors").write_bytes(b"")
    one_line_error(evaluate.main, ["--checkpoint", str(tmp_path / "zero.safetensors")], capsys, "not a valid")
    (tmp_path / "file").write_text("x")
    one_line_error(evaluate.main, ["--output-dir", str(tmp_path / "file" / "sub")], capsys, "not writable")
    one_line_error(evaluate.main, ["--output-dir", str(tmp_path / "o"), "--json", str(tmp_path / "o" / "results.json")],
                   capsys, "would replace")
