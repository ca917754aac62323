"""EViT through the commands: ``vitbench-flops`` / ``ats-eval --flops-only --model evit_*`` (Table A.5's numbers
beside the data-free counts, both K rules), ``ats-train`` building EViT and EViT + ATS, and one-line errors."""

import json

import pytest
import torch
from ats import train
from ats.backbones import evit
from ats.evaluate import main as ats_eval
from safetensors.torch import save_file
from vitbench.engine import TrainConfig
from vitbench.flops import main as flops_main
from vitbench.testing import result_rows


def test_vitbench_flops_counts_evit(tmp_path):
    out = tmp_path / "f.json"
    assert flops_main(["--model", "evit_deit_small_patch16_224", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["counted_by"] == "EViT.gmacs" and abs(result["gmacs"] / 3.0 - 1) < 0.02
    assert abs(result["cross_check_difference"]) < 1e-9 and result["flop_counter_gmacs"] == pytest.approx(3.029,
                                                                                                         abs=5e-4)


@pytest.mark.parametrize("rule, bound", [("evit", 2.583), ("compound", 2.154)])
def test_flops_only_rows_with_table_a5(tmp_path, rule, bound):
    argv = ["--flops-only", "--model", "evit_deit_small_patch16_224", "--k-rule", rule]
    rows = {r["label"]: r for r in result_rows(ats_eval, tmp_path, *argv)}
    dense = rows["dense"]
    assert dense["paper"] == {"top1": 79.5, "gflops": 3.0} and dense["gflops"] == pytest.approx(3.0355, abs=1e-3)
    series = f"ATS k-rule {rule}"
    at = rows[f"{series} off-the-shelf rho 0.7 @ 4,5,7,8,10,11"]
    assert at["gflops"] == pytest.approx(bound, abs=5e-4) and at["setting"]["k_rule"] == rule
    assert rows[f"{series} fine-tuned rho 0.7 @ 4,5,7,8,10,11"]["paper"] == {"top1": 79.5, "gflops": 2.5}
    assert rows[f"{series} off-the-shelf rho 1 @ 4,5,7,8,10,11"]["gflops"] == pytest.approx(dense["gflops"],
                                                                                             rel=0.01)


@pytest.mark.parametrize("argv, message", [
    (["--baselines", "evit", "--model", "deit_small_patch16_224"], "--baselines evit runs on the embedded default "
     "only (no --model, --checkpoint or --flops-only); for EViT on ImageNet give --model evit_deit_small_patch16_224"),
    (["--flops-only", "--model", "evit_deit_small_patch16_224", "--stages", "2-4"],
     "ATS cannot sample in EViT's reorganising blocks [3]; choose among the others"),
])
def test_bad_evit_input_is_one_line(argv, message, capsys, tmp_path):
    assert ats_eval([*argv, "--output-dir", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.strip() == f"ats-eval: error: {message}"


def test_a_foreign_checkpoint_is_refused_by_name(capsys, tmp_path):
    model = evit.EViT(img_size=112, patch_size=8, embed_dim=64, depth=12, num_heads=2, num_classes=10)
    path = tmp_path / "w.safetensors"
    save_file({**model.state_dict(), "dist_token": torch.zeros(1, 1, 64)}, str(path))
    assert ats_eval(["--model", "evit_digits_patch8_112", "--checkpoint", str(path), "--output-dir",
                     str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"ats-eval: error: checkpoint {path} does not fit EViT: not an EViT / DeiT state dict: unknown "
                   "keys ['dist_token'], missing keys []")


def test_ats_train_builds_evit_and_evit_ats(tmp_path):
    weights = tmp_path / "w.safetensors"
    save_file(evit.EViT(img_size=112, patch_size=8, embed_dim=64, depth=12, num_heads=2,
                        num_classes=10).state_dict(), str(weights))
    argv = ["--model", "evit_digits_patch8_112", "--checkpoint", str(weights), "--cpu"]
    ns = train.build_parser().parse_args([*argv, "--no-ats"])
    plain = train.build_model(TrainConfig.from_args(ns), train.ats_config_from_args(ns))
    assert isinstance(plain, evit.EViT) and not hasattr(plain, "record")
    ns = train.build_parser().parse_args([*argv, "--rho", "0.7"])
    cfg = train.ats_config_from_args(ns)
    assert cfg.stages == evit.STAGES
    model = train.build_model(TrainConfig.from_args(ns), cfg)
    assert model.record.config.k == (98, 98, 70, 70, 50, 50)  # Table A.5 on the embedded 14 x 14 + CLS


def test_baselines_rows_on_the_shipped_weights():
    from ats.baselines import evit_settings
    from ats.evaluate import SharedBlocks

    shared = SharedBlocks({})
    rows = evit_settings(shared, "evit", 0, None)
    assert [s.label for s in rows] == ["EViT off-the-shelf keep 0.7", "EViT fine-tuned keep 0.7",
                                       "EViT + ATS off-the-shelf rho 0.7", "EViT + ATS fine-tuned rho 0.7"]
    assert rows[0].gflops == pytest.approx(rows[1].gflops) and rows[2].gflops < rows[1].gflops
    assert rows[2].params["k"] == [98, 98, 70, 70, 50, 50] and rows[3].model.record.config.stages == evit.STAGES
    assert set(shared.depths) == {"evit:backbone", "evit:fine-tuned", "evit:ats"}
    x = torch.zeros(2, 3, 112, 112)
    with torch.no_grad():  # the EViT row's shared-blocks step is the model's own forward
        logits, _ = rows[1].step(x, None, torch.arange(2))
        assert torch.allclose(logits, rows[1].model(x), atol=1e-5)
