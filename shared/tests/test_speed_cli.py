import pytest
import torch

from vitbench import flops, throughput


@pytest.mark.parametrize("main", [flops.main, throughput.main], ids=["flops", "throughput"])
@pytest.mark.parametrize("argv, message", [
    (["--img-size", "113"], "not a multiple of deit_small_patch16_224's patch size 16"),
    (["--img-size", "0"], "--img-size must be in [8, 4096], got 0"),
    (["--model", "no_such_vit"], "unknown timm model 'no_such_vit'"),
    (["--model", "resnet18"], "is not a ViT"),
])
def test_bad_model_arguments_fail_in_one_line(main, argv, message, capsys):
    if main is throughput.main:
        argv = [a.replace("--model", "--models") for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"vitbench-{'flops' if main is flops.main else 'throughput'}: "
                                                   "error: ") and message in err


@pytest.mark.parametrize("argv, message", [
    (["--batch-sizes", "1", "0"], "--batch-sizes must be >= 1, got 0"),
    (["--repeats", "0"], "--repeats must be >= 1"),
    (["--dtype", "fp16", "--device", "cpu"], "fp16 autocast needs CUDA"),
    (["--baseline", "other"], "--baseline 'other' is not among"),
    (["--amp", "--dtype", "fp32", "--device", "cpu"], "give --amp or --dtype, not both"),
])
def test_throughput_rejects_bad_values_before_work(argv, message, capsys, monkeypatch):
    monkeypatch.setattr(throughput, "sweep", lambda *a, **k: pytest.fail("work started"))
    assert throughput.main(argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_throughput_refuses_cuda_without_cuda(capsys):
    assert throughput.main(["--device", "cuda"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


def test_flops_cross_check_counts_attention(tmp_path):
    out = tmp_path / "f.json"
    assert flops.main(["--model", "vit_digits_patch8_112", "--json", str(out)]) == 0
    import json

    result = json.loads(out.read_text())
    assert abs(result["cross_check_difference"]) < 0.01 and "attention included" in result["cross_check_counts"]
    geom = flops.ViTGeometry.from_model(flops.create_vit("vit_digits_patch8_112"))
    no_attention = result["analytic_without_layernorm"] - geom.depth * 2 * geom.num_tokens**2 * geom.dim / 1e9
    assert result["flop_counter_gmacs"] > no_attention + 0.5 * (result["analytic_without_layernorm"] - no_attention)


def test_sweep_reports_syncs_per_batch_size():
    rows = throughput.sweep({"a": torch.nn.Linear(4, 4), "b": lambda x: x[x > 0]}, lambda b: torch.randn(b, 4),
                            [1, 3], warmup=0, repeats=1)
    assert [(r["name"], r["batch_size"], r["syncs"]) for r in rows] == [("a", 1, 0), ("b", 1, 1), ("a", 3, 0),
                                                                       ("b", 3, 1)]
    assert all(r["cuda_ms"] is None and r["peak_mib"] is None and r["dtype"] == "fp32" for r in rows)


def test_bf16_precision_context_on_cpu():
    with throughput.precision(torch.device("cpu"), "bf16"):
        assert torch.nn.Linear(4, 4)(torch.randn(2, 4)).dtype == torch.bfloat16
    with pytest.raises(ValueError):
        throughput.precision(torch.device("cpu"), "fp8")
